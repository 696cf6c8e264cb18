"""Probes measured every cycle, and meta-metrics computed over cycles.

Probes (one dict of floats per cycle): guard loss and accuracy, internal-train loss and
accuracy, the internal generalization gap ``guard_loss - train_loss``, accuracy on older
sources' guard data, robustness (guard accuracy under Gaussian input noise ``x + sigma eps``),
a self-generated shifted benchmark (guard signals circularly shifted by ``shift`` samples),
parameters, FLOPs and activation memory per example (:func:`selfmod.arch.cost`).

Meta-metrics (:func:`meta_metrics`, :func:`against_fixed`; ``None`` where undefined), with
``L(t)`` the guard loss (the replay buffer's guard part, eval mode) logged every ``log_every``
steps and ``L_c`` the one probed at the start of cycle ``c``:

- *meta-convergence rate against the static baseline*: ``S_fixed / S_tuned``, where
  ``L* = L_fixed(T)`` is the fixed configuration's final guard loss and ``S_run`` the first
  logged step at which ``L_run(t) <= L*``; above 1 the self-modifying run reaches the static
  run's final guard loss sooner (2: in half the steps); 0 when it never does. Also
  ``S_tuned`` and ``S_fixed`` themselves, and (without the baseline) the mean per-cycle
  decrease of ``log L_c`` until ``L_c`` first comes within 5% of its best, and that cycle;
- *adaptation speed*: cycles after a distribution shift until the guard accuracy reaches 95%
  of the best value it attains after the shift (the new source may be harder than the old);
- *introspective stability*: the standard deviation of ``L_c`` over the last half of the
  cycles, and the fraction of sign changes of its successive differences (oscillation);
- *internal generalization gap* ``G = guard loss - internal-train loss`` (the replay buffer's
  guard and training parts): its value at the end of the run and its mean over the cycles;
- *internal vs external gap*: the mean absolute difference between guard accuracy (internal)
  and test accuracy (external validation);
- *self-induced distribution shift* (:mod:`.shift`): ``1 - CKA`` between the replay buffer's
  representations after the lookahead with and without each committed change; its mean
  over commits, its sum, and its sum per modifier.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

Apply = Callable[[dict[str, Tensor], Tensor], Tensor]


def loss_and_accuracy(
    apply: Apply, params: dict[str, Tensor], x: Tensor, y: Tensor
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``apply(params, x (n, D))`` against ``y (n,)``."""
    if len(y) == 0:
        return math.nan, math.nan
    with torch.no_grad():
        logits = apply(params, x)  # (n, C)
        return F.cross_entropy(logits, y).item(), (logits.argmax(-1) == y).float().mean().item()


Metric = Callable[[Tensor, Tensor], float]


def robustness(metric: Metric, x: Tensor, y: Tensor, sigma: float, seed: int) -> float:
    """``metric`` on ``x + sigma * std(x) * eps``, ``eps ~ N(0, I)`` drawn from its own ``seed``
    (so probing never consumes the run's random stream)."""
    if len(y) == 0:
        return math.nan
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
    return metric(x + sigma * x.std() * eps, y)


def shifted(metric: Metric, x: Tensor, y: Tensor, shift: int) -> float:
    """``metric`` on the inputs rolled by ``shift`` along their last axis (a self-made shifted
    set)."""
    return metric(torch.roll(x, shift, dims=-1), y)


def cycle_probe(
    problem: Any,
    state: Any,
    guard: tuple[Tensor, Tensor],
    train: tuple[Tensor, Tensor],
    older: tuple[Tensor, Tensor],
    test: tuple[float, float],
    seed: int,
    example: Tensor,
) -> dict[str, float]:
    """One cycle's probes of the model at ``state``: guard (the proposing split) and
    internal-train loss and metric, the gap, the metric on ``older`` sources' guard data,
    ``test``'s metric, robustness to input noise (seeded by ``seed``), a self-made shifted
    set, parameters, FLOPs and memory (4 bytes a parameter plus one example's activations)."""
    p, b, ev = state.params, state.buffers, problem.evaluate
    gx, gy = guard
    gl, ga = ev(p, b, gx, gy)
    tl, ta = ev(p, b, *train)
    _, old = ev(p, b, *older)
    robust = shift = math.nan
    if gx.is_floating_point():  # perturbations of real-valued inputs only (not tokens)

        def metric(x: Tensor, y: Tensor) -> float:
            return ev(p, b, x, y)[1]

        robust = robustness(metric, gx, gy, 0.25, seed)
        shift = shifted(metric, gx, gy, 5)
    c = problem.cost(p, example)
    return {
        "guard_loss": gl,
        "guard_acc": ga,
        "train_loss": tl,
        "train_acc": ta,
        "gap": gl - tl if math.isfinite(tl) else math.nan,
        "old_guard_acc": old,
        "test_acc": test[1],
        "robust_acc": robust,
        "shifted_acc": shift,
        "params": c.params,
        "flops": c.flops,
        "memory_bytes": c.activation_bytes + 4 * c.params,
    }


def convergence(guard_loss: Sequence[float]) -> tuple[float, int]:
    """``(rate, cycle)``: mean per-cycle decrease of log guard loss until within 5% of best."""
    xs = [v for v in guard_loss if math.isfinite(v) and v > 0]
    if len(xs) < 2:
        return math.nan, 0
    best = min(xs)
    cycle = next(i for i, v in enumerate(xs) if v <= 1.05 * best)
    rate = (math.log(xs[0]) - math.log(xs[cycle])) / max(cycle, 1)
    return rate, cycle


def adaptation(guard_acc: Sequence[float], shift_cycle: int | None) -> float:
    """Cycles after ``shift_cycle`` until guard accuracy reaches 95% of its post-shift best."""
    if shift_cycle is None or shift_cycle < 1 or shift_cycle >= len(guard_acc):
        return math.nan
    target = 0.95 * max(guard_acc[shift_cycle:])
    for i in range(shift_cycle, len(guard_acc)):
        if guard_acc[i] >= target:
            return float(i - shift_cycle)
    return math.inf


def stability(guard_loss: Sequence[float]) -> tuple[float, float]:
    """``(std, oscillation)`` of the guard loss over the last half of the cycles."""
    tail = [v for v in guard_loss[len(guard_loss) // 2 :] if math.isfinite(v)]
    if len(tail) < 3:
        return math.nan, math.nan
    t = torch.tensor(tail, dtype=torch.float64)
    d = t.diff()
    flips = ((d[1:] * d[:-1]) < 0).double().mean().item()
    return t.std().item(), flips


def _defined(x: float) -> float | None:
    """``x``, or ``None`` for NaN and infinities (JSON has neither)."""
    return x if math.isfinite(x) else None


def self_shift(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregates of :mod:`.shift`'s per-commit records ``{modifier, shift, ...}``."""
    finite = [(r["modifier"], float(r["shift"])) for r in records if finite_number(r.get("shift"))]
    by: dict[str, float] = {}
    for name, value in finite:
        by[name] = by.get(name, 0.0) + value
    total = sum(v for _, v in finite)
    return {
        "self_induced_shift_mean": total / len(finite) if finite else None,
        "self_induced_shift_total": total if finite else None,
        "self_induced_shift_by_modifier": by,
        "commits_measured": len(finite),
    }


def finite_number(x: Any) -> bool:
    """Whether ``x`` is an int or float other than NaN and infinity (a JSON field may be
    None)."""
    return isinstance(x, int | float) and math.isfinite(x)


def meta_metrics(
    probes: Sequence[dict[str, float]],
    shift_cycle: int | None = None,
    shifts: Sequence[dict[str, Any]] = (),
    final_gap: float = math.nan,
) -> dict[str, Any]:
    """The meta-metrics of the module docstring that need no baseline, from the per-cycle probe
    dicts, the self-induced shift records and the gap at the end of the run."""
    gl = [p["guard_loss"] for p in probes]
    ga = [p["guard_acc"] for p in probes]
    rate, at = convergence(gl)
    std, osc = stability(gl)
    pairs = [
        (p["guard_acc"], p["test_acc"])
        for p in probes
        if math.isfinite(p.get("test_acc", math.nan))
    ]
    gap = sum(abs(a - b) for a, b in pairs) / len(pairs) if pairs else math.nan
    gaps = [p["gap"] for p in probes if finite_number(p.get("gap"))]
    return {
        "log_guard_decrease_per_cycle": _defined(rate),
        "converged_at_cycle": at if len(gl) >= 2 else None,
        "adaptation_cycles": _defined(adaptation(ga, shift_cycle)),
        "guard_loss_std": _defined(std),
        "guard_loss_oscillation": _defined(osc),
        "gap_final": _defined(final_gap),
        "gap_mean": sum(gaps) / len(gaps) if gaps else None,
        "internal_vs_external_acc_gap": _defined(gap),
        **self_shift(shifts),
    }


def first_step_at_or_below(log: Sequence[dict[str, Any]], target: float) -> int | None:
    """The first logged ``step`` whose ``guard_loss <= target`` (``None``: never)."""
    for row in log:
        if finite_number(row.get("guard_loss")) and row["guard_loss"] <= target:
            return int(row["step"])
    return None


def against_fixed(
    tuned_log: Sequence[dict[str, Any]], fixed_log: Sequence[dict[str, Any]] | None
) -> dict[str, Any]:
    """Meta-convergence rate against the static baseline (module docstring) from the two runs'
    log rows ``{step, guard_loss, ...}``: ``S_fixed / S_tuned``, and both step counts."""
    none = {
        "meta_convergence_rate": None,
        "steps_to_fixed_final": None,
        "fixed_steps_to_final": None,
    }
    if not fixed_log or not tuned_log or not finite_number(fixed_log[-1].get("guard_loss")):
        return none
    target = float(fixed_log[-1]["guard_loss"])
    s_fixed = first_step_at_or_below(fixed_log, target)
    s_tuned = first_step_at_or_below(tuned_log, target)
    return {
        "meta_convergence_rate": 0.0 if s_tuned is None else s_fixed / s_tuned,  # type: ignore[operator]
        "steps_to_fixed_final": s_tuned,
        "fixed_steps_to_final": s_fixed,
    }
