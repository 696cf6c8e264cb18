"""MAML and Meta-SGD: the initial weights (and per-coordinate step sizes) are hyperparameters
of a short inner training run on each task's support set, scored on its query set.

For one task, ``adapt`` takes ``steps`` SGD steps on the support loss from ``theta``; the meta-loss
is the query loss at the adapted weights. Second-order MAML differentiates through the steps
(``hypergrad.reverse``: ``res.params`` is d meta-loss / d theta); first-order MAML uses the query
gradient at the adapted weights instead. Meta-SGD learns one step size per coordinate,
``theta' = theta - alpha * grad`` with ``alpha`` shaped like ``theta``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from selfmod import hypergrad, optim, tree
from selfmod.optim.base import GradientTransformation

Params = dict[str, Tensor]
TaskLoss = Callable[[Params, Any], Tensor]  # loss(params, batch) -> scalar

META_SGD_PREFIX = "alpha."


@dataclass(frozen=True)
class MetaGradient:
    """Mean over tasks: ``loss`` (query loss after adaptation), ``params`` (d loss / d theta),
    ``hparams`` (d loss / d hparams, e.g. Meta-SGD's step sizes), each a sum divided by the
    number of tasks in the *whole* meta-batch (so shards add up across ranks)."""

    loss: Tensor
    params: Params
    hparams: Params


def meta_sgd_optimizer(params: Params) -> tuple[GradientTransformation, Params]:
    """Meta-SGD's inner optimizer and its learnable step sizes ``alpha.<name>``, one per
    coordinate, initialised to 0.01 (Li et al. 2017)."""
    alphas = {META_SGD_PREFIX + k: torch.full_like(v, 0.01) for k, v in params.items()}
    names = list(params)
    return optim.sgd(lr=lambda h: {k: h[META_SGD_PREFIX + k] for k in names}), alphas


def adapt(
    loss: TaskLoss,
    optimizer: GradientTransformation,
    params: Params,
    hparams: Params,
    support: Any,
    steps: int,
) -> Params:
    """``steps`` optimizer steps on the support loss, without a graph (for evaluation)."""
    state = optimizer.init(params)
    final, _ = hypergrad.run(
        lambda p, h, b: loss(p, b),
        optimizer,
        params,
        state,
        hparams,
        [support] * steps,
        create_graph=False,
    )
    return final


def maml_step(
    loss: TaskLoss,
    params: Params,
    episodes: Sequence[Any],
    *,
    steps: int = 1,
    inner_lr: float = 0.4,
    optimizer: GradientTransformation | None = None,
    hparams: Params | None = None,
    first_order: bool = False,
    total_tasks: int | None = None,
) -> MetaGradient:
    """The MAML meta-gradient over ``episodes`` (each with ``.support`` and ``.query``).

    ``optimizer`` (default ``sgd(inner_lr)``) and its ``hparams`` define the inner loop; pass
    :func:`meta_sgd_optimizer`'s pair for Meta-SGD. ``total_tasks`` divides the sums (default
    ``len(episodes)``; the whole meta-batch's size when ``episodes`` is one rank's shard).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    if not episodes:
        raise ValueError("episodes is empty")
    optimizer = optimizer or optim.sgd(inner_lr)
    hparams = hparams or {}
    n = total_tasks or len(episodes)
    inner = lambda p, h, b: loss(p, b)  # noqa: E731
    total_loss = torch.zeros(())
    g_params = tree.zeros_like(params)
    g_hparams = tree.zeros_like(hparams)
    for ep in episodes:
        if first_order:
            adapted = adapt(loss, optimizer, params, hparams, ep.support, steps)
            w = tree.detach(adapted, requires_grad=True)
            value = loss(w, ep.query)
            gp = dict(zip(w, torch.autograd.grad(value, list(w.values())), strict=True))
            gh = tree.zeros_like(hparams)
        else:
            res = hypergrad.reverse(
                inner, inner, optimizer, params, hparams, [ep.support] * steps, ep.query
            )
            value, gp, gh = res.value, res.params, res.hparams
        total_loss = total_loss + value.detach()
        g_params = {k: g_params[k] + gp[k] for k in g_params}
        g_hparams = {k: g_hparams[k] + gh[k] for k in g_hparams}
    return MetaGradient(
        total_loss / n,
        {k: v / n for k, v in g_params.items()},
        {k: v / n for k, v in g_hparams.items()},
    )
