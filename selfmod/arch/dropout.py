"""Concrete dropout as a module whose rate the run learns (one rate per dropout site).

The module holds no rate of its own: the caller supplies ``{site}.rate ()`` and
``{site}.noise (B, >=W)`` by name through :func:`torch.func.functional_call` (see
:class:`selfmod.models.FunctionalModel`'s ``extra``), so the rate is an ordinary differentiable
input. Without them, or in eval mode, it is the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: concrete-dropout temperature (Gal et al. 2017 use 0.1)
TEMPERATURE = 0.1


def concrete_dropout(h: Tensor, p: Tensor, u: Tensor) -> Tensor:
    """Relaxed dropout, differentiable in the rate ``p``: the drop mask is
    ``z = sigmoid((logit p + logit u) / t)``, the output ``h (1 - z) / (1 - p)``, with
    ``1 - z = sigmoid(-(logit p + logit u) / t)``.

    ``h (B, W, *rest)``, ``p ()``, ``u (B, W)`` uniform noise (one mask entry per unit, shared
    along ``rest``). References: Gal, Hron & Kendall 2017.
    """
    eps = 1e-7
    keep = torch.sigmoid((torch.logit(p, eps) + torch.logit(u, eps)) / -TEMPERATURE)  # (B, W)
    if h.dim() > 2:
        keep = keep.reshape(*keep.shape, *([1] * (h.dim() - 2)))
    return h * keep / (1.0 - p)


class ConcreteDropout(nn.Module):
    """Concrete dropout over dim 1 (units of a ``Linear``, channels of a conv) with a rate and
    noise supplied by name: ``h (B, W, *rest) -> h * keep / (1 - rate)`` in training mode when
    ``noise`` is non-empty, else ``h``."""

    rate: Tensor
    noise: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("rate", torch.zeros(()), persistent=False)
        self.register_buffer("noise", torch.zeros(0), persistent=False)

    def forward(self, h: Tensor) -> Tensor:
        if not self.training or self.noise.numel() == 0:
            return h
        return concrete_dropout(h, self.rate, self.noise[: h.shape[0], : h.shape[1]])
