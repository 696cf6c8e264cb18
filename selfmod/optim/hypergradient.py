"""Online hypergradient descent: an optimizer that tunes its own learning rate every step.

With ``theta_t = theta_{t-1} - alpha d_{t-1}``, the derivative of the new loss with respect to
the learning rate is ``df(theta_t)/dalpha = -g_t . d_{t-1}``, so one extra dot product per step
gives ``alpha_t = alpha_{t-1} + beta g_t . d_{t-1}`` before stepping ``theta_{t+1} = theta_t -
alpha_t d_t``. ``d`` is the raw gradient for SGD-HD and Adam's direction for Adam-HD.
References: Baydin et al. 2018, "Online Learning Rate Adaptation with Hypergradient Descent".
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from selfmod import tree
from selfmod.optim.base import GradientTransformation, Params, check_range
from selfmod.optim.transforms import identity, scale_by_adam


class HypergradientState(NamedTuple):
    lr: Tensor | Params  # current learning rate: 0-dim, or one 0-dim tensor per param tensor
    direction: Params  # previous step direction d_{t-1}, shaped like params
    inner: Any  # state of the direction transform


def hypergradient_descent(
    lr: float,
    hyper_lr: float,
    direction: GradientTransformation | None = None,
    per_tensor: bool = False,
) -> GradientTransformation:
    """Descend along ``direction`` (default: the raw gradient) with a learning rate adapted by
    its own hypergradient. ``per_tensor`` keeps one learning rate per parameter tensor.

    The current learning rate is ``state.lr``. ``grads`` must be the loss gradient.
    """
    check_range("lr", lr, 0.0)
    check_range("hyper_lr", hyper_lr, 0.0)
    direction = direction or identity()

    def init(params: Params) -> HypergradientState:
        like = next(iter(params.values()))
        lr0 = torch.tensor(float(lr), dtype=like.dtype, device=like.device)
        return HypergradientState(
            {k: lr0.clone() for k in params} if per_tensor else lr0,
            tree.zeros_like(params),
            direction.init(params),
        )

    def update(grads, state, params=None, hparams=None):
        if per_tensor:
            rate = {
                k: a + hyper_lr * torch.sum(grads[k] * state.direction[k])
                for k, a in state.lr.items()
            }
        else:
            rate = state.lr + hyper_lr * tree.vdot(grads, state.direction)
        d, inner = direction.update(grads, state.inner, params, hparams)
        updates = {k: -(rate[k] if per_tensor else rate) * dk for k, dk in d.items()}
        return updates, HypergradientState(rate, d, inner)

    return GradientTransformation(init, update)


def sgd_hd(lr: float, hyper_lr: float = 1e-3, per_tensor: bool = False) -> GradientTransformation:
    """SGD-HD (Baydin et al. 2018)."""
    return hypergradient_descent(lr, hyper_lr, None, per_tensor)


def adam_hd(
    lr: float = 1e-3,
    hyper_lr: float = 1e-7,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    per_tensor: bool = False,
) -> GradientTransformation:
    """Adam-HD (Baydin et al. 2018): hypergradient descent along Adam's direction."""
    return hypergradient_descent(lr, hyper_lr, scale_by_adam(b1, b2, eps), per_tensor)
