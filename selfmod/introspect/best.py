"""The best verified state, for early stopping (``keep_best``).

At every log point (every ``log_every`` base steps or the longer ``log_share`` interval, and
the last) the run's metric on the ``"verify"`` part of the guard (data that neither the probes
nor the meta-gradient read) is measured; the parameters and buffers with the best are kept (a
model's copy, referenced: the loop's base steps never write a state something else holds). The
metric is the one the run reports: accuracy for a classifier (ties to the lower loss; a lower
loss can come with a lower accuracy, as a classifier grows confident), the loss otherwise. When
the run ends worse than the best by more than ``epsilon`` (accuracy: ``epsilon`` below; loss:
``1 + epsilon`` times above), the best state's parameters and buffers are returned instead (the
optimizer state and hyperparameters stay the final ones), and the ledger and the summary say
so. Saved in every checkpoint: a resumed run returns the same.

Only states of the run's current architecture compete: a committed change of structure
(growth, pruning, factorization, a choice's commit: another set of parameter or buffer names or
shapes) starts the record again from the first log point after it, so early stopping never
returns a state that silently undoes a verified architecture change."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor

from selfmod.introspect.state import RunState

Params = dict[str, Tensor]


@dataclass(frozen=True)
class Best:
    """The best verify guard metric seen at a log point (and its loss), its base step, params
    and buffers (``accuracy = -inf``: a run whose metric is the loss)."""

    loss: float = math.inf
    step: int = -1
    params: Params | None = None
    buffers: Params | None = None
    accuracy: float = -math.inf

    def offer(
        self,
        problem: Any,
        verify: tuple[Tensor, Tensor],
        step: int,
        state: RunState,
        scored: tuple[float, float] | None = None,
    ) -> Best:
        """This record, or ``state`` at ``step`` if it does better on ``verify``: a higher
        accuracy (equal: a lower loss) for a classifier, else a lower loss; ``state`` whatever
        its score where the record is of another architecture (:meth:`fits`). ``scored``:
        ``state``'s ``(loss, metric)`` on ``verify`` where the caller has it."""
        if scored is None:
            scored = problem.evaluate(state.params, state.buffers, *verify)
        loss, metric = scored
        acc = metric if problem.metric == "accuracy" else -math.inf
        better = (acc, -loss) > (self.accuracy, -self.loss) or not self.fits(state)
        return Best(loss, step, state.params, state.buffers, acc) if better else self

    def fits(self, state: RunState) -> bool:
        """Whether the record is of ``state``'s architecture (the same parameter and buffer
        names and shapes), or empty."""
        mine = self.params, self.buffers or {}
        return self.params is None or _shapes(*mine) == _shapes(state.params, state.buffers)

    def returned(
        self,
        problem: Any,
        verify: tuple[Tensor, Tensor],
        state: RunState,
        epsilon: float,
        scored: tuple[float, float] | None = None,
    ) -> tuple[RunState | None, str]:
        """``(state with the best params and buffers, why)`` when ``state`` does worse on
        ``verify`` than the best by more than ``epsilon`` (accuracy: that much lower; loss:
        relatively higher); else ``(None, "")``. ``scored``: ``state``'s ``(loss, metric)`` on
        ``verify`` where the caller has it (the run's last log point)."""
        if self.params is None or not self.fits(state):
            return None, ""
        if scored is None:
            scored = problem.evaluate(state.params, state.buffers, *verify)
        final, metric = scored
        if problem.metric == "accuracy":
            if not metric < self.accuracy - epsilon:
                return None, ""
            why = f"verify guard accuracy {metric:.4g} at the end, {self.accuracy:.4g} at step "
        elif final > self.loss * (1 + epsilon):
            why = f"verify guard loss {final:.6g} at the end, {self.loss:.6g} at step "
        else:
            return None, ""
        return replace(state, params=self.params, buffers=self.buffers), why + str(self.step)

    def summary(self) -> dict[str, Any] | None:
        if self.params is None:
            return None
        out = {"step": self.step, "guard_loss": self.loss}
        return out | ({"guard_accuracy": self.accuracy} if self.accuracy > -math.inf else {})


def _shapes(*parts: Params) -> list[dict[str, tuple[int, ...]]]:
    return [{k: tuple(v.shape) for k, v in part.items()} for part in parts]


def save(best: Best, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Add ``best`` to a checkpoint's ``tensors`` (``best.params.*``, ``best.buffers.*``) and
    ``meta`` (``best``: loss and step), in place."""
    if best.params is None:
        return
    # copies: the best state may be the current one, and a checkpoint holds no shared storage
    tensors.update({f"best.params.{k}": v.clone() for k, v in best.params.items()})
    tensors.update({f"best.buffers.{k}": v.clone() for k, v in (best.buffers or {}).items()})
    acc = best.accuracy if best.accuracy > -math.inf else None  # JSON has no infinity
    meta["best"] = {"loss": best.loss, "step": best.step, "accuracy": acc}


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
    acc = record.get("accuracy")  # none: a run by its loss, or a checkpoint from before
    acc = -math.inf if acc is None else float(acc)
    at = float(record["loss"]), int(record["step"])
    return Best(*at, part["params"], part["buffers"], acc), rest
