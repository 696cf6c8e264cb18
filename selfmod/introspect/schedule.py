"""The learning rates' schedule over the run's budget: the modifiers tune each rate's *level*;
the optimizer steps with ``level x factor(progress)``, the factor in ``hparams`` as its log
(:data:`~selfmod.introspect.hparams.LR_SCHEDULE`), so that replays, estimates and verification
use the rates of the steps they stand for.

- ``"cosine"``: a linear warm-up over the first ``WARMUP`` of the budget, then a cosine decay
  to 0 at its end (what a tuned AdamW sweep uses);
- ``"wsd"``: warm-up, stable, decay: the same warm-up, then factor 1, then a linear decay to 0
  over the last ``COOLDOWN`` of the budget (Hu et al. 2024; Hägele et al. 2024): more steps at
  the full rate than the cosine's, the same cool-down to its end;
- ``"constant"``: factor 1.

A loop that the caller drives batch by batch (:class:`~selfmod.runs.SelfModifier`) has no known
end: its rates are not scheduled (the caller's own scheduler may be).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from selfmod.introspect.budget import progress
from selfmod.introspect.hparams import LR_SCHEDULE
from selfmod.introspect.state import RunState
from selfmod.optim.fused import stamp

WARMUP = 0.05
COOLDOWN = 0.2
#: the factor's floor: ``log 0`` is not a number, and a rate of exactly 0 is a wasted step
FLOOR = 1e-3


def factor(kind: str, progress: float) -> float:
    """The schedule ``kind``'s factor at ``progress`` in ``[0, 1]`` of the budget."""
    if kind == "constant":
        return 1.0
    if progress < WARMUP:
        return max((progress + 1e-9) / WARMUP, FLOOR)
    if kind == "wsd":
        return max(min(1.0, (1.0 - progress) / COOLDOWN), FLOOR)
    cosine = 0.5 * (1.0 + math.cos(math.pi * (progress - WARMUP) / (1.0 - WARMUP)))
    return max(cosine, FLOOR)


class _Made:
    """The factor tensor made last, the value it was made with and its :func:`stamp` then: a
    state that holds that very tensor, not written in place since, holds the factor already
    (the stable phase of ``"wsd"``, most of a run: no new tensor and no new hyperparameters a
    step). The three are replaced as one tuple, so a thread never sees one's with another's."""

    def __init__(self) -> None:
        self.last: tuple[torch.Tensor, float, Any] | None = None  # the tensor: its id stays its

    def holds(self, tensor: torch.Tensor, value: float) -> bool:
        last = self.last
        if last is None or value != last[1] or last[2] is None:  # None: an inference tensor
            return False
        return stamp(tensor) == last[2]

    def make(self, value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        made = torch.tensor(math.log(value), dtype=dtype).to(device)
        self.last = (made, value, stamp(made))
        return made


_made = _Made()


def scheduled(state: RunState, value: float) -> RunState:
    """``state`` with the schedule's factor ``value`` on every learning rate."""
    if value == 1.0 and LR_SCHEDULE not in state.hparams:
        return state
    now = state.hparams.get(LR_SCHEDULE)
    if now is not None and _made.holds(now, value):  # the factor it has: no new tensor
        return state
    level = state.hparams["log_lr"]
    log = _made.make(value, level.dtype, level.device)
    return replace(state, hparams={**state.hparams, LR_SCHEDULE: log})


def at(state: RunState, config: Any, step: int, examples: int | None) -> RunState:
    """``state`` with ``config.lr_schedule``'s factor at the budget's progress now."""
    return scheduled(state, factor(config.lr_schedule, progress(config, step, examples)))
