"""Every meta-gradient estimator on common layers: Dropout, BatchNorm, LayerNorm with a residual,
a transformer encoder layer, and selfmod's ConcreteDropout with a learned rate.

One table of models (each an ``nn.Module`` run through :class:`FunctionalModel`, its buffers
closed over by the losses) and one battery of checks: the exact estimators against ``reverse``,
``reverse`` against finite differences, ``implicit`` for what it promises off a fixed point, and
after every call the module, its buffers, the attention backend and (for dropout) the RNG stream
left as they were. Float64, K = 4 steps of SGD with momentum and one learning rate per tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfmod import hypergrad, optim
from selfmod.arch.dropout import ConcreteDropout
from selfmod.models import FunctionalModel, functionalize

K = 4
B = 8  # batch size
CLASSES = 3

# Estimators that must equal `reverse` on the K-step problem, with the options that make them so.
EXACT = {"checkpointed": {"segments": 2}, "truncated": {"window": K}, "forward": {}}


class ResidualLayerNormMLP(nn.Module):
    """``x (B, 4) -> (B, 3)``: a pre-norm residual block between two linear maps."""

    def __init__(self, d_in: int = 4, width: int = 6) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.norm = nn.LayerNorm(width)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)  # (B, W)
        h = h + self.hidden(torch.relu(self.norm(h)))  # (B, W)
        return self.out(h)  # (B, 3)


class TinyTransformer(nn.Module):
    """``x (B, T, 8) -> (B, 3)``: one encoder layer (scaled-dot-product attention), mean over T."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(
            d_model=8, nhead=2, dim_feedforward=16, batch_first=True, dropout=0.0
        )
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(dim=1))  # (B, T, 8) -> (B, 8) -> (B, 3)


class ConcreteDropoutMLP(nn.Module):
    """``x (B, 4) -> (B, 3)`` with a concrete-dropout site ``drop`` over the 6 hidden units."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.drop = ConcreteDropout()
        self.out = nn.Linear(6, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.drop(torch.relu(self.inp(x))))


@dataclass(frozen=True)
class Model:
    """A table entry: the module, the shape of one input ``(B, ...)``, and its dropout kind."""

    build: Callable[[], nn.Module]
    x_shape: tuple[int, ...]
    random: bool = False  # draws masks from the global RNG (nn.Dropout)
    concrete_site: str | None = None  # a ConcreteDropout whose rate is the hparam "drop_logit"


MODELS = {
    "dropout-mlp": Model(
        lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 3)),
        (B, 4),
        random=True,
    ),
    "batchnorm-cnn": Model(
        lambda: nn.Sequential(
            nn.Conv2d(1, 3, 3),  # (B, 1, 5, 5) -> (B, 3, 3, 3)
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.Flatten(),  # (B, 27)
            nn.Linear(27, 3),
        ),
        (B, 1, 5, 5),
    ),
    "layernorm-residual": Model(ResidualLayerNormMLP, (B, 4)),
    "transformer": Model(TinyTransformer, (B, 5, 8)),
    "concrete-dropout": Model(ConcreteDropoutMLP, (B, 4), concrete_site="drop"),
}


@dataclass
class Case:
    """A built problem: the estimators' arguments, plus the module and buffers to watch."""

    module: nn.Module
    buffers: dict[str, Tensor]
    inner: Callable[..., Tensor]
    outer: Callable[..., Tensor]
    optimizer: Any
    params: dict[str, Tensor]
    hparams: dict[str, Tensor]
    batches: list[tuple[Tensor, Tensor, Tensor]]
    outer_batch: tuple[Tensor, Tensor, Tensor]
    random: bool


def _build(spec: Model, seed: int) -> Case:
    """Train mode inside (batch statistics, no buffer written), eval mode for the outer loss."""
    torch.manual_seed(seed)
    module = spec.build().to(torch.float64)
    fm = FunctionalModel(module)
    params, buffers = fm.init()
    keys = list(params)
    site = spec.concrete_site

    def inner(p, h, batch):
        x, y, u = batch  # u (B, 6): the concrete-dropout noise, part of the data
        extra = None if site is None else {f"{site}.rate": torch.sigmoid(h["drop_logit"])}
        if extra is not None:
            extra[f"{site}.noise"] = u
        out, _ = fm(p, buffers, x, train=True, update_buffers=False, extra=extra)
        return F.cross_entropy(out, y)

    def outer(p, h, batch):
        out, _ = fm(p, buffers, batch[0], train=False)
        return F.cross_entropy(out, batch[1])

    gen = torch.Generator().manual_seed(seed)

    def batch(n: int = B):
        return (
            torch.randn(n, *spec.x_shape[1:], generator=gen, dtype=torch.float64),
            torch.randint(0, CLASSES, (n,), generator=gen),
            torch.rand(n, 6, generator=gen, dtype=torch.float64),
        )

    hparams = {"log_lr": torch.full((len(keys),), -1.5, dtype=torch.float64)}
    if site is not None:
        hparams["drop_logit"] = torch.tensor(-1.0, dtype=torch.float64)
    return Case(
        module=module,
        buffers=buffers,
        inner=inner,
        outer=outer,
        optimizer=optim.sgd(
            lr=lambda h: {k: h["log_lr"][i].exp() for i, k in enumerate(keys)}, momentum=0.5
        ),
        params=params,
        hparams=hparams,
        batches=[batch() for _ in range(K)],
        outer_batch=batch(2 * B),
        random=spec.random,
    )


@pytest.fixture(scope="module")
def cases():
    return {name: _build(spec, seed=i) for i, (name, spec) in enumerate(MODELS.items())}


def _sdpa_flags() -> tuple[bool, ...]:
    b = torch.backends.cuda
    return (
        b.flash_sdp_enabled(),
        b.mem_efficient_sdp_enabled(),
        b.math_sdp_enabled(),
        b.cudnn_sdp_enabled(),
    )


def _call(case: Case, method: str, seed: int = 7, **options) -> hypergrad.HypergradResult:
    """Run one estimator from ``torch.manual_seed(seed)`` and check that it left the module (its
    buffers, e.g. BatchNorm's running statistics and ``num_batches_tracked``, and its train/eval
    flags), the buffers the losses close over, and the attention backend flags as they were."""
    state = {k: v.clone() for k, v in case.module.state_dict().items()}
    buffers = {k: v.clone() for k, v in case.buffers.items()}
    modes = [m.training for m in case.module.modules()]
    flags = _sdpa_flags()
    torch.manual_seed(seed)
    res = hypergrad.ESTIMATORS[method](
        case.inner,
        case.outer,
        case.optimizer,
        case.params,
        case.hparams,
        case.batches,
        case.outer_batch,
        **options,
    )
    after = case.module.state_dict()
    assert after.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(after[k], v), f"{method} changed the module's {k}"
    for k, v in buffers.items():
        assert torch.equal(case.buffers[k], v), f"{method} changed buffers[{k!r}]"
    assert [m.training for m in case.module.modules()] == modes
    assert _sdpa_flags() == flags, f"{method} left the attention backend changed"
    return res


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


_reverse_cache: dict[str, tuple[hypergrad.HypergradResult, Tensor]] = {}


def _reverse(cases, model: str) -> hypergrad.HypergradResult:
    """``reverse`` from seed 7, computed once per model, with the RNG state it leaves."""
    if model not in _reverse_cache:
        res = _call(cases[model], "reverse")
        _reverse_cache[model] = res, torch.get_rng_state()
    return _reverse_cache[model][0]


@pytest.mark.parametrize("method", list(EXACT))
@pytest.mark.parametrize("model", list(MODELS))
def test_exact_estimators_equal_reverse(cases, model, method):
    """Same seed, same dropout masks: forward's vmap draws one mask per step for every tangent."""
    case = cases[model]
    ref = _reverse(cases, model)
    res = _call(case, method, **EXACT[method])
    assert torch.equal(torch.get_rng_state(), _reverse_cache[model][1])  # the same draws
    assert float(res.value) == pytest.approx(float(ref.value), rel=1e-12)
    for k in case.hparams:
        assert _rel(res.hparams[k], ref.hparams[k]) < 1e-6, k
    if method == "forward":
        assert res.params is None
    else:
        for k in case.params:
            assert _rel(res.params[k], ref.params[k]) < 1e-6, k
    for k in case.params:
        torch.testing.assert_close(res.final_params[k], ref.final_params[k], rtol=1e-10, atol=1e-12)


def _value(case: Case, params: dict[str, Tensor], seed: int = 7) -> float:
    """The outer loss after K plain training steps from ``params``, masks from ``seed``."""
    torch.manual_seed(seed)
    p, _ = hypergrad.run(
        case.inner,
        case.optimizer,
        params,
        case.optimizer.init(params),
        case.hparams,
        case.batches,
        create_graph=False,
    )
    with torch.no_grad():
        return float(case.outer(p, case.hparams, case.outer_batch))


@pytest.mark.parametrize("model", list(MODELS))
def test_reverse_matches_finite_differences(cases, model):
    """d/d hparams coordinate-wise; d/d params_0 along one random direction (a full coordinate
    sweep over the transformer's ~600 params would cost 1,200 unrolls). finite_difference resets
    the RNG to the seed before each evaluation, so every unroll sees reverse's dropout masks."""
    case = cases[model]
    ref = _reverse(cases, model)
    fd = _call(case, "finite_difference", eps=1e-6, wrt_params=False)
    for k in case.hparams:
        assert _rel(ref.hparams[k], fd.hparams[k]) < 1e-5, k
        assert float(fd.hparams[k].abs().max()) > 1e-6, k  # the check can fail
    gen = torch.Generator().manual_seed(0)
    v = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in case.params.items()}
    eps = 1e-6
    plus = _value(case, {k: p + eps * v[k] for k, p in case.params.items()})
    minus = _value(case, {k: p - eps * v[k] for k, p in case.params.items()})
    directional = (plus - minus) / (2 * eps)
    predicted = float(sum((ref.params[k] * v[k]).sum() for k in case.params))
    assert predicted == pytest.approx(directional, rel=1e-5)
    assert abs(directional) > 1e-4


@pytest.mark.parametrize("model", list(MODELS))
def test_implicit_runs_and_trains_like_reverse(cases, model):
    """After K = 4 steps these nets are nowhere near a fixed point, so the IFT answer is not
    reverse's and is not compared with it. What holds: the same training run (value and final
    params equal reverse's), finite hypergradients, exactly 0 for learning rates (they do not
    move a fixed point), and a non-zero one for the concrete-dropout rate, which enters the loss.
    ``damping`` keeps CG well posed on these non-convex losses. With ``nn.Dropout`` the Hessian
    and mixed term see one more mask, drawn after training (a stochastic IFT estimate)."""
    case = cases[model]
    ref = _reverse(cases, model)
    res = _call(case, "implicit", iters=5, damping=1.0)
    assert float(res.value) == pytest.approx(float(ref.value), rel=1e-12)
    for k in case.params:
        torch.testing.assert_close(res.final_params[k], ref.final_params[k], rtol=1e-10, atol=1e-12)
    assert res.params is None
    assert torch.equal(res.hparams["log_lr"], torch.zeros_like(case.hparams["log_lr"]))
    if "drop_logit" in case.hparams:
        g = res.hparams["drop_logit"]
        assert torch.isfinite(g) and float(g.abs()) > 1e-8


def test_dropout_masks_matter_so_the_comparison_can_fail(cases):
    """Another seed, other masks, another hypergradient: the agreement above is not vacuous."""
    case = cases["dropout-mlp"]
    ref = _reverse(cases, "dropout-mlp")
    other = _call(case, "forward", seed=8)
    assert _rel(other.hparams["log_lr"], ref.hparams["log_lr"]) > 1e-3


def test_the_buffer_check_catches_a_module_run_with_its_own_buffers(cases):
    """The failure of issue 13: ``functionalize`` substitutes only the parameters, so BatchNorm
    in training mode writes its running statistics during ``reverse``; ``_call`` must notice."""
    case = cases["batchnorm-cnn"]
    saved = {k: v.clone() for k, v in case.module.state_dict().items()}
    apply, _ = functionalize(case.module)
    stateful = dataclasses.replace(
        case, inner=lambda p, h, batch: F.cross_entropy(apply(p, batch[0]), batch[1])
    )
    try:
        with pytest.raises(AssertionError, match=r"changed the module's 1\.running_mean"):
            _call(stateful, "reverse")
    finally:
        case.module.load_state_dict(saved)


@pytest.mark.parametrize("method", ["reverse", "forward", "implicit"])
def test_attention_backend_is_restored_when_the_inner_loss_raises(cases, method):
    case = cases["transformer"]
    flags = _sdpa_flags()

    def failing(p, h, batch):  # fails where it is differentiated twice (math backend only)
        if _sdpa_flags() == (False, False, True, False):
            raise RuntimeError("boom")
        return case.inner(p, h, batch)

    with pytest.raises(RuntimeError, match="boom"):
        hypergrad.ESTIMATORS[method](
            failing,
            case.outer,
            case.optimizer,
            case.params,
            case.hparams,
            case.batches,
            case.outer_batch,
        )
    assert _sdpa_flags() == flags
