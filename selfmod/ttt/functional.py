"""Functional core of test-time training: attention formulas and inner loops as pure functions.

Every function here is a composition of differentiable torch ops; nothing is updated in place,
so the outer loop can differentiate through an inner loop to any order (second order by
default). Shapes follow attention: ``q, k (..., N, d)``, ``v (..., N, d_v)``, where ``...`` is
any batch of leading dims, typically ``(B, H)``.

The inner model is a chain of affine layers with GELU between them, held as
``[(W (..., d_in, d_out), b (..., d_out) | None), ...]``. Its per-token gradient is written out
by hand (no ``autograd.grad`` inside the forward pass) because the gradient of layer ``l`` for
token ``s`` is the outer product ``a_s^T g_s`` of the layer's input ``a_s`` and its output
error ``g_s``; keeping ``(a, g)`` instead of the product is what allows the dual form.

References: Sun et al., "Learning to (Learn at Test Time)", arXiv 2310.13807 (MTTT);
Sun et al., "Learning to (Learn at Test Time): RNNs with Expressive Hidden States",
arXiv 2407.04620 (TTT layers, mini-batch TTT, dual form); Katharopoulos et al. 2020
(linear attention).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

# One affine layer of an inner model: weight (..., d_in, d_out) and optional bias (..., d_out).
Layer = tuple[Tensor, Tensor | None]
InnerParams = list[Layer]
# A learning rate: a float, a tensor broadcastable to (..., N) (one rate per token), or a
# sequence of those with one entry per inner update.
LR = float | Tensor | Sequence[float | Tensor]
# objective(y, x, target) -> (error at y (..., n, d_out), loss per token (..., n))
Objective = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
# readout(y, x) -> output of the layer for queries x whose inner-model output is y
Readout = Callable[[Tensor, Tensor], Tensor]

__all__ = [
    "init_mlp",
    "layer_norm_backward",
    "linear_attention",
    "nadaraya_watson",
    "softmax_attention",
    "ttt_causal_scan",
    "ttt_inner_loop",
    "ttt_linear",
    "ttt_mlp",
]


# ----------------------------------------------------------------------------------------------
# Attention formulas
# ----------------------------------------------------------------------------------------------


def linear_attention(
    q: Tensor, k: Tensor, v: Tensor, causal: bool = False, chunk_size: int | None = 128
) -> Tensor:
    """Unnormalised linear attention ``q (k^T v)``; causal: ``tril(q k^T) v``.

    The causal form is evaluated in chunks of ``chunk_size`` tokens, which is exact and costs
    ``O(N (C + d) d_v)`` instead of ``O(N^2)``: for chunk ``c``,
    ``out_c = q_c S_{<c} + tril(q_c k_c^T) v_c`` with the prefix state ``S_{<c} = sum k^T v``.
    ``chunk_size=None`` forms the full ``N x N`` matrix (the reference).

    Shapes: ``q, k (..., N, d)``, ``v (..., N, d_v)`` -> ``(..., N, d_v)``.

    References: Katharopoulos et al., "Transformers are RNNs", ICML 2020.
    """
    if not causal:
        return q @ (k.mT @ v)  # (..., N, d) @ (..., d, d_v)
    n = q.shape[-2]
    if chunk_size is None or chunk_size >= n:
        return (q @ k.mT).tril() @ v  # (..., N, N) @ (..., N, d_v)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None (got {chunk_size})")
    pad = (-n) % chunk_size
    if pad:  # zero keys/values add nothing; padded queries are dropped at the end
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    c = chunk_size
    qc = q.unflatten(-2, (-1, c))  # (..., n_chunks, C, d)
    kc = k.unflatten(-2, (-1, c))  # (..., n_chunks, C, d)
    vc = v.unflatten(-2, (-1, c))  # (..., n_chunks, C, d_v)
    states = kc.mT @ vc  # (..., n_chunks, d, d_v)
    prefix = states.cumsum(-3) - states  # exclusive prefix sum, (..., n_chunks, d, d_v)
    out = qc @ prefix + (qc @ kc.mT).tril() @ vc  # (..., n_chunks, C, d_v)
    return out.flatten(-3, -2)[..., :n, :]


def softmax_attention(
    q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float | None = None
) -> Tensor:
    """``softmax(scale * q k^T) v`` (PyTorch SDPA); ``scale`` defaults to ``1 / sqrt(d)``.

    Shapes: ``q, k (..., N, d)``, ``v (..., N, d_v)`` -> ``(..., N, d_v)``.

    References: Vaswani et al., "Attention Is All You Need", 2017.
    """
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def nadaraya_watson(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
    """Kernel regression ``out_t = sum_s w(q_t, k_s) v_s / sum_s w(q_t, k_s)``, ``w = exp(q.k)``.

    Written as an explicit weighted average. A row-wise max is subtracted from the exponent
    for stability; it cancels between numerator and denominator. This is the inner loop of
    MTTT with a kernel estimator and equals ``softmax_attention(q, k, v, causal, scale=1)``.

    Shapes: ``q, k (..., N, d)``, ``v (..., N, d_v)`` -> ``(..., N, d_v)``.

    References: Nadaraya 1964, Watson 1964; arXiv 2310.13807, section 3.
    """
    logits = q @ k.mT  # (..., N, N)
    if causal:
        n, m = logits.shape[-2:]
        future = torch.ones(n, m, dtype=torch.bool, device=q.device).triu(1)
        logits = logits.masked_fill(future, float("-inf"))
    logits = logits - logits.amax(-1, keepdim=True).detach()
    w = logits.exp()  # (..., N, N) kernel weights, 0 on the future
    return (w @ v) / w.sum(-1, keepdim=True)


# ----------------------------------------------------------------------------------------------
# Inner model: affine layers with GELU between them, and its hand-written backward pass
# ----------------------------------------------------------------------------------------------


# GELU's and LayerNorm's backward kernels, differentiable again (autograd has their double
# backward): one op each where the formulas written out take about ten
_GELU_BWD = torch.ops.aten.gelu_backward.default  # (g, z) -> g * GELU'(z), exact GELU
_LN_VJP = torch.ops.aten.native_layer_norm_backward.default


def _forward(params: InnerParams, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """``y = f(x; params)``, plus each layer's input ``a_l`` and each hidden pre-activation."""
    acts: list[Tensor] = []
    pres: list[Tensor] = []
    h = x  # (..., n, d_in)
    for i, (W, b) in enumerate(params):
        if i > 0:
            pres.append(h)
            h = F.gelu(h)
        acts.append(h)
        h = h @ W if b is None else h @ W + b.unsqueeze(-2)  # (..., n, d_out_l)
    return h, acts, pres


def _backward(params: InnerParams, acts: list[Tensor], pres: list[Tensor], g_y: Tensor):
    """Per-token gradient factors ``[(a_l, g_l)]``: ``grad_W l_s = a_s^T g_s``, ``grad_b = g_s``."""
    factors: list[tuple[Tensor, Tensor]] = []
    g = g_y  # (..., n, d_out)
    for i in range(len(params) - 1, -1, -1):
        factors.append((acts[i], g))
        if i > 0:
            g = _GELU_BWD(g @ params[i][0].mT, pres[i - 1])  # (..., n, d_hidden)
    return factors[::-1]


def _weight_rows(x: Tensor, eta: float | Tensor) -> Tensor:
    """``eta_s * x_s`` for a scalar rate or per-token rates ``eta (..., n)``."""
    return x * eta if not isinstance(eta, Tensor) or eta.ndim == 0 else x * eta.unsqueeze(-1)


def _step(
    params: InnerParams, factors, eta: float | Tensor, clip: float | None = None
) -> InnerParams:
    """``W_l <- W_l - sum_s eta_s a_s^T g_s`` and ``b_l <- b_l - sum_s eta_s g_s``.

    ``clip``: scale the whole step ``u`` (all layers) by ``min(1, clip / ||u||)`` per batch
    element ``...``, so one step moves the inner weights by at most ``clip``.
    """
    updates: list[tuple[Tensor, Tensor | None]] = []
    for (_, b), (a, g) in zip(params, factors, strict=True):
        ge = _weight_rows(g, eta)  # (..., n, d_out)
        updates.append((a.mT @ ge, None if b is None else ge.sum(-2)))  # (..., i, o), (..., o)
    if clip is not None:
        sq = sum(
            dW.pow(2).sum((-2, -1)) + (0 if db is None else db.pow(2).sum(-1)) for dW, db in updates
        )  # (...,)
        scale = clip / sq.sqrt().clamp_min(clip)  # (...,) 1 below the threshold
        updates = [
            (dW * scale[..., None, None], None if db is None else db * scale[..., None])
            for dW, db in updates
        ]
    return [
        (W - dW, None if b is None else b - db)
        for (W, b), (dW, db) in zip(params, updates, strict=True)
    ]


def _dual_forward(params: InnerParams, x: Tensor, factors, eta: float | Tensor) -> Tensor:
    """Causal mini-batch output without materialising per-token weights (the dual form).

    Token ``t`` sees ``W_t = W - sum_{s<=t} eta_s a_s^T g_s``, so for layer input ``h_t``
    ``h_t W_t = h_t W - sum_{s<=t} eta_s (h_t . a_s) g_s = h W - (tril(h a^T) * eta) g``.
    """
    n = x.shape[-2]
    mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    h = x  # (..., n, d_in)
    for i, ((W, b), (a, g)) in enumerate(zip(params, factors, strict=True)):
        if i > 0:
            h = F.gelu(h)
        ge = _weight_rows(g, eta)  # (..., n, d_out)
        scores = (h @ a.mT).masked_fill(~mask, 0.0)  # (..., n, n)
        out = h @ W - scores @ ge
        if b is not None:
            out = out + b.unsqueeze(-2) - ge.cumsum(-2)  # b_t = b - sum_{s<=t} eta_s g_s
        h = out
    return h


def _primal_forward(params: InnerParams, x: Tensor, factors, eta: float | Tensor) -> Tensor:
    """The same outputs as :func:`_dual_forward`, materialising ``W_t (..., n, d_in, d_out)``."""
    h = x  # (..., n, d_in)
    for i, ((W, b), (a, g)) in enumerate(zip(params, factors, strict=True)):
        if i > 0:
            h = F.gelu(h)
        ge = _weight_rows(g, eta)  # (..., n, d_out)
        W_t = W.unsqueeze(-3) - (a.unsqueeze(-1) * ge.unsqueeze(-2)).cumsum(-3)  # (..., n, i, o)
        out = (h.unsqueeze(-2) @ W_t).squeeze(-2)  # (..., n, d_out)
        if b is not None:
            out = out + b.unsqueeze(-2) - ge.cumsum(-2)
        h = out
    return h


def layer_norm_backward(y: Tensor, g: Tensor, weight: Tensor | None, eps: float = 1e-5) -> Tensor:
    """Gradient w.r.t. ``y`` of ``<g, LN(y)>`` over the last dim, ``LN(y) = w * y_hat + b``.

    ``dy = (g_hat - mean(g_hat) - y_hat * mean(g_hat * y_hat)) / sigma`` with ``g_hat = w g``
    (LayerNorm's backward kernel; differentiable again).
    """
    _, mean, rstd = torch.native_layer_norm(y, y.shape[-1:], None, None, eps)
    g_hat = g if weight is None else g * weight
    return _LN_VJP(g_hat, y, y.shape[-1:], mean, rstd, None, None, [True, False, False])[0]


def _ln(y: Tensor, ln: tuple[Tensor, Tensor] | None, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dim with an affine ``(w, b)`` that may differ per head."""
    y_hat = F.layer_norm(y, y.shape[-1:], eps=eps)
    return y_hat if ln is None else y_hat * ln[0] + ln[1]


def _check_ln_widths(k: Tensor, v: Tensor, ln: tuple[Tensor, Tensor] | None) -> None:
    """``f(x) = x + LN(x W)`` adds the input to the output, so it needs ``d_v = d``."""
    if ln is not None and k.shape[-1] != v.shape[-1]:
        raise ValueError(
            f"ln=(w, b) makes f(x) = x + LN(f_res(x)), which needs d_v = d (got key width "
            f"d={k.shape[-1]}, value width d_v={v.shape[-1]}); pass ln=None for unequal widths"
        )


def _reconstruction(ln: tuple[Tensor, Tensor] | None) -> tuple[Objective, Readout]:
    """``l_s = 1/2 ||f(k_s) - v_s||^2`` with ``f(x) = y`` or, with ``ln``, ``f(x) = x + LN(y)``."""
    if ln is None:

        def objective(y: Tensor, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
            err = y - target  # (..., n, d_out)
            return err, 0.5 * err.pow(2).sum(-1)

        def readout(y: Tensor, x: Tensor) -> Tensor:
            return y

        return objective, readout

    def objective_ln(y: Tensor, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        # LN(y) and its VJP share one pass of statistics
        y_hat, mean, rstd = torch.native_layer_norm(y, y.shape[-1:], None, None, 1e-5)
        err = x + y_hat * ln[0] + ln[1] - target  # (..., n, d)
        g_y = _LN_VJP(err * ln[0], y, y.shape[-1:], mean, rstd, None, None, [True, False, False])
        return g_y[0], 0.5 * err.pow(2).sum(-1)

    def readout_ln(y: Tensor, x: Tensor) -> Tensor:
        return x + _ln(y, ln)

    return objective_ln, readout_ln


# ----------------------------------------------------------------------------------------------
# The inner loop
# ----------------------------------------------------------------------------------------------


def _rates(lr: LR, n_updates: int, b: int, n_blocks: int) -> list[list[float | Tensor]]:
    """``rates[i][j]``: the rate of update ``i`` for the tokens of mini-batch ``j``."""
    if isinstance(lr, float | int | Tensor):
        return [_split_rate(lr, b, n_blocks)] * n_updates  # split a shared rate only once
    rates = list(lr)
    if len(rates) != n_updates:
        raise ValueError(
            f"lr has {len(rates)} entries but the inner loop makes {n_updates} updates; pass one "
            "rate per update (steps * number of mini-batches) or a single rate"
        )
    return [_split_rate(r, b, n_blocks) for r in rates]


def _split_rate(eta: float | Tensor, b: int, n_blocks: int) -> list[float | Tensor]:
    """One rate per mini-batch: token-dependent rates ``(..., N)`` split into ``(..., b)``."""
    if isinstance(eta, Tensor) and eta.ndim > 0 and eta.shape[-1] > 1:
        return list(eta.split(b, -1))
    return [eta] * n_blocks


def ttt_inner_loop(
    params: InnerParams,
    q: Tensor,
    k: Tensor,
    target: Tensor,
    objective: Objective,
    readout: Readout,
    lr: LR = 1.0,
    steps: int = 1,
    mini_batch: int | None = None,
    causal: bool = False,
    first_order: bool = False,
    form: Literal["dual", "primal"] = "dual",
    return_losses: bool = False,
    clip: float | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Train the inner model on ``(k, target)`` by gradient steps and read it out at ``q``.

    A step on a set ``B`` of tokens is ``theta <- theta - sum_{s in B} lr_s grad l_s(theta)``.
    Non-causal: ``steps`` passes over the tokens in mini-batches of ``mini_batch`` (``None``:
    one full batch, i.e. batch GD; otherwise SGD over the mini-batches in order); every query
    reads the final model. Causal (mini-batch TTT of 2407.04620): one step per mini-batch, all
    gradients of a mini-batch taken at the model it started from, and token ``t`` reads the
    model updated with the gradients of tokens ``<= t`` only (``form="dual"`` evaluates that
    without per-token weights; ``"primal"`` materialises them, for checking).

    ``first_order=True`` evaluates the inner gradients at detached inner weights, dropping the
    second-derivative terms ``d grad / d theta``; their dependence on ``k``, ``target`` and
    ``lr`` is kept, so the outer loop still trains the projections.

    ``clip`` (non-causal only) bounds the norm of each step over all inner weights, per
    sequence and head (see :func:`_step`): a safeguard that keeps a learned rate from
    diverging when the outer loop sharpens the inner loss.

    Shapes: ``q, k (..., N, d_in)``, ``target (..., N, d_t)``; returns ``(..., N, d_out)`` and,
    with ``return_losses``, the mean inner loss per token: non-causal ``(..., updates + 1)``
    over all tokens at each iterate; causal ``(..., n_blocks, 2)`` on each mini-batch before
    and after its update.

    References: arXiv 2310.13807 (MTTT, section 4); arXiv 2407.04620 (sections 2.4-2.5).
    """
    n = k.shape[-2]
    if steps < 0:
        raise ValueError(f"steps must be >= 0 (got {steps})")
    if mini_batch is not None and mini_batch < 1:
        raise ValueError(f"mini_batch must be >= 1 or None for full batch (got {mini_batch})")
    if causal and steps > 1:
        raise ValueError(
            f"causal TTT makes one step per mini-batch (got steps={steps}); use steps=1 and a "
            "smaller mini_batch for more updates"
        )
    if clip is not None and (causal or clip <= 0):
        raise ValueError(
            f"clip must be > 0 and is for non-causal inner loops (got clip={clip}, "
            f"causal={causal}); bound a causal layer's rate instead"
        )
    if form not in ("dual", "primal"):
        raise ValueError(f"form must be 'dual' or 'primal' (got {form!r})")
    b = n if mini_batch is None else min(mini_batch, n)
    # Split once rather than slicing per block: the backward of ``split`` concatenates the
    # block gradients, where per-block slicing would scatter each into a full-length zero
    # tensor (O(N^2) work over the sequence).
    k_blocks, t_blocks = k.split(b, -2), target.split(b, -2)  # each (..., b, d)
    n_blocks = len(k_blocks)
    rates = _rates(lr, steps * n_blocks, b, n_blocks)

    def factors_at(p: InnerParams, kb: Tensor, tb: Tensor):
        if first_order:
            p = [(W.detach(), None if bb is None else bb.detach()) for W, bb in p]
        y, acts, pres = _forward(p, kb)
        g_y, loss = objective(y, kb, tb)
        return _backward(p, acts, pres, g_y), loss

    def loss_at(p: InnerParams, kb: Tensor, tb: Tensor) -> Tensor:
        return objective(_forward(p, kb)[0], kb, tb)[1].mean(-1)

    if not causal or steps == 0:
        losses = [loss_at(params, k, target)] if return_losses else []
        i = 0
        for _ in range(steps):
            for j in range(n_blocks):
                factors, _ = factors_at(params, k_blocks[j], t_blocks[j])
                params = _step(params, factors, rates[i][j], clip)
                i += 1
                if return_losses:
                    losses.append(loss_at(params, k, target))
        out = readout(_forward(params, q)[0], q)
        return (out, torch.stack(losses, -1)) if return_losses else out

    outs: list[Tensor] = []
    block_losses: list[Tensor] = []
    read = _dual_forward if form == "dual" else _primal_forward
    for j, (qb, kb, tb) in enumerate(zip(q.split(b, -2), k_blocks, t_blocks, strict=True)):
        eta = rates[j][j]
        factors, loss = factors_at(params, kb, tb)
        outs.append(readout(read(params, qb, factors, eta), qb))  # (..., b, d_out)
        params = _step(params, factors, eta)
        if return_losses:
            block_losses.append(torch.stack([loss.mean(-1), loss_at(params, kb, tb)], -1))
    out = torch.cat(outs, -2)  # (..., N, d_out)
    return (out, torch.stack(block_losses, -2)) if return_losses else out


def ttt_causal_scan(
    params: InnerParams,
    q: Tensor,
    k: Tensor,
    target: Tensor,
    objective: Objective,
    readout: Readout,
    lr: float | Tensor = 1.0,
    mini_batch: int = 16,
    first_order: bool = False,
) -> Tensor:
    """Causal mini-batch TTT in dual form with only the recurrence in the Python loop.

    The same outputs (and autograd gradients) as ``ttt_inner_loop(..., causal=True,
    form="dual")`` for any inner model: mini-batch ``j`` takes its gradient factors
    ``[(a_l, g_l)]`` at ``theta_j`` and steps ``theta_{j+1} = theta_j - sum_s eta_s a_s^T g_s``;
    that is all the loop does. The dual-form read ``h W_j - (tril(h a^T) * eta) g`` of every
    mini-batch then runs once, batched over the ``n`` mini-batches with ``theta_j`` stacked
    ``(..., n, d_in, d_out)``, instead of ``n`` small reads inside the loop. Tokens are
    zero-padded to whole mini-batches (rate 0, dropped at the end).

    Shapes: ``q, k (..., N, d_in)``, ``target (..., N, d_t)``, ``lr`` a float or per-token
    rates ``(..., N)`` -> ``(..., N, d_out)``.

    References: arXiv 2407.04620, sections 2.5-2.7 (mini-batch TTT, dual form).
    """
    if mini_batch < 1:
        raise ValueError(f"mini_batch must be >= 1 (got {mini_batch})")
    N = k.shape[-2]
    b = min(mini_batch, N)
    pad = (-N) % b
    n = (N + pad) // b
    eta = torch.as_tensor(lr, dtype=q.dtype, device=q.device)
    if eta.ndim == 0 or eta.shape[-1] == 1:  # one rate: padded tokens need their own 0
        eta = eta.reshape(*eta.shape[:-1], 1) if eta.ndim else eta.reshape(1)
        eta = eta.expand(*eta.shape[:-1], N)  # (..., N)
    if pad:
        q, k, target = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, target))
        eta = F.pad(eta, (0, pad))
    qb, kb, tb = (t.unflatten(-2, (n, b)) for t in (q, k, target))  # (..., n, b, .)
    etab = eta.unflatten(-1, (n, b))  # (..., n, b)
    thetas: list[InnerParams] = []
    factor_list = []
    for kj, tj, ej in zip(kb.unbind(-3), tb.unbind(-3), etab.unbind(-2), strict=True):
        p = [(W.detach(), None if c is None else c.detach()) for W, c in params]
        p = p if first_order else params
        y, acts, pres = _forward(p, kj)  # (..., b, d_out)
        g_y, _ = objective(y, kj, tj)
        factors = _backward(p, acts, pres, g_y)  # [(a (..., b, d_in_l), g (..., b, d_out_l))]
        thetas.append(params)
        factor_list.append(factors)
        params = _step(params, factors, ej)
    # stack over mini-batches: W (..., n, d_in, d_out), bias (..., n, d_out), a, g (..., n, b, .)
    stacked = [
        (
            torch.stack([t[i][0].expand(*kb.shape[:-3], *t[i][0].shape[-2:]) for t in thetas], -3),
            None
            if thetas[0][i][1] is None
            else torch.stack([t[i][1].expand(*kb.shape[:-3], -1) for t in thetas], -2),
        )
        for i in range(len(params))
    ]
    factors = [
        tuple(torch.stack([f[i][m] for f in factor_list], -3) for m in range(2))
        for i in range(len(params))
    ]
    y = _dual_forward(stacked, qb, factors, etab).flatten(-3, -2)  # (..., N + pad, d_out)
    return readout(y, q)[..., :N, :]  # per token, so on the flat sequence


# ----------------------------------------------------------------------------------------------
# Causal TTT-Linear as a scan with a hand-written backward pass
# ----------------------------------------------------------------------------------------------

_LN_EPS = 1e-5
# the most bytes of any per-segment tensor of the scan: the blocks are taken in segments whose
# largest tensor (the backward's 7 LayerNorm vectors per token) stays under this, so that
# every temporary of the scan is a block the allocator reuses from call to call (glibc maps a
# block over 32 MiB afresh on every call, and at 8,192 tokens and more those page faults cost
# more than the arithmetic on them); only the inputs and outputs are whole-sequence tensors
_SEGMENT_BYTES = 1 << 24
# _LN_BWD(g, z, shape, mean, rstd, *_LN_ARGS)[0] = LN'(z)^T g = (g - mean(g) - z_hat
# mean(g z_hat)) / sigma, the LayerNorm VJP (it is symmetric), from its native kernel; the
# overload's underlying builtin skips a Python wrapper that costs about as much as the kernel
# on one (b, d) block
_LN_BWD = torch.ops.aten.native_layer_norm_backward.default
_LN_BWD, _LN_ARGS = getattr(_LN_BWD, "_op", _LN_BWD), (None, None, [True, False, False])


def _segments(n: int, B: int, b: int, d: int, like: Tensor) -> list[slice]:
    """The blocks ``0..n-1`` in consecutive segments of at most ``_SEGMENT_BYTES`` per tensor."""
    step = max(1, _SEGMENT_BYTES // (7 * b * d * B * like.element_size()))
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


def _scan_segment(W, K, Q, R, eta, w, Y):
    """The forward scan over one segment of ``m`` blocks from ``W = W_s (B, p, d)``.

    ``K, Q (m, B, b, d_k)``, ``R (m, B, b, d)``, ``eta (m, B, b)``; writes the read into
    ``Y (m, B, b, d)`` and returns what the backward needs: ``[K_j; Q_j]`` with the bias
    feature ``(m, B, 2b, p)``, ``-eta K (m, B, b, p)``, ``[Z_j; Q_j W_j] (m, B, 2b, d)``,
    ``G (m, B, b, d)``, ``tril(Q K^T) (m, B, b, b)`` and ``W_s..W_{s+m} (m + 1, B, p, d)``.
    """
    (m, B, b, dk), (p, d) = K.shape, W.shape[-2:]
    KQ = K.new_empty(m, B, 2 * b, p)  # [K_j; Q_j]: one product gives Z_j and Q_j W_j
    KQ[:, :, :b, :dk], KQ[:, :, b:, :dk] = K, Q
    if p > dk:
        KQ[..., dk] = 1.0  # the bias feature
    K, Q = KQ[:, :, :b], KQ[:, :, b:]  # (m, B, b, p)
    ZQ = W.new_empty(m, B, 2 * b, d)  # [Z_j; Q_j W_j], written by the loop, d = d_v
    Ken = K * -eta.unsqueeze(-1)  # -eta K: W_{j+1} = W_j + Ken_j^T G_j, (m, B, b, p)
    if w is not None:  # w e = w R + w^2 LN(Z)
        Rw, w2, shape = (R * w).unbind(0), w * w, (d,)
    Ws = W.new_empty(m + 1, B, p, d)
    Ws[0] = W
    Gs = W.new_empty(m, B, b, d)
    # inference mode skips the autograd and version-counter bookkeeping of each small op
    # (about 0.5 us of the 2-3 us each costs here); every write goes into normal tensors
    with torch.inference_mode():
        for j, (KQj, ZQj, Z, KeT, W, Wn, Gj) in enumerate(
            zip(KQ.unbind(0), ZQ.unbind(0), ZQ[:, :, :b].unbind(0), Ken.mT.unbind(0),
                Ws[:m].unbind(0), Ws[1:].unbind(0), Gs.unbind(0), strict=True)
        ):  # fmt: skip
            torch.bmm(KQj, W, out=ZQj)  # Z = K_j W_j, (B, b, d), above Q_j W_j
            if w is None:
                G = torch.add(Z, R[j], out=Gj)
            else:
                zh, mean, rstd = torch.native_layer_norm(Z, shape, None, None, _LN_EPS)
                G = _LN_BWD(torch.addcmul(Rw[j], zh, w2), Z, shape, mean, rstd, *_LN_ARGS)[0]
                Gj.copy_(G)
            torch.baddbmm(W, KeT, G, out=Wn)  # W_{j+1}, (B, p, d)
    A = (Q @ K.mT).tril()  # (m, B, b, b)
    torch.sub(ZQ[:, :, b:], (A * eta.unsqueeze(-2)) @ Gs, out=Y)  # the read, Q W - A E
    return KQ, Ken, ZQ, Gs, A, Ws


def _reverse_segment(U, gY, R, eta, w, KQ, Ken, ZQ, Gs, A, Ws, dk, first_order, out):
    """The reverse scan over one segment from ``U = dL/dW_{s+m} (B, p, d)``; returns
    ``dL/dW_s`` and the segment's ``dw`` term ``(B, 1, d)`` (or None without LayerNorm).

    ``gY (m, B, b, d)`` the read's cotangent, ``R``, ``eta`` and the saved tensors as
    :func:`_scan_segment` gives them; ``out = (dK, dQ, dR, deta)`` of the segment are written.
    """
    (m, B, b2, p), d, b = KQ.shape, Gs.shape[-1], Gs.shape[-2]  # d = d_v
    K, Q, etas = KQ[:, :, :b], KQ[:, :, b:], eta.unsqueeze(-1)  # (m, B, b, 1)
    dK, dQ, dR, deta = out
    # [dZ_j; dY_j] per block: dY is copied in once (it arrives in the caller's layout,
    # which every product below would otherwise copy again)
    DZY = gY.new_empty(m, B, b2, d)
    DZY[:, :, b:] = gY
    gY = DZY[:, :, b:]
    # the read Y = Q W - A E, E = eta G: with P = dY G^T, dA = -tril(P) eta (per column),
    # dE = -A^T dY - K_j U_{j+1}, U_{j+1} = dL/dW_{j+1}, and -A^T dY . G = -colsum(A P)
    P = gY @ Gs.mT  # (m, B, b, b)
    dA = -(P * eta.unsqueeze(-2)).tril()
    torch.sum(A * P, -2, out=deta).neg_()  # the read's part of dE . G, (m, B, b)
    # c_j = eta_j dE_j = cE_j + Ken_j U_{j+1}, cE = -eta A^T dY: d loss / d G_j, computed
    # in place (in DZY without LayerNorm, where dZ = c)
    cE = (A.mT * -etas) @ gY  # (m, B, b, d)
    # U_j = U_{j+1} + K_j^T dZ_j + Q_j^T dY_j: one product on [dZ_j; dY_j]
    if w is None:
        DZY[:, :, :b] = cE
        cE = DZY[:, :, :b]
    else:
        # VJP of G = LN'(Z)^T (w e) at cotangent c, per row (s = sigma, z_hat = LN(Z),
        # g_h = w e, B = mean(g_h z_hat)): dZ = a * c + sum_k mean(c x_k) y_k, with
        # a = (w^2 - B) / s^2 and [x_k] = [u, 1, LN'^T w^2, z_hat],
        # [y_k] = [z_hat, -a, -1 / s, (2 B - w^2) z_hat / s^2 - G / s],
        # u = -(LN'^T (w^2 z_hat) / s + (g_h - mean g_h) / s^2). All x, y are computed
        # here for the segment's blocks (x_4 = y_1 stored once); in the loop, the four means
        # are one (b, d) x (d, 4b) product masked to its diagonals (the mask holds the 1 / d),
        # and c' = LN'^T c, needed for dR and dw only, is batched after it.
        # Z made contiguous once: the three LayerNorm kernels below would each copy it
        Zs, shape = ZQ[:, :, :b].contiguous(), (d,)  # (m, B, b, d)
        zh, mean, rstd = torch.native_layer_norm(Zs, shape, None, None, _LN_EPS)
        r2, w2 = rstd * rstd, w * w
        gh = w * torch.addcmul(R, zh, w)  # w e, (m, B, b, d)
        Bq = (gh * zh).mean(-1, keepdim=True)  # (m, B, b, 1)
        gh -= gh.mean(-1, keepdim=True)
        w2zh = w2 * zh
        u = _LN_BWD(w2zh, Zs, shape, mean, rstd, *_LN_ARGS)[0].addcmul_(rstd, gh)  # -x_1 s
        # LN'^T w^2 = (w^2 - mean(w^2) - z_hat mean(w^2 z_hat)) / s
        mw, cw = -rstd * w2zh.mean(-1, keepdim=True), w2 - w2.mean(-1, keepdim=True)
        del gh, w2zh
        a = r2 * (w2 - Bq)  # (m, B, b, d)
        # [x_1, x_2, x_3, x_4 = y_1, y_2, y_3, y_4] per block
        XY = Gs.new_empty(m, B, 7, b, d)
        torch.mul(u, -rstd, out=XY[:, :, 0])
        XY[:, :, 1] = 1.0
        torch.mul(zh, mw, out=XY[:, :, 2]).addcmul_(rstd, cw)
        XY[:, :, 3] = zh
        torch.neg(a, out=XY[:, :, 4])
        XY[:, :, 5] = -rstd
        torch.mul(Gs, -rstd, out=XY[:, :, 6]).addcmul_(zh, r2 * (2 * Bq - w2))
        Xs, Ys = XY[:, :, :4].flatten(2, 3).mT.unbind(0), XY[:, :, 3:].flatten(2, 3).unbind(0)
        del u
        mask = torch.eye(b, dtype=Gs.dtype, device=Gs.device).repeat(1, 4) / d  # (b, 4b)
        a = a.unbind(0)  # (B, b, d)
    dzy, dz = DZY.unbind(0), DZY[:, :, :b].unbind(0)
    Us = Gs.new_empty(m + 1, B, p, d)  # U_s..U_{s+m}
    Us[m] = U
    KQT, cs, Kens, U = KQ.mT.unbind(0), cE.unbind(0), Ken.unbind(0), Us.unbind(0)
    if first_order:  # U_j = U_{j+1} + Q_j^T dY_j: no second-order path through Z_j
        KQT, dzy = Q.mT.unbind(0), gY.unbind(0)
    with torch.inference_mode():  # as in the forward
        for j in range(m - 1, -1, -1):
            c = cs[j].baddbmm_(Kens[j], U[j + 1])  # d loss / d G_j, (B, b, d)
            if w is not None:
                T = torch.bmm(c, Xs[j]).mul_(mask)  # mean(c x_k) on the diagonals
                torch.mul(c, a[j], out=dz[j]).baddbmm_(T, Ys[j])  # dZ_j, (B, b, d)
            torch.baddbmm(U[j + 1], KQT[j], dzy[j], out=U[j])  # U_j, (B, p, d)
    # the products with U_{j+1} and W_j, batched: G_j U_{j+1}^T (E U^T for dK, K U . G
    # for deta) and [dZ_j; dY_j] W_j^T (dK, dQ), (m, B, b | 2b, p)
    GUs, WTs = Gs @ Us[1:].mT, DZY @ Ws[:m].mT
    deta -= (K * GUs).sum(-1)  # dE . G, (m, B, b); (K U) . G = K . (G U^T)
    # dK = dZ W^T - E U^T + dA^T Q, dQ = dY W^T + dA K, on the d_k input features
    K, Q, WTs, GUs = K[..., :dk], Q[..., :dk], WTs[..., :dk], GUs[..., :dk]
    torch.matmul(dA.mT, Q, out=dK).add_(WTs[:, :, :b]).addcmul_(GUs, etas, value=-1.0)
    torch.matmul(dA, K, out=dQ).add_(WTs[:, :, b:])
    if w is None:  # dG = c
        dR.copy_(cE)
        return U[0], None
    dG = _LN_BWD(cE, Zs, shape, mean, rstd, *_LN_ARGS)[0]  # LN'(Z)^T c, (m, B, b, d)
    torch.mul(dG, w, out=dR)
    dw = (dG * torch.addcmul(R, zh, w, value=2.0)).sum((0, 2)).unsqueeze(1)  # (B, 1, d)
    return U[0], dw


class _LinearScan(torch.autograd.Function):
    """Causal mini-batch TTT-Linear in dual form: the scan and its read, forward and reverse.

    For mini-batches ``j = 0..n-1`` with keys ``K_j`` and queries ``Q_j`` ``(B, b, d_k)``,
    augmented by a constant-1 feature when ``W (B, p, d)`` has a bias row (``p = d_k + 1``,
    else ``p = d_k``; ``d = d_v`` is the value width, any width): ``Z_j = K_j W_j``; the
    inner-loss gradient at ``Z_j`` is ``G_j = e_j = Z_j + R_j`` (plain) or
    ``G_j = LN'(Z_j)^T (w * e_j)``, ``e_j = w * LN(Z_j) + R_j``
    (``f(x) = x + LN(x W)``, the residual ``R = k + beta - v`` folded in); ``E_j = eta_j G_j``;
    ``W_{j+1} = W_j - K_j^T E_j``; the read is ``Y_j = Q_j W_j - tril(Q_j K_j^T) E_j``
    ``(B, b, d)``. Only the recurrence runs block by block (5 ops per block forward, 6 in
    reverse), with ``Q_j W_j`` in one product with ``K_j W_j``; the reverse loop writes
    ``U_{j+1} = dL/dW_{j+1}`` into a stack like the forward's ``W_j``, so that the products
    ``G_j U_{j+1}^T`` and ``[dZ_j; dY_j] W_j^T`` run batched after it. Both loops run in
    inference mode (no autograd bookkeeping per op; at ``b = 16``, ``d = 64`` each op is a
    few microseconds of dispatch over about a thousand numbers). Everything elementwise is
    batched over the blocks of a segment (:func:`_segments`), before or after the loops.
    Blocks lead every stacked tensor ``(m, B, ...)``, so block ``j`` is one contiguous slice.
    The forward keeps ``Z``, ``G`` and the ``W_j``; the backward runs the loop in reverse with
    the hand-derived VJP of ``Z -> G`` (second derivatives of the inner loss included: per
    token, a diagonal plus a rank-4 map), so it is exact but not itself differentiable.
    """

    @staticmethod
    def forward(ctx, W0, K, Q, R, eta, w, first_order: bool):
        # W0 (B, p, d_v), K, Q (n, B, b, d_k), R (n, B, b, d_v), eta (n, B, b),
        # w (B, 1, d_v) | None; p = d_k (+ 1 with a bias row)
        (n, B, b, dk), d = K.shape, W0.shape[-1]
        Y, W, saved = W0.new_empty(n, B, b, d), W0, []  # Y (n, B, b, d_v)
        ctx.segments = _segments(n, B, b, d, W0)
        for t in ctx.segments:
            saved += _scan_segment(W, K[t], Q[t], R[t], eta[t], w, Y[t])
            W = saved[-1][-1]  # W_{s+m}, (B, p, d)
        ctx.first_order, ctx.dk = first_order, dk
        ctx.save_for_backward(R, eta, w, *saved)
        return Y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gY):
        R, eta, w, *saved = ctx.saved_tensors
        (n, B, b, d), dk = R.shape, ctx.dk
        dK, dQ = gY.new_empty(n, B, b, dk), gY.new_empty(n, B, b, dk)
        dR, deta = gY.new_empty(n, B, b, d), gY.new_empty(n, B, b)
        per = len(saved) // len(ctx.segments)  # the tensors _scan_segment returns
        Ws = saved[-1]  # the last segment's W_s..W_n, (m + 1, B, p, d)
        U, dw = Ws.new_zeros(Ws.shape[1:]), None  # U_n = dL/dW_n = 0, (B, p, d)
        for i, t in reversed(list(enumerate(ctx.segments))):
            out = (dK[t], dQ[t], dR[t], deta[t])
            U, dw_t = _reverse_segment(
                U, gY[t], R[t], eta[t], w, *saved[per * i : per * (i + 1)], dk, ctx.first_order,
                out,
            )  # fmt: skip
            dw = dw_t if dw is None else dw + dw_t
        return U, dK, dQ, dR, deta, dw, None


def _ttt_linear_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    W0: Tensor,
    b0: Tensor | None,
    eta: float | Tensor,
    mini_batch: int,
    ln: tuple[Tensor, Tensor] | None,
    first_order: bool,
) -> Tensor:
    """Causal mini-batch TTT-Linear in dual form through :class:`_LinearScan`.

    Equals ``ttt_inner_loop`` with ``causal=True, form="dual"`` (the reference). A bias is a
    weight row on a constant-1 input feature, so token ``t`` of a mini-batch reads
    ``q_t W_j - sum_{s<=t} (q_t . k_s) E_s`` with ``q, k`` augmented by that 1 (inside the
    scan); the tokens are zero-padded to whole mini-batches (padded tokens get rate 0 and are
    dropped).
    """
    N, dv = k.shape[-2], v.shape[-1]
    eta = torch.as_tensor(eta, dtype=q.dtype, device=q.device)
    eta = eta.unsqueeze(-1) if eta.ndim == 0 else eta  # (..., N) or (..., 1)
    R = -v if ln is None else k + ln[1] - v  # (..., N, d_v): error e = f(k) - v = Z + R
    x, W = q, W0
    if b0 is not None:  # fold the bias into W: x W + b = [x, 1] [W; b]
        W = torch.cat([W0, b0.unsqueeze(-2)], -2)  # (..., p, d_v), p = d + 1
    lead = torch.broadcast_shapes(
        q.shape[:-2], k.shape[:-2], R.shape[:-2], W.shape[:-2], eta.shape[:-1]
    )
    b = min(mini_batch, N)
    pad = (-N) % b
    n, d, p = (N + pad) // b, k.shape[-1], W.shape[-2]

    def blocks(t: Tensor, width: int) -> Tensor:  # (..., N, width) -> (n, B, b, width)
        t = F.pad(t, (0, 0, 0, pad)) if pad else t
        return t.expand(*lead, N + pad, width).reshape(-1, n, b, width).transpose(0, 1)

    Kb, Qb, Rb = blocks(k, d), blocks(q, d), blocks(R, dv)
    eb = eta.expand(*lead, N)
    eb = (F.pad(eb, (0, pad)) if pad else eb).reshape(-1, n, b).transpose(0, 1)  # (n, B, b)
    w = None if ln is None else ln[0].expand(*lead, 1, dv).reshape(-1, 1, dv)  # (B, 1, d_v)
    W = W.expand(*lead, p, dv).reshape(-1, p, dv)  # (B, p, d_v)
    Y = _LinearScan.apply(W, Kb, Qb, Rb, eb, w, first_order)  # (n, B, b, d_v)
    Y = Y.transpose(0, 1).reshape(*lead, N + pad, dv)[..., :N, :]
    return Y if ln is None else x + _ln(Y, ln)


def ttt_linear(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    W0: Tensor | None = None,
    lr: LR = 1.0,
    steps: int = 1,
    mini_batch: int | None = None,
    causal: bool = False,
    *,
    b0: Tensor | None = None,
    ln: tuple[Tensor, Tensor] | None = None,
    first_order: bool = False,
    form: Literal["dual", "primal"] = "dual",
    return_losses: bool = False,
    impl: Literal["scan", "loop"] = "scan",
) -> Tensor | tuple[Tensor, Tensor]:
    """TTT with a linear inner model ``f(x; W) = x W`` on ``l_s(W) = 1/2 ||k_s W - v_s||^2``.

    A step on tokens ``B`` is ``W <- W - lr sum_{s in B} k_s^T (k_s W - v_s)``; the output is
    ``q_t W`` with the ``W`` token ``t`` may see (see :func:`ttt_inner_loop`). With ``W0 = 0``
    one full-batch step gives ``W = lr k^T v``, so the output is ``lr * linear_attention``
    (causal: ``lr * tril(q k^T) v``). Optional ``b0 (..., d_v)`` adds a bias; ``ln=(w, b)``
    makes ``f(x) = x + LN(x W)`` as in TTT-Linear (needs ``d == d_v``).

    ``impl="scan"`` (default) runs the causal dual form (``causal=True, form="dual"``, a
    single or per-token rate, no ``return_losses``) through a fused scan with a hand-written
    backward pass: the same outputs and gradients as the autograd loop ``impl="loop"`` (the
    reference), several times faster, but not differentiable twice. Every other case runs
    the loop.

    Shapes: ``q, k (..., N, d)``, ``v (..., N, d_v)``, ``W0 (..., d, d_v)`` -> ``(..., N, d_v)``.

    References: arXiv 2310.13807 (Theorem 1); arXiv 2407.04620 (TTT-Linear, dual form).
    """
    if impl not in ("scan", "loop"):
        raise ValueError(f"impl must be 'scan' or 'loop' (got {impl!r})")
    _check_ln_widths(k, v, ln)
    if W0 is None:
        W0 = q.new_zeros(q.shape[-1], v.shape[-1])
    scan = impl == "scan" and causal and form == "dual" and steps == 1 and not return_losses
    if scan and isinstance(lr, float | int | Tensor):
        b = k.shape[-2] if mini_batch is None else mini_batch
        if b < 1:
            raise ValueError(f"mini_batch must be >= 1 or None for full batch (got {b})")
        return _ttt_linear_scan(q, k, v, W0, b0, lr, b, ln, first_order)
    objective, readout = _reconstruction(ln)
    return ttt_inner_loop(
        [(W0, b0)],
        q,
        k,
        v,
        objective,
        readout,
        lr,
        steps,
        mini_batch,
        causal,
        first_order,
        form,
        return_losses,
    )


def init_mlp(
    d_in: int,
    d_out: int | None = None,
    hidden: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(W1 (d_in, hidden), b1, W2 (hidden, d_out), b2)``, Gaussian ``1/sqrt(fan_in)`` weights.

    ``hidden`` defaults to ``4 * d_in`` and ``d_out`` to ``d_in``; biases start at zero.
    """
    d_out = d_in if d_out is None else d_out
    hidden = 4 * d_in if hidden is None else hidden
    W1 = torch.randn(d_in, hidden, generator=generator, dtype=dtype) / math.sqrt(d_in)
    W2 = torch.randn(hidden, d_out, generator=generator, dtype=dtype) / math.sqrt(hidden)
    return W1, W1.new_zeros(hidden), W2, W2.new_zeros(d_out)


def ttt_mlp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    W0: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    lr: LR = 1.0,
    steps: int = 1,
    mini_batch: int | None = None,
    causal: bool = False,
    *,
    ln: tuple[Tensor, Tensor] | None = None,
    first_order: bool = False,
    form: Literal["dual", "primal"] = "dual",
    return_losses: bool = False,
    impl: Literal["scan", "loop"] = "scan",
) -> Tensor | tuple[Tensor, Tensor]:
    """TTT with a 2-layer MLP ``f(x) = GELU(x W1 + b1) W2 + b2`` on ``1/2 ||f(k_s) - v_s||^2``.

    As :func:`ttt_linear` with the MLP's four tensors ``W0 = (W1, b1, W2, b2)`` as the inner
    weights (hidden width 4x by :func:`init_mlp`); the causal mini-batch form is still exact
    in dual form because each layer is affine in its own weights.

    ``impl="scan"`` (default) runs the causal dual form (``causal=True, form="dual"``, one
    step, a single or per-token rate, no ``return_losses``) through
    :func:`ttt_causal_scan`, which reads all mini-batches in one batched pass after the
    recurrence; ``"loop"`` is the reference. Both are plain autograd (differentiable twice).

    Shapes: ``q, k (..., N, d)``, ``v (..., N, d_v)``, ``W1 (..., d, h)``, ``W2 (..., h, d_v)``.

    References: arXiv 2310.13807 (MTTT-MLP); arXiv 2407.04620 (TTT-MLP).
    """
    if W0 is None:
        raise ValueError(
            "ttt_mlp needs initial weights: an all-zero MLP has zero gradient in its first "
            "layer; pass W0=init_mlp(d, d_v)"
        )
    if impl not in ("scan", "loop"):
        raise ValueError(f"impl must be 'scan' or 'loop' (got {impl!r})")
    _check_ln_widths(k, v, ln)
    W1, b1, W2, b2 = W0
    objective, readout = _reconstruction(ln)
    scan = impl == "scan" and causal and form == "dual" and steps == 1 and not return_losses
    if scan and isinstance(lr, float | int | Tensor):
        b = k.shape[-2] if mini_batch is None else mini_batch
        return ttt_causal_scan(
            [(W1, b1), (W2, b2)], q, k, v, objective, readout, lr, b, first_order
        )
    return ttt_inner_loop(
        [(W1, b1), (W2, b2)],
        q,
        k,
        v,
        objective,
        readout,
        lr,
        steps,
        mini_batch,
        causal,
        first_order,
        form,
        return_losses,
    )
