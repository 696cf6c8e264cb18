"""A fingerprint of a run's data: what a resume checks it is given the data the run began on.

``sha256`` over every source's training data (a tensor pair; a map-style dataset by its length
and its first and last examples; a re-iterable of batches by its first batch), guard pair and
test pair: each tensor's dtype, shape and bytes. A tensor of at most :data:`WHOLE_BYTES` is
hashed whole; a larger one by that many bytes of rows, evenly spaced from its first to its last
(``scheme`` ``"sha256-rows"``), so the fingerprint costs a few milliseconds whatever the data's
size, and a tensor on an accelerator copies only those rows to the host. Another dataset,
another order of the rows, fewer rows, another shape or dtype give another fingerprint; a
value changed in a row outside the sample of a large tensor does not. A fingerprint recorded
whole (``"sha256"``, before the sample) is checked whole (:func:`fingerprint`'s ``like``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import default_collate

from selfmod.data.streams import IndexedBatches, IterableBatches

#: bytes of a tensor hashed at most (its rows evenly spaced, first and last included)
WHOLE_BYTES = 1 << 22
#: the schemes: every tensor whole, or at most :data:`WHOLE_BYTES` of it
SCHEMES = ("sha256", "sha256-rows")


def sampled_rows(t: Tensor, budget: int | None = None) -> Tensor:
    """``t`` itself if it holds at most ``budget`` bytes (default :data:`WHOLE_BYTES`), else
    ``k >= 2`` of its rows (along dim 0) evenly spaced from the first to the last, ``k`` as many
    as ``budget`` holds."""
    budget = WHOLE_BYTES if budget is None else budget
    nbytes = t.numel() * t.element_size()
    if nbytes <= budget or t.dim() == 0 or len(t) <= 2:
        return t
    k = min(len(t), max(2, budget // max(nbytes // len(t), 1)))
    return t[torch.linspace(0, len(t) - 1, k, device=t.device).round().long()]


def _feed(h: Any, x: Any, whole: bool) -> None:
    """Hash ``x``: tensors by dtype, shape and bytes (``whole``: all of them, else
    :func:`sampled_rows`); containers item by item; else its type and ``repr`` (numbers,
    strings)."""
    if isinstance(x, Tensor):
        h.update(f"tensor {x.dtype} {tuple(x.shape)};".encode())
        t = (x if whole else sampled_rows(x)).detach().cpu().contiguous()
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the bytes, not a copy of them
    elif isinstance(x, dict):
        h.update(f"dict {len(x)};".encode())
        for k in sorted(x, key=str):
            h.update(f"{k!s};".encode())
            _feed(h, x[k], whole)
    elif isinstance(x, list | tuple):
        h.update(f"seq {len(x)};".encode())
        for v in x:
            _feed(h, v, whole)
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


def fingerprint(sources: Sequence[Any], like: str | None = None) -> str:
    """``<scheme>:<hex>`` of the sources' data (:class:`~selfmod.introspect.feed.Source`):
    ``"sha256-rows"``, or the scheme of the recorded fingerprint ``like`` where it names
    another of :data:`SCHEMES` (a run recorded before the sample is checked whole)."""
    scheme = like.partition(":")[0] if isinstance(like, str) else ""
    scheme = scheme if scheme in SCHEMES else "sha256-rows"
    h = hashlib.sha256()
    for s in sources:
        for part in (_train(s.train), s.guard_x, s.guard_y, s.test_x, s.test_y):
            _feed(h, part, whole=scheme == "sha256")
    return f"{scheme}:{h.hexdigest()}"
