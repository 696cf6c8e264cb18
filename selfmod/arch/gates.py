"""Unit and channel gates for pruning: hard-concrete (L0) gates and straight-through masks.

A gate multiplies the units of a layer's output, along dimension 1: ``y[:, j, ...] <- z_j
y[:, j, ...]``. It sits after the activation, so a closed gate (``z_j = 0``) means unit ``j``
contributes nothing downstream and surgery can remove its rows and columns exactly.

Hard-concrete (Louizos et al. 2018), with ``u ~ U(0, 1)``::

    s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
    z = clamp(s (r - l) + l, 0, 1)                      # training: a sample
    z = clamp(sigmoid(log_alpha) (r - l) + l, 0, 1)     # eval: deterministic
    E[||z||_0] = sum_j sigmoid(log_alpha_j - beta log(-l / r))

References: Louizos, Welling & Kingma 2018, "Learning Sparse Neural Networks through L0
Regularization"; Bengio, Leonard & Courville 2013 (straight-through estimator).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

BETA = 2.0 / 3.0
LIMIT_L = -0.1
LIMIT_R = 1.1


def hard_concrete_sample(
    log_alpha: Tensor,
    beta: float = BETA,
    l: float = LIMIT_L,
    r: float = LIMIT_R,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One reparameterised sample ``z`` in ``[0, 1]`` per gate; differentiable in ``log_alpha``.

    ``log_alpha (C,) -> z (C,)``. Exact zeros and ones have positive probability.
    """
    _check(beta, l, r)
    u = torch.rand(
        log_alpha.shape, dtype=log_alpha.dtype, device=log_alpha.device, generator=generator
    ).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)  # (C,)
    return (s * (r - l) + l).clamp(0.0, 1.0)


def hard_concrete_eval(log_alpha: Tensor, l: float = LIMIT_L, r: float = LIMIT_R) -> Tensor:
    """Deterministic test-time gate ``clamp(sigmoid(log_alpha) (r - l) + l, 0, 1)``, ``(C,)``."""
    return (torch.sigmoid(log_alpha) * (r - l) + l).clamp(0.0, 1.0)


def prob_nonzero(
    log_alpha: Tensor, beta: float = BETA, l: float = LIMIT_L, r: float = LIMIT_R
) -> Tensor:
    """``P(z_j != 0) = sigmoid(log_alpha_j - beta log(-l / r))`` per gate, ``(C,)``."""
    _check(beta, l, r)
    return torch.sigmoid(log_alpha - beta * math.log(-l / r))


def expected_l0(
    log_alpha: Tensor, beta: float = BETA, l: float = LIMIT_L, r: float = LIMIT_R
) -> Tensor:
    """Expected number of open gates ``E[||z||_0] = sum_j P(z_j != 0)``, a 0-dim tensor.

    References: Louizos et al. 2018, eq. 12.
    """
    return prob_nonzero(log_alpha, beta, l, r).sum()


def straight_through_mask(scores: Tensor, threshold: float = 0.0) -> Tensor:
    """Binary mask ``1[scores > threshold]`` forward, gradient of ``sigmoid(scores)`` backward.

    ``scores (C,) -> mask (C,)`` with values exactly 0 or 1. References: Bengio et al. 2013.
    """
    soft = torch.sigmoid(scores - threshold)
    hard = (scores > threshold).to(scores.dtype)
    return hard + (soft - soft.detach())


def apply_gate(x: Tensor, z: Tensor) -> Tensor:
    """Multiply units (dimension 1) by the gate: ``x (B, C, *S) * z (C,) -> (B, C, *S)``."""
    if x.shape[1] != z.shape[0]:
        raise ValueError(
            f"gate has {z.shape[0]} units but the input has {x.shape[1]} along "
            f"dim 1 (shape {tuple(x.shape)}); the gate must match the layer's width"
        )
    return x * z.reshape(z.shape[0], *([1] * (x.dim() - 2)))


class HardConcreteGate(nn.Module):
    """``y = x * z`` along dim 1 with hard-concrete gates: a sample in training, the
    deterministic gate in eval. Its one parameter is ``log_alpha (C,)``.

    ``init_open`` is the initial deterministic gate value's pre-stretch probability
    ``sigmoid(log_alpha)`` (Louizos et al. initialise near open, e.g. 0.9).
    """

    def __init__(
        self,
        num_units: int,
        init_open: float = 0.9,
        beta: float = BETA,
        l: float = LIMIT_L,
        r: float = LIMIT_R,
    ) -> None:
        super().__init__()
        if not 0.0 < init_open < 1.0:
            raise ValueError(f"init_open must be in (0, 1) (got {init_open})")
        _check(beta, l, r)
        self.beta, self.l, self.r = beta, l, r
        init = math.log(init_open / (1 - init_open))
        self.log_alpha = nn.Parameter(torch.full((num_units,), init))

    def gate(self, generator: torch.Generator | None = None) -> Tensor:
        """The gate values ``z (C,)`` for the current mode."""
        if self.training:
            return hard_concrete_sample(self.log_alpha, self.beta, self.l, self.r, generator)
        return hard_concrete_eval(self.log_alpha, self.l, self.r)

    def forward(self, x: Tensor) -> Tensor:
        return apply_gate(x, self.gate())

    def expected_l0(self) -> Tensor:
        return expected_l0(self.log_alpha, self.beta, self.l, self.r)

    def closed(self) -> Tensor:
        """Boolean ``(C,)``: gates whose deterministic value is exactly 0."""
        return hard_concrete_eval(self.log_alpha, self.l, self.r) == 0


class StraightThroughGate(nn.Module):
    """``y = x * 1[scores > 0]`` along dim 1 with a straight-through (sigmoid) gradient."""

    def __init__(self, num_units: int, init: float = 1.0) -> None:
        super().__init__()
        self.scores = nn.Parameter(torch.full((num_units,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return apply_gate(x, straight_through_mask(self.scores))

    def closed(self) -> Tensor:
        return self.scores <= 0


def _check(beta: float, l: float, r: float) -> None:
    if beta <= 0:
        raise ValueError(f"beta must be > 0 (got {beta}); Louizos et al. use 2/3")
    if not (l < 0 and r > 1):
        raise ValueError(
            f"the stretch interval must satisfy l < 0 < 1 < r (got l={l}, r={r}); "
            f"Louizos et al. use (-0.1, 1.1)"
        )
