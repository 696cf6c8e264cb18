"""Internal data: a replay buffer of seen examples with metadata, split into internal-train and
guard entries, resampled so that the guard set keeps older data.

Every entry carries ``step`` (when it was seen), ``source`` (which data distribution it came
from) and ``split`` (``TRAIN``, ``GUARD`` or ``PROPOSE``). Guard entries come from each
source's held-out pool and are never trained on; with ``halves`` they alternate between
``PROPOSE`` (the half that probes and meta-gradients see) and ``GUARD`` (the half only the
verifier sees), so a change is checked on data that did not propose it. Train entries are a
reservoir sample of the examples the model did train on (for the internal generalization gap).

Guard resampling keeps at most ``capacity // n_sources`` entries per source, evicting from
the largest source first, so a new distribution never pushes the old one out of the guard set
(the forgetting budget needs it). References: Vitter 1985 (reservoir sampling, algorithm R).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

TRAIN, GUARD, PROPOSE = 0, 1, 2


class Replay(NamedTuple):
    """The buffer as tensors, one row per entry (N entries, D features)."""

    x: Tensor  # (N, ...) as the model's input
    y: Tensor  # (N, ...) as the loss's target
    step: Tensor  # (N,) int64, base step when seen
    source: Tensor  # (N,) int64
    split: Tensor  # (N,) int64, TRAIN, GUARD or PROPOSE
    seen: Tensor  # () int64, train examples offered so far (reservoir counter)


def empty(x_like: Tensor, y_like: Tensor) -> Replay:
    """An empty buffer for examples shaped and typed like ``x_like[i]`` and ``y_like[i]``."""
    z = torch.zeros(0, dtype=torch.int64)
    x = torch.zeros((0, *x_like.shape[1:]), dtype=x_like.dtype, device=x_like.device)
    y = torch.zeros((0, *y_like.shape[1:]), dtype=y_like.dtype, device=y_like.device)
    return Replay(x, y, z, z, z, torch.tensor(0))


def _cat(buf: Replay, x, y, step, source, split) -> Replay:
    n = len(y)
    return Replay(
        torch.cat([buf.x, x]),
        torch.cat([buf.y, y]),
        torch.cat([buf.step, torch.full((n,), step, dtype=torch.int64)]),
        torch.cat([buf.source, torch.full((n,), source, dtype=torch.int64)]),
        torch.cat([buf.split, torch.full((n,), split, dtype=torch.int64)]),
        buf.seen,
    )


def _keep(buf: Replay, mask: Tensor) -> Replay:
    return Replay(*(t[mask] for t in buf[:-1]), buf.seen)


def add_guard(
    buf: Replay,
    x: Tensor,
    y: Tensor,
    step: int,
    source: int,
    capacity: int,
    generator: torch.Generator,
    halves: bool = False,
) -> Replay:
    """Add a source's held-out guard examples, then resample to at most ``capacity`` guard
    entries with an equal share per source (evicting uniformly at random within a source).
    With ``halves`` the new rows alternate ``PROPOSE``, ``GUARD``, ``PROPOSE``, ..."""
    n = len(buf.y)
    buf = _cat(buf, x, y, step, source, GUARD)
    if halves:
        split = buf.split.clone()
        split[n::2] = PROPOSE
        buf = buf._replace(split=split)
    guard = buf.split != TRAIN
    sources = buf.source[guard].unique().tolist()
    share = capacity // max(1, len(sources))
    keep = torch.ones(len(buf.y), dtype=torch.bool)
    for s in sources:
        idx = torch.nonzero(guard & (buf.source == s)).squeeze(1)
        if len(idx) > share:
            drop = idx[torch.randperm(len(idx), generator=generator)[: len(idx) - share]]
            keep[drop] = False
    return _keep(buf, keep)


def add_train(
    buf: Replay,
    x: Tensor,
    y: Tensor,
    step: int,
    source: int,
    capacity: int,
    generator: torch.Generator,
) -> Replay:
    """Offer trained-on examples ``x (B, ...)`` to the train reservoir (algorithm R over all
    offered): while there is room an offer is appended; after that the ``k``-th offer overall
    replaces slot ``j = floor(u k)``, ``u ~ U[0, 1)``, if ``j < capacity`` (slots count the
    train rows in buffer order, then this batch's appended ones; a later offer to the same
    slot wins). Vectorised: the same buffer as offering the rows one at a time."""
    seen = int(buf.seen)
    train_idx = torch.nonzero(buf.split == TRAIN).squeeze(1)
    n_train, b = len(train_idx), len(y)
    u = torch.rand(b, generator=generator, dtype=torch.float64)
    n_fill = max(0, min(b, capacity - n_train))  # the first offers fill the room
    append = torch.arange(n_fill)  # offered rows appended, by slot n_train + i
    rows = offered = torch.zeros(0, dtype=torch.int64)  # buffer rows replaced, and by what
    if n_fill < b:
        k = torch.arange(seen + n_fill + 1, seen + b + 1, dtype=torch.float64)  # offer counts
        slot = (u[n_fill:] * k).long()  # (b - n_fill,)
        hit = slot < capacity
        winner = torch.full((capacity,), -1, dtype=torch.int64)
        winner.scatter_reduce_(0, slot[hit], torch.arange(n_fill, b)[hit], reduce="amax")
        m = min(n_train, capacity)  # slots that are rows already in the buffer
        old = winner[:m] >= 0
        rows, offered = train_idx[:m][old], winner[:m][old]
        new = winner[n_train : n_train + n_fill]
        append = torch.where(new >= 0, new, append)
    seen += b
    x2, y2, step2, source2 = buf.x.clone(), buf.y.clone(), buf.step.clone(), buf.source.clone()
    if len(rows):
        x2[rows], y2[rows], step2[rows], source2[rows] = x[offered], y[offered], step, source
    buf = Replay(x2, y2, step2, source2, buf.split, torch.tensor(seen))
    if n_fill:
        buf = _cat(buf, x[append], y[append], step, source, TRAIN)
        buf = buf._replace(seen=torch.tensor(seen))
    return buf


def split(
    buf: Replay,
    which: int | tuple[int, ...],
    source: int | None = None,
    exclude_source: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``(x (n, D), y (n,))`` of one split (or several), optionally of one source or all but
    one (the rows :func:`rows` picks)."""
    mask = rows(buf, which, source, exclude_source)
    return buf.x[mask], buf.y[mask]


def first(pair: tuple[Tensor, ...], rows: int) -> tuple[Tensor, ...]:
    """Each tensor of ``pair`` cut to its first ``rows`` rows (``rows = 0``: whole)."""
    return tuple(t[:rows] for t in pair) if rows else pair


def rows(
    buf: Replay,
    which: int | tuple[int, ...],
    source: int | None = None,
    exclude_source: int | None = None,
) -> Tensor:
    """``(N,)`` bool: the entries of split ``which`` (or of several), optionally of one source
    or all but one."""
    codes = (which,) if isinstance(which, int) else which
    mask = torch.isin(buf.split, torch.tensor(codes, dtype=buf.split.dtype))
    if source is not None:
        mask &= buf.source == source
    if exclude_source is not None:
        mask &= buf.source != exclude_source
    return mask
