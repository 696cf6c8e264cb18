"""What observers of a run see: each :class:`Decision`, and the :class:`Recorder` callbacks.

A recorder (in the manner of Lightning's ``Callback`` and Hugging Face's ``TrainerCallback``)
sees the run through :class:`RunView`, a narrow read-only view: it may write the ledger and
checkpoints and report approvals; it cannot change the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from selfmod.introspect.state import jsonable

__all__ = ["Decision", "Recorder", "RunView", "jsonable", "payload"]


@dataclass
class Decision:
    """One proposal and what became of it."""

    cycle: int
    step: int
    modifier: str
    decision: str  # commit | reject | rollback | pending | applied | expired
    reason: str
    before: dict[str, Any]
    after: dict[str, Any]
    guard_current: float = math.nan
    guard_proposed: float = math.nan
    id: int = 0  # ledger seq


class RunView(Protocol):
    """What a recorder may read of the run (the :class:`~selfmod.introspect.loop.Loop`)."""

    @property
    def step(self) -> int: ...

    @property
    def cycle(self) -> int: ...

    @property
    def config(self) -> Any: ...

    def checkpoint(self) -> tuple[dict[str, Tensor], dict[str, Any]]: ...


class Recorder:
    """Observes the run: it may write the ledger and checkpoints and report approvals; it
    cannot change the run. The base class keeps nothing."""

    def record(
        self, run: RunView, kind: str, decision: str, reason: str, payload: dict[str, Any]
    ) -> int | None:
        """One ledger entry; returns its id (or ``None``)."""
        return None

    def checkpoint(self, run: RunView) -> None:
        """Called at the start of every ``checkpoint_every``-th cycle."""

    def pending(self, run: RunView) -> list[tuple[int, int, dict[str, Any], bool]]:
        """Pending proposals ``(id, cycle, change, approved)`` (manual approval), oldest
        first."""
        return []

    def log(self, run: RunView, row: dict[str, Any]) -> None:
        """A log point's row (losses, metrics, hyperparameters), every ``log_every`` steps."""


def payload(d: Decision, change: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """The ledger payload of decision ``d`` (JSON-able): the change and its figures."""
    return jsonable(
        {
            "modifier": d.modifier,
            "before": d.before,
            "after": d.after,
            "guard_current": d.guard_current,
            "guard_proposed": d.guard_proposed,
            "change": change,
            "info": info,
        }
    )
