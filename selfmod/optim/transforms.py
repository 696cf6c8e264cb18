"""Composable gradient transformations; each is one concept, :func:`chain` composes them.

Each returns a :class:`~selfmod.optim.base.GradientTransformation`. All maths is out of place
and differentiable with respect to hyperparameters, params and state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from selfmod import tree
from selfmod.optim.base import (
    EmptyState,
    GradientTransformation,
    HParam,
    Params,
    check_range,
    negate,
    per_key,
    resolve,
)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` in order; the state is the tuple of their states."""

    def init(params: Params) -> tuple[Any, ...]:
        return tuple(t.init(params) for t in transforms)

    def update(updates, state, params=None, hparams=None):
        new_state = []
        for t, s in zip(transforms, state, strict=True):
            updates, s = t.update(updates, s, params, hparams)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


def identity() -> GradientTransformation:
    """Leave updates unchanged."""
    return GradientTransformation(
        lambda params: EmptyState(), lambda u, s, params=None, hparams=None: (u, s)
    )


def _stateless(name: str, value: HParam, fn) -> GradientTransformation:
    """A transformation ``u_k <- fn(u_k, value_k, params_k)`` with no state."""

    def update(updates, state, params=None, hparams=None):
        v = resolve(value, hparams, name)
        if isinstance(v, Mapping):
            return {
                k: fn(u, per_key(v, k, name), None if params is None else params[k])
                for k, u in updates.items()
            }, state
        return {
            k: fn(u, v, None if params is None else params[k]) for k, u in updates.items()
        }, state

    return GradientTransformation(lambda params: EmptyState(), update)


def multiply(updates: Params, factor: Any, name: str) -> Params:
    """``u_k <- factor_k * u_k`` for every tensor in one fused ``foreach`` op.

    ``factor`` is a float, a 0-dim tensor, or a dict of those keyed like ``updates``. One
    autograd node for all tensors instead of one per tensor: this is on every inner step.
    """
    keys, us = list(updates), list(updates.values())
    if not isinstance(factor, Mapping | Tensor):
        return dict(zip(keys, torch._foreach_mul(us, factor), strict=True))
    factors = [per_key(factor, k, name) for k in keys] if isinstance(factor, Mapping) else None
    if factors is None:
        factors = [factor] * len(keys)
    elif all(not isinstance(f, Tensor) for f in factors):
        return dict(zip(keys, torch._foreach_mul(us, factors), strict=True))
    tensors = [
        f if isinstance(f, Tensor) else torch.as_tensor(f, dtype=u.dtype)
        for f, u in zip(factors, us, strict=True)
    ]
    return dict(zip(keys, torch._foreach_mul(us, tensors), strict=True))


def scale(step_size: HParam) -> GradientTransformation:
    """``u <- step_size * u``."""

    def update(updates, state, params=None, hparams=None):
        return multiply(updates, resolve(step_size, hparams, "step_size"), "step_size"), state

    return GradientTransformation(lambda params: EmptyState(), update)


def scale_by_learning_rate(lr: HParam) -> GradientTransformation:
    """``u <- -lr * u`` (descent). ``lr`` may be per tensor."""
    check_range("lr", lr, 0.0)

    def update(updates, state, params=None, hparams=None):
        return multiply(updates, resolve(lr, hparams, "lr", then=negate), "lr"), state

    return GradientTransformation(lambda params: EmptyState(), update)


def add_decayed_weights(weight_decay: HParam) -> GradientTransformation:
    """``u <- u + weight_decay * p`` (L2 gradient, or decoupled decay placed after scaling), one
    ``foreach`` call per operation (outside autograd the sum lands in place on the products)."""
    check_range("weight_decay", weight_decay, 0.0)

    def update(updates, state, params=None, hparams=None):
        if params is None:
            raise ValueError("add_decayed_weights needs params; pass params to update()")
        wd = resolve(weight_decay, hparams, "weight_decay")
        keys, us = list(updates), list(updates.values())
        decay = list(multiply({k: params[k] for k in keys}, wd, "weight_decay").values())
        if torch.is_grad_enabled():
            return dict(zip(keys, torch._foreach_add(us, decay), strict=True)), state
        torch._foreach_add_(decay, us)  # wd p + u: the same sum
        return dict(zip(keys, decay, strict=True)), state

    return GradientTransformation(lambda params: EmptyState(), update)


def clip(max_delta: float) -> GradientTransformation:
    """Clamp every coordinate to ``[-max_delta, max_delta]``."""
    check_range("max_delta", max_delta, 0.0, low_open=True)
    return _stateless("max_delta", max_delta, lambda u, m, p: u.clamp(-m, m))


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """``u <- u * min(1, max_norm / (||u|| + 1e-6))`` over all tensors, as ``clip_grad_norm_``."""
    check_range("max_norm", max_norm, 0.0, low_open=True)

    def update(updates, state, params=None, hparams=None):
        coef = torch.clamp(max_norm / (tree.norm(updates) + 1e-6), max=1.0)
        return {k: u * coef for k, u in updates.items()}, state

    return GradientTransformation(lambda params: EmptyState(), update)


class TraceState(NamedTuple):
    trace: Params  # momentum buffer, shaped like params


def trace(momentum: HParam, nesterov: bool = False) -> GradientTransformation:
    """Heavy-ball momentum as in ``torch.optim.SGD``: ``m <- mu m + u``; ``u <- m``
    (Nesterov: ``u <- u + mu m``)."""
    check_range("momentum", momentum, 0.0, 1.0)

    def init(params: Params) -> TraceState:
        return TraceState(tree.zeros_like(params))

    def update(updates, state, params=None, hparams=None):
        mu = resolve(momentum, hparams, "momentum")
        new_trace, out = {}, {}
        for k, u in updates.items():
            m = per_key(mu, k, "momentum")
            t = state.trace[k] * m + u
            new_trace[k] = t
            out[k] = u + m * t if nesterov else t
        return out, TraceState(new_trace)

    return GradientTransformation(init, update)


class UpdateSumState(NamedTuple):
    total: Params  # sum_k decay^k u_{t-k}, shaped like params


def sum_updates(decay: float) -> GradientTransformation:
    """Leave the updates unchanged and keep their discounted sum ``z <- decay z + u``.

    With ``theta_{t+1} = theta_t + u_t`` and ``u_t`` proportional to tensor ``i``'s learning
    rate ``eta_i``, ``d u_t[i] / d log eta_i = u_t[i]``; dropping the Hessian term of forward-mode
    differentiation, ``d theta_t[i] / d log eta_i ~ z[i]`` over a horizon of about
    ``1 / (1 - decay)`` steps (the first-order tangent of MARTHE, Donini et al. 2020).
    """
    check_range("decay", decay, 0.0, 1.0)

    def init(params: Params) -> UpdateSumState:
        return UpdateSumState(tree.zeros_like(params))

    def update(updates, state, params=None, hparams=None):
        total = {k: state.total[k] * decay + u for k, u in updates.items()}
        return updates, UpdateSumState(total)

    return GradientTransformation(init, update)


class AdamState(NamedTuple):
    count: int  # steps taken
    mu: Params  # first moment, shaped like params
    nu: Params  # second moment, shaped like params


def scale_by_adam(
    b1: HParam = 0.9, b2: HParam = 0.999, eps: HParam = 1e-8, eps_root: float = 0.0
) -> GradientTransformation:
    """Adam's direction ``m_hat / (sqrt(v_hat + eps_root) + eps)`` with bias correction.

    ``eps_root > 0`` keeps the meta-gradient finite where a gradient coordinate is exactly 0
    (``d sqrt(v)/dv`` is infinite at 0); the default 0 matches ``torch.optim.Adam``.
    References: Kingma & Ba 2015.
    """
    check_range("b1", b1, 0.0, 1.0, high_open=True)
    check_range("b2", b2, 0.0, 1.0, high_open=True)
    check_range("eps", eps, 0.0)
    check_range("eps_root", eps_root, 0.0)

    def init(params: Params) -> AdamState:
        return AdamState(0, tree.zeros_like(params), tree.zeros_like(params))

    def update(updates, state, params=None, hparams=None):
        b1v, b2v = resolve(b1, hparams, "b1"), resolve(b2, hparams, "b2")
        epsv = resolve(eps, hparams, "eps")
        t = state.count + 1
        shared = not any(isinstance(v, Mapping) for v in (b1v, b2v, epsv))
        # a 0-dim tensor times a 0-dim hyperparameter promotes to the wider dtype; foreach
        # keeps the tensor's: those stay in the loop
        if shared and not torch.is_grad_enabled() and all(u.dim() for u in updates.values()):
            keys = list(updates)
            m, v, out = _adam_direction_foreach(
                [state.mu[k] for k in keys], [state.nu[k] for k in keys],
                list(updates.values()), b1v, b2v, epsv, eps_root, t,
            )  # fmt: skip
            return (
                dict(zip(keys, out, strict=True)),
                AdamState(t, dict(zip(keys, m, strict=True)), dict(zip(keys, v, strict=True))),
            )
        mu, nu, out = {}, {}, {}
        for k, g in updates.items():
            k1, k2 = per_key(b1v, k, "b1"), per_key(b2v, k, "b2")
            m = state.mu[k] * k1 + g * (1 - k1)
            v = state.nu[k] * k2 + g * g * (1 - k2)
            mu[k], nu[k] = m, v
            v_hat = v / (1 - k2**t)
            if eps_root:
                v_hat = v_hat + eps_root
            out[k] = (m / (1 - k1**t)) / (torch.sqrt(v_hat) + per_key(epsv, k, "eps"))
        return out, AdamState(t, mu, nu)

    return GradientTransformation(init, update)


def _adam_direction_foreach(
    mu: list[Tensor], nu: list[Tensor], grads: list[Tensor], k1, k2, eps, eps_root: float, t: int
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """``(m, v, direction)`` of :func:`scale_by_adam` for one ``b1, b2, eps`` shared by all
    tensors: the per-tensor loop's operations in the same order, one ``foreach`` call each
    (bitwise equal, fewer dispatches), in place on the intermediates it made (fewer
    allocations: a large tensor's is page faults). Outside autograd only: a base step's cost."""
    m = torch._foreach_mul(mu, k1)
    torch._foreach_add_(m, torch._foreach_mul(grads, 1 - k1))  # mu k1 + g (1 - k1)
    v, g2 = torch._foreach_mul(nu, k2), torch._foreach_mul(grads, grads)
    torch._foreach_mul_(g2, 1 - k2)
    torch._foreach_add_(v, g2)  # nu k2 + g^2 (1 - k2)
    denom = torch._foreach_div(v, 1 - k2**t)  # v_hat
    if eps_root:
        torch._foreach_add_(denom, eps_root)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    out = torch._foreach_div(m, 1 - k1**t)
    torch._foreach_div_(out, denom)
    return m, v, out


class RmsState(NamedTuple):
    nu: Params  # running mean of squared gradients
    mean: Params | None  # running mean of gradients (centered only)


def scale_by_rms(
    alpha: HParam = 0.99, eps: HParam = 1e-8, centered: bool = False, eps_root: float = 0.0
) -> GradientTransformation:
    """RMSprop's direction ``u / (sqrt(v) + eps)``, ``v <- alpha v + (1 - alpha) u^2``, as
    ``torch.optim.RMSprop`` (centered: ``v - mean^2`` under the root). References: Tieleman &
    Hinton 2012."""
    check_range("alpha", alpha, 0.0, 1.0)
    check_range("eps", eps, 0.0)

    def init(params: Params) -> RmsState:
        return RmsState(tree.zeros_like(params), tree.zeros_like(params) if centered else None)

    def update(updates, state, params=None, hparams=None):
        av, epsv = resolve(alpha, hparams, "alpha"), resolve(eps, hparams, "eps")
        nu, mean, out = {}, ({} if centered else None), {}
        for k, g in updates.items():
            a = per_key(av, k, "alpha")
            v = state.nu[k] * a + g * g * (1 - a)
            nu[k] = v
            if centered:
                mean[k] = state.mean[k] * a + g * (1 - a)
                v = v - mean[k] * mean[k]
            if eps_root:
                v = v + eps_root
            out[k] = g / (torch.sqrt(v) + per_key(epsv, k, "eps"))
        return out, RmsState(nu, mean)

    return GradientTransformation(init, update)


__all__ = [
    "AdamState",
    "RmsState",
    "TraceState",
    "add_decayed_weights",
    "chain",
    "clip",
    "clip_by_global_norm",
    "identity",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_rms",
    "trace",
]
