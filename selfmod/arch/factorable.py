"""A linear layer that a run can factorize into a low-rank product.

:class:`FactorableLinear` holds ``weight (m, n)``, ``bias (m,)``, ``left (m, r)`` and
``right (r, n)``. While it is dense, ``left`` and ``right`` are empty (``r = 0``) and it is an
``nn.Linear``; once factored (:func:`selfmod.arch.lowrank.factorized_params`), ``weight`` is
empty (``(m, 0)``) and

    y = (x right^T) left^T + b        m n  ->  r (m + n) parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FactorableLinear(nn.Module):
    """``nn.Linear(in_features, out_features)`` that
    :func:`~selfmod.arch.lowrank.factorized_params` turns into ``x -> (x right^T) left^T + b``;
    initialised exactly as ``nn.Linear`` (the same random draws in the same order), so a network
    built with it computes what the plain one does."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        dense = nn.Linear(in_features, out_features, bias)
        self.weight = dense.weight  # (m, n); (m, 0) once factored
        self.bias = dense.bias
        self.left = nn.Parameter(torch.zeros(out_features, 0))  # (m, r)
        self.right = nn.Parameter(torch.zeros(0, in_features))  # (r, n)

    def forward(self, x: Tensor) -> Tensor:
        return factorable_linear(x, self.weight, self.bias, self.left, self.right)


def factorable_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, left: Tensor, right: Tensor
) -> Tensor:
    """``x (..., n) -> (..., m)``: ``x W^T + b`` while ``W`` is dense, else
    ``(x R^T) L^T + b``."""
    if weight.numel() or not right.numel():
        return F.linear(x, weight, bias)
    return F.linear(F.linear(x, right), left, bias)
