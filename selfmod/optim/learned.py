"""Learned optimizers: update rules whose own parameters are meta-learned.

Both are ordinary :class:`~selfmod.optim.GradientTransformation`\\ s whose weights live in
``hparams`` (under a prefix), so every :mod:`selfmod.hypergrad` estimator meta-trains them:
``res.hparams`` is the meta-gradient for the optimizer's weights.

- :func:`lstm_optimizer`: coordinate-wise 2-layer LSTM (20 units) on log-and-sign preprocessed
  gradients. References: Andrychowicz et al. 2016, "Learning to learn by gradient descent by
  gradient descent".
- :func:`mlp_optimizer`: per-parameter MLP on gradient, momenta at several timescales and the
  parameter, each feature normalised per tensor; output ``d * exp(m * scale) * scale``.
  References: Metz et al. 2020, "Tasks, stability, architecture, and compute".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from selfmod.optim.base import GradientTransformation, HParams, Params


def _cat(tree: Params) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tree.values()])


def _split(flat: Tensor, like: Params) -> Params:
    out, i = {}, 0
    for k, v in like.items():
        out[k] = flat[i : i + v.numel()].reshape(v.shape)
        i += v.numel()
    return out


def _linear_init(fan_in: int, fan_out: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    bound = 1.0 / math.sqrt(fan_in)
    w = (torch.rand(fan_out, fan_in, generator=gen) * 2 - 1) * bound
    b = (torch.rand(fan_out, generator=gen) * 2 - 1) * bound
    return w, b


# ------------------------------------------------------------------------------------ LSTM
class LSTMState(NamedTuple):
    h: tuple[Tensor, ...]  # per layer, (n_coords, hidden)
    c: tuple[Tensor, ...]  # per layer, (n_coords, hidden)


def preprocess_gradients(g: Tensor, p: float = 10.0) -> Tensor:
    """Log-and-sign preprocessing, ``(n,) -> (n, 2)``: ``(log|g| / p, sign g)`` if
    ``|g| >= e^-p``, else ``(-1, e^p g)`` (Andrychowicz et al. 2016, appendix A)."""
    big = g.abs() >= math.exp(-p)
    log_part = torch.where(big, torch.log(g.abs().clamp_min(math.exp(-p))) / p, -torch.ones_like(g))
    sign_part = torch.where(big, torch.sign(g), math.exp(p) * g)
    return torch.stack([log_part, sign_part], dim=-1)


def init_lstm_optimizer(
    hidden: int = 20, layers: int = 2, seed: int = 0, prefix: str = "lstm"
) -> dict[str, Tensor]:
    """Initial weights of :func:`lstm_optimizer`, keyed ``{prefix}.w_ih{l}`` etc."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for layer in range(layers):
        fan_in = 2 if layer == 0 else hidden
        w_ih, b = _linear_init(fan_in, 4 * hidden, gen)
        w_hh, _ = _linear_init(hidden, 4 * hidden, gen)
        b = b.clone()
        b[hidden : 2 * hidden] = 1.0  # forget-gate bias 1: remember by default
        out.update(
            {f"{prefix}.w_ih{layer}": w_ih, f"{prefix}.w_hh{layer}": w_hh, f"{prefix}.b{layer}": b}
        )
    w_out, b_out = _linear_init(hidden, 1, gen)
    out[f"{prefix}.w_out"], out[f"{prefix}.b_out"] = w_out * 0.1, b_out * 0.0
    return out


def lstm_optimizer(
    hidden: int = 20, layers: int = 2, output_scale: float = 0.1, prefix: str = "lstm"
) -> GradientTransformation:
    """Coordinate-wise LSTM optimizer: every scalar parameter is a batch row sharing weights.

    ``u_i = output_scale * W_out h_i``, ``h_i = LSTM(preprocess(g_i), state_i)``.
    Weights are read from ``hparams`` (see :func:`init_lstm_optimizer`).
    """

    def init(params: Params) -> LSTMState:
        n = sum(v.numel() for v in params.values())
        like = next(iter(params.values()))

        def zeros() -> tuple[Tensor, ...]:  # h and c apart: no shared storage in checkpoints
            return tuple(like.new_zeros(n, hidden) for _ in range(layers))

        return LSTMState(zeros(), zeros())

    def update(grads, state, params=None, hparams: HParams | None = None):
        if hparams is None:
            raise ValueError("lstm_optimizer reads its weights from hparams; pass hparams")
        x = preprocess_gradients(_cat(grads))  # (n, 2)
        hs, cs = [], []
        for layer in range(layers):
            gates = (
                x @ hparams[f"{prefix}.w_ih{layer}"].T
                + state.h[layer] @ hparams[f"{prefix}.w_hh{layer}"].T
                + hparams[f"{prefix}.b{layer}"]
            )  # (n, 4 * hidden)
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * state.c[layer] + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            hs.append(h)
            cs.append(c)
            x = h
        out = (x @ hparams[f"{prefix}.w_out"].T + hparams[f"{prefix}.b_out"]).squeeze(-1)
        return _split(out * output_scale, grads), LSTMState(tuple(hs), tuple(cs))

    return GradientTransformation(init, update)


# ------------------------------------------------------------------------------------- MLP
class MLPOptState(NamedTuple):
    momenta: tuple[Params, ...]  # one EMA of the gradient per decay rate, shaped like params


def init_mlp_optimizer(
    hidden: int = 32,
    decays: Sequence[float] = (0.5, 0.9, 0.99),
    seed: int = 0,
    prefix: str = "mlpopt",
) -> dict[str, Tensor]:
    """Initial weights of :func:`mlp_optimizer` (features: g, momenta, param)."""
    gen = torch.Generator().manual_seed(seed)
    n_features = 2 + len(decays)
    w0, b0 = _linear_init(n_features, hidden, gen)
    w1, b1 = _linear_init(hidden, hidden, gen)
    w2, b2 = _linear_init(hidden, 2, gen)
    return {
        f"{prefix}.w0": w0,
        f"{prefix}.b0": b0,
        f"{prefix}.w1": w1,
        f"{prefix}.b1": b1,
        f"{prefix}.w2": w2,
        f"{prefix}.b2": b2 * 0.0,
    }


def mlp_optimizer(
    decays: Sequence[float] = (0.5, 0.9, 0.99), step_scale: float = 1e-3, prefix: str = "mlpopt"
) -> GradientTransformation:
    """Per-parameter MLP optimizer: ``u = d * exp(m * s) * s`` with ``(d, m) = MLP(features)``.

    Features per coordinate: gradient, its EMAs with ``decays``, and the parameter, each divided
    by its root-mean-square over the tensor (so the rule is invariant to their scale).
    """

    def init(params: Params) -> MLPOptState:
        return MLPOptState(
            tuple({k: torch.zeros_like(v) for k, v in params.items()} for _ in decays)
        )

    def update(grads, state, params=None, hparams: HParams | None = None):
        if hparams is None or params is None:
            raise ValueError("mlp_optimizer needs params and hparams (its weights)")
        momenta = tuple(
            {k: m[k] * b + grads[k] * (1 - b) for k in grads}
            for m, b in zip(state.momenta, decays, strict=True)
        )
        out = {}
        for k, g in grads.items():
            feats = [g, *(m[k] for m in momenta), params[k]]
            x = torch.stack([f * torch.rsqrt(f.pow(2).mean() + 1e-16) for f in feats], dim=-1)
            x = torch.relu(x @ hparams[f"{prefix}.w0"].T + hparams[f"{prefix}.b0"])
            x = torch.relu(x @ hparams[f"{prefix}.w1"].T + hparams[f"{prefix}.b1"])
            d, m = (x @ hparams[f"{prefix}.w2"].T + hparams[f"{prefix}.b2"]).unbind(-1)
            out[k] = d * torch.exp(m * step_scale) * step_scale
        return out, MLPOptState(momenta)

    return GradientTransformation(init, update)
