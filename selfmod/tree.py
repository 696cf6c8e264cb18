"""Trees of tensors: params, gradients and optimizer state as ``dict[str, Tensor]``.

A *tree* here is a ``dict[str, Tensor]`` keyed by parameter name (as from
``module.named_parameters()``). Optimizer states are NamedTuples whose fields are such dicts or
scalars; :func:`leaves` and friends walk them through ``torch.utils._pytree``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

Tree = dict[str, Tensor]


def map(fn: Callable[..., Tensor], tree: Mapping[str, Tensor], *rest: Mapping[str, Tensor]) -> Tree:
    """``{k: fn(tree[k], *(r[k] for r in rest))}``; every tree must have ``tree``'s keys."""
    return {k: fn(v, *(r[k] for r in rest)) for k, v in tree.items()}


def zeros_like(tree: Mapping[str, Tensor]) -> Tree:
    return {k: torch.zeros_like(v) for k, v in tree.items()}


def detach(tree: Mapping[str, Tensor], requires_grad: bool = False) -> Tree:
    """Detached copies (sharing storage); optionally marked as new leaves of a graph."""
    return {k: v.detach().requires_grad_(requires_grad) for k, v in tree.items()}


def clone(tree: Mapping[str, Tensor]) -> Tree:
    """Detached copies with their own storage."""
    return {k: v.detach().clone() for k, v in tree.items()}


def add(a: Mapping[str, Tensor], b: Mapping[str, Tensor], alpha: float = 1.0) -> Tree:
    """``a + alpha * b``."""
    return {k: a[k] + alpha * b[k] if alpha != 1.0 else a[k] + b[k] for k in a}


def vdot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """Inner product ``sum_k <a_k, b_k>`` as a 0-dim tensor."""
    return sum((torch.sum(a[k] * b[k]) for k in a), torch.zeros((), dtype=_dtype(a)))


def norm(tree: Mapping[str, Tensor]) -> Tensor:
    """Global Euclidean norm ``sqrt(sum_k ||t_k||^2)``."""
    return torch.sqrt(vdot(tree, tree))


def size(tree: Mapping[str, Tensor]) -> int:
    """Total number of scalar elements."""
    return sum(v.numel() for v in tree.values())


def is_finite(tree: Any) -> bool:
    """True when every floating-point tensor leaf of ``tree`` is finite."""
    return all(bool(torch.isfinite(x).all()) for x in float_leaves(tree))


def float_leaves(tree: Any) -> list[Tensor]:
    """The floating-point tensor leaves of any pytree, in flattening order."""
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, Tensor) and x.is_floating_point()]


def partition(tree: Any) -> tuple[list[Tensor], Callable[[Iterable[Tensor]], Any]]:
    """Split a pytree into its floating-point tensor leaves and a function that puts them back.

    Integer tensors and Python scalars (step counters) stay inside the returned closure, so
    ``torch.autograd.grad`` or ``torch.func.jvp`` see only differentiable leaves.
    """
    flat, spec = pytree.tree_flatten(tree)
    slots = [i for i, x in enumerate(flat) if isinstance(x, Tensor) and x.is_floating_point()]
    leaves = [flat[i] for i in slots]
    static = [None if i in set(slots) else x for i, x in enumerate(flat)]

    def combine(new_leaves: Iterable[Tensor]) -> Any:
        out = list(static)
        for i, x in zip(slots, new_leaves, strict=True):
            out[i] = x
        return pytree.tree_unflatten(out, spec)

    return leaves, combine


def _dtype(tree: Mapping[str, Tensor]) -> torch.dtype:
    return next(iter(tree.values())).dtype if tree else torch.get_default_dtype()
