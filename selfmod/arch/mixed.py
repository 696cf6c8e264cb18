"""Mixed operations and learnable connections: choose an operation, or an input, by gradient.

With architecture weights ``alpha (K,)`` over candidates ``o_1 .. o_K``::

    DARTS:  y = sum_i softmax(alpha)_i o_i(x)
    GDAS:   h = one_hot(argmax(alpha + g)),  g ~ Gumbel(0, 1)
            y = sum_i (h_i - p_i.detach() + p_i) o_i(x),  p = softmax((alpha + g) / tau)

GDAS's forward value is exactly the sampled op (only that op runs); its gradient reaches every
``alpha_j`` through ``p``. At eval, DARTS keeps the softmax mixture and GDAS takes
``argmax(alpha)``, so :func:`discretise` keeps a GDAS network's eval function exactly.

References: Liu, Simonyan & Yang 2019, "DARTS: Differentiable Architecture Search"; Dong & Yang
2019, "Searching for a Robust Neural Architecture in Four GPU Hours" (GDAS); Jang et al. 2017
(Gumbel-softmax); Zela et al. 2020 and Chu et al. 2020 (collapse to skip connections).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from selfmod.arch.surgery import drop_torch_params, rename_state

MODES = ("darts", "gdas")


def mixture_weights(
    alpha: Tensor,
    mode: str = "darts",
    tau: float = 1.0,
    training: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Weights ``(K,)`` over candidates: softmax (DARTS), or a straight-through one-hot Gumbel
    sample (GDAS; the one-hot of ``argmax(alpha)`` when not ``training``)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} (got {mode!r})")
    if tau <= 0:
        raise ValueError(f"tau must be > 0 (got {tau})")
    if mode == "darts":
        return torch.softmax(alpha, -1)
    if not training:
        return nn.functional.one_hot(alpha.argmax(-1), alpha.shape[-1]).to(alpha.dtype)
    u = torch.rand(alpha.shape, dtype=alpha.dtype, device=alpha.device, generator=generator)
    g = -torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-10)))  # Gumbel(0, 1)
    p = torch.softmax((alpha + g) / tau, -1)  # (K,)
    hard = nn.functional.one_hot(p.argmax(-1), alpha.shape[-1]).to(alpha.dtype)
    return hard - p.detach() + p


def _combine(weights: Tensor, thunks: Sequence) -> Tensor:
    """``sum_i w_i f_i()``, calling only the ``f_i`` whose weight value is non-zero."""
    live = (weights.detach() != 0).nonzero().squeeze(1).tolist()
    out = None
    for i in live:
        term = weights[i] * thunks[i]()
        out = term if out is None else out + term
    return out


class Zero(nn.Module):
    """The ``none`` op: ``y = 0 * x`` (keeps shape, dtype and device)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 0.0


class MixedOp(nn.Module):
    """A weighted choice among ``candidates`` (name -> module, same output shape); its
    architecture weights are ``alpha (K,)``, named ``alpha`` in the params."""

    def __init__(
        self, candidates: Mapping[str, nn.Module], mode: str = "darts", tau: float = 1.0
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} (got {mode!r})")
        self.ops = nn.ModuleDict(dict(candidates))
        self.alpha = nn.Parameter(torch.zeros(len(self.ops)) + 1e-3 * torch.randn(len(self.ops)))
        self.mode, self.tau = mode, tau

    @property
    def names(self) -> list[str]:
        return list(self.ops.keys())

    def weights(self) -> Tensor:
        return mixture_weights(self.alpha, self.mode, self.tau, self.training)

    def forward(self, x: Tensor) -> Tensor:
        ops = list(self.ops.values())
        return _combine(self.weights(), [lambda op=op: op(x) for op in ops])

    def chosen(self, exclude: Sequence[str] = ()) -> str:
        """The candidate with the largest ``alpha``, ignoring those named in ``exclude``."""
        allowed = [i for i, n in enumerate(self.names) if n not in exclude]
        if not allowed:
            raise ValueError(f"exclude={list(exclude)} leaves no candidate to choose")
        return self.names[allowed[int(self.alpha.detach()[allowed].argmax())]]


class Connections(nn.Module):
    """Learnable connections: the input of a layer chosen (DARTS: mixed) among ``n`` earlier
    outputs with weights ``beta (n,)``; called as ``conn(list_of_tensors)``."""

    def __init__(self, n: int, mode: str = "darts", tau: float = 1.0) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.zeros(n) + 1e-3 * torch.randn(n))
        self.mode, self.tau = mode, tau

    def weights(self) -> Tensor:
        return mixture_weights(self.beta, self.mode, self.tau, self.training)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        if len(inputs) != self.beta.numel():
            raise ValueError(
                f"Connections has {self.beta.numel()} weights but got {len(inputs)} inputs"
            )
        return _combine(self.weights(), [lambda t=t: t for t in inputs])


class Pick(nn.Module):
    """A discretised :class:`Connections`: ``y = inputs[index]``."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        return inputs[self.index]


# ----------------------------------------------------------------------------- penalties


def entropy(alpha: Tensor) -> Tensor:
    """Entropy of ``softmax(alpha)`` over the last dim, ``(..., K) -> (...)``."""
    logp = torch.log_softmax(alpha, -1)
    return -(logp.exp() * logp).sum(-1)


def entropy_penalty(alphas: Iterable[Tensor]) -> Tensor:
    """``-mean_c H(softmax(alpha_c))``: adding ``lambda *`` this to the loss keeps each choice
    spread (high entropy) and slows early collapse onto one op."""
    hs = [entropy(a) for a in alphas]
    return -torch.stack(hs).mean()


def diversity_penalty(alphas: Iterable[Tensor]) -> Tensor:
    """``log K - H(mean_c softmax(alpha_c))``, 0 when the cells' choices cover the candidates
    evenly and ``log K`` when every cell picks the same op. All ``alpha_c`` need the same ``K``."""
    p = torch.stack([torch.softmax(a, -1) for a in alphas]).mean(0)  # (K,)
    return math.log(p.shape[-1]) + (p * torch.log(p.clamp_min(1e-30))).sum()


# ----------------------------------------------------------------------------- collapse guard


class CollapseReport(NamedTuple):
    """Which mixed ops chose a parameter-free candidate, and how much weight those carry."""

    choices: dict[str, str]  # mixed op name -> chosen candidate
    parameter_free: list[str]  # mixed ops whose choice is parameter-free
    fraction: float  # len(parameter_free) / len(choices)
    mean_weight: float  # mean softmax weight on parameter-free candidates
    collapsed: bool  # fraction > threshold

    def __str__(self) -> str:
        flag = "COLLAPSED" if self.collapsed else "ok"
        return (
            f"[{flag}] {len(self.parameter_free)}/{len(self.choices)} mixed ops chose a "
            f"parameter-free op ({', '.join(self.parameter_free) or '-'}); mean weight on "
            f"parameter-free ops {self.mean_weight:.3f}"
        )


def collapse_report(
    model: nn.Module,
    parameter_free: Sequence[str] = ("skip", "none"),
    threshold: float = 0.5,
    warn: bool = True,
) -> CollapseReport:
    """Detect DARTS's collapse onto parameter-free ops (skip, none) among ``model``'s MixedOps.

    ``collapsed`` when more than ``threshold`` of the mixed ops choose one; with ``warn`` a
    ``RuntimeWarning`` says so. References: Zela et al. 2020 ("Understanding and Robustifying
    DARTS"), Chu et al. 2020 ("Fair DARTS").
    """
    choices, free, weights = {}, [], []
    for name, m in model.named_modules():
        if isinstance(m, MixedOp):
            choices[name] = m.chosen()
            if choices[name] in parameter_free:
                free.append(name)
            p = torch.softmax(m.alpha.detach(), -1)
            idx = [i for i, n in enumerate(m.names) if n in parameter_free]
            weights.append(float(p[idx].sum()) if idx else 0.0)
    if not choices:
        raise ValueError("collapse_report found no MixedOp in the model")
    frac = len(free) / len(choices)
    rep = CollapseReport(choices, free, frac, sum(weights) / len(weights), frac > threshold)
    if warn and rep.collapsed:
        warnings.warn(str(rep), RuntimeWarning, stacklevel=2)
    return rep


# ----------------------------------------------------------------------------- discretise


def discretise(
    model: nn.Module,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    exclude: Sequence[str] = (),
) -> dict[str, str | None]:
    """Replace every :class:`MixedOp` by its ``argmax(alpha)`` candidate and every
    :class:`Connections` by a :class:`Pick` of ``argmax(beta)``, in place.

    ``exclude`` names candidates never chosen: DARTS derives its cells with ``("none",)``; after
    :func:`collapse_report` flags a collapse, ``("none", "skip")`` is the guard's remedy. The
    eval function is kept only when no argmax is excluded.

    Returns the key mapping ``old param name -> new name`` (``None``: removed: the
    architecture weights and the unchosen candidates). The chosen op's parameters are the same
    tensors, so their ``torch.optim`` state carries over; removed ones leave each optimizer
    (for :class:`selfmod.optim.Optimizer` its names and functional state are renamed too). A
    GDAS network's eval function is unchanged; use :func:`rename_params` and
    :func:`~selfmod.arch.surgery.rename_state` for functional params and state.
    """
    old = dict(model.named_parameters())
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, MixedOp | Connections)]
    for name, m in targets:
        if isinstance(m, MixedOp):
            new: nn.Module = m.ops[m.chosen(exclude)]
        else:
            new = Pick(int(m.beta.argmax()))
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
    by_id = {id(p): k for k, p in model.named_parameters()}
    mapping = {k: by_id.get(id(p)) for k, p in old.items()}
    gone = [p for k, p in old.items() if mapping[k] is None]
    for opt in optimizers:
        if hasattr(opt, "functional_state"):
            before = opt.param_groups[0]["params"]
            ren = {
                n: by_id[id(p)] for n, p in zip(opt.names, before, strict=True) if id(p) in by_id
            }
            drop_torch_params(opt, gone)
            opt.names = [ren[n] for n in opt.names]
            opt.functional_state = rename_state(opt.functional_state, ren)
        else:
            drop_torch_params(opt, gone)
    return mapping


def rename_params(
    params: Mapping[str, Tensor], mapping: Mapping[str, str | None]
) -> dict[str, Tensor]:
    """Functional params after :func:`discretise`: renamed, removed ones dropped."""
    return {mapping.get(k, k): v for k, v in params.items() if mapping.get(k, k) is not None}


def architecture_params(model: nn.Module) -> dict[str, Tensor]:
    """The architecture weights (``alpha`` of MixedOps, ``beta`` of Connections) by name."""
    return {
        k: v
        for k, v in model.named_parameters()
        if k.endswith(".alpha") or k.endswith(".beta") or k in ("alpha", "beta")
    }
