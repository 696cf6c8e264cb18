"""Checks of selfmod.ttt against the attention formulas, autograd and finite differences.

All equivalence checks run in float64 (the ``float64`` fixture sets the default dtype).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from selfmod.ttt import (
    MTTTMLP,
    TTTMLP,
    CausalLM,
    MTTTLinear,
    SequenceClassifier,
    TTTLinear,
    init_mlp,
    linear_attention,
    make_mixer,
    nadaraya_watson,
    softmax_attention,
    ttt_linear,
    ttt_mlp,
)
from selfmod.ttt import functional as ttt_functional
from selfmod.ttt.functional import _reconstruction, ttt_inner_loop

TOL = dict(rtol=1e-10, atol=1e-10)


def qkv(*shape: int, scale: float = 1.0, dv: int | None = None):
    """``q, k (*shape)`` and ``v`` of the same shape but width ``dv`` (default: the same)."""
    q, k = (scale * torch.randn(*shape) for _ in range(2))
    v = scale * torch.randn(*shape[:-1], shape[-1] if dv is None else dv)
    return q, k, v


# value widths other than the key width (d = 4 in most tests): wider and narrower
UNEQUAL_DV = [5, 3]


# ---------------------------------------------------------------------------------------------
# Attention formulas
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lr", [1.0, 0.37])
@pytest.mark.parametrize("dv", [5, 7, 2])
def test_ttt_linear_one_full_batch_step_from_zero_is_linear_attention(float64, causal, lr, dv):
    q, k, v = qkv(2, 3, 19, 5, dv=dv)
    out = ttt_linear(q, k, v, W0=None, lr=lr, steps=1, causal=causal)
    ref = lr * (q @ k.mT).tril() @ v if causal else lr * q @ (k.mT @ v)  # the formula itself
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(out, lr * linear_attention(q, k, v, causal), **TOL)


@pytest.mark.parametrize("chunk", [1, 4, 7, 16, 64])
@pytest.mark.parametrize("dv", [6, 9, 2])
def test_chunked_causal_linear_attention_equals_tril_form(float64, chunk, dv):
    q, k, v = qkv(2, 37, 6, dv=dv)
    ref = (q @ k.mT).tril() @ v
    torch.testing.assert_close(linear_attention(q, k, v, True, chunk_size=chunk), ref, **TOL)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dv", [4, *UNEQUAL_DV])
def test_nadaraya_watson_equals_softmax_attention(float64, causal, dv):
    q, k, v = qkv(2, 2, 23, 4, scale=3.0, dv=dv)  # large logits: needs the max-subtraction
    out = nadaraya_watson(q, k, v, causal)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, softmax_attention(q, k, v, causal, scale=1.0), **TOL)
    # and against the textbook weighted average, written independently
    w = torch.exp(q @ k.mT - 50.0)
    if causal:
        w = w.tril()
    torch.testing.assert_close(out, (w @ v) / w.sum(-1, keepdim=True), **TOL)


# ---------------------------------------------------------------------------------------------
# Inner loops: dual vs primal vs a naive autograd reference
# ---------------------------------------------------------------------------------------------


def _inner(kind: str, d: int, dv: int | None = None):
    """(fn, W0, ln) for an inner-model kind from width ``d`` to ``dv`` (LN kinds: ``dv = d``)."""
    dv = d if dv is None else dv
    ln = (1.0 + 0.1 * torch.randn(d), 0.1 * torch.randn(d)) if kind.endswith("_ln") else None
    if kind.startswith("linear"):
        W0 = 0.3 * torch.randn(d, dv)
        return (lambda *a, **kw: ttt_linear(*a, b0=0.1 * torch.ones(dv), ln=ln, **kw)), W0, ln
    return (lambda *a, **kw: ttt_mlp(*a, ln=ln, **kw)), init_mlp(d, dv), ln


def _bias(kind: str, W0) -> list:
    """The inner weights as a flat list, with the linear kinds' bias ``0.1`` of ``_inner``."""
    return [W0, 0.1 * torch.ones(W0.shape[-1])] if kind.startswith("linear") else list(W0)


def _f(kind: str, params, x, ln):
    """The inner model written directly with autograd-friendly ops (no hand-written grads)."""
    if kind.startswith("linear"):
        W, b = params
        y = x @ W + b
    else:
        W1, b1, W2, b2 = params
        y = F.gelu(x @ W1 + b1) @ W2 + b2
    return y if ln is None else x + F.layer_norm(y, y.shape[-1:], ln[0], ln[1], 1e-5)


def _naive_causal(kind, q, k, v, params, eta, mini_batch, ln):
    """Token by token with autograd: W_t = W_b - sum_{s<=t, same block} eta_s grad l_s(W_b)."""
    n = q.shape[-2]
    outs = []
    for s0 in range(0, n, mini_batch):
        start = [p.detach().requires_grad_() for p in params]
        grads = []
        for s in range(s0, min(s0 + mini_batch, n)):
            loss = 0.5 * (_f(kind, start, k[s], ln) - v[s]).pow(2).sum()
            grads.append(torch.autograd.grad(loss, start))
        cum = [torch.zeros_like(p) for p in params]
        for i, s in enumerate(range(s0, min(s0 + mini_batch, n))):
            cum = [c + eta[s] * g for c, g in zip(cum, grads[i], strict=True)]
            outs.append(_f(kind, [p - c for p, c in zip(start, cum, strict=True)], q[s], ln))
        params = [p - c for p, c in zip(start, cum, strict=True)]
    return torch.stack(outs).detach()


KINDS = ["linear", "linear_ln", "mlp", "mlp_ln"]
# (kind, d_v) with d_v != d = 4: LayerNorm kinds add the input x to LN(f(x)), so need d_v = d
UNEQUAL = [(kind, dv) for kind in ("linear", "mlp") for dv in UNEQUAL_DV]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mini_batch", [1, 4, 11])
def test_dual_form_equals_primal_form(float64, kind, mini_batch):
    q, k, v = qkv(2, 2, 11, 4)
    eta = 0.05 * torch.rand(2, 2, 11)  # token-dependent rates
    fn, W0, _ = _inner(kind, 4)
    dual = fn(q, k, v, W0, lr=eta, mini_batch=mini_batch, causal=True, form="dual")
    primal = fn(q, k, v, W0, lr=eta, mini_batch=mini_batch, causal=True, form="primal")
    torch.testing.assert_close(dual, primal, **TOL)


@pytest.mark.parametrize(("kind", "dv"), UNEQUAL)
@pytest.mark.parametrize("mini_batch", [1, 4, 11])
def test_dual_form_equals_primal_form_with_unequal_widths(float64, kind, dv, mini_batch):
    q, k, v = qkv(2, 2, 11, 4, dv=dv)
    eta = 0.05 * torch.rand(2, 2, 11)
    fn, W0, _ = _inner(kind, 4, dv)
    dual = fn(q, k, v, W0, lr=eta, mini_batch=mini_batch, causal=True, form="dual")
    primal = fn(q, k, v, W0, lr=eta, mini_batch=mini_batch, causal=True, form="primal")
    assert dual.shape == (2, 2, 11, dv)
    torch.testing.assert_close(dual, primal, **TOL)


@pytest.mark.parametrize(("kind", "dv"), [(kind, 3) for kind in KINDS] + UNEQUAL)
def test_causal_mini_batch_ttt_matches_token_by_token_autograd(float64, kind, dv):
    n, d, b = 9, 3, 4
    q, k, v = qkv(n, d, dv=dv)
    eta = 0.1 * torch.rand(n)
    fn, W0, ln = _inner(kind, d, dv)
    out = fn(q, k, v, W0, lr=eta, mini_batch=b, causal=True)
    params = _bias(kind, W0)
    torch.testing.assert_close(out, _naive_causal(kind, q, k, v, params, eta, b, ln), **TOL)


@pytest.mark.parametrize(("kind", "dv"), [(kind, 3) for kind in KINDS] + UNEQUAL)
@pytest.mark.parametrize(("steps", "mini_batch"), [(3, None), (2, 4)])
def test_noncausal_gd_and_sgd_match_autograd(float64, kind, dv, steps, mini_batch):
    n, d = 10, 3
    q, k, v = qkv(n, d, dv=dv)
    fn, W0, ln = _inner(kind, d, dv)
    out = fn(q, k, v, W0, lr=0.05, steps=steps, mini_batch=mini_batch)
    params = _bias(kind, W0)
    b = n if mini_batch is None else mini_batch
    for _ in range(steps):
        for s in range(0, n, b):
            p = [t.detach().requires_grad_() for t in params]
            loss = 0.5 * (_f(kind, p, k[s : s + b], ln) - v[s : s + b]).pow(2).sum()
            params = [t - 0.05 * g for t, g in zip(p, torch.autograd.grad(loss, p), strict=True)]
    torch.testing.assert_close(out, _f(kind, params, q, ln).detach(), **TOL)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_inner_loss_falls_over_inner_steps(float64, kind):
    q, k, v = qkv(2, 16, 4)
    fn, W0, _ = _inner(kind, 4)
    _, losses = fn(q, k, v, W0, lr=0.01, steps=4, return_losses=True)
    curve = losses.mean(0)  # (steps + 1,)
    assert curve.shape == (5,)
    assert (curve.diff() < 0).all(), curve
    assert curve[-1] < 0.9 * curve[0]


# ---------------------------------------------------------------------------------------------
# Outer gradients through the inner loop
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        dict(kind="linear", steps=3),
        dict(kind="mlp_ln", steps=2, mini_batch=3),
        dict(kind="linear_ln", causal=True, mini_batch=3),
        dict(kind="mlp", causal=True, mini_batch=2),
    ],
    ids=["linear-gd3", "mlp_ln-sgd", "linear_ln-causal", "mlp-causal"],
)
def test_outer_gradients_match_finite_differences(float64, config):
    config = dict(config)
    kind = config.pop("kind")
    q, k, v = qkv(6, 3)
    fn, W0, _ = _inner(kind, 3)
    W0 = [W0] if isinstance(W0, torch.Tensor) else list(W0)
    lr = torch.tensor(0.1)

    def outer(q, k, v, lr, *W):
        init = W[0] if len(W) == 1 else tuple(W)
        return fn(q, k, v, init, lr=lr, **config).pow(2).sum()

    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v, lr, *W0))
    assert torch.autograd.gradcheck(outer, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_second_order_differs_from_first_order_and_agrees_when_it_should(float64):
    q, k, v = qkv(8, 3)
    W0 = (0.3 * torch.randn(3, 3)).requires_grad_()

    def grads(steps, first_order, W):
        out = ttt_linear(q, k, v, W, lr=0.05, steps=steps, first_order=first_order)
        return torch.autograd.grad(out.pow(2).sum(), W)[0]

    # several steps from W0 != 0: the Hessian terms matter
    assert not torch.allclose(grads(3, False, W0), grads(3, True, W0), atol=1e-6)
    # zero steps: no inner gradient at all, both orders coincide
    torch.testing.assert_close(grads(0, False, W0), grads(0, True, W0), **TOL)
    # first order still trains keys and values
    kk = k.clone().requires_grad_()
    out = ttt_linear(q, kk, v, W0.detach(), lr=0.05, steps=2, first_order=True)
    assert torch.autograd.grad(out.sum(), kk)[0].abs().sum() > 0


def test_misuse_raises_with_fix(float64):
    q, k, v = qkv(8, 3)
    with pytest.raises(ValueError, match="one step per mini-batch"):
        ttt_linear(q, k, v, steps=2, causal=True)
    with pytest.raises(ValueError, match="one rate per update"):
        ttt_linear(q, k, v, lr=[0.1, 0.2], steps=3)
    with pytest.raises(ValueError, match="init_mlp"):
        ttt_mlp(q, k, v)
    with pytest.raises(ValueError, match="causal only"):
        make_mixer("ttt_linear", 8, 2, causal=False)
    q, k, v = qkv(8, 3, dv=5)
    ln = (torch.ones(5), torch.zeros(5))
    for impl in ("scan", "loop"):
        with pytest.raises(ValueError, match="d_v = d"):
            ttt_linear(q, k, v, causal=True, ln=ln, impl=impl)
    with pytest.raises(ValueError, match="d_v = d"):
        ttt_mlp(q, k, v, init_mlp(3, 5), ln=ln)


# ---------------------------------------------------------------------------------------------
# Fused causal scan of TTT-Linear against the autograd loop (the reference)
# ---------------------------------------------------------------------------------------------

SCAN_CASES = [  # (lead dims, N, mini_batch, bias, LN, first order, per-token rate)
    ((2, 3), 19, 5, True, True, False, True),  # N not a multiple of b: padded last block
    ((2,), 16, 4, False, False, False, False),
    ((2,), 16, 4, False, True, False, True),
    ((1, 2), 7, 16, True, True, True, True),  # one block shorter than b; first order
    ((3,), 10, 3, True, True, True, False),
    ((3,), 10, 3, True, False, False, True),
]
# without LayerNorm the value width d_v may differ from the key width d = 4
SCAN_CASES_UNEQUAL = [  # (d_v, lead dims, N, mini_batch, bias, first order, per-token rate)
    (dv, *case)
    for dv in UNEQUAL_DV
    for case in [
        ((2, 3), 19, 5, True, False, True),
        ((2,), 16, 4, False, False, False),
        ((1, 2), 7, 16, True, True, True),
        ((3,), 10, 3, False, True, False),
    ]
]


def _scan_inputs(lead, N, bias, ln, per_token, d=4, dv=None):
    dv = d if dv is None else dv
    q, k, v = qkv(*lead, N, d, dv=dv)
    W0 = 0.3 * torch.randn(lead[-1], d, dv)  # per head, broadcast over the batch
    extra = [0.1 * torch.randn(lead[-1], dv)] if bias else []
    if ln:
        extra += [1 + 0.1 * torch.randn(lead[-1], 1, d), 0.1 * torch.randn(lead[-1], 1, d)]
    eta = 0.3 * torch.rand(*lead, N) if per_token else torch.tensor(0.2)
    return [t.requires_grad_() for t in (q, k, v, W0, eta, *extra)]


def _scan_fn(N, b, bias, ln, first_order, impl):
    def fn(q, k, v, W0, eta, *extra):
        b0 = extra[0] if bias else None
        lnp = tuple(extra[-2:]) if ln else None
        return ttt_linear(
            q, k, v, W0, eta, 1, b, True, b0=b0, ln=lnp, first_order=first_order, impl=impl
        )

    return fn


def _assert_scan_equals_loop(lead, N, b, bias, ln, first_order, per_token, dv=None) -> None:
    """The fused scan and the autograd loop agree in value and in every input's gradient."""
    inputs = _scan_inputs(lead, N, bias, ln, per_token, dv=dv)
    scan = _scan_fn(N, b, bias, ln, first_order, "scan")(*inputs)
    loop = _scan_fn(N, b, bias, ln, first_order, "loop")(*inputs)
    torch.testing.assert_close(scan, loop, **TOL)
    cotangent = torch.randn_like(loop)
    for gs, gl in zip(
        torch.autograd.grad(scan, inputs, cotangent),
        torch.autograd.grad(loop, inputs, cotangent),
        strict=True,
    ):
        torch.testing.assert_close(gs, gl, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", SCAN_CASES)
def test_scan_equals_autograd_loop_in_value_and_gradient(float64, case):
    lead, N, b, bias, ln, first_order, per_token = case
    _assert_scan_equals_loop(lead, N, b, bias, ln, first_order, per_token)


@pytest.mark.parametrize("case", SCAN_CASES_UNEQUAL)
def test_scan_equals_loop_with_unequal_key_and_value_widths(float64, case):
    dv, lead, N, b, bias, first_order, per_token = case
    _assert_scan_equals_loop(lead, N, b, bias, False, first_order, per_token, dv=dv)


@pytest.mark.parametrize("dv", UNEQUAL_DV)
def test_scan_default_call_with_unequal_widths_as_reported(float64, dv):
    # issue 14 item 9: q, k of width 4, v of width 5, all defaults but causal=True
    q, k, v = (t.requires_grad_() for t in qkv(2, 9, 4, dv=dv))
    out = ttt_linear(q, k, v, causal=True)
    ref = ttt_linear(q, k, v, causal=True, impl="loop")
    assert out.shape == (2, 9, dv)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(out, (q @ k.mT).tril() @ v, **TOL)  # W0 = 0, one full batch
    cot = torch.randn_like(out)
    for gs, gl in zip(
        torch.autograd.grad(out, (q, k, v), cot),
        torch.autograd.grad(ref, (q, k, v), cot),
        strict=True,
    ):
        torch.testing.assert_close(gs, gl, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("first_order", [False, True])
def test_scan_with_one_block_per_segment_equals_loop(float64, monkeypatch, first_order):
    # the scan runs in segments of blocks whose tensors are at most _SEGMENT_BYTES (W_s and
    # dL/dW_s carried across); long sequences use several: force one block per segment
    monkeypatch.setattr(ttt_functional, "_SEGMENT_BYTES", 1)
    _assert_scan_equals_loop((2, 3), 19, 5, True, True, first_order, True)


@pytest.mark.parametrize(
    ("case", "dv"),  # second order only: first order is by design not the true derivative
    [(((1,), 7, 3, True, True, False, True), 3), (((1,), 8, 4, False, True, False, False), 3),
     (((1,), 7, 3, True, False, False, True), 3), (((1,), 7, 3, True, False, False, True), 2),
     (((1,), 8, 4, False, False, False, False), 4)],  # d = 3: the last two with d_v != d
)  # fmt: skip
def test_scan_passes_gradcheck(float64, case, dv):
    lead, N, b, bias, ln, first_order, per_token = case
    inputs = _scan_inputs(lead, N, bias, ln, per_token, d=3, dv=dv)
    fn = _scan_fn(N, b, bias, ln, first_order, "scan")
    weights = torch.randn_like(fn(*inputs))  # a scalar loss keeps the Jacobian one row

    def loss(*args):
        return (fn(*args) * weights).sum()

    assert torch.autograd.gradcheck(loss, tuple(inputs), eps=1e-6, atol=1e-5, rtol=1e-5)


def test_ttt_linear_layer_scan_equals_loop(float64):
    layer = TTTLinear(8, 2, mini_batch=4)
    x = torch.randn(2, 11, 8)
    y = layer(x)
    grads = torch.autograd.grad(y.pow(2).sum(), list(layer.parameters()))
    layer.impl = "loop"
    y_ref = layer(x)
    grads_ref = torch.autograd.grad(y_ref.pow(2).sum(), list(layer.parameters()))
    torch.testing.assert_close(y, y_ref, **TOL)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Stability of the MTTT inner loop
# ---------------------------------------------------------------------------------------------


def test_inner_step_clipping_bounds_each_step(float64):
    q, k, v = qkv(3, 12, 4)
    W0 = torch.zeros(4, 4)
    big = ttt_linear(q, k, v, W0, lr=1.0, steps=1, return_losses=True)
    # one step from W0 = 0 reads q W_1; the clipped step has norm <= clip in every sequence
    W1 = k.mT @ v  # (3, 4, 4), the unclipped step's size
    assert (W1.flatten(1).norm(dim=1) > 0.5).all()
    objective, readout = _reconstruction(None)
    clipped = ttt_inner_loop([(W0, None)], q, k, v, objective, readout, 1.0, 1, clip=0.5)
    W1c = torch.linalg.lstsq(q, clipped).solution  # recover W_1 from q W_1
    torch.testing.assert_close(W1c.flatten(1).norm(dim=1), torch.full((3,), 0.5))
    torch.testing.assert_close(W1c, 0.5 * W1 / W1.flatten(1).norm(dim=1)[:, None, None])
    same = ttt_inner_loop([(W0, None)], q, k, v, objective, readout, 1.0, 1, clip=1e6)
    torch.testing.assert_close(same, big[0], **TOL)


def test_bounded_rate_and_clipping_keep_a_sharp_inner_loss_finite():
    x = F.layer_norm(torch.randn(3, 16, 8), (8,))
    curves = {}
    for clip in (None, 1.0):
        torch.manual_seed(0)
        layer = MTTTMLP(8, 2, steps=4, lr=0.099, max_lr=0.1, inner_clip=clip)
        with torch.no_grad():
            layer.decoder.mul_(10)  # what outer training can do: a much sharper inner loss
        layer.track_inner_loss = True
        out = layer(x)
        curves[clip] = layer.inner_losses
    # the rate at its bound still diverges on a sharp loss; clipping keeps every step bounded
    assert not torch.isfinite(curves[None][-1]) or curves[None][-1] > 1e3 * curves[None][0]
    assert torch.isfinite(out).all() and torch.isfinite(curves[1.0]).all()
    assert curves[1.0].max() < 10 * curves[1.0][0]
    # the learned rate stays inside (0, max_lr) whatever its parameter does
    with torch.no_grad():
        layer.lr_logit.fill_(50.0)
    assert (layer.inner_lr() <= 0.1).all()


def test_mttt_rate_outside_its_bound_raises():
    with pytest.raises(ValueError, match="raise max_lr"):
        MTTTMLP(8, 2, lr=0.3)
    q, k, v = qkv(5, 3)
    with pytest.raises(ValueError, match="non-causal"):
        ttt_inner_loop([(torch.zeros(3, 3), None)], q, k, v, *_reconstruction(None), causal=True,
                       clip=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="impl must be"):
        ttt_linear(*qkv(5, 3), causal=True, impl="fast")


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [1, 3])
def test_mttt_linear_as_in_paper_is_linear_attention(float64, heads):
    dim, N, lr = 12, 10, 0.7
    layer = MTTTLinear(
        dim, heads, steps=1, inner="gd", lr=lr, learn_init=False, max_lr=1.0, inner_clip=None
    )
    x = torch.randn(2, N, dim)
    dh = dim // heads
    split = lambda t: t.view(2, N, heads, dh).transpose(1, 2)  # noqa: E731  (B, H, N, d_h)
    q, k = split(x @ layer.psi.weight.T), split(x @ layer.phi.weight.T)
    v = x.unsqueeze(1) @ layer.decoder.mT  # (B, H, N, d_h): values from the decoder
    z = (lr / N) * linear_attention(q, k, v)  # the layer takes the mean inner loss
    ref = layer.out(z.transpose(1, 2).reshape(2, N, dim))
    torch.testing.assert_close(layer(x), ref, **TOL)


def _mttt_linear_one_step(layer: MTTTLinear, x: torch.Tensor):
    """MTTT-Linear after one batch-GD step, written as linear attention: per head,
    ``q W0 + s (eta / N) q k^T v'`` with ``v' = v - k W0 G G^T`` (``v = x G^T``, ``G`` the
    decoder) and ``s = min(1, clip / ||u||)`` for the step ``u = (eta / N) k^T v'``.

    Returns the layer's output and the step's norm per sequence and head ``(B, H)``.
    """
    B, N, _ = x.shape
    H, dh = layer.heads, layer.head_dim
    split = lambda t: t.view(B, N, H, dh).transpose(1, 2)  # noqa: E731  (B, H, N, d_h)
    q, k = split(layer.psi(x)), split(layer.phi(x))
    G, W0, eta = layer.decoder, layer.W0, layer.inner_lr()[0]  # (H, d_h, dim), (H, d_h, d_h)
    v = x.unsqueeze(1) @ G.mT  # (B, H, N, d_h)
    v_shift = v - k @ W0 @ G @ G.mT  # the learned W0's part of the inner gradient
    norm = ((eta / N) * k.mT @ v_shift).flatten(2).norm(dim=-1)  # ||u||, (B, H)
    s = torch.ones_like(norm)
    if layer.inner_clip is not None:
        s = (layer.inner_clip / norm).clamp(max=1.0)
    z = q @ W0 + s[..., None, None] * (eta / N) * linear_attention(q, k, v_shift)
    return layer.out(z.transpose(1, 2).reshape(B, N, H * dh)), norm


@pytest.mark.parametrize("heads", [1, 3])
def test_mttt_linear_with_learned_init_is_linear_attention_plus_w0_terms(float64, heads):
    # exact for any W0: out = h(q W0 + (eta / N) q k^T (v - k W0 G G^T)) per head, i.e.
    # linear attention on shifted values plus a read of W0 (W0 = 0: Theorem 1)
    layer = MTTTLinear(12, heads, steps=1, lr=0.3, max_lr=1.0, inner_clip=None)
    with torch.no_grad():
        layer.W0.normal_(0.0, 0.3)
    x = torch.randn(2, 10, 12)
    ref, _ = _mttt_linear_one_step(layer, x)
    torch.testing.assert_close(layer(x), ref, **TOL)
    # both W0 terms matter: plain linear attention on the same q, k, v is another function
    with torch.no_grad():
        layer.W0.zero_()
    assert not torch.allclose(layer(x), ref, atol=1e-3)


def test_mttt_linear_with_clip_is_linear_attention_scaled_where_the_step_binds(float64):
    # the clip scales the whole step, so the layer stays linear attention on shifted values
    # with a per-(sequence, head) factor min(1, clip / ||u||): exact where ||u|| <= clip
    # (the factor is 1), a different function where it binds
    layer = MTTTLinear(8, 2, steps=1, lr=0.3, max_lr=1.0, inner_clip=1.0)
    with torch.no_grad():
        layer.W0.normal_(0.0, 0.3)
    x = torch.randn(4, 16, 8) * torch.tensor([0.3, 0.5, 3.0, 5.0])[:, None, None]
    ref, norm = _mttt_linear_one_step(layer, x)
    assert (norm[:2] < 1.0).all() and (norm[2:] > 1.0).all()  # below, above the clip
    torch.testing.assert_close(layer(x), ref, **TOL)
    layer.inner_clip = None
    unclipped = layer(x)
    layer.inner_clip = 1.0
    torch.testing.assert_close(layer(x)[:2], unclipped[:2], **TOL)
    assert ((layer(x)[2:] - unclipped[2:]).abs().amax((1, 2)) > 1e-2).all()


@pytest.mark.parametrize("decoder_ln", [False, True])
@pytest.mark.parametrize("inner", ["gd", "sgd"])
def test_mttt_mlp_inner_loop_matches_autograd(float64, decoder_ln, inner):
    dim, heads, N, T = 8, 2, 6, 2
    layer = MTTTMLP(
        dim, heads, steps=T, inner=inner, lr=0.5, decoder_ln=decoder_ln, max_lr=1.0, inner_clip=None
    )
    with torch.no_grad():
        layer.lr_logit.copy_(torch.logit(torch.tensor([0.5, 0.3])))  # max_lr = 1
    x = torch.randn(1, N, dim)
    dh = dim // heads
    split = lambda t: t.view(1, N, heads, dh).transpose(1, 2)  # noqa: E731
    q, k = split(x @ layer.psi.weight.T), split(x @ layer.phi.weight.T)
    params = [layer.W1, layer.b1, layer.W2, layer.b2]
    mlp = lambda p, z: F.gelu(z @ p[0] + p[1].unsqueeze(-2)) @ p[2] + p[3].unsqueeze(-2)  # noqa: E731
    ln = lambda y: (  # noqa: E731
        F.layer_norm(y, (dh,)) * layer.decoder_ln[0] + layer.decoder_ln[1] if decoder_ln else y
    )
    b = N if inner == "gd" else math.ceil(N / T)
    blocks = [slice(0, N)] * T if inner == "gd" else [slice(s, s + b) for s in range(0, N, b)]
    p = [t.detach() for t in params]
    for t, blk in enumerate(blocks):
        p = [u.detach().requires_grad_() for u in p]
        recon = ln(mlp(p, k[..., blk, :])) @ layer.decoder  # (1, H, n, dim)
        loss = 0.5 * (recon - x[:, None, blk]).pow(2).sum()
        step = layer.inner_lr()[t].item() / b
        p = [u - step * g for u, g in zip(p, torch.autograd.grad(loss, p), strict=True)]
    z = mlp(p, q).detach()
    ref = layer.out(z.transpose(1, 2).reshape(1, N, dim))
    torch.testing.assert_close(layer(x), ref, **TOL)


def test_mttt_layer_tracks_falling_inner_loss(float64):
    layer = MTTTMLP(8, 2, steps=4, lr=0.1, decoder_ln=True, max_lr=0.3)
    layer.track_inner_loss = True
    layer(torch.randn(3, 16, 8))
    curve = layer.inner_losses
    assert curve.shape == (5,)
    assert (curve.diff() < 0).all(), curve


@pytest.mark.parametrize("cls", [TTTLinear, TTTMLP])
def test_ttt_layers_are_causal_and_dual_equals_primal(float64, cls):
    layer = cls(8, 2, mini_batch=4)
    x = torch.randn(2, 10, 8)
    y = layer(x)
    x2 = x.clone()
    x2[:, 6:] += torch.randn(2, 4, 8)  # change the future of token 5
    torch.testing.assert_close(layer(x2)[:, :6], y[:, :6], **TOL)
    assert not torch.allclose(layer(x2)[:, 6:], y[:, 6:])
    layer.form = "primal"
    torch.testing.assert_close(layer(x), y, **TOL)


@pytest.mark.parametrize("cls", [MTTTLinear, MTTTMLP, TTTLinear])
def test_layer_parameter_gradients_match_finite_differences(float64, cls):
    kwargs = dict(mini_batch=3) if cls is TTTLinear else dict(steps=2, learn_init=True)
    layer = cls(4, 2, **kwargs)
    x = torch.randn(1, 6, 4)
    names = [n for n, _ in layer.named_parameters()]
    params = {n: p.detach() for n, p in layer.named_parameters()}

    def f(*values):
        return functional_call(layer, dict(zip(names, values, strict=True)), (x,)).pow(2).sum()

    inputs = tuple(params[n].clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mixer", ["mttt_linear", "mttt_mlp", "linear_attention", "softmax_attention"]
)
def test_sequence_classifier_runs_and_learns_a_step(mixer):
    model = SequenceClassifier(16, 3, mixer, dim=8, depth=1, heads=2)
    x, y = torch.randn(4, 16), torch.tensor([0, 1, 2, 0])
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert model(x).shape == (4, 3)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "mixer", ["ttt_linear", "ttt_mlp", "linear_attention", "softmax_attention"]
)
def test_causal_lm_is_causal(mixer):
    kwargs = dict(mini_batch=4) if mixer.startswith("ttt") else {}
    model = CausalLM(mixer, dim=16, depth=2, heads=2, max_len=32, **kwargs)
    idx = torch.randint(0, 256, (2, 12))
    logits = model(idx)
    assert logits.shape == (2, 12, 256)
    idx2 = idx.clone()
    idx2[:, 7:] = (idx2[:, 7:] + 1) % 256
    torch.testing.assert_close(model(idx2)[:, :7], logits[:, :7])
    assert torch.isfinite(model.loss(idx))
