"""The run's summary: test loss and metric, cost, widths, decisions, the final
hyperparameters and the meta-metrics that need no baseline."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from selfmod.introspect import probes, replay
from selfmod.introspect.feed import Source, guard, guard_codes
from selfmod.introspect.hparams import HParamSpace
from selfmod.introspect.problem import Problem
from selfmod.introspect.state import Counters, RunState


def unused(names: Sequence[str], params: dict[str, Tensor]) -> list[int]:
    """Indices (into ``names``) of tensors with no entries: a factorable layer's unused half,
    whose learning rate means nothing."""
    return [i for i, k in enumerate(names) if params[k].numel() == 0]


def test_metric(
    problem: Problem, state: RunState, src: Source, rows: int = 0
) -> tuple[float, float]:
    """``(loss, metric)`` of ``state`` on ``src``'s test set (NaN without one); ``rows > 0``:
    its first ``rows``."""
    if src.test_x is None or src.test_y is None:
        return math.nan, math.nan
    return problem.evaluate(
        state.params, state.buffers, *replay.first((src.test_x, src.test_y), rows)
    )


def overhead(seconds: float, meta_seconds: float) -> dict[str, float]:
    """The wall time split: ``meta_seconds`` (the race, the cycles and the log points:
    self-modification's own work), ``base_seconds`` (the rest: training) and
    ``meta_overhead = meta / base`` (NaN where a run resumed from a checkpoint that did not
    count it)."""
    base = max(seconds - meta_seconds, 0.0)
    share = meta_seconds / base if base > 0 else math.nan
    return {"meta_seconds": meta_seconds, "base_seconds": base, "meta_overhead": share}


def run_probe(
    problem: Any,
    state: Any,
    buffer: Any,
    source: Any,
    shared: bool,
    counters: Any,
    seed: int,
    rows: int = 0,
) -> dict[str, float]:
    """A run's cycle probes (:func:`.probes.cycle_probe`) with its counters: ``buffer`` the replay
    buffer (:mod:`.replay`), ``source`` the data source trained on, ``shared``: one guard set
    proposes and verifies; the cost model's input is the guard's first example; ``rows > 0``:
    the first ``rows`` of each set only."""
    n, cut = counters, (lambda pair: replay.first(pair, rows))
    older = cut(guard(buffer, "propose", shared, n.source_id))
    test = test_metric(problem, state, source, rows)
    found = probes.cycle_probe(
        problem, state, cut(guard(buffer, "propose", shared)),
        cut(replay.split(buffer, replay.TRAIN)), older, test, seed + n.cycle, source.guard_x[:1],
    )  # fmt: skip
    tail = {"batch_size": state.batch_size, "meta_lr": state.meta_lr}
    return {"cycle": n.cycle, "step": n.step, **found} | tail


def guard_scores(
    problem: Problem, state: RunState, buffer: replay.Replay, shared: bool
) -> tuple[tuple[float, float], tuple[float, float]]:
    """``((loss, metric) on the whole guard set, on its verifying split)`` at ``state``, from
    one pass over the guard set (``shared``: one set, both the same). The verifying split's
    rows are read from the whole set's outputs, so its figures equal a pass of its own to
    rounding (other chunks); an output that is not a tensor takes a pass of its own."""
    x, y = guard(buffer, "all", shared)
    out = problem.predict(state.params, state.buffers, x) if len(y) else None
    whole = problem.score(out, y) if len(y) else (math.nan, math.nan)
    if shared:
        return whole, whole
    in_all, in_verify = (replay.rows(buffer, guard_codes(p, False)) for p in ("all", "verify"))
    is_verify = in_verify[in_all]  # (len(y),): the whole set's rows that verify
    if not isinstance(out, Tensor) or not bool(is_verify.any()):  # a pass of its own
        return whole, problem.evaluate(state.params, state.buffers, *guard(buffer, "verify", False))
    return whole, problem.score(out[is_verify], y[is_verify])


def log_row(
    problem: Problem,
    state: RunState,
    guard_score: tuple[float, float],
    src: Source | None,
    step: int,
    train_loss: float,
    rows: int = 0,
) -> dict[str, Any]:
    """A log point's losses and metrics at ``state``: the whole guard set's ``guard_score``
    (:func:`guard_scores`), the metric on ``src``'s test set (``rows > 0``: on its first
    ``rows``; NaN with ``src = None``: the test set is not logged), the last base step's loss
    and the meta learning rate."""
    gl, ga = guard_score
    _, ta = test_metric(problem, state, src, rows) if src is not None else (math.nan, math.nan)
    return {
        "step": step,
        "guard_loss": gl,
        "guard_acc": ga,
        "test_acc": ta,
        "train_loss": train_loss,
        "meta_lr": state.meta_lr,
    }


def summarize(
    problem: Problem,
    state: RunState,
    src: Source,
    buffer: replay.Replay,
    example: Tensor,
    *,
    counters: Counters,
    history: dict[str, Any],
    names: Sequence[str],
    modifiers: Sequence[str],
    skipped: dict[str, str],
    values: dict[str, Any],
    space: HParamSpace,
    best: dict[str, Any] | None = None,
    rows: int = 0,
    scored: tuple[tuple[float, float], Any] | None = None,
) -> dict[str, Any]:
    """The summary of a run at ``state`` (the final internal gap is measured here: the whole
    guard set's loss minus the replay buffer's training loss on its first ``rows`` when
    ``rows > 0``; :func:`.probes.meta_metrics`). The test set is read whole. ``scored``:
    :func:`guard_scores` at ``state`` where the caller has them (the run's last log point)."""
    tl, tm = test_metric(problem, state, src)
    p, b = state.params, state.buffers
    whole = scored[0] if scored is not None else problem.evaluate(p, b, *guard(buffer, "all", True))
    gap = (
        whole[0]
        - problem.evaluate(p, b, *replay.first(replay.split(buffer, replay.TRAIN), rows))[0]
    )
    c = problem.cost(p, example)
    decisions = history["decisions"]
    count = {
        k: sum(d["decision"] == k for d in decisions)
        for k in ("commit", "reject", "rollback", "pending")
    }
    return {
        "test_accuracy": tm if problem.metric == "accuracy" else None,
        "test_metric": tm,
        "metric_name": problem.metric,
        "test_loss": tl,
        "seconds": counters.seconds,
        **overhead(counters.seconds, counters.meta_seconds),
        "params": c.params,
        "flops": c.flops,
        "widths": problem.widths(p),
        "steps": counters.step,
        "examples": counters.examples,
        "meta_examples": counters.meta_examples,  # self-modification's work (.budget)
        "meta_share": counters.meta_examples / counters.examples if counters.examples else None,
        "cycles_skipped": counters.cycles_skipped,  # over meta_budget when due
        "best_verified": best,  # keep_best: the best cycle start's step and verify guard loss
        "divergences": counters.divergences,
        "diverged_at": counters.diverged_at,
        "tensor_names": list(names),
        "unused_tensors": unused(names, p),
        "modifiers": list(modifiers),
        "modifiers_skipped": dict(skipped),
        "decisions": {k: count[k] for k in ("commit", "reject", "rollback")},
        **{f"n_{k}": v for k, v in count.items()},
        **values,
        "hyperparameters": space.described(),
        "meta_metrics": probes.meta_metrics(
            history["probes"], counters.shift_cycle, history.get("self_shift", []), gap
        ),
    }
