"""Budget-controlled sparsity: drive a differentiable cost (expected parameters under L0 gates)
to a target with a Lagrange multiplier instead of a hand-tuned penalty weight.

The constrained problem ``min_theta L(theta)  s.t.  c(theta) <= target`` becomes the saddle
point of the Lagrangian ``L(theta) + lam (c(theta) / target - 1)`` with ``lam >= 0``: the
weights descend it, the multiplier ascends it (projected dual ascent)::

    lam <- max(0, lam + lr (c / target - 1))

so ``lam`` grows while the network is over budget and decays to 0 once it is under, where the
task loss alone is free to reopen gates. Integral control alone winds up while the gates lag
a moving target and then overshoots it; a proportional term ``kp (c / target - 1)`` added to
``lam`` damps that (a PI controller). A fixed penalty ``lam c`` lands wherever the loss and
the penalty balance, which depends on the data, the width and the step count; the multiplier
finds the ``lam`` that lands on the target. A ramped target (``ramp``) lets the network shed
units gradually, as in gradual magnitude pruning.

For independent unit gates the expected parameter count of an MLP is exact in the expected
widths, because ``E[n_i n_{i+1}] = E[n_i] E[n_{i+1}]``::

    E[#params] = sum_i (E[n_{i-1}] E[n_i] + E[n_i]),   n_0 = inputs, n_L = outputs (fixed)

Usage, with ``total`` the dense parameter count::

    state = budget_init()
    for step in range(steps):
        frac = gated_mlp_expected_params(model) / total      # () differentiable in log_alpha
        target = ramp(step, ramp_steps, 1.0, 0.24)
        loss = task_loss + budget_penalty(frac, target, state)
        ...                                                  # backward, optimizer step
        state = budget_update(state, frac.detach(), target, lr=0.05, kp=20.0)

References: Gallego-Posada, Ramirez, Erraqabi, Bengio & Lacoste-Julien 2022, "Controlled
Sparsity via Constrained Optimization"; Louizos, Welling & Kingma 2018 (L0 gates); Zhu &
Gupta 2017, "To prune, or not to prune" (gradual schedule).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from selfmod.arch.gates import HardConcreteGate


class BudgetState(NamedTuple):
    """State of the budget controller."""

    multiplier: Tensor  # () float, the Lagrange multiplier used in the penalty
    integral: Tensor  # () float, the accumulated (integral) part of the multiplier


def budget_init(multiplier: float = 0.0) -> BudgetState:
    """A controller with ``lam = multiplier``."""
    if multiplier < 0:
        raise ValueError(f"multiplier must be >= 0 (got {multiplier}); it weights a constraint")
    m = torch.tensor(float(multiplier))
    return BudgetState(m, m.clone())


def budget_penalty(cost: Tensor, target: float | Tensor, state: BudgetState) -> Tensor:
    """``lam (cost / target - 1)``, a 0-dim tensor differentiable in ``cost`` (``lam`` is a
    constant here: the multiplier moves only through :func:`budget_update`)."""
    _check_target(target)
    return state.multiplier.to(cost) * (cost / target - 1.0)


def budget_update(
    state: BudgetState,
    cost: Tensor | float,
    target: float | Tensor,
    lr: float,
    kp: float = 0.0,
    restart: bool = True,
    equality: bool = False,
) -> BudgetState:
    """One PI step of the multiplier on the violation ``v = cost / target - 1``; no graph::

        I   <- I + lr v                 # dual ascent (the integral term)
        lam <- I + kp v                 # plus a proportional term that damps overshoot

    For the inequality ``cost <= target`` both are projected onto ``>= 0``, and ``restart``
    sets ``I = 0`` as soon as the inequality holds (the "dual restart" of Gallego-Posada et
    al.): the multiplier accumulated while over budget would otherwise keep pruning long after
    the target is met. ``equality``: the constraint is ``cost = target``; ``lam`` may go
    negative, which reopens gates when the cost undershoots. ``kp = 0`` is plain dual ascent.

    References: Gallego-Posada et al. 2022; Sohrabi et al. 2024, "On PI Controllers for
    Updating Lagrange Multipliers in Constrained Optimization".
    """
    _check_target(target)
    if lr <= 0:
        raise ValueError(f"lr must be > 0 (got {lr}); it is the multiplier's step size")
    if kp < 0:
        raise ValueError(f"kp must be >= 0 (got {kp}); it is the proportional gain")
    v = float(cost) / float(target) - 1.0
    integral = state.integral + lr * v
    if not equality:
        integral = torch.zeros_like(integral) if restart and v <= 0 else integral.clamp_min(0.0)
    lam = integral + kp * v
    return BudgetState(lam if equality else lam.clamp_min(0.0), integral)


def ramp(step: int, steps: int, start: float, end: float) -> float:
    """Cubic schedule from ``start`` (step 0) to ``end`` (step ``steps`` and after):
    ``end + (start - end) (1 - t)^3``, ``t = min(step / steps, 1)``; fast early, slow late.

    References: Zhu & Gupta 2017 (the cubic sparsity schedule).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    t = min(max(step, 0) / steps, 1.0)
    return end + (start - end) * (1.0 - t) ** 3


def expected_mlp_params(widths: Sequence[Tensor | float]) -> Tensor:
    """``E[#params]`` of a chain of ``nn.Linear`` layers with (expected) widths
    ``[n_0, E[n_1], ..., E[n_{L-1}], n_L]``: ``sum_i E[n_{i-1}] E[n_i] + E[n_i]`` (weights
    and biases), exact for independent gates. Differentiable in the tensor entries."""
    if len(widths) < 2:
        raise ValueError(f"widths needs at least the input and output sizes (got {len(widths)})")
    w = [torch.as_tensor(n, dtype=torch.get_default_dtype()) for n in widths]
    return sum(a * b + b for a, b in itertools.pairwise(w))  # type: ignore[return-value]


def gated_mlp_expected_params(model: nn.Sequential) -> Tensor:
    """``E[#params]`` of a :func:`~selfmod.arch.models.gated_mlp` whose hidden layers each carry
    a :class:`HardConcreteGate`: :func:`expected_mlp_params` over the layers' widths, with each
    gated width replaced by ``E[||z||_0]``."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    gates = [m for m in model if isinstance(m, HardConcreteGate)]
    if not linears or len(gates) != len(linears) - 1:
        raise ValueError(
            f"expected a gated MLP (Linear -> act -> HardConcreteGate -> ... -> Linear) with one "
            f"gate per hidden layer; found {len(linears)} Linear and {len(gates)} gates"
        )
    widths: list[Tensor | float] = [float(linears[0].in_features)]
    widths += [g.expected_l0() for g in gates]
    widths.append(float(linears[-1].out_features))
    return expected_mlp_params(widths)


def _check_target(target: float | Tensor) -> None:
    if float(target) <= 0:
        raise ValueError(f"target must be > 0 (got {float(target)}); it is a cost budget")
