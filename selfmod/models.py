"""Small models as pure functions of a params dict, and a bridge from ``nn.Module``.

``apply(params, x)`` with ``params: dict[str, Tensor]`` is the form every selfmod estimator
differentiates through.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

Params = dict[str, Tensor]


def mlp(sizes: Sequence[int], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """``Linear(sizes[0], sizes[1]) -> act -> ... -> Linear(sizes[-2], sizes[-1])``."""
    if len(sizes) < 2:
        raise ValueError(f"sizes needs at least 2 entries (got {list(sizes)})")
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def init_mlp_params(sizes: Sequence[int], generator: torch.Generator) -> Params:
    """He-initialised weights ``w{i} (sizes[i+1], sizes[i])`` and zero biases ``b{i}`` for
    :func:`mlp_forward`, a plain-dict MLP for meta-learning loops that make many small nets."""
    params = {}
    for i, (d_in, d_out) in enumerate(itertools.pairwise(sizes)):
        params[f"w{i}"] = torch.randn(d_out, d_in, generator=generator) * math.sqrt(2.0 / d_in)
        params[f"b{i}"] = torch.zeros(d_out)
    return params


def mlp_forward(params: Params, x: Tensor) -> Tensor:
    """``x (B, sizes[0]) -> (B, sizes[-1])`` through ReLU layers of :func:`init_mlp_params`."""
    n = len(params) // 2
    for i in range(n):
        x = F.linear(x, params[f"w{i}"], params[f"b{i}"])
        if i < n - 1:
            x = torch.relu(x)
    return x


def functionalize(module: nn.Module) -> tuple[Callable[[Params, Tensor], Tensor], Params]:
    """``(apply, params)`` with ``apply(params, x) == module(x)`` evaluated at ``params``.

    For a plain ReLU MLP (``nn.Sequential`` of ``Linear`` and ``ReLU``) the returned ``apply``
    is a direct chain of ``F.linear``/``relu`` calls, skipping ``functional_call``'s
    per-call module patching (a measurable cost on the small models of meta-learning).
    """
    params = {k: v.detach().clone() for k, v in module.named_parameters()}
    if isinstance(module, nn.Sequential) and all(
        isinstance(m, nn.Linear | nn.ReLU) for m in module
    ):
        plan = [
            (f"{i}.weight", f"{i}.bias") if isinstance(m, nn.Linear) else None
            for i, m in enumerate(module)
        ]

        def apply_mlp(p: Params, x: Tensor) -> Tensor:
            for step in plan:
                x = torch.relu(x) if step is None else F.linear(x, p[step[0]], p.get(step[1]))
            return x

        return apply_mlp, params

    def apply(p: Params, x: Tensor) -> Tensor:
        return functional_call(module, p, (x,))

    return apply, params


def cross_entropy_loss(apply: Callable[[Params, Tensor], Tensor]):
    """``loss(params, hparams, (x, y)) = CE(apply(params, x), y)``, the estimators' signature."""

    def loss(params: Params, hparams: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(apply(params, x), y)

    return loss


def accuracy(
    apply: Callable[[Params, Tensor], Tensor], params: Params, x: Tensor, y: Tensor
) -> float:
    with torch.no_grad():
        return (apply(params, x).argmax(-1) == y).float().mean().item()
