"""Forward-mode meta-gradients (real-time recurrent learning).

Carry the tangents ``Z_t = d(params_t, state_t) / d hparams`` along the unroll: one
Jacobian-vector product per step and hyperparameter, ``Z_{t+1} = dPhi/dw Z_t + dPhi/dh``,
batched over the hyperparameters with ``vmap``. Memory is independent of K (it holds H copies
of params and state), time grows with H: for few hyperparameters.

Random layers (dropout) draw one mask per step, shared by every tangent direction
(``vmap(randomness="same")``): the directions differentiate one training run. The global RNG
advances as in :func:`~selfmod.hypergrad.reverse`, so both see the same masks from one seed.
References: Williams & Zipser 1989; Franceschi et al. 2017 ("Forward and Reverse
Gradient-Based Hyperparameter Optimization").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.func import grad_and_value, jvp, vmap

from selfmod import tree
from selfmod.hypergrad.contract import MetaProblem, estimator, prepare
from selfmod.hypergrad.unroll import (
    FiniteMonitor,
    HypergradResult,
    Params,
    grads_or_zeros,
    outer_value,
    result,
    second_order,
)


@estimator
def forward(
    problem: MetaProblem,
    *,
    state: Any = None,
) -> HypergradResult:
    """Forward-mode (RTRL) hypergradient; ``result.params`` is ``None``."""
    p, h, batches = prepare(problem)
    inner_loss, optimizer = problem.inner_loss, problem.optimizer
    p, h = tree.detach(p), tree.detach(h)
    state = optimizer.init(p) if state is None else state
    s_leaves, rebuild = tree.partition(state)  # float leaves carry tangents
    keys = list(h)
    sizes = [h[k].numel() for k in keys]
    n = sum(sizes)

    # The basis of hparam space, one row per scalar hyperparameter: (n, *h[k].shape) per key.
    eye = torch.eye(n, dtype=h[keys[0]].dtype) if keys else torch.zeros(0, 0)
    basis = {
        k: block.reshape(n, *h[k].shape)
        for k, block in zip(keys, eye.split(sizes, dim=1), strict=True)
    }
    # Tangents of params and state: zero at the start (params_0 does not depend on hparams).
    tp = {k: v.new_zeros(n, *v.shape) for k, v in p.items()}
    ts = [x.new_zeros(n, *x.shape) for x in s_leaves]

    monitor = FiniteMonitor()
    for batch in batches:
        p, s_leaves, rebuild, tp, ts, loss, grads = _tangent_step(
            inner_loss, optimizer, p, s_leaves, rebuild, h, batch, tp, ts, basis
        )
        monitor.record(loss, list(grads.values()))
    monitor.check()
    p_final = tree.detach(p, requires_grad=True)
    h_req = tree.detach(h, requires_grad=True)
    value = outer_value(problem.outer_loss, p_final, h_req, problem.outer_batch)
    g = grads_or_zeros([value], [*h_req.values(), *p_final.values()])
    g_h, g_p = g[: len(h)], dict(zip(p_final.keys(), g[len(h) :], strict=True))
    # d value/d h = direct term + sum over params of <d value/d p_K, Z_K>, one entry per row.
    through = sum(torch.einsum("n...,...->n", tp[k], g_p[k]) for k in g_p)
    through = through.split(sizes) if n else []
    hgrads: list[Tensor] = [d + t.reshape(d.shape) for d, t in zip(g_h, through, strict=True)]
    return result(value, h, hgrads, None, None, p_final, rebuild(s_leaves))


def _tangent_step(inner_loss, optimizer, p, s_leaves, rebuild, h, batch, tp, ts, basis):
    """One inner step and its Jacobian-vector products along every hparam direction.

    Returns the new params, state leaves and state structure, the tangents
    ``(n, *shape)``, and the step's loss and gradients (for the finiteness monitor).
    """
    structure = {}

    def step(p_: Params, s_: list[Tensor], h_: Params):
        grads, loss = grad_and_value(lambda q: inner_loss(q, h_, batch))(p_)
        updates, s_new = optimizer.update(grads, rebuild(s_), p_, h_)
        leaves, structure["rebuild"] = tree.partition(s_new)  # static leaves: step counts
        return {k: v + updates[k] for k, v in p_.items()}, leaves, loss, grads

    def tangent(tp_, ts_, th_):
        (p_new, s_new, loss, grads), (dp, ds, _, _) = jvp(step, (p, s_leaves, h), (tp_, ts_, th_))
        return p_new, s_new, loss, grads, dp, ds

    # jvp needs forward-mode rules for the step's backward pass: attention on the math backend.
    with second_order(True):
        if basis:  # at least one hyperparameter; one dropout mask for all n directions
            batched = vmap(tangent, out_dims=(None, None, None, None, 0, 0), randomness="same")
            p_new, s_new, loss, grads, tp, ts = batched(tp, ts, basis)
        else:
            p_new, s_new, loss, grads = step(p, s_leaves, h)
    return p_new, s_new, structure["rebuild"], tp, ts, loss, grads
