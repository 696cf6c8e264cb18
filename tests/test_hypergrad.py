"""Every meta-gradient estimator against finite differences and against the full reverse unroll.

One table of estimators and one of optimizers; every pair runs through the same checks.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from selfmod import NonFiniteError, hypergrad, optim
from selfmod.models import cross_entropy_loss, functionalize, mlp

K = 6

# Estimators under test, with the options that make them exact on the K-step problem.
EXACT = {
    "reverse": {},
    "checkpointed": {"segments": 3},
    "truncated": {"window": K},
    "forward": {},
}


def _optimizers(keys):
    """Optimizers whose hyperparameters are learnable, in several parameterisations."""
    return {
        "sgd-per-tensor-lr": optim.sgd(
            lr=lambda h: {k: h["log_lr"][i].exp() for i, k in enumerate(keys)},
            momentum=lambda h: torch.sigmoid(h["logit_mu"]),
        ),
        "adam": optim.adam(
            lr=lambda h: 0.05 * h["log_lr"][0].exp(),
            b1=lambda h: torch.sigmoid(h["logit_mu"]),
            eps_root=1e-16,
        ),
        "rmsprop-wd": optim.rmsprop(
            lr=lambda h: 0.02 * h["log_lr"][1].exp(),
            weight_decay=lambda h: 0.1 * torch.sigmoid(h["logit_mu"]),
            eps_root=1e-16,
        ),
    }


@pytest.fixture(scope="module")
def problem():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(1)
    apply, params = functionalize(mlp([4, 5, 3]))
    loss = cross_entropy_loss(apply)

    def inner_loss(p, h, batch):  # an hparam that enters the loss itself: L2 strength
        return loss(p, h, batch) + 0.5 * h["l2"].exp() * sum((w**2).sum() for w in p.values())

    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(K)]
    outer = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
    hparams = {
        "log_lr": torch.full((len(params),), -1.5),
        "logit_mu": torch.tensor(0.3),
        "l2": torch.tensor(-3.0),
    }
    yield {
        "inner": inner_loss,
        "outer": loss,
        "params": params,
        "hparams": hparams,
        "batches": batches,
        "outer_batch": outer,
        "optimizers": _optimizers(list(params)),
    }
    torch.set_default_dtype(old)


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _run(problem, name, method, **options):
    return hypergrad.ESTIMATORS[method](
        problem["inner"],
        problem["outer"],
        problem["optimizers"][name],
        problem["params"],
        problem["hparams"],
        problem["batches"],
        problem["outer_batch"],
        **options,
    )


_cache = {}


def _fd(problem, name):
    if name not in _cache:
        _cache[name] = _run(problem, name, "finite_difference", eps=1e-6)
    return _cache[name]


OPT_NAMES = ["sgd-per-tensor-lr", "adam", "rmsprop-wd"]


@pytest.mark.parametrize("opt_name", OPT_NAMES)
@pytest.mark.parametrize("method", list(EXACT))
def test_estimator_matches_finite_differences(problem, method, opt_name):
    res, fd = _run(problem, opt_name, method, **EXACT[method]), _fd(problem, opt_name)
    assert float(res.value) == pytest.approx(float(fd.value), rel=1e-13)
    for k in problem["hparams"]:
        assert _rel(res.hparams[k], fd.hparams[k]) < 1e-5, k
    if method != "forward":
        for k in problem["params"]:
            assert _rel(res.params[k], fd.params[k]) < 1e-5, k
    # sanity: the check can fail (the meta-gradient is not trivially zero)
    assert all(float(fd.hparams[k].abs().max()) > 1e-6 for k in ("log_lr", "logit_mu", "l2"))


@pytest.mark.parametrize("opt_name", OPT_NAMES)
@pytest.mark.parametrize("method", ["checkpointed", "truncated", "forward"])
def test_exact_estimators_equal_reverse_to_1e_8(problem, method, opt_name):
    ref = _run(problem, opt_name, "reverse")
    res = _run(problem, opt_name, method, **EXACT[method])
    for k in problem["hparams"]:
        torch.testing.assert_close(res.hparams[k], ref.hparams[k], rtol=1e-8, atol=1e-12)
    if res.params is not None:
        for k in problem["params"]:
            torch.testing.assert_close(res.params[k], ref.params[k], rtol=1e-8, atol=1e-12)
    for k in problem["params"]:
        torch.testing.assert_close(res.final_params[k], ref.final_params[k], rtol=1e-12, atol=0)


@pytest.mark.parametrize("segments", [1, 2, 4, K, 50])
def test_checkpointed_is_exact_for_any_segment_count(problem, segments):
    ref = _run(problem, "adam", "reverse")
    res = _run(problem, "adam", "checkpointed", segments=segments)
    for k in problem["hparams"]:
        torch.testing.assert_close(res.hparams[k], ref.hparams[k], rtol=1e-10, atol=1e-14)
    for k in problem["params"]:
        torch.testing.assert_close(res.params[k], ref.params[k], rtol=1e-10, atol=1e-14)


def test_truncated_short_window_is_reverse_from_the_window_start(problem):
    """window=k differentiates only the last k steps: equal to `reverse` started at params_{K-k}
    with the optimizer state it had reached, and without d/d params_0."""
    k = 2
    res = _run(problem, "sgd-per-tensor-lr", "truncated", window=k)
    assert res.params is None
    opt = problem["optimizers"]["sgd-per-tensor-lr"]
    p, s = hypergrad.run(
        problem["inner"],
        opt,
        problem["params"],
        opt.init(problem["params"]),
        problem["hparams"],
        problem["batches"][: K - k],
        create_graph=False,
    )
    tail = hypergrad.reverse(
        problem["inner"],
        problem["outer"],
        opt,
        p,
        problem["hparams"],
        problem["batches"][K - k :],
        problem["outer_batch"],
        state=s,
    )
    full = _run(problem, "sgd-per-tensor-lr", "reverse")
    for name in problem["hparams"]:
        torch.testing.assert_close(res.hparams[name], tail.hparams[name], rtol=1e-12, atol=0)
    assert _rel(res.hparams["log_lr"], full.hparams["log_lr"]) > 1e-3  # truncation is biased


def test_checkpointed_replays_random_inner_losses_exactly(problem):
    """Dropout in the inner loss draws from the global RNG; segments replay it."""

    def noisy_inner(p, h, batch):
        x, y = batch
        hidden = F.dropout(torch.relu(F.linear(x, p["0.weight"], p["0.bias"])), 0.3)
        return F.cross_entropy(F.linear(hidden, p["2.weight"], p["2.bias"]), y)

    args = (
        noisy_inner,
        problem["outer"],
        optim.sgd(lambda h: h["log_lr"][0].exp()),
        problem["params"],
        problem["hparams"],
        problem["batches"],
        problem["outer_batch"],
    )
    torch.manual_seed(3)
    ref = hypergrad.reverse(*args)
    after_ref = torch.rand(1)
    torch.manual_seed(3)
    res = hypergrad.checkpointed(*args, segments=3)
    torch.testing.assert_close(res.hparams["log_lr"], ref.hparams["log_lr"], rtol=1e-12, atol=0)
    assert torch.equal(torch.rand(1), after_ref)  # RNG stream left where reverse leaves it


def _ridge_problem(n_steps):
    """Strongly convex inner problem: ridge regression with log-L2 strength as hyperparameter."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    w_true = torch.randn(6, 1, generator=gen, dtype=torch.float64)
    y = x @ w_true + 0.5 * torch.randn(40, 1, generator=gen, dtype=torch.float64)
    xv = torch.randn(30, 6, generator=gen, dtype=torch.float64)
    yv = xv @ w_true

    def inner(p, h, batch):
        xb, yb = batch
        return (
            0.5 * ((xb @ p["w"] - yb) ** 2).mean() + 0.5 * h["log_l2"].exp() * (p["w"] ** 2).sum()
        )

    def outer(p, h, batch):
        xb, yb = batch
        return 0.5 * ((xb @ p["w"] - yb) ** 2).mean()

    return dict(
        inner_loss=inner,
        outer_loss=outer,
        optimizer=optim.sgd(0.2),
        params={"w": torch.zeros(6, 1, dtype=torch.float64)},
        hparams={"log_l2": torch.tensor(math.log(0.3), dtype=torch.float64)},
        inner_batches=[(x, y)] * n_steps,
        outer_batch=(xv, yv),
    )


@pytest.mark.parametrize(
    ("solver", "options"), [("cg", {"iters": 10}), ("neumann", {"iters": 300})]
)
def test_implicit_converges_to_reverse_as_k_grows(solver, options):
    errors = []
    for n_steps in (5, 20, 80, 320):
        args = _ridge_problem(n_steps)
        ref = hypergrad.reverse(**args)
        imp = hypergrad.implicit(**args, solver=solver, **options)
        assert imp.params is None
        errors.append(_rel(imp.hparams["log_l2"], ref.hparams["log_l2"]))
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-6, errors


def test_implicit_matches_finite_differences_at_convergence():
    args = _ridge_problem(400)
    fd = hypergrad.finite_difference(**args, eps=1e-6, wrt_params=False)
    imp = hypergrad.implicit(**args, solver="cg", iters=10)
    assert _rel(imp.hparams["log_l2"], fd.hparams["log_l2"]) < 1e-5


def test_implicit_gives_zero_for_hyperparameters_that_do_not_move_the_optimum():
    args = _ridge_problem(200)
    args["optimizer"] = optim.sgd(lambda h: h["lr"])
    args["hparams"] = {**args["hparams"], "lr": torch.tensor(0.2, dtype=torch.float64)}
    imp = hypergrad.implicit(**args)
    assert float(imp.hparams["lr"]) == 0.0
    assert abs(float(imp.hparams["log_l2"])) > 1e-4


def _nan_at(step_to_break, where):
    """Inner loss that becomes NaN (or has an inf gradient) from a given step on."""
    counter = {"t": 0}

    def inner(p, h, batch):
        x, y = batch
        value = ((x @ p["w"] - y) ** 2).mean()
        t, counter["t"] = counter["t"], counter["t"] + 1
        if t == step_to_break:
            if where == "loss":
                return value * float("nan")
            return value + torch.sqrt((p["w"] * 0).sum().abs())  # d sqrt at 0 = inf
        return value

    return inner


@pytest.mark.parametrize("method", ["reverse", "checkpointed", "truncated", "forward", "implicit"])
@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_non_finite_inner_values_raise_naming_the_step(method, where):
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    options = {"checkpointed": {"segments": 2}, "truncated": {"window": 3}}.get(method, {})
    with pytest.raises(NonFiniteError) as err:
        hypergrad.ESTIMATORS[method](
            _nan_at(4, where),
            lambda p, h, b: ((b[0] @ p["w"] - b[1]) ** 2).mean(),
            optim.sgd(lambda h: h["lr"]),
            {"w": torch.zeros(3, 1, dtype=torch.float64)},
            {"lr": torch.tensor(0.1, dtype=torch.float64)},
            [(x, y)] * 8,
            (x, y),
            **options,
        )
    assert err.value.step == 4
    assert err.value.what == ("inner loss" if where == "loss" else "gradient")
    assert "at inner step 4" in str(err.value)


def test_non_finite_meta_gradient_raises():
    """Adam without eps_root: a coordinate whose gradient is always 0 has d sqrt(v)/dv = inf."""
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    x[:, 0] = 0.0  # the first weight never gets a gradient
    with pytest.raises(NonFiniteError, match=r"meta-gradient.*eps_root"):
        hypergrad.reverse(
            lambda p, h, b: ((b[0] @ p["w"] - b[1]) ** 2).mean(),
            lambda p, h, b: ((b[0] @ p["w"] - b[1]) ** 2).mean(),
            optim.adam(lambda h: h["lr"]),
            {"w": torch.zeros(3, 1, dtype=torch.float64)},
            {"lr": torch.tensor(0.1, dtype=torch.float64)},
            [(x, y)] * 3,
            (x, y),
        )


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("checkpointed", {"segments": 0}, "segments must be an int >= 1 (got 0)"),
        ("truncated", {"window": -1}, "window must be an int >= 1 (got -1)"),
        ("implicit", {"solver": "lu"}, "solver must be 'cg' or 'neumann'"),
        ("finite_difference", {"eps": 0.0}, "eps must be > 0 (got 0.0)"),
    ],
)
def test_bad_options_are_named(method, options, message):
    args = _ridge_problem(3)
    with pytest.raises(ValueError) as err:
        hypergrad.ESTIMATORS[method](**args, **options)
    assert message in str(err.value)


def test_integer_hparams_are_rejected_with_the_key():
    args = _ridge_problem(3)
    args["hparams"] = {"n": torch.tensor(3)}
    with pytest.raises(TypeError, match=r"hparams\['n'\] must be a floating-point tensor"):
        hypergrad.reverse(**args)


def test_inputs_are_not_modified(problem):
    before = {k: v.clone() for k, v in problem["params"].items()}
    _run(problem, "adam", "reverse")
    for k, v in problem["params"].items():
        assert torch.equal(v, before[k]) and not v.requires_grad


@pytest.mark.parametrize("method", [*EXACT, "implicit", "finite_difference"])
def test_final_state_continues_training_where_the_unroll_stopped(problem, method):
    """Running K steps then K more from (final_params, final_state) equals 2K steps in one go."""
    opt = problem["optimizers"]["adam"]
    options = {
        **EXACT.get(method, {}),
        **({"wrt_params": False} if method == "finite_difference" else {}),
    }
    first = _run(problem, "adam", method, **options)
    assert first.final_state is not None
    second = hypergrad.reverse(
        problem["inner"],
        problem["outer"],
        opt,
        first.final_params,
        problem["hparams"],
        problem["batches"],
        problem["outer_batch"],
        state=first.final_state,
    )
    both = hypergrad.reverse(
        problem["inner"],
        problem["outer"],
        opt,
        problem["params"],
        problem["hparams"],
        problem["batches"] * 2,
        problem["outer_batch"],
    )
    for k in problem["params"]:
        torch.testing.assert_close(
            second.final_params[k], both.final_params[k], rtol=1e-12, atol=1e-14
        )


def test_a_fused_inner_step_is_the_chains_step_to_rounding(monkeypatch):
    """``inner_step(..., fused=True)`` (the loop's base step) steps AdamW by the fused kernel;
    without ``fused`` the chain steps; the two agree to float64 rounding (``eps_root`` = 0)."""
    calls, kernel = [], torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(5, 3, generator=gen, dtype=torch.float64)}
    x = torch.randn(8, 5, generator=gen, dtype=torch.float64)

    def loss(p, h, batch):
        return (batch @ p["w"]).pow(2).mean()

    opt = optim.adamw(lr=lambda h: h["log_lr"].exp(), weight_decay=0.1)
    hparams = {"log_lr": torch.tensor(-3.0, dtype=torch.float64)}
    out = {}
    for fused in (False, True):
        out[fused] = hypergrad.run(
            loss, opt, params, opt.init(params), hparams, [x, x, x], create_graph=False,
            fused=fused,
        )  # fmt: skip
    torch.testing.assert_close(out[True][0]["w"], out[False][0]["w"], rtol=1e-12, atol=1e-14)
    assert not torch.equal(out[True][0]["w"], params["w"])
    assert len(calls) == 3  # the fused run's three steps, none of the chain's
