"""Determinism: torch's deterministic-algorithms switch, and the random state a replay starts
from.

``torch.use_deterministic_algorithms`` also sets ``torch._inductor.config.deterministic``,
and importing that config costs over a second in a fresh process (the compiler stack): more
than a small run's whole training on a CPU. A run here compiles nothing, so where the compiler
is not loaded yet the flag is set directly; once it is loaded, through torch's own function.

A replay (a lookahead, a level of the race) draws the random numbers the run would have drawn:
:func:`random_state` takes the generators' state, :func:`drawing_from` runs a block from it
and leaves the run's generators as they were.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch

#: the random state: the CPU generator's, and the CUDA device's where the run is on one
RNG = tuple[torch.Tensor, torch.Tensor | None]


def set_deterministic(mode: bool, warn_only: bool = False) -> None:
    """``torch.use_deterministic_algorithms(mode, warn_only=warn_only)``, without importing
    ``torch._inductor`` when nothing has (the module docstring)."""
    if "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        torch._C._set_deterministic_algorithms(mode, warn_only=warn_only)


def random_state(device: torch.device) -> RNG:
    """The generators' state now (CPU, and ``device``'s if it is a CUDA one)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_random_state(rng: RNG, device: torch.device) -> None:
    """Set the state :func:`random_state` gave."""
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state(rng[1], device)


@contextlib.contextmanager
def drawing_from(rng: RNG, device: torch.device) -> Iterator[None]:
    """A block that draws from ``rng``; the generators are restored when it ends."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        set_random_state(rng, device)
        yield
