"""A fingerprint of a run's data: what a resume checks it is given the data the run began on.

``sha256`` over every source's training data (a tensor pair in full; a map-style dataset by its
length and its first and last examples; a re-iterable of batches by its first batch), guard
pair and test pair: each tensor's dtype, shape and bytes. Cheap next to training (one pass
over the tensors), and other values, fewer rows or another dtype all give another fingerprint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import default_collate

from selfmod.data.streams import IndexedBatches, IterableBatches


def _feed(h: Any, x: Any) -> None:
    """Hash ``x``: tensors by dtype, shape and bytes; containers item by item; else its type
    and ``repr`` (numbers, strings)."""
    if isinstance(x, Tensor):
        t = x.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the bytes, not a copy of them
    elif isinstance(x, dict):
        h.update(f"dict {len(x)};".encode())
        for k in sorted(x, key=str):
            h.update(f"{k!s};".encode())
            _feed(h, x[k])
    elif isinstance(x, list | tuple):
        h.update(f"seq {len(x)};".encode())
        for v in x:
            _feed(h, v)
    else:
        h.update(f"{type(x).__name__} {x!r};".encode())


def _train(train: Any) -> Any:
    """What of a training stream is fingerprinted (see the module docstring)."""
    if isinstance(train, IndexedBatches):
        data = train.data
        if isinstance(data, tuple):
            return data
        n = len(train)
        return [n, default_collate([data[0]]) if n else None, default_collate([data[n - 1]])]
    if isinstance(train, IterableBatches):  # its first batch, drawn as the run draws it
        with torch.random.fork_rng(devices=[]):  # a shuffling loader draws from torch's RNG
            torch.manual_seed(train.seed)
            return IterableBatches(train.batches, train.seed, train.source).next(0)
    return None  # the step-level API: batches come from the caller, step by step


def fingerprint(sources: Sequence[Any]) -> str:
    """``sha256:<hex>`` of the sources' data (:class:`~selfmod.introspect.feed.Source`)."""
    h = hashlib.sha256()
    for s in sources:
        for part in (_train(s.train), s.guard_x, s.guard_y, s.test_x, s.test_y):
            _feed(h, part)
    return f"sha256:{h.hexdigest()}"
