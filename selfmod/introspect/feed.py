"""The data feed: the run's sources on its device, the next training batch with its dropout
noise, and the guard splits (what proposes a change and what verifies it)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from selfmod.data.streams import Batches
from selfmod.errors import SelfmodError
from selfmod.introspect import replay

Batch = tuple[Any, Tensor, Tensor]  # x (B, ...), y (B, ...), dropout noise (S, B, W) or (0,)
DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: ``config.autocast`` -> the forward's autocast dtype (``None``: no autocast)
AUTOCAST = {"off": None, "bf16": torch.bfloat16}


@dataclass
class Source:
    """One data distribution: its training batches, guard set and (optional) test set."""

    train: Batches
    guard_x: Tensor  # (G, ...)
    guard_y: Tensor  # (G, ...)
    test_x: Tensor | None = None  # (M, ...)
    test_y: Tensor | None = None


def device_of(cfg: Any) -> torch.device:
    """``cfg.device`` (``"auto"``: CUDA when available), checked."""
    name = cfg.device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SelfmodError(
            f"device must be 'cpu' or 'auto' here: CUDA is not available (got {name!r})"
        )
    return torch.device(name)


def to_device(x: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """``x`` on ``device``; floating-point tensors also in ``dtype`` (labels keep theirs)."""
    if isinstance(x, Tensor):
        return x.to(device, dtype) if x.is_floating_point() else x.to(device)
    return x


def place(sources: Sequence[Source], device: torch.device, dtype: torch.dtype, b: int) -> None:
    """Guard and test sets on the run's device (floats in its dtype); the training data is
    moved batch by batch. Refuses a batch size ``b`` larger than the training set."""
    for src in sources:
        src.guard_x, src.guard_y = (to_device(t, device, dtype) for t in (src.guard_x, src.guard_y))
        src.test_x, src.test_y = (to_device(t, device, dtype) for t in (src.test_x, src.test_y))
    train = sources[0].train
    if getattr(train, "resizable", False) and b > len(train):  # type: ignore[arg-type]
        n = len(train)  # type: ignore[arg-type]
        raise SelfmodError(f"batch_size must be <= the {n} training examples (got {b})")


@dataclass
class Feed:
    """Training batches: the caller's (``inbox``, step-level driving) or the current source's
    stream, each with the dropout noise of its examples (``sites x width`` uniforms drawn from
    ``rng``, at the widest a layer may become, so that growth does not change the stream)."""

    sources: list[Source]
    device: torch.device
    dtype: torch.dtype
    rng: torch.Generator
    sites: int  # dropout sites that draw noise (0: none)
    width: int  # noise per example and site
    inbox: list[Any] = field(default_factory=list)

    def next_batch(self, batch_size: int, source: int) -> Batch:
        if self.inbox:
            x, y = self.inbox.pop(0)
        else:
            x, y = self.sources[source].train.next(batch_size)
        b = len(x)
        noise = (
            torch.rand((self.sites, b, self.width), generator=self.rng)
            if self.sites
            else torch.zeros(0)
        )
        x = to_device(x, self.device, self.dtype)
        return x, y.to(self.device), noise.to(self.device, self.dtype)


def guard(
    buffer: replay.Replay, part: str, shared: bool, exclude_source: int | None = None
) -> tuple[Tensor, Tensor]:
    """Guard data of ``buffer``: ``"propose"`` (what probes and meta-gradients see),
    ``"verify"`` (what only the verifier sees) or ``"all"``; ``shared``
    (``verify_on = "shared"``): one set does both. ``exclude_source``: leave that source out
    (the older sources' data of the forgetting budget)."""
    return replay.split(buffer, guard_codes(part, shared), exclude_source=exclude_source)


def guard_codes(part: str, shared: bool) -> tuple[int, ...]:
    """The replay splits that make guard part ``part`` (:func:`guard`)."""
    if part == "all" or shared:
        return (replay.GUARD, replay.PROPOSE)
    return {"propose": (replay.PROPOSE,), "verify": (replay.GUARD,)}[part]


def add_source(
    buffer: replay.Replay,
    source: Source,
    step: int,
    index: int,
    config: Any,
    rng: torch.Generator,
) -> replay.Replay:
    """``buffer`` with data source ``index``'s guard data added at base ``step`` (split into
    proposing and verifying halves unless ``verify_on`` is ``"shared"``)."""
    x, y = source.guard_x, source.guard_y
    halves = config.verify_on == "held_out"
    return replay.add_guard(buffer, x, y, step, index, config.guard_size, rng, halves=halves)
