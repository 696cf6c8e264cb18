"""Probes measured every cycle, and meta-metrics computed over cycles.

Probes (one dict of floats per cycle): guard loss and accuracy, internal-train loss and
accuracy, the internal generalization gap ``guard_loss - train_loss``, accuracy on older
sources' guard data, robustness (guard accuracy under Gaussian input noise ``x + sigma eps``),
a self-generated shifted benchmark (guard signals circularly shifted by ``shift`` samples),
parameters, FLOPs and activation memory per example (:func:`selfmod.arch.cost`).

Meta-metrics (over the probe history):

- *meta-convergence rate*: the mean per-cycle decrease of ``log guard_loss`` until it first
  comes within 5% of its best value, and the cycle where that happens;
- *adaptation speed*: cycles after a distribution shift until the guard accuracy reaches 95%
  of the best value it attains after the shift (the new source may be harder than the old);
- *introspective stability*: the standard deviation of the guard loss over the last half of
  the cycles, and the fraction of sign changes of its successive differences (oscillation);
- *internal vs external gap*: the mean absolute difference between guard accuracy (internal)
  and test accuracy (external validation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

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


def meta_metrics(
    probes: Sequence[dict[str, float]], shift_cycle: int | None = None
) -> dict[str, float]:
    """The meta-metrics above from a list of per-cycle probe dicts."""
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
    return {
        "meta_convergence_rate": rate,
        "converged_at_cycle": float(at),
        "adaptation_cycles": adaptation(ga, shift_cycle),
        "guard_loss_std": std,
        "guard_loss_oscillation": osc,
        "internal_vs_external_acc_gap": gap,
    }
