"""Meta-gradient estimators by unrolling: reverse mode (full, truncated, checkpointed) and
central finite differences.

Each one, under the contract of :mod:`selfmod.hypergrad.contract`, runs
``K = len(inner_batches)`` optimizer steps on ``inner_loss`` from ``params`` and returns a
:class:`HypergradResult` holding ``value = outer_loss(params_K, hparams, outer_batch)`` and its
gradients with respect to ``hparams`` and (where the method can) the initial ``params``.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor

from selfmod import tree
from selfmod.hypergrad.contract import MetaProblem, estimator, prepare
from selfmod.hypergrad.unroll import (
    FiniteMonitor,
    HypergradResult,
    Params,
    grads_or_zeros,
    outer_value,
    result,
    run,
)


@estimator
def reverse(
    problem: MetaProblem,
    *,
    state: Any = None,
) -> HypergradResult:
    """Full reverse-mode unroll: keep the graph of all K steps, backpropagate once.

    Exact; time about that of 3 training steps per step, memory O(K).
    ``state``: initial optimizer state (default ``optimizer.init(params)``).
    """
    p0, h, batches = prepare(problem)
    return _reverse_tail(problem, p0, h, batches, window=len(batches), state=state)


@estimator
def truncated(
    problem: MetaProblem,
    *,
    window: int,
    state: Any = None,
) -> HypergradResult:
    """Truncated backpropagation: differentiate only through the last ``window`` steps.

    The first ``K - window`` steps run without a graph and count as constants (biased, memory
    O(window)). ``window >= K`` is :func:`reverse`; ``result.params`` is ``None`` otherwise.
    References: Williams & Peng 1990; Shaban et al. 2019.
    """
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1 (got {window!r})")
    p0, h, batches = prepare(problem)
    return _reverse_tail(problem, p0, h, batches, window=window, state=state)


def _reverse_tail(problem: MetaProblem, p0, h, batches, *, window, state) -> HypergradResult:
    inner_loss, optimizer = problem.inner_loss, problem.optimizer
    state = optimizer.init(p0) if state is None else state
    head = max(len(batches) - window, 0)
    monitor = FiniteMonitor()
    p, s = run(
        inner_loss,
        optimizer,
        p0,
        state,
        tree.detach(h),
        batches[:head],
        create_graph=False,
        monitor=monitor,
    )
    p_start = p0 if head == 0 else tree.detach(p, requires_grad=True)
    p, s = run(
        inner_loss, optimizer, p_start, s, h, batches[head:], create_graph=True, monitor=monitor
    )
    monitor.check()
    value = outer_value(problem.outer_loss, p, h, problem.outer_batch)
    grads = grads_or_zeros([value], [*h.values(), *p_start.values()])
    return result(
        value,
        h,
        grads[: len(h)],
        p_start if head == 0 else None,
        grads[len(h) :] if head == 0 else None,
        p,
        s,
    )


@estimator
def checkpointed(
    problem: MetaProblem,
    *,
    segments: int,
    state: Any = None,
) -> HypergradResult:
    """Reverse mode with recomputation: store params and state at ``segments`` boundaries
    only, and rebuild one segment's graph at a time in the backward pass.

    Exact (equal to :func:`reverse`), memory O(K/S + S) states instead of O(K), about one extra
    forward unroll of time. RNG state is saved per segment, so stochastic losses replay exactly.
    References: Griewank & Walther 2000 (checkpointing); Chen et al. 2016.
    """
    if not isinstance(segments, int) or segments < 1:
        raise ValueError(f"segments must be an int >= 1 (got {segments!r})")
    p0, h, batches = prepare(problem)
    inner_loss, optimizer = problem.inner_loss, problem.optimizer
    K = len(batches)
    n_seg = max(min(segments, K), 1)
    bounds = [round(j * K / n_seg) for j in range(n_seg + 1)]  # segment edges, 0..K
    state = optimizer.init(p0) if state is None else state
    h_const = tree.detach(h)

    # Forward: plain training, keeping (params, state, RNG) at each segment start.
    monitor, snapshots = FiniteMonitor(), []
    p, s = tree.detach(p0), state
    for a, b in itertools.pairwise(bounds):
        snapshots.append((p, s, torch.get_rng_state()))
        p, s = run(
            inner_loss, optimizer, p, s, h_const, batches[a:b], create_graph=False, monitor=monitor
        )
    monitor.check()
    final_state = s
    rng_after = torch.get_rng_state()
    p_final = tree.detach(p, requires_grad=True)
    value = outer_value(problem.outer_loss, p_final, h, problem.outer_batch)
    grads = grads_or_zeros([value], [*h.values(), *p_final.values()])
    h_grad, adj_p = grads[: len(h)], grads[len(h) :]
    adj_s: list[Tensor] | None = None  # outer loss does not read the final optimizer state

    # Backward: rebuild each segment's graph and pull the adjoint through it.
    for (a, b), (p_snap, s_snap, rng) in zip(
        reversed(list(itertools.pairwise(bounds))), reversed(snapshots), strict=True
    ):
        torch.set_rng_state(rng)
        p_in = tree.detach(p_snap, requires_grad=True)
        s_leaves, rebuild = tree.partition(s_snap)
        s_in = [x.detach().requires_grad_(True) for x in s_leaves]
        p_out, s_out = run(
            inner_loss, optimizer, p_in, rebuild(s_in), h, batches[a:b], create_graph=True
        )
        s_out_leaves, _ = tree.partition(s_out)
        outs = [*p_out.values(), *s_out_leaves]
        adj = [
            *adj_p,
            *(adj_s if adj_s is not None else [torch.zeros_like(x) for x in s_out_leaves]),
        ]
        g = grads_or_zeros(outs, [*h.values(), *p_in.values(), *s_in], adj)
        h_grad = [x + y for x, y in zip(h_grad, g[: len(h)], strict=True)]
        adj_p, adj_s = g[len(h) : len(h) + len(p_in)], g[len(h) + len(p_in) :]
    torch.set_rng_state(rng_after)
    return result(value, h, h_grad, p0, adj_p, p_final, final_state)


@estimator
def finite_difference(
    problem: MetaProblem,
    *,
    eps: float = 1e-6,
    wrt_params: bool = True,
    state: Any = None,
) -> HypergradResult:
    """Central differences ``(f(x + eps e_i) - f(x - eps e_i)) / 2 eps``, one coordinate at a
    time: 2 unrolls per scalar, so for checking small problems (use float64)."""
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (got {eps})")
    p0, h, batches = prepare(problem)
    inner_loss, optimizer = problem.inner_loss, problem.optimizer
    p0, h = tree.detach(p0), tree.detach(h)
    rng = torch.get_rng_state()

    def f(p: Params, hp: Params) -> float:
        torch.set_rng_state(rng)
        s = optimizer.init(p) if state is None else state
        monitor = FiniteMonitor()
        pk, _ = run(inner_loss, optimizer, p, s, hp, batches, create_graph=False, monitor=monitor)
        monitor.check()
        with torch.no_grad():
            return float(outer_value(problem.outer_loss, pk, hp, problem.outer_batch))

    def gradient(group: Params, call) -> list[Tensor]:
        out = []
        for k, v in group.items():
            g = torch.zeros_like(v).reshape(-1)
            for i in range(v.numel()):
                e = torch.zeros_like(v).reshape(-1)
                e[i] = eps
                e = e.reshape(v.shape)
                g[i] = (call({**group, k: v + e}) - call({**group, k: v - e})) / (2 * eps)
            out.append(g.reshape(v.shape))
        return out

    hgrads = gradient(h, lambda hp: f(p0, hp))
    pgrads = gradient(p0, lambda p: f(p, h)) if wrt_params else None
    torch.set_rng_state(rng)
    s = optimizer.init(p0) if state is None else state
    pk, s = run(inner_loss, optimizer, p0, s, h, batches, create_graph=False)
    with torch.no_grad():
        value = problem.outer_loss(pk, h, problem.outer_batch)
    return result(value, h, hgrads, p0 if wrt_params else None, pgrads, pk, s)
