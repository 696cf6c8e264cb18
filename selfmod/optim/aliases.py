"""The familiar optimizers, each a :func:`chain` of transforms, numerically equal to
their ``torch.optim`` namesakes; Adam and AdamW also carry torch's fused kernel as their
``step`` outside autograd (:mod:`.fused`)."""

from __future__ import annotations

from selfmod.optim.base import GradientTransformation, HParam, check_range, is_zero
from selfmod.optim.fused import adam_step
from selfmod.optim.transforms import (
    add_decayed_weights,
    chain,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_rms,
    trace,
)


def sgd(
    lr: HParam, momentum: HParam = 0.0, nesterov: bool = False, weight_decay: HParam = 0.0
) -> GradientTransformation:
    """``torch.optim.SGD``: ``g <- g + wd p``; ``m <- mu m + g``; ``p <- p - lr m``
    (Nesterov: ``p <- p - lr (g + mu m)``)."""
    check_range("lr", lr, 0.0)
    if nesterov and is_zero(momentum):
        raise ValueError("nesterov=True needs momentum > 0 (got momentum=0)")
    parts = []
    if not is_zero(weight_decay):
        parts.append(add_decayed_weights(weight_decay))
    if not is_zero(momentum):
        parts.append(trace(momentum, nesterov))
    parts.append(scale_by_learning_rate(lr))
    return chain(*parts)


def adam(
    lr: HParam = 1e-3,
    b1: HParam = 0.9,
    b2: HParam = 0.999,
    eps: HParam = 1e-8,
    weight_decay: HParam = 0.0,
    eps_root: float = 0.0,
) -> GradientTransformation:
    """``torch.optim.Adam`` (weight decay as an L2 term added to the gradient)."""
    check_range("lr", lr, 0.0)
    decay = [] if is_zero(weight_decay) else [add_decayed_weights(weight_decay)]
    wd = weight_decay if decay else 0.0
    fused = adam_step(lr, b1, b2, eps, wd, decoupled=False, at=len(decay))
    adam = chain(*decay, scale_by_adam(b1, b2, eps, eps_root), scale_by_learning_rate(lr))
    return adam._replace(step=fused)


def adamw(
    lr: HParam = 1e-3,
    b1: HParam = 0.9,
    b2: HParam = 0.999,
    eps: HParam = 1e-8,
    weight_decay: HParam = 1e-2,
    eps_root: float = 0.0,
) -> GradientTransformation:
    """``torch.optim.AdamW``: decoupled decay, ``p <- p - lr (adam_dir + wd p)``.
    References: Loshchilov & Hutter 2019."""
    check_range("lr", lr, 0.0)
    return chain(
        scale_by_adam(b1, b2, eps, eps_root),
        add_decayed_weights(weight_decay),
        scale_by_learning_rate(lr),
    )._replace(step=adam_step(lr, b1, b2, eps, weight_decay, decoupled=True))


def rmsprop(
    lr: HParam = 1e-2,
    alpha: HParam = 0.99,
    eps: HParam = 1e-8,
    weight_decay: HParam = 0.0,
    momentum: HParam = 0.0,
    centered: bool = False,
    eps_root: float = 0.0,
) -> GradientTransformation:
    """``torch.optim.RMSprop``: ``p <- p - lr * m``, ``m <- mu m + g / (sqrt(v) + eps)``."""
    check_range("lr", lr, 0.0)
    parts = [] if is_zero(weight_decay) else [add_decayed_weights(weight_decay)]
    parts.append(scale_by_rms(alpha, eps, centered, eps_root))
    if not is_zero(momentum):
        parts.append(trace(momentum))
    parts.append(scale_by_learning_rate(lr))
    return chain(*parts)
