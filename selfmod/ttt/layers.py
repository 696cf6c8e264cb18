"""Multi-head token mixers: MTTT and TTT layers, and the attention layers they replace.

Each layer holds only projections and the inner model's initial weights; the maths is in
:mod:`selfmod.ttt.functional`. Input and output are ``(B, N, dim)``; heads split ``dim``.

References: arXiv 2310.13807 (MTTT-Linear, MTTT-MLP); arXiv 2407.04620 (TTT-Linear, TTT-MLP).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from selfmod.ttt.functional import (
    InnerParams,
    _ln,
    init_mlp,
    layer_norm_backward,
    linear_attention,
    softmax_attention,
    ttt_inner_loop,
    ttt_linear,
    ttt_mlp,
)

__all__ = [
    "MTTTMLP",
    "TTTMLP",
    "ConvMixer",
    "LinearAttention",
    "MTTTLinear",
    "SoftmaxAttention",
    "TTTLinear",
    "gaussian_noise",
    "random_mask",
]


def _split_heads(x: Tensor, heads: int) -> Tensor:
    B, N, _ = x.shape
    return x.view(B, N, heads, -1).transpose(1, 2)  # (B, H, N, d_h)


def _merge_heads(x: Tensor) -> Tensor:
    B, H, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, H * d)  # (B, N, H d_h)


def _head_dim(dim: int, heads: int, head_dim: int | None) -> int:
    if head_dim is not None:
        return head_dim
    if dim % heads:
        raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}); or pass head_dim")
    return dim // heads


# A hand-crafted test-time task's corruption of the layer input, (B, N, dim) -> (B, N, dim)
Corruption = Callable[[Tensor], Tensor]


def random_mask(rate: float) -> Corruption:
    """Zero each input feature independently with probability ``rate`` (a fresh mask per call,
    at test time too, from torch's global RNG): the masked-reconstruction task of MTTT's
    hand-crafted baselines (MAE-style, per token and channel).

    References: arXiv 2310.13807, section 5 (hand-crafted tasks); He et al. 2022 (MAE).
    """
    if not 0.0 < rate < 1.0:
        raise ValueError(f"mask rate must be in (0, 1) (got {rate})")

    def corrupt(x: Tensor) -> Tensor:
        return x * (torch.rand_like(x) >= rate)

    return corrupt


def gaussian_noise(std: float) -> Corruption:
    """``x + std * eps``, ``eps ~ N(0, I)`` afresh per call: the denoising task.

    References: arXiv 2310.13807, section 5; Vincent et al. 2008 (denoising autoencoders).
    """
    if std <= 0.0:
        raise ValueError(f"noise std must be > 0 (got {std})")

    def corrupt(x: Tensor) -> Tensor:
        return x + std * torch.randn_like(x)

    return corrupt


class _MTTT(nn.Module):
    """Shared MTTT machinery; subclasses define the inner model's initial weights.

    For input ``x (B, N, dim)`` and each head: keys ``k = theta_phi x``, queries
    ``q = theta_psi x``; the inner loss is the reconstruction of ``x`` through the decoder
    ``g(z) = [LN](z) theta_g``, ``l_s(W) = 1/2 ||g(f(k_s; W)) - x_s||^2``, taken as a mean over
    the tokens of each step (the step is ``lr_t / |B|`` times the summed gradient); the output
    is ``h(concat_heads f(q; W_T))``. ``inner="gd"``: ``steps`` full-batch steps; ``"sgd"``:
    one pass over ``steps`` consecutive mini-batches of ``ceil(N / steps)`` tokens.

    Stability: a learned rate is bounded, ``lr_t = max_lr * sigmoid(theta_t)`` (as the TTT
    layers' rate, 2407.04620), starting at ``lr``; and each inner step's norm over all inner
    weights is clipped to ``inner_clip`` per sequence and head (``None``: no clipping). An
    unbounded learned rate let the outer loop sharpen the inner loss until T = 4 steps
    diverged to NaN. With the defaults (``lr = 0.03``, ``max_lr = 0.1``, ``inner_clip = 1``;
    a fixed 0.3 diverges at these widths) the inner loss falls with T and training at
    T = 0..4 stays finite on 3 seeds (``benchmarks/results/ttt_repro.md``); at
    initialisation a step's norm is 0.1-0.5, so the clip binds only on sharpened losses.

    ``corruption`` replaces the learned task by a fixed, hand-crafted one (the paper's
    baseline): per head, keys are the head's slice of ``corruption(x)``, queries and targets
    its slice of ``x``, and the decoder is the identity, ``l_s(W) = 1/2 ||f(k_s; W) - x_s||^2``
    (no ``theta_phi``, ``theta_psi``, ``theta_g``; e.g. :func:`random_mask`,
    :func:`gaussian_noise`).

    References: arXiv 2310.13807, sections 4-5.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        head_dim: int | None = None,
        steps: int = 1,
        inner: Literal["gd", "sgd"] = "gd",
        lr: float = 0.03,
        learn_lr: bool = True,
        learn_init: bool = True,
        decoder_ln: bool = False,
        first_order: bool = False,
        max_lr: float = 0.1,
        inner_clip: float | None = 1.0,
        corruption: Corruption | None = None,
    ) -> None:
        super().__init__()
        if learn_lr and not 0 < lr < max_lr:
            raise ValueError(
                f"a learned inner rate starts inside (0, max_lr) (got lr={lr}, max_lr={max_lr});"
                " raise max_lr or pass learn_lr=False for a fixed rate"
            )
        if inner not in ("gd", "sgd"):
            raise ValueError(f"inner must be 'gd' (batch GD) or 'sgd' (got {inner!r})")
        if steps < 0:
            raise ValueError(f"steps must be >= 0 (got {steps})")
        dh = _head_dim(dim, heads, head_dim)
        self.heads, self.head_dim, self.steps, self.inner = heads, dh, steps, inner
        self.first_order, self.max_lr, self.inner_clip = first_order, max_lr, inner_clip
        self.corruption = corruption
        if corruption is None:
            self.phi = nn.Linear(dim, heads * dh, bias=False)  # theta_phi: keys ("corruption")
            self.psi = nn.Linear(dim, heads * dh, bias=False)  # theta_psi: queries
            self.decoder = nn.Parameter(torch.randn(heads, dh, dim) / math.sqrt(dh))  # theta_g
        elif heads * dh != dim:
            raise ValueError(
                f"a fixed task reconstructs each head's slice of the input, so heads * head_dim "
                f"must equal dim (got {heads} * {dh} != {dim}); drop head_dim"
            )
        self.out = nn.Linear(heads * dh, dim)  # h
        rates = torch.full((steps,), float(lr))  # one inner learning rate per step
        self.learn_lr = learn_lr
        if learn_lr:  # lr = max_lr * sigmoid(lr_logit)
            self.lr_logit = nn.Parameter(torch.logit(rates / max_lr))
        else:
            self.register_buffer("lr", rates)
        self.decoder_ln = (
            nn.ParameterList(
                [nn.Parameter(torch.ones(heads, 1, dh)), nn.Parameter(torch.zeros(heads, 1, dh))]
            )
            if decoder_ln
            else None
        )
        self.learn_init = learn_init
        self.track_inner_loss = False
        self.inner_losses: Tensor | None = None  # (steps + 1,) mean inner loss, when tracked

    def _init_params(self, names: list[str], values: list[Tensor]) -> None:
        for name, value in zip(names, values, strict=True):
            if self.learn_init:
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

    def inner_params(self) -> InnerParams:
        raise NotImplementedError

    def inner_lr(self) -> Tensor:
        """The inner learning rate of each step, ``(steps,)``."""
        return self.max_lr * torch.sigmoid(self.lr_logit) if self.learn_lr else self.lr

    def task(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Queries, keys, targets and decoder of the inner task for ``x (B, N, dim)``.

        Learned: ``q = theta_psi x``, ``k = theta_phi x`` ``(B, H, N, d_h)``, target ``x``
        ``(B, 1, N, dim)`` for every head, decoder ``theta_g (H, d_h, dim)``. Fixed: the head
        slices of ``x``, ``corruption(x)`` and ``x`` ``(B, H, N, d_h)``, decoder ``None``.
        """
        if self.corruption is not None:
            xh = _split_heads(x, self.heads)  # (B, H, N, d_h)
            return xh, _split_heads(self.corruption(x), self.heads), xh, None
        k = _split_heads(self.phi(x), self.heads)  # (B, H, N, d_h)
        q = _split_heads(self.psi(x), self.heads)  # (B, H, N, d_h)
        return q, k, x.unsqueeze(1), self.decoder

    def forward(self, x: Tensor) -> Tensor:
        N = x.shape[1]
        lr = self.inner_lr()  # (steps,)
        q, k, target, G = self.task(x)
        ln = tuple(self.decoder_ln) if self.decoder_ln is not None else None

        def objective(y: Tensor, kb: Tensor, tb: Tensor) -> tuple[Tensor, Tensor]:
            z = _ln(y, ln) if ln is not None else y  # (B, H, n, d_h)
            err = z - tb if G is None else z @ G - tb  # (B, H, n, d_h | dim)
            g_z = err if G is None else err @ G.mT  # (B, H, n, d_h)
            g_y = layer_norm_backward(y, g_z, ln[0]) if ln is not None else g_z
            return g_y, 0.5 * err.pow(2).sum(-1)

        if self.inner == "gd":
            mini_batch, passes = None, self.steps
            rates = [r / N for r in lr]
        else:
            mini_batch, passes = math.ceil(N / max(self.steps, 1)), min(self.steps, 1)
            n_blocks = math.ceil(N / mini_batch)
            rates = [r / mini_batch for r in lr[:n_blocks]]
        result = ttt_inner_loop(
            self.inner_params(),
            q,
            k,
            target,
            objective,
            lambda y, _: y,
            rates,
            passes,
            mini_batch,
            causal=False,
            first_order=self.first_order,
            return_losses=self.track_inner_loss,
            clip=self.inner_clip,
        )
        if self.track_inner_loss:
            result, losses = result
            self.inner_losses = losses.detach().mean((0, 1))
        return self.out(_merge_heads(result))  # (B, N, dim)


class MTTTLinear(_MTTT):
    """MTTT with a linear inner model ``f(x; W) = x W`` per head, ``W (d_h, d_h)``.

    With ``W0 = 0`` (``learn_init=False``), one batch-GD step and no decoder LN, the output
    is ``h(concat_heads (lr / N) q (k^T v))`` with ``v = x theta_g^T``: linear attention.

    References: arXiv 2310.13807, Theorem 1.
    """

    def __init__(self, dim: int, heads: int = 4, **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        dh = self.head_dim
        self._init_params(["W0"], [torch.zeros(heads, dh, dh)])

    def inner_params(self) -> InnerParams:
        return [(self.W0, None)]


class MTTTMLP(_MTTT):
    """MTTT with a 2-layer GELU MLP inner model per head (hidden ``4 d_h``), learned init.

    References: arXiv 2310.13807, section 5 (MTTT-MLP).
    """

    def __init__(self, dim: int, heads: int = 4, **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        dh = self.head_dim
        W1, b1, W2, b2 = init_mlp(dh)
        stack = [t.expand(heads, *t.shape).clone() for t in (W1, b1, W2, b2)]
        self._init_params(["W1", "b1", "W2", "b2"], stack)  # (H, ...) per head

    def inner_params(self) -> InnerParams:
        return [(self.W1, self.b1), (self.W2, self.b2)]


class _TTT(nn.Module):
    """Shared causal TTT machinery (2407.04620): mini-batch TTT with the dual form.

    Per head: ``k = theta_K x``, ``v = theta_V x``, ``q = theta_Q x``; inner model
    ``f(z) = z + LN(f_res(z))`` trained on ``1/2 ||f(k_s) - v_s||^2`` with token-dependent rate
    ``eta_s = lr * sigmoid(theta_lr . x_s) / d_h``; token ``t`` reads ``f(q_t; W_t)`` with
    ``W_t`` updated by the gradients of the tokens ``<= t`` of its mini-batch (taken at the
    mini-batch's starting weights) and all earlier mini-batches. ``tune_lr``: the base rate
    ``lr`` becomes the persistent buffer ``log_inner_lr`` (``lr = exp``), which a run tunes by
    its guard loss (:mod:`selfmod.introspect.modifiers.inner_lr`).

    References: arXiv 2407.04620, sections 2.3-2.7.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        head_dim: int | None = None,
        mini_batch: int = 16,
        lr: float = 1.0,
        first_order: bool = False,
        form: Literal["dual", "primal"] = "dual",
        tune_lr: bool = False,
    ) -> None:
        super().__init__()
        if tune_lr and lr <= 0:
            raise ValueError(f"lr must be > 0 to be tuned in log space (got {lr})")
        dh = _head_dim(dim, heads, head_dim)
        self.heads, self.head_dim, self.mini_batch = heads, dh, mini_batch
        self.base_lr, self.first_order, self.form = lr, first_order, form
        if tune_lr:  # a run's hyperparameter (modifier inner_lr): a buffer, not a parameter
            self.register_buffer("log_inner_lr", torch.tensor(math.log(lr)))
        self.qkv = nn.Linear(dim, 3 * heads * dh, bias=False)  # theta_Q, theta_K, theta_V
        self.lr_proj = nn.Linear(dim, heads)  # theta_lr: token-dependent inner rate
        self.ln_weight = nn.Parameter(torch.ones(heads, 1, dh))
        self.ln_bias = nn.Parameter(torch.zeros(heads, 1, dh))
        self.out = nn.Linear(heads * dh, dim)

    def mix(self, q: Tensor, k: Tensor, v: Tensor, eta: Tensor, ln: tuple[Tensor, Tensor]):
        """The inner loop ``(B, H, N, d_h) -> (B, H, N, d_h)`` with rates ``eta (B, H, N)``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(x).chunk(3, -1))  # (B,H,N,d_h)
        base = self.log_inner_lr.exp() if hasattr(self, "log_inner_lr") else self.base_lr
        eta = base * torch.sigmoid(self.lr_proj(x)).transpose(1, 2) / self.head_dim  # (B, H, N)
        z = self.mix(q, k, v, eta, (self.ln_weight, self.ln_bias))  # (B, H, N, d_h)
        return self.out(_merge_heads(z))  # (B, N, dim)


class TTTLinear(_TTT):
    """Causal TTT-Linear: ``f_res(z) = z W + b`` per head, learned ``W0 ~ N(0, 0.02^2)``.

    ``impl="scan"`` runs the fused scan of :func:`ttt_linear` (exact, not differentiable
    twice); ``"loop"`` the autograd reference loop.

    References: arXiv 2407.04620 (TTT-Linear).
    """

    def __init__(
        self, dim: int, heads: int = 4, impl: Literal["scan", "loop"] = "scan", **kwargs
    ) -> None:
        super().__init__(dim, heads, **kwargs)
        dh = self.head_dim
        self.impl = impl
        self.W0 = nn.Parameter(0.02 * torch.randn(heads, dh, dh))
        self.b0 = nn.Parameter(torch.zeros(heads, dh))

    def mix(self, q: Tensor, k: Tensor, v: Tensor, eta: Tensor, ln: tuple[Tensor, Tensor]):
        return ttt_linear(
            q, k, v, self.W0, eta, 1, self.mini_batch, True, b0=self.b0, ln=ln,
            first_order=self.first_order, form=self.form, impl=self.impl,
        )  # fmt: skip


class TTTMLP(_TTT):
    """Causal TTT-MLP: ``f_res`` a 2-layer GELU MLP per head with hidden ``4 d_h``.

    ``impl="scan"`` runs :func:`ttt_causal_scan` (the read batched over mini-batches after
    the recurrence); ``"loop"`` the reference loop. Both are autograd, with equal results.

    References: arXiv 2407.04620 (TTT-MLP).
    """

    def __init__(
        self, dim: int, heads: int = 4, impl: Literal["scan", "loop"] = "scan", **kwargs
    ) -> None:
        super().__init__(dim, heads, **kwargs)
        self.impl = impl
        W1, b1, W2, b2 = init_mlp(self.head_dim)
        self.W1, self.b1, self.W2, self.b2 = (
            nn.Parameter(t.expand(heads, *t.shape).clone()) for t in (W1, b1, W2, b2)
        )

    def mix(self, q: Tensor, k: Tensor, v: Tensor, eta: Tensor, ln: tuple[Tensor, Tensor]):
        return ttt_mlp(
            q, k, v, (self.W1, self.b1, self.W2, self.b2), eta, 1, self.mini_batch, True, ln=ln,
            first_order=self.first_order, form=self.form, impl=self.impl,
        )  # fmt: skip


class ConvMixer(nn.Module):
    """A depthwise convolution over tokens, then GELU and a linear map:
    ``y = W gelu(conv_k(x)) + b``, ``(B, N, dim) -> (B, N, dim)``; ``causal``: token ``t``
    reads tokens ``t - k + 1 .. t`` (left padding), else a centred window.

    References: Wu et al. 2019 (lightweight and dynamic convolutions).
    """

    def __init__(self, dim: int, heads: int = 4, kernel: int = 3, causal: bool = False) -> None:
        super().__init__()
        self.kernel, self.causal = kernel, causal
        self.conv = nn.Conv1d(dim, dim, kernel, groups=dim)  # one filter per channel
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        k = self.kernel
        pad = (k - 1, 0) if self.causal else ((k - 1) // 2, k // 2)
        h = self.conv(nn.functional.pad(x.transpose(1, 2), pad))  # (B, dim, N)
        return self.out(nn.functional.gelu(h.transpose(1, 2)))  # (B, N, dim)


class LinearAttention(nn.Module):
    """Multi-head linear attention ``h(concat_heads linear_attention(q, k, v) / N)``.

    The ``1 / N`` (causal: ``1 / (t + 1)``) keeps the unnormalised sum's scale independent
    of length; it is the same ``lr / N`` as the MTTT layer's mean inner loss.

    References: Katharopoulos et al. 2020; arXiv 2310.13807, Theorem 1.
    """

    def __init__(self, dim: int, heads: int = 4, causal: bool = False) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        N = x.shape[1]
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(x).chunk(3, -1))  # (B,H,N,d_h)
        z = linear_attention(q, k, v, self.causal)  # (B, H, N, d_h)
        if self.causal:
            z = z / torch.arange(1, N + 1, device=x.device, dtype=x.dtype).unsqueeze(-1)
        else:
            z = z / N
        return self.out(_merge_heads(z))


class SoftmaxAttention(nn.Module):
    """Multi-head softmax self-attention (PyTorch SDPA).

    References: Vaswani et al. 2017.
    """

    def __init__(self, dim: int, heads: int = 4, causal: bool = False) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(x).chunk(3, -1))  # (B,H,N,d_h)
        return self.out(_merge_heads(softmax_attention(q, k, v, self.causal)))
