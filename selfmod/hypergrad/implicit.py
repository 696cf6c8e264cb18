"""Implicit differentiation at the end point of training.

If training converged to ``w*`` with ``grad_w L_in(w*, h) = 0``, the implicit function theorem
gives ``dw*/dh = -H^{-1} d2L_in/dw dh`` with ``H = d2L_in/dw2``, so

    d value/dh = dL_out/dh - (d2L_in/dh dw) v,   where   H v = dL_out/dw.

``v`` comes from conjugate gradients or a Neumann series, using Hessian-vector products only.
Hyperparameters that act only through the optimizer (learning rates) do not move ``w*`` and
get only their direct term.
References: Lorraine, Vicol & Duvenaud 2020; Pedregosa 2016; Rajeswaran et al. 2019.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from selfmod import tree
from selfmod.hypergrad.contract import MetaProblem, estimator, prepare
from selfmod.hypergrad.unroll import (
    FiniteMonitor,
    HypergradResult,
    grads_or_zeros,
    outer_value,
    result,
    run,
    second_order,
)

Hvp = Callable[[list[Tensor]], list[Tensor]]


@estimator
def implicit(
    problem: MetaProblem,
    *,
    solver: Literal["cg", "neumann"] = "cg",
    iters: int = 20,
    damping: float = 0.0,
    alpha: float | None = None,
    hessian_batch: Any = None,
    state: Any = None,
) -> HypergradResult:
    """IFT hypergradient at the params reached after the K inner steps.

    Options:
        solver: ``"cg"`` (conjugate gradients; needs a positive-definite ``H + damping I``) or
            ``"neumann"`` (``v = alpha sum_j (I - alpha H)^j g``; needs ``alpha < 2/lambda_max``).
        iters: CG iterations or Neumann terms.
        damping: added to the Hessian's diagonal (Tikhonov), for non-convex inner problems.
        alpha: Neumann step; default ``1 / lambda_max`` from 20 power iterations.
        hessian_batch: the batch for ``L_in`` in the Hessian and mixed term; default the last
            inner batch.
    ``result.params`` is ``None``: at a fixed point the answer does not depend on the start.
    """
    if solver not in ("cg", "neumann"):
        raise ValueError(f"solver must be 'cg' or 'neumann' (got {solver!r})")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1 (got {iters!r})")
    if damping < 0:
        raise ValueError(f"damping must be >= 0 (got {damping})")
    p0, h, batches = prepare(problem)
    inner_loss, optimizer = problem.inner_loss, problem.optimizer
    if hessian_batch is None:
        if not batches:
            raise ValueError("implicit needs inner_batches or a hessian_batch")
        hessian_batch = batches[-1]
    state = optimizer.init(p0) if state is None else state
    monitor = FiniteMonitor()
    pk, final_state = run(
        inner_loss,
        optimizer,
        tree.detach(p0),
        state,
        tree.detach(h),
        batches,
        create_graph=False,
        monitor=monitor,
    )
    monitor.check()

    w = tree.detach(pk, requires_grad=True)
    value = outer_value(problem.outer_loss, w, h, problem.outer_batch)
    g = grads_or_zeros([value], [*h.values(), *w.values()])
    direct, g_w = g[: len(h)], g[len(h) :]

    with torch.enable_grad(), second_order(True):  # Hessian-vector products: double backward
        grad_w = torch.autograd.grad(
            inner_loss(w, h, hessian_batch),
            tuple(w.values()),
            create_graph=True,
            materialize_grads=True,
        )

    def hvp(v: list[Tensor]) -> list[Tensor]:
        hv = torch.autograd.grad(
            grad_w, tuple(w.values()), grad_outputs=v, retain_graph=True, materialize_grads=True
        )
        return [a + damping * b for a, b in zip(hv, v, strict=True)] if damping else list(hv)

    if solver == "cg":
        v = conjugate_gradient(hvp, g_w, iters)
    else:
        v = neumann(hvp, g_w, iters, alpha if alpha is not None else 1.0 / max_eigenvalue(hvp, g_w))
    mixed = grads_or_zeros(list(grad_w), list(h.values()), grad_outputs=v, retain_graph=False)
    hgrads = [d - m for d, m in zip(direct, mixed, strict=True)]
    return result(value, h, hgrads, None, None, w, final_state)


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return sum(torch.sum(x * y) for x, y in zip(a, b, strict=True))


def conjugate_gradient(hvp: Hvp, b: list[Tensor], iters: int, tol: float = 1e-20) -> list[Tensor]:
    """Solve ``H x = b`` for symmetric positive-definite ``H`` given as ``hvp``."""
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    d = [t.clone() for t in b]
    rr = _dot(r, r)
    for _ in range(iters):
        if rr <= tol:
            break
        hd = hvp(d)
        step = rr / _dot(d, hd)
        x = [xi + step * di for xi, di in zip(x, d, strict=True)]
        r = [ri - step * hi for ri, hi in zip(r, hd, strict=True)]
        rr_new = _dot(r, r)
        d = [ri + (rr_new / rr) * di for ri, di in zip(r, d, strict=True)]
        rr = rr_new
    return [t.detach() for t in x]


def neumann(hvp: Hvp, b: list[Tensor], iters: int, alpha: float) -> list[Tensor]:
    """``H^{-1} b ~= alpha sum_{j=0}^{iters} (I - alpha H)^j b``."""
    term = [t.clone() for t in b]
    total = [t.clone() for t in b]
    for _ in range(iters):
        hterm = hvp(term)
        term = [t - alpha * ht for t, ht in zip(term, hterm, strict=True)]
        total = [s + t for s, t in zip(total, term, strict=True)]
    return [alpha * t.detach() for t in total]


def max_eigenvalue(hvp: Hvp, like: list[Tensor], iters: int = 20) -> float:
    """Largest eigenvalue of ``H`` by power iteration (for a positive semi-definite ``H``)."""
    gen = torch.Generator().manual_seed(0)
    v = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in like]
    lam = torch.tensor(1.0)
    for _ in range(iters):
        n = torch.sqrt(_dot(v, v))
        v = [t / n for t in v]
        hv = hvp(v)
        lam = _dot(v, hv)
        v = [t.detach() for t in hv]
    return max(float(lam), 1e-12)
