"""Growth: add units to a hidden layer without changing the network's function.

GradMax (Evci et al. 2022). Between ``h_in (B, n_in)`` (the producer layer's input) and
``delta (B, n_out)`` (the loss gradient at the consumer layer's output), new units with zero
fan-in and fan-out columns ``W_new (n_out, k)`` leave the function unchanged, and with
``f'(0) = 1`` (:class:`~selfmod.arch.models.GrowReLU`) their fan-in gradient is
``W_new^T M`` with ``M = sum_b delta_b h_in_b^T  (n_out, n_in)`` (``delta`` the gradient of the
batch-mean loss, so ``M`` is a mean over examples). Under the spectral-norm bound
``||W_new||_2 <= c`` its norm is maximal for ``W_new = c U_k``, the top-``k`` left singular
vectors of ``M``: ``||grad||_F^2 = c^2 sum_{i<=k} sigma_i^2``. (Under a Frobenius bound the
maximiser is rank one, so ``k`` new units would be ``k`` copies of one direction.)

With a plain ReLU, ``f'(0) = 0`` and zero-fan-in units never start learning. The dual form
(:func:`gradmax_fan_in_plan`) gives new units zero fan-out (the function is unchanged) and
fan-in ``v_i`` along the top right singular vectors of the same ``M``: for a unit in its linear
regime the fan-out gradient is ``M v_i``, of norm ``sigma_i``, the largest possible for a
unit-norm fan-in.

Net2Net splitting (Chen et al. 2016): duplicate unit ``j`` (same fan-in) and split its fan-out
between the two copies as ``(a, 1 - a)``; the sum is unchanged for any ``a``.

References: Evci, van Merrienboer, Unterthiner, Vladymyrov & Pedregosa 2022, "GradMax: Growing
Neural Networks using Gradient Information"; Chen, Goodfellow & Shlens 2016, "Net2Net".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from selfmod.arch.factorable import FactorableLinear
from selfmod.arch.surgery import Surgery, UnitGroup, grow_plan

Params = dict[str, Tensor]


class LayerSignals(NamedTuple):
    """What one ``nn.Linear`` saw on a batch."""

    inputs: Tensor  # (B, n_in)
    out_grad: Tensor  # (B, n_out): dL/d(layer output), L the batch-mean loss
    weight_grad: Tensor  # (n_out, n_in)


def linear_signals(
    model: nn.Module, params: Mapping[str, Tensor], loss_fn: Callable[[Tensor], Tensor], x: Tensor
) -> dict[str, LayerSignals]:
    """Inputs, output gradients and weight gradients of every ``nn.Linear`` in ``model`` (and
    every dense :class:`~selfmod.arch.factorable.FactorableLinear`), evaluated at ``params`` on the
    batch ``x``; ``loss_fn(output) -> scalar``."""
    seen: dict[str, list] = {}
    hooks = []
    for name, m in model.named_modules():
        dense = isinstance(m, FactorableLinear) and params[f"{name}.weight"].numel() > 0
        if isinstance(m, nn.Linear) or dense:

            def hook(mod, inp, out, name=name):
                rec = [inp[0].detach(), None]
                seen[name] = rec
                if out.requires_grad:
                    out.register_hook(lambda g: rec.__setitem__(1, g.detach()))

            hooks.append(m.register_forward_hook(hook))
    p = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in params.items()}
    try:
        loss = loss_fn(functional_call(model, p, (x,)))
        weights = {n: p[f"{n}.weight"] for n in seen}
        grads = torch.autograd.grad(loss, list(weights.values()))
    finally:
        for h in hooks:
            h.remove()
    return {
        n: LayerSignals(seen[n][0], seen[n][1], g)
        for (n, _), g in zip(weights.items(), grads, strict=True)
    }


def gradmax_directions(out_grad: Tensor, inputs: Tensor) -> tuple[Tensor, Tensor]:
    """``(U, sigma)``: left singular vectors ``U (n_out, r)`` and singular values ``sigma (r,)``
    of ``M = out_grad^T inputs``, largest first.

    ``out_grad (B, n_out)`` is the batch-mean loss's gradient at the consumer layer's output,
    ``inputs (B, n_in)``
    the producer layer's input. References: Evci et al. 2022, eq. 6.
    """
    u, s, _ = _gradmax_svd(out_grad, inputs)
    return u, s


def _gradmax_svd(out_grad: Tensor, inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``U (n_out, r)``, ``sigma (r,)``, ``Vh (r, n_in)`` of ``M = out_grad^T inputs``."""
    m = out_grad.transpose(0, 1) @ inputs  # (n_out, n_in)
    return torch.linalg.svd(m, full_matrices=False)


def gradmax_plan(
    group: UnitGroup,
    params: Mapping[str, Tensor],
    out_grad: Tensor,
    inputs: Tensor,
    k: int,
    scale: float = 1.0,
    side: str = "fan_in",
) -> Surgery:
    """Add ``k`` units along the top singular vectors of ``M = out_grad^T inputs``
    (``U (n_out, r)``, ``V (n_in, r)``) without changing the function (GradMax). ``side`` names
    the new units' weights whose gradient is maximised, as in :func:`growth_criterion`:

    - ``"fan_in"``: zero fan-in, fan-out ``scale * U[:, :k]``; the new fan-in weights' gradient
      norm is the largest possible for fan-out weights of spectral norm ``scale`` (needs
      ``f'(0) = 1``, :class:`~selfmod.arch.models.GrowReLU`).
    - ``"fan_out"`` (dual GradMax, :func:`gradmax_fan_in_plan`): zero fan-out, fan-in
      ``scale * V[:, :k]^T``; a new unit ``i`` in its linear regime gets the fan-out gradient
      ``M v_i`` of norm ``scale * sigma_i``, the largest possible for fan-in of norm ``scale``
      (works with ``f'(0) = 0`` activations such as ReLU, where zero fan-in units get no
      gradient). Needs a Linear producer.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1 (got {k})")
    if side not in ("fan_in", "fan_out"):
        raise ValueError(f'side must be "fan_in" or "fan_out" (got {side!r})')
    (target,) = _linear_consumer(group, params)
    if side == "fan_out":
        target = group.producers[0]
        if params[target.key].dim() != 2 or target.dim != 0:
            raise ValueError("dual GradMax needs a Linear producer (2-D weight, units on dim 0)")
    u, _, vh = _gradmax_svd(out_grad, inputs)  # u (n_out, r), vh (r, n_in)
    if k > vh.shape[0]:
        raise ValueError(
            f"GradMax can give at most rank(M) = {vh.shape[0]} directions "
            f"(asked for {k}); grow by fewer units or use split_plan"
        )
    # the new units' fan-out columns (n_out, k), or their fan-in rows (k, n_in)
    w_new = u[:, :k] if side == "fan_in" else vh[:k]
    return grow_plan(
        group, group.width(params), {target.key: (w_new * scale).to(params[target.key].dtype)}
    )


def gradmax_fan_in_plan(
    group: UnitGroup,
    params: Mapping[str, Tensor],
    out_grad: Tensor,
    inputs: Tensor,
    k: int,
    scale: float = 1.0,
) -> Surgery:
    """:func:`gradmax_plan` with ``side="fan_out"``: ``k`` units with zero fan-out and fan-in
    ``scale * V[:, :k]^T`` (dual GradMax, for ReLU)."""
    return gradmax_plan(group, params, out_grad, inputs, k, scale, side="fan_out")


def zero_plan(
    group: UnitGroup,
    params: Mapping[str, Tensor],
    k: int,
    init_std: float = 1e-2,
    generator: torch.Generator | None = None,
) -> Surgery:
    """Add ``k`` units with zero fan-out and small random fan-in ``N(0, init_std^2)``: the
    function is unchanged and the fan-out weights get the gradient ``delta h_new^T``."""
    w = params[group.producers[0].key]
    fan_in = torch.randn((k, *w.shape[1:]), generator=generator, dtype=w.dtype) * init_std
    return grow_plan(group, group.width(params), {group.producers[0].key: fan_in})


def split_plan(
    group: UnitGroup,
    params: Mapping[str, Tensor],
    units: Tensor,
    noise: float = 0.1,
    generator: torch.Generator | None = None,
) -> Surgery:
    """Net2Net: duplicate ``units`` (distinct indices); the fan-out of unit ``j`` is split as
    ``a_j`` (original) and ``1 - a_j`` (copy), ``a_j = 1/2 + noise * U(-1/2, 1/2)``.

    The copies' optimizer state is a copy of the originals' (the index repeats them).
    """
    units = torch.as_tensor(units, dtype=torch.long)
    if units.unique().numel() != units.numel():
        raise ValueError("split_plan needs distinct units; split again to make more copies")
    width = group.width(params)
    a = 0.5 + noise * (torch.rand(units.numel(), generator=generator, dtype=torch.float64) - 0.5)
    index = torch.cat([torch.arange(width), units])
    sc = torch.ones(width + units.numel(), dtype=torch.float64)
    sc[units] = a
    sc[width:] = 1.0 - a
    return Surgery(group, index, {}, {s.key: sc for s in group.consumers})


class GrowthDecision(NamedTuple):
    k: int  # units to add
    sigma: Tensor  # (r,) GradMax singular values
    reference: float  # the existing units' mean normalised fan-in gradient norm
    fan_in: Tensor  # (r, n_in) right singular vectors: the fan-in directions, largest first


def growth_criterion(
    signals_producer: LayerSignals,
    signals_consumer: LayerSignals,
    consumer_weight: Tensor,
    threshold: float = 1.0,
    max_new: int = 8,
    max_width: int | None = None,
    side: str = "fan_in",
    producer_weight: Tensor | None = None,
) -> GrowthDecision:
    """How many units to add to the layer between ``producer`` and ``consumer``.

    ``side = "fan_in"`` (:func:`gradmax_plan`): an existing unit ``j`` gets a fan-in gradient
    of norm ``g_j = ||dL/dW_P[j]||`` for a fan-out of norm ``||W_C[:, j]||``; per unit of
    fan-out norm that is ``r_j = g_j / ||W_C[:, j]||``. A GradMax unit along the ``i``-th
    direction gets ``sigma_i`` per unit of fan-out norm. ``side = "fan_out"``
    (:func:`gradmax_fan_in_plan`, needs ``producer_weight``): ``r_j = ||dL/dW_C[:, j]|| /
    ||W_P[j]||``, fan-out gradient per unit of fan-in norm, against a new unit's ``sigma_i``.
    Grow the directions with ``sigma_i > threshold * mean_j r_j`` (at most ``max_new``): new
    units would learn faster than the average existing one. ``max_width`` caps the layer's
    width (``width + k <= max_width``).
    """
    _, sigma, fan_in = _gradmax_svd(signals_consumer.out_grad, signals_producer.inputs)
    if side == "fan_in":
        g = signals_producer.weight_grad.norm(dim=1)  # (width,)
        norm = consumer_weight.norm(dim=0).clamp_min(1e-12)  # (width,)
    elif side == "fan_out":
        if producer_weight is None:
            raise ValueError('side="fan_out" needs producer_weight (the fan-in weights)')
        g = signals_consumer.weight_grad.norm(dim=0)  # (width,)
        norm = producer_weight.norm(dim=1).clamp_min(1e-12)  # (width,)
    else:
        raise ValueError(f'side must be "fan_in" or "fan_out" (got {side!r})')
    ref = float((g / norm).mean())
    k = min(int((sigma > threshold * ref).sum()), max_new)
    if max_width is not None:
        if max_width < 1:
            raise ValueError(f"max_width must be >= 1 (got {max_width}); None for no cap")
        k = max(0, min(k, max_width - g.shape[0]))
    return GrowthDecision(k, sigma, ref, fan_in)


def _linear_consumer(group: UnitGroup, params: Mapping[str, Tensor]):
    if (
        len(group.consumers) != 1
        or group.consumers[0].repeat != 1
        or params[group.consumers[0].key].dim() != 2
    ):
        raise ValueError(
            "GradMax growth is implemented for Linear -> Linear groups (one 2-D "
            "consumer, repeat 1); use zero_plan or split_plan for convolutions"
        )
    return group.consumers
