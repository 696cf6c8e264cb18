"""The best verified state, for early stopping (``keep_best``).

At every log point (every 50 base steps, and the last) the run's guard loss on the
``"verify"`` part of the guard (data that neither the probes nor the meta-gradient read) is
measured; the parameters and buffers with the lowest are kept (a model's copy, referenced:
states are immutable). When the run ends, a final verify loss worse than the best by more
than ``epsilon`` returns the best state's parameters and buffers instead (the optimizer state
and hyperparameters stay the final ones), and the ledger and the summary say so. Saved in
every checkpoint: a resumed run returns the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor

from selfmod.introspect.state import RunState

Params = dict[str, Tensor]


@dataclass(frozen=True)
class Best:
    """The lowest verify guard loss seen at a cycle's start, its base step, params, buffers."""

    loss: float = math.inf
    step: int = -1
    params: Params | None = None
    buffers: Params | None = None

    def offer(
        self, problem: Any, verify: tuple[Tensor, Tensor], step: int, state: RunState
    ) -> Best:
        """This record, or ``state`` at ``step`` if its loss on ``verify`` is lower."""
        loss, _ = problem.evaluate(state.params, state.buffers, *verify)
        return Best(loss, step, state.params, state.buffers) if loss < self.loss else self

    def returned(
        self, problem: Any, verify: tuple[Tensor, Tensor], state: RunState, epsilon: float
    ) -> tuple[RunState | None, str]:
        """``(state with the best params and buffers, why)`` when ``state``'s loss on
        ``verify`` is worse than the best by more than ``epsilon`` (relative); else
        ``(None, "")``."""
        final, _ = problem.evaluate(state.params, state.buffers, *verify)
        if self.params is None or not final > self.loss * (1 + epsilon):
            return None, ""
        why = f"verify guard loss {final:.6g} at the end, {self.loss:.6g} at step {self.step}"
        return replace(state, params=self.params, buffers=self.buffers), why

    def ended(
        self, problem: Any, verify: tuple[Tensor, Tensor], state: RunState, config: Any
    ) -> tuple[RunState, str]:
        """``(the state the run ends with, why it is the best one)``: :meth:`returned` under
        ``config.epsilon``, else ``(state, "")``."""
        kept, why = self.returned(problem, verify, state, config.epsilon)
        return (state, "") if kept is None else (kept, why)

    def summary(self) -> dict[str, Any] | None:
        return None if self.params is None else {"step": self.step, "guard_loss": self.loss}


def save(best: Best, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Add ``best`` to a checkpoint's ``tensors`` (``best.params.*``, ``best.buffers.*``) and
    ``meta`` (``best``: loss and step), in place."""
    if best.params is None:
        return
    # copies: the best state may be the current one, and a checkpoint holds no shared storage
    tensors.update({f"best.params.{k}": v.clone() for k, v in best.params.items()})
    tensors.update({f"best.buffers.{k}": v.clone() for k, v in (best.buffers or {}).items()})
    meta["best"] = {"loss": best.loss, "step": best.step}


def load(tensors: dict[str, Tensor], meta: dict[str, Any]) -> tuple[Best, dict[str, Tensor]]:
    """``(record, the other tensors)``: :func:`save`'s record from a checkpoint (none kept: an
    empty one)."""
    part: dict[str, Params] = {"params": {}, "buffers": {}}
    rest = {}
    for key, value in tensors.items():
        kind, _, name = key.partition(".")[2].partition(".")
        if key.startswith("best.") and kind in part:
            part[kind][name] = value
        else:
            rest[key] = value
    record = meta.get("best")
    if not isinstance(record, dict):
        return Best(), rest
    return Best(float(record["loss"]), int(record["step"]), part["params"], part["buffers"]), rest
