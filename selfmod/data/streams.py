"""Training data as deterministic, resumable streams of minibatches.

- :class:`Stream`: epoch ``e`` of source ``s`` is the permutation seeded by ``(seed, s, e)``;
  the position ``(source, epoch, pos)`` is all a checkpoint needs.
- :func:`as_batches`: a ``(X, Y)`` tensor pair or a map-style ``torch.utils.data.Dataset``
  (indexed, so any batch size works), or any re-iterable of ``(x, y)`` batches (a
  ``DataLoader``: epoch ``e`` re-seeds its ``generator`` and calls ``sampler.set_epoch(e)``
  where it has them; resume skips the batches already seen).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate


class Stream:
    """Deterministic minibatch indices over ``n`` examples."""

    def __init__(self, seed: int, n: int, source: int = 0, epoch: int = 0, pos: int = 0) -> None:
        self.seed, self.n, self.source, self.epoch, self.pos = seed, n, source, epoch, pos
        self._perm = self._make()

    def _make(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.source * 10_007 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def next(self, batch_size: int) -> Tensor:
        if self.pos + batch_size > self.n:
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._make()
        idx = self._perm[self.pos : self.pos + batch_size]
        self.pos += batch_size
        return idx

    def position(self) -> dict[str, int]:
        return {"source": self.source, "epoch": self.epoch, "pos": self.pos, "n": self.n}


class IndexedBatches:
    """Minibatches of any size from tensors ``x (N, ...)``, ``y (N, ...)`` or a map-style
    dataset (examples collated with ``default_collate``)."""

    resizable = True

    def __init__(self, data: tuple[Tensor, Tensor] | Dataset, seed: int, source: int = 0):
        self.data = data
        n = len(data[0]) if isinstance(data, tuple) else len(data)  # type: ignore[arg-type]
        self.stream = Stream(seed, n, source)

    def __len__(self) -> int:
        return self.stream.n

    def next(self, batch_size: int) -> tuple[Any, Any]:
        idx = self.stream.next(batch_size)
        if isinstance(self.data, tuple):
            return self.data[0][idx], self.data[1][idx]
        return tuple(default_collate([self.data[int(i)] for i in idx]))  # type: ignore[return-value]

    def position(self) -> dict[str, int]:
        return self.stream.position()

    def seek(self, position: dict[str, int]) -> None:
        p = position
        self.stream = Stream(self.stream.seed, p["n"], p["source"], p["epoch"], p["pos"])


class IterableBatches:
    """Batches from a re-iterable (e.g. a ``DataLoader``); its batch size is its own."""

    resizable = False

    def __init__(self, batches: Iterable[Any], seed: int, source: int = 0) -> None:
        self.batches, self.seed, self.source = batches, seed, source
        self.epoch, self.pos = 0, 0
        self._it: Iterator[Any] | None = None

    def _start(self) -> None:
        gen = getattr(self.batches, "generator", None)
        if isinstance(gen, torch.Generator):
            gen.manual_seed(self.seed * 1_000_003 + self.source * 10_007 + self.epoch)
        sampler = getattr(self.batches, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)  # type: ignore[union-attr]
        self._it = iter(self.batches)
        for _ in range(self.pos):
            next(self._it)

    def next(self, batch_size: int) -> tuple[Any, Any]:
        if self._it is None:
            self._start()
        assert self._it is not None
        try:
            batch = next(self._it)
        except StopIteration:
            if self.pos == 0:
                raise ValueError("train data yielded no batch") from None
            self.epoch, self.pos = self.epoch + 1, 0
            self._start()
            batch = next(self._it)
        self.pos += 1
        if not (isinstance(batch, tuple | list) and len(batch) == 2):
            raise TypeError("train data must yield (x, y) batches")
        return batch[0], batch[1]

    def position(self) -> dict[str, int]:
        return {"source": self.source, "epoch": self.epoch, "pos": self.pos, "n": -1}

    def seek(self, position: dict[str, int]) -> None:
        self.epoch, self.pos, self._it = position["epoch"], position["pos"], None


Batches = IndexedBatches | IterableBatches


def as_batches(data: Any, seed: int, source: int = 0) -> Batches:
    """A resumable batch stream over ``data`` (see the module docstring)."""
    if (
        isinstance(data, tuple | list)
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
    ):
        x, y = data
        if len(x) != len(y):
            raise ValueError(f"train x and y must have the same length (got {len(x)} and {len(y)})")
        return IndexedBatches((x, y), seed, source)
    if isinstance(data, Dataset) and hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        return IndexedBatches(data, seed, source)
    if isinstance(data, Iterable) and not isinstance(data, Iterator):
        return IterableBatches(data, seed, source)
    raise TypeError(
        "train data must be an (X, Y) tensor pair, a map-style Dataset or a re-iterable of "
        f"(x, y) batches (got {type(data).__name__}; an iterator cannot be replayed)"
    )


def materialize(data: Any) -> tuple[Tensor, Tensor]:
    """Guard or test data as one ``(X, Y)`` pair of tensors."""
    if (
        isinstance(data, tuple | list)
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
    ):
        return data[0], data[1]
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        x, y = default_collate([data[i] for i in range(len(data))])  # type: ignore[arg-type]
        return x, y
    if isinstance(data, Iterable):
        xs, ys = zip(*list(data), strict=True)
        return torch.cat(xs), torch.cat(ys)
    raise TypeError(
        "guard and test data must be an (X, Y) pair, a Dataset or batches "
        f"(got {type(data).__name__})"
    )
