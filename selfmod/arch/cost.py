"""Cost model: parameters, FLOPs per example and activation memory, as plain numbers.

FLOPs count what runs on one example: ``Linear``: ``2 n_in n_out`` (+ ``n_out`` for the bias);
a factored :class:`~selfmod.arch.factorable.FactorableLinear`: ``2 r (n_in + n_out)``;
``Conv``: ``2 (C_in / groups) prod(k) C_out prod(L_out)`` (+ ``C_out prod(L_out)``). A
multiply-add is 2 FLOPs; elementwise ops (activations, gates, pooling) are not counted.
Activation memory is the bytes of every leaf module's output for one example (what a backward
pass keeps, to within the framework's choices). Only the candidates that run are counted, so a
GDAS network costs its sampled ops and a DARTS one all of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from selfmod.arch.factorable import FactorableLinear


class Cost(NamedTuple):
    params: int  # scalar parameters
    flops: int  # per example
    activation_bytes: int  # per example

    def __str__(self) -> str:
        return (
            f"params {self.params:,}  FLOPs/example {self.flops:,}  "
            f"activations/example {self.activation_bytes / 1024:.1f} KiB"
        )


def cost(
    model: nn.Module,
    example: Sequence[int] | Tensor,
    params: Mapping[str, Tensor] | None = None,
    buffers: Mapping[str, Tensor] | None = None,
) -> Cost:
    """The :class:`Cost` of ``model`` (evaluated at ``params`` if given, e.g. after functional
    surgery) on one example: ``example`` itself (a batch of one, ``(1, ...)``, any dtype: token
    ids too), or its shape without the batch dim (then zeros in the parameters' dtype);
    ``buffers``: some of the model's buffers replaced for the call (not counted)."""
    params = dict(model.named_parameters()) if params is None else dict(params)
    like = next(iter(params.values()))
    flops = [0]
    act = [0]

    def hook(mod: nn.Module, inp, out) -> None:
        if isinstance(out, Tensor):
            act[0] += out[0].numel() * out.element_size()
        if isinstance(mod, nn.Linear):
            n_in, n_out = mod.weight.shape[1], mod.weight.shape[0]
            rows = out[0].numel() // n_out
            flops[0] += rows * (2 * n_in * n_out + (n_out if mod.bias is not None else 0))
        elif isinstance(mod, FactorableLinear):
            w, left, right = mod.weight, mod.left, mod.right
            m = left.shape[0]
            rows = out[0].numel() // m
            mults = w.numel() if w.numel() else right.numel() + left.numel()
            flops[0] += rows * (2 * mults + (m if mod.bias is not None else 0))
        elif isinstance(mod, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            w = mod.weight  # (C_out, C_in / groups, *k)
            positions = out[0].numel() // w.shape[0]  # prod(L_out)
            per_pos = 2 * math.prod(w.shape) + (w.shape[0] if mod.bias is not None else 0)
            flops[0] += positions * per_pos

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            x = (
                example[:1]
                if isinstance(example, Tensor)
                else torch.zeros((1, *example), dtype=like.dtype, device=like.device)
            )
            functional_call(model, {**params, **(buffers or {})}, (x,))
    finally:
        for h in hooks:
            h.remove()
    return Cost(sum(v.numel() for v in params.values()), flops[0], act[0])


def compare(before: Cost, after: Cost) -> str:
    """One line per quantity: ``before -> after (ratio)``, for printing."""
    rows = []
    for name in Cost._fields:
        a, b = getattr(before, name), getattr(after, name)
        rows.append(
            f"{name:>16}: {a:>12,} -> {b:>12,}  (x{b / a:.3f})"
            if a
            else f"{name:>16}: {a:>12,} -> {b:>12,}"
        )
    return "\n".join(rows)
