"""Online hypergradient descent, and stacks of it where each level's step size is learned by
the level above.

With ``theta_t = theta_{t-1} - alpha d_{t-1}``, the derivative of the new loss with respect to
the learning rate is ``h_t = dL(theta_t)/dalpha = -g_t . d_{t-1}``, so one extra dot product per
step gives ``alpha_t = alpha_{t-1} - beta h_t`` (SGD-HD: ``d`` is the gradient; Adam-HD: Adam's
direction). Stacking: ``beta`` itself moves by ``beta_t = beta_{t-1} - gamma h'_t`` with
``h'_t = dL_t/dbeta = -h_t h_{t-1}``, and so on up to a fixed top step size.
References: Baydin et al. 2018, "Online Learning Rate Adaptation with Hypergradient Descent";
Chandra et al. 2022, "Gradient Descent: The Ultimate Optimizer".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from selfmod import tree
from selfmod.optim.base import GradientTransformation, Params, check_range
from selfmod.optim.transforms import add_decayed_weights, chain, identity, scale_by_adam


class HypergradientState(NamedTuple):
    lr: Tensor | Params  # level-0 learning rate: 0-dim, or one 0-dim tensor per param tensor
    hyper_lrs: Tensor  # (height - 1,) rates r_1..r_{H-1}; the top rate r_H stays fixed
    hypergrads: Tensor  # (height,) last step's hypergradients h_0..h_{H-1} of r_0..r_{H-1}
    direction: Params  # previous step direction d_{t-1}, shaped like params
    inner: Any  # state of the direction transform


def hyperoptimizer_stack(
    lr: float,
    hyper_lrs: Sequence[float],
    direction: GradientTransformation | None = None,
    per_tensor: bool = False,
) -> GradientTransformation:
    """Descend along ``direction`` (default: the raw gradient) with a learning rate adapted by
    its hypergradient; ``hyper_lrs = [beta_1, ..., beta_H]``: ``beta_i`` is the step size of
    level ``i-1``'s rate, adapted in turn by ``beta_{i+1}``; ``beta_H`` is fixed.

    Height 1 (``hyper_lrs=[beta]``) is hypergradient descent. ``per_tensor`` keeps one level-0
    rate per parameter tensor. ``grads`` must be the loss gradient. Hypergradients multiply up
    the stack (``h_i ~ h_{i-1}^2``), so keep ``g . d`` of order 1 or below, or the top levels
    run away.
    """
    check_range("lr", lr, 0.0)
    if len(hyper_lrs) < 1:
        raise ValueError("hyper_lrs needs at least one step size (got none)")
    for i, b in enumerate(hyper_lrs):
        check_range(f"hyper_lrs[{i}]", b, 0.0)
    direction = direction or identity()
    height = len(hyper_lrs)
    if per_tensor and height > 1:
        raise ValueError(
            "per_tensor supports a stack of height 1 (got a height of "
            f"{height}); use one rate for all tensors in taller stacks"
        )

    def h_dtype(state: HypergradientState) -> torch.dtype:
        return state.hypergrads.dtype

    def init(params: Params) -> HypergradientState:
        like = next(iter(params.values()))
        lr0 = torch.tensor(float(lr), dtype=like.dtype, device=like.device)
        return HypergradientState(
            {k: lr0.clone() for k in params} if per_tensor else lr0,
            torch.tensor([float(b) for b in hyper_lrs[:-1]], dtype=like.dtype),
            like.new_zeros(height),
            tree.zeros_like(params),
            direction.init(params),
        )

    def update(grads, state, params=None, hparams=None):
        # Rates r_0 = lr, r_1..r_{H-1} = state.hyper_lrs (adapted), r_H = hyper_lrs[-1] (fixed);
        # r_i <- r_i - r_{i+1} h_i with h_i = dL_t/dr_i.
        if per_tensor:
            h0 = {k: -torch.sum(grads[k] * state.direction[k]) for k in grads}
        else:
            h0 = -tree.vdot(grads, state.direction)
        hs = [h0]  # h_0; then h_i = -h_{i-1, t} h_{i-1, t-1}
        for i in range(1, height):
            hs.append(-hs[i - 1] * state.hypergrads[i - 1])
        rates = [*state.hyper_lrs, torch.as_tensor(float(hyper_lrs[-1]), dtype=h_dtype(state))]
        if per_tensor:
            lr_new = {k: a - rates[0] * h0[k] for k, a in state.lr.items()}
        else:
            lr_new = state.lr - rates[0] * h0
        hyper_new = (
            torch.stack([rates[i - 1] - rates[i] * hs[i] for i in range(1, height)])
            if height > 1
            else state.hyper_lrs
        )
        d, inner = direction.update(grads, state.inner, params, hparams)
        updates = {k: -(lr_new[k] if per_tensor else lr_new) * dk for k, dk in d.items()}
        return updates, HypergradientState(
            lr_new, hyper_new, torch.stack(hs) if not per_tensor else state.hypergrads, d, inner
        )

    return GradientTransformation(init, update)


def hypergradient_descent(
    lr: float,
    hyper_lr: float,
    direction: GradientTransformation | None = None,
    per_tensor: bool = False,
) -> GradientTransformation:
    """Hypergradient descent (a stack of height 1): ``alpha_t = alpha_{t-1} + beta g_t.d_{t-1}``.

    The current learning rate is ``state.lr``.
    """
    return hyperoptimizer_stack(lr, [hyper_lr], direction, per_tensor)


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


# ------------------------------------------------------------------ normalized, in log space

#: normalized hypergradient descent keeps every learning rate in [1e-6, 10]
LOG_LR_RANGE = (math.log(1e-6), math.log(10.0))


def cosine_hypergradient(grads: Params, previous: Params) -> Tensor:
    """``(T,)`` per tensor ``cos(g_i, -u_i)`` in ``[-1, 1]``: ``g`` this step's gradient, ``u``
    the previous update ``theta_t - theta_{t-1}`` (so ``-dL/dlog alpha_i / (|g_i| |u_i|)``);
    0 where either is zero. ``g . u < 0`` (the slope goes on) is positive: raise the rate."""
    keys = list(grads)
    g, u = [grads[k] for k in keys], [previous[k] for k in keys]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*g, *u)):
        dots = torch.stack([torch.sum(a * b) for a, b in zip(g, u, strict=True)])
        norms = torch.stack([a.norm() * b.norm() for a, b in zip(g, u, strict=True)])
    else:  # a base step: fewer dispatches
        dots = torch.stack(
            [torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(g, u, strict=True)]
        )
        norms = torch.stack(torch._foreach_norm(g)) * torch.stack(torch._foreach_norm(u))
    return (-dots / (norms + 1e-30)).clamp(-1.0, 1.0)


def online_log_lr(log_lr: Tensor, grads: Params, previous: Params, max_step: float) -> Tensor:
    """One step of normalized hypergradient descent on per-tensor log rates ``(T,)``:
    ``log alpha_i + max_step * cos(g_i, -u_i)``, clamped to ``LOG_LR_RANGE``; unchanged when
    there is no previous update or a tensor's shape changed since (surgery)."""
    if not previous or any(previous[k].shape != g.shape for k, g in grads.items()):
        return log_lr
    cos = cosine_hypergradient(grads, previous).to(log_lr.dtype)
    return (log_lr + max_step * cos).clamp(*LOG_LR_RANGE)


class OnlineLogLRState(NamedTuple):
    log_lr: Tensor  # (T,) per-tensor log learning rates, in the params' key order
    previous: Params  # the last update u_{t-1} = theta_t - theta_{t-1}; {} before the first
    inner: Any  # state of the direction transform


def normalized_hypergradient_descent(
    lr: float, max_step: float = 0.02, direction: GradientTransformation | None = None
) -> GradientTransformation:
    """``update_i = -alpha_i d_i`` with per-tensor rates learned online, scale-free:
    ``log alpha_i <- log alpha_i + max_step cos(g_i, -u_{i,t-1})`` before each step (no rate moves
    by more than ``max_step`` in log per step; each stays in [1e-6, 10]). ``d`` is ``direction``
    (default the gradient) and may include decoupled weight decay. ``state.log_lr`` holds the
    rates, in the params' key order. References: Baydin et al. 2018 (the hypergradient).
    """
    check_range("lr", lr, 1e-6, 10.0)
    check_range("max_step", max_step, 0.0, 1.0, low_open=True)
    direction = direction or identity()

    def init(params: Params) -> OnlineLogLRState:
        like = next(iter(params.values()))
        log_lr = torch.full((len(params),), math.log(lr), dtype=like.dtype, device=like.device)
        return OnlineLogLRState(log_lr, {}, direction.init(params))

    def update(grads, state, params=None, hparams=None):
        log_lr = online_log_lr(state.log_lr, grads, state.previous, max_step)
        d, inner = direction.update(grads, state.inner, params, hparams)
        keys = list(d)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (log_lr, *d.values())):
            rates = log_lr.exp()
            updates = {k: -rates[i] * d[k] for i, k in enumerate(keys)}
        else:
            out = torch._foreach_mul([d[k] for k in keys], (-log_lr.exp()).tolist())
            updates = dict(zip(keys, out, strict=True))
        return updates, OnlineLogLRState(log_lr, updates, inner)

    return GradientTransformation(init, update)


def adamw_hd(
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    max_step: float = 0.02,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> GradientTransformation:
    """AdamW whose per-tensor learning rates tune themselves by normalized hypergradient
    descent: ``p_i <- p_i - alpha_i (adam_dir_i + wd p_i)``, ``alpha_i`` as in
    :func:`normalized_hypergradient_descent` (the decay is decoupled, as in ``torch.optim.AdamW``,
    and scaled by the learned rate). A drop-in with :class:`selfmod.optim.Optimizer`:
    ``Optimizer(model.named_parameters(), adamw_hd())``."""
    check_range("weight_decay", weight_decay, 0.0)
    parts = [scale_by_adam(b1, b2, eps)]
    if weight_decay:
        parts.append(add_decayed_weights(weight_decay))
    return normalized_hypergradient_descent(lr, max_step, chain(*parts))
