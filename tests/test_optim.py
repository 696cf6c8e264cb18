"""selfmod.optim against torch.optim in float64, and differentiability of every update."""

import math

import pytest
import torch
import torch.nn.functional as F

from selfmod import optim, tree
from selfmod.data import batches, load_mnist1d
from selfmod.models import functionalize, mlp

# One table: (name, selfmod optimizer, torch optimizer factory). Every entry gets every check.
CASES = [
    ("sgd", lambda: optim.sgd(0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    (
        "sgd-momentum",
        lambda: optim.sgd(0.05, momentum=0.9),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    ),
    (
        "sgd-nesterov-wd",
        lambda: optim.sgd(0.05, momentum=0.8, nesterov=True, weight_decay=1e-2),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-2),
    ),
    ("adam", lambda: optim.adam(1e-2), lambda p: torch.optim.Adam(p, lr=1e-2)),
    (
        "adam-wd",
        lambda: optim.adam(1e-2, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.1),
        lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
    ),
    (
        "adamw",
        lambda: optim.adamw(1e-2, weight_decay=0.1),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    ),
    ("rmsprop", lambda: optim.rmsprop(1e-2), lambda p: torch.optim.RMSprop(p, lr=1e-2)),
    (
        "rmsprop-centered-momentum",
        lambda: optim.rmsprop(1e-2, alpha=0.9, momentum=0.5, centered=True, weight_decay=1e-3),
        lambda p: torch.optim.RMSprop(
            p, lr=1e-2, alpha=0.9, momentum=0.5, centered=True, weight_decay=1e-3
        ),
    ),
]
IDS = [c[0] for c in CASES]


def _problem():
    module = mlp([5, 7, 3]).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    return module, x, y


@pytest.mark.parametrize(("name", "ours", "theirs"), CASES, ids=IDS)
def test_matches_torch_optim_functional(name, ours, theirs):
    module, x, y = _problem()
    apply, params = functionalize(module)
    reference = theirs(module.parameters())
    opt = ours()
    state = opt.init(params)
    for _ in range(25):
        reference.zero_grad()
        F.cross_entropy(module(x), y).backward()
        reference.step()
        p = tree.detach(params, requires_grad=True)
        grads = torch.autograd.grad(F.cross_entropy(apply(p, x), y), list(p.values()))
        updates, state = opt.update(dict(zip(p, grads, strict=True)), state, params)
        params = optim.apply_updates(params, updates)
    for k, v in module.named_parameters():
        torch.testing.assert_close(params[k], v.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("name", "ours", "theirs"), CASES, ids=IDS)
def test_torch_optimizer_wrapper_trains_module_like_torch(name, ours, theirs):
    module, x, y = _problem()
    twin = mlp([5, 7, 3]).double()
    twin.load_state_dict(module.state_dict())
    wrapped, reference = (
        optim.Optimizer(module.named_parameters(), ours()),
        theirs(twin.parameters()),
    )
    for _ in range(10):
        for net, opt in ((module, wrapped), (twin, reference)):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    for a, b in zip(module.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_wrapper_state_dict_round_trip_continues_identically():
    module, x, y = _problem()
    opt = optim.Optimizer(module.named_parameters(), optim.adam(1e-2))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(module(x), y).backward()
        opt.step()
    saved, weights = opt.state_dict(), {k: v.clone() for k, v in module.state_dict().items()}
    opt.zero_grad()
    F.cross_entropy(module(x), y).backward()
    opt.step()
    expected = [p.detach().clone() for p in module.parameters()]
    module.load_state_dict(weights)
    fresh = optim.Optimizer(module.named_parameters(), optim.adam(1e-2))
    fresh.load_state_dict(saved)
    fresh.zero_grad()
    F.cross_entropy(module(x), y).backward()
    fresh.step()
    for a, b in zip(module.parameters(), expected, strict=True):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)


def _hparam_forms():
    """The same learning rate 0.1 given as float, tensor, callable and per-tensor dict."""
    return {
        "float": (optim.sgd(0.1, momentum=0.9), {}),
        "tensor": (optim.sgd(torch.tensor(0.1, dtype=torch.float64), momentum=0.9), {}),
        "callable": (
            optim.sgd(lambda h: h["log_lr"].exp(), momentum=lambda h: h["mu"]),
            {
                "log_lr": torch.tensor(math.log(0.1), dtype=torch.float64),
                "mu": torch.tensor(0.9, dtype=torch.float64),
            },
        ),
        "per-tensor": (
            optim.sgd(
                lambda h: {k: h["lr"] for k in ("0.weight", "0.bias", "2.weight", "2.bias")},
                momentum=0.9,
            ),
            {"lr": torch.tensor(0.1, dtype=torch.float64)},
        ),
    }


def test_hyperparameter_forms_agree():
    _, params = functionalize(mlp([5, 7, 3]).double())
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    results = {}
    for form, (opt, hp) in _hparam_forms().items():
        state = opt.init(params)
        for _ in range(3):
            updates, state = opt.update(grads, state, params, hp)
        results[form] = updates
    for form, updates in results.items():
        for k in params:
            torch.testing.assert_close(
                updates[k],
                results["float"][k],
                rtol=1e-14,
                atol=1e-14,
                msg=f"{form} differs at {k}",
            )


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop", "hd"])
def test_updates_are_differentiable_in_hparams_params_and_state(name):
    """gradcheck of two steps as a function of (hyperparameters, params, initial state)."""
    hp_names = {
        "sgd": ("lr", "momentum"),
        "adam": ("lr", "b1", "b2"),
        "adamw": ("lr", "wd"),
        "rmsprop": ("lr", "alpha"),
        "hd": (),
    }[name]
    make = {
        "sgd": lambda h: optim.sgd(h["lr"], momentum=h["momentum"], weight_decay=0.1),
        "adam": lambda h: optim.adam(h["lr"], b1=h["b1"], b2=h["b2"], eps_root=1e-12),
        "adamw": lambda h: optim.adamw(h["lr"], weight_decay=h["wd"], eps_root=1e-12),
        "rmsprop": lambda h: optim.rmsprop(h["lr"], alpha=h["alpha"], momentum=0.5, eps_root=1e-12),
        "hd": lambda h: optim.sgd_hd(0.1, hyper_lr=0.01),
    }[name]
    values = {"lr": 0.1, "momentum": 0.9, "b1": 0.8, "b2": 0.95, "wd": 0.05, "alpha": 0.9}
    w0 = torch.randn(3, 2, dtype=torch.float64)
    g_first = torch.randn(3, 2, dtype=torch.float64)

    def two_steps(w, *hvals):
        h = dict(zip(hp_names, hvals, strict=True))
        opt = make(h)
        state = opt.init({"w": w})
        p = {"w": w}
        for g in (g_first, torch.sin(w) + w**2):  # second gradient depends on params
            updates, state = opt.update({"w": g}, state, p)
            p = optim.apply_updates(p, updates)
        return p["w"]

    inputs = (
        w0.requires_grad_(),
        *(torch.tensor(values[n], dtype=torch.float64, requires_grad=True) for n in hp_names),
    )
    assert torch.autograd.gradcheck(two_steps, inputs)


def test_clip_by_global_norm_matches_torch():
    grads = {
        "a": torch.randn(4, 3, dtype=torch.float64) * 5,
        "b": torch.randn(3, dtype=torch.float64),
    }
    clipped, _ = optim.clip_by_global_norm(1.0).update(grads, optim.EmptyState())
    params = [torch.zeros_like(g, requires_grad=True) for g in grads.values()]
    for p, g in zip(params, grads.values(), strict=True):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    for (k, c), p in zip(clipped.items(), params, strict=True):
        torch.testing.assert_close(c, p.grad, msg=k)
    assert float(tree.norm(clipped)) == pytest.approx(1.0, rel=1e-5)


def test_chain_composes_in_order():
    g = {"w": torch.tensor([3.0, -4.0])}
    opt = optim.chain(optim.clip(1.0), optim.scale(2.0), optim.scale_by_learning_rate(0.5))
    updates, _ = opt.update(g, opt.init(g))
    torch.testing.assert_close(updates["w"], torch.tensor([-1.0, 1.0]))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: optim.sgd(-0.1), "lr must be in [0.0, inf) (got -0.1); pass a callable"),
        (lambda: optim.sgd(0.1, momentum=1.5), "momentum must be in [0.0, 1.0] (got 1.5)"),
        (lambda: optim.adam(b2=1.0), "b2 must be in [0.0, 1.0) (got 1.0)"),
        (lambda: optim.sgd(0.1, nesterov=True), "nesterov=True needs momentum > 0"),
        (lambda: optim.clip_by_global_norm(0.0), "max_norm must be in (0.0, inf)"),
        (lambda: optim.sgd("fast"), "lr must be a float, a tensor, a per-tensor dict or"),
    ],
)
def test_bad_hyperparameters_are_named(call, message):
    with pytest.raises((ValueError, TypeError)) as err:
        call()
    assert message in str(err.value)


def test_per_tensor_hparam_missing_key_is_named():
    opt = optim.sgd(lambda h: {"w": h["lr"]})
    params = {"w": torch.ones(2), "b": torch.ones(1)}
    with pytest.raises(KeyError, match="no entry for parameter 'b'"):
        opt.update(params, opt.init(params), params, {"lr": torch.tensor(0.1)})


def test_callable_hparam_without_hparams_is_explained():
    opt = optim.sgd(lambda h: h["lr"])
    params = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="pass the hparams dict"):
        opt.update(params, opt.init(params), params)


def test_sgd_hd_learning_rate_follows_its_hypergradient():
    """alpha_t = alpha_{t-1} + beta g_t . g_{t-1} (Baydin et al. 2018, eq. for SGD-HD)."""
    opt = optim.sgd_hd(lr=0.1, hyper_lr=0.01)
    p = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}
    state = opt.init(p)
    g1, g2 = (
        torch.tensor([0.5, -1.0], dtype=torch.float64),
        torch.tensor([0.2, -0.4], dtype=torch.float64),
    )
    u1, state = opt.update({"w": g1}, state, p)
    torch.testing.assert_close(u1["w"], -0.1 * g1)  # no previous direction: lr unchanged
    u2, state = opt.update({"w": g2}, state, p)
    lr2 = 0.1 + 0.01 * float(g1 @ g2)
    assert float(state.lr) == pytest.approx(lr2, rel=1e-14)
    torch.testing.assert_close(u2["w"], -lr2 * g2)


def _train(opt, steps: int, seed: int = 0):
    data = load_mnist1d()
    torch.manual_seed(seed)
    apply, params = functionalize(mlp([40, 100, 10]))
    state = opt.init(params)
    stream = batches(data.x_train, data.y_train, 100, torch.Generator().manual_seed(seed))
    for _ in range(steps):
        x, y = next(stream)
        p = tree.detach(params, requires_grad=True)
        grads = torch.autograd.grad(F.cross_entropy(apply(p, x), y), list(p.values()))
        with torch.no_grad():
            updates, state = opt.update(dict(zip(p, grads, strict=True)), state, params)
            params = optim.apply_updates(params, updates)
    with torch.no_grad():
        return F.cross_entropy(apply(params, data.x_train), data.y_train).item(), state


@pytest.mark.parametrize("seed", [0, 1])
def test_sgd_hd_fixes_a_learning_rate_100x_too_small_on_mnist1d(seed):
    good = 0.1
    plain_loss, _ = _train(optim.sgd(good / 100), 600, seed)
    hd_loss, state = _train(optim.sgd_hd(good / 100, hyper_lr=1e-2), 600, seed)
    assert float(state.lr) > 10 * good / 100  # it raised its own learning rate >10x
    assert hd_loss < plain_loss - 0.3


def test_adam_hd_adapts_and_trains():
    plain_loss, _ = _train(optim.adam(1e-5), 300)
    hd_loss, state = _train(optim.adam_hd(1e-5, hyper_lr=1e-5), 300)
    assert float(state.lr) > 1e-5
    assert hd_loss < plain_loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hyper", ["float", "tensor32", "tensor64", "callable"])
@pytest.mark.parametrize("eps_root", [0.0, 1e-10])
def test_adam_outside_autograd_is_bitwise_the_per_tensor_loop(dtype, hyper, eps_root, monkeypatch):
    """Under no_grad, Adam's direction runs as one foreach call per operation; it must give
    exactly the values of the per-tensor loop that autograd mode runs (the base step's fast
    path may not change a run)."""
    from selfmod.optim import transforms

    calls = []
    fast_path = transforms._adam_direction_foreach
    monkeypatch.setattr(
        transforms, "_adam_direction_foreach", lambda *a: calls.append(1) or fast_path(*a)
    )
    gen = torch.Generator().manual_seed(0)
    shapes = {"w1": (7, 5), "b1": (7,), "w2": (3, 7), "v": (1,)}
    params = {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in shapes.items()}
    values = dict(b1=0.85, b2=0.995, eps=1e-6)
    if hyper == "callable":  # hyperparameters read from hparams, as the loop does
        hparams = {k: torch.tensor(v) for k, v in values.items()}
        kw = {k: (lambda h, k=k: h[k]) for k in values}
    else:
        hparams = None
        make = {"float": float, "tensor32": torch.tensor,
                "tensor64": lambda v: torch.tensor(v, dtype=torch.float64)}[hyper]  # fmt: skip
        kw = {k: make(v) for k, v in values.items()}
    opt = optim.scale_by_adam(**kw, eps_root=eps_root)
    fast = slow = opt.init(params)
    for _ in range(3):
        grads = {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in shapes.items()}
        grads["w1"][0] = 0.0  # exact zeros: v = 0 under the root
        with torch.no_grad():
            out_fast, fast = opt.update(grads, fast, params, hparams)
        with torch.enable_grad():  # nothing requires grad: the per-tensor loop, same values
            out_slow, slow = opt.update(grads, slow, params, hparams)
        assert fast.count == slow.count
        for k in shapes:
            for a, b in ((out_fast[k], out_slow[k]), (fast.mu[k], slow.mu[k]),
                         (fast.nu[k], slow.nu[k])):  # fmt: skip
                assert a.dtype == b.dtype == dtype and torch.equal(a, b), k
    assert len(calls) == 3  # the no_grad updates took the foreach path, the others not


def test_adam_with_per_tensor_betas_or_a_scalar_param_keeps_the_loop_under_no_grad():
    params = {"a": torch.randn(3), "b": torch.randn(2)}
    b1 = {"a": torch.tensor(0.8), "b": torch.tensor(0.95)}
    opt = optim.scale_by_adam(b1=b1)
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    with torch.no_grad():
        _, state = opt.update(grads, opt.init(params), params)
    torch.testing.assert_close(state.mu["a"], 0.2 * torch.ones(3))  # each tensor its own b1
    torch.testing.assert_close(state.mu["b"], 0.05 * torch.ones(2))
    # a 0-dim float32 param with a float64 beta: the loop's type promotion, kept under no_grad
    opt = optim.scale_by_adam(b1=torch.tensor(0.9, dtype=torch.float64))
    params = {"w": torch.randn(2), "t": torch.tensor(1.0)}
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    for grad_mode in (torch.no_grad(), torch.enable_grad()):
        with grad_mode:
            _, state = opt.update(grads, opt.init(params), params)
        assert state.mu["t"].dtype == torch.float64 and state.mu["w"].dtype == torch.float32


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_fused_step_is_the_chain_to_rounding_and_leaves_its_inputs_alone(name):
    """``optim.step`` outside autograd runs torch's fused kernel on copies: per-tensor rates
    (two groups), weight decay, float64; five steps agree with ``update`` + ``apply_updates``
    to rounding and with ``torch.optim``; the params and state passed in are not written."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"w": (6, 4), "b": (6,), "s": ()}
    params = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    rates = {"w": 1e-2, "b": 3e-2, "s": 1e-2}
    hparams = {"log_lr": torch.tensor([math.log(rates[k]) for k in shapes], dtype=torch.float64)}
    lr = lambda h: {k: h["log_lr"][i].exp() for i, k in enumerate(shapes)}  # noqa: E731
    opt = getattr(optim, name)(lr=lr, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.1)
    assert opt.step is not None
    fused, chained = (params, opt.init(params)), (params, opt.init(params))
    torch_params = [torch.nn.Parameter(params[k].clone()) for k in shapes]
    groups = [{"params": [p], "lr": rates[k]} for k, p in zip(shapes, torch_params, strict=True)]
    theirs = getattr(torch.optim, {"adam": "Adam", "adamw": "AdamW"}[name])(
        groups, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1
    )
    for _ in range(5):
        grads = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
        kept = {k: v.clone() for k, v in fused[0].items()}
        at = 1 if name == "adam" else 0  # the AdamState's place in the chain's state
        kept_mu = {k: v.clone() for k, v in fused[1][at].mu.items()}
        with torch.no_grad():
            before = fused
            fused = optim.step(opt, grads, before[1], before[0], hparams)
            updates, state = opt.update(grads, chained[1], chained[0], hparams)
            chained = (optim.apply_updates(chained[0], updates), state)
        for k in shapes:
            assert torch.equal(before[0][k], kept[k]), "the params passed in were written"
        assert all(torch.equal(before[1][at].mu[k], kept_mu[k]) for k in shapes)
        for p, g in zip(torch_params, grads.values(), strict=True):
            p.grad = g.clone()
        theirs.step()
        for k, p in zip(shapes, torch_params, strict=True):
            torch.testing.assert_close(fused[0][k], chained[0][k], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(fused[0][k], p.detach(), rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(fused[1][at].nu[k], chained[1][at].nu[k])
        assert fused[1][at].count == chained[1][at].count


def test_fused_step_reads_its_rates_again_exactly_when_they_can_have_changed():
    """A fused step keeps the floats it read while ``hparams`` holds the same tensors and
    every hyperparameter is a number or a callable marked ``of_hparams_only``; a tensor
    written in place, a new tensor, or an unmarked callable reading state of its own is read
    again: each step equals the step of a fresh optimizer, bit for bit."""
    gen = torch.Generator().manual_seed(2)
    params = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(4, generator=gen)}
    outside = [1.0]  # state of the caller's that the unmarked callable reads
    marked = optim.of_hparams_only(lambda h: h["log_lr"].exp())
    forms = {
        "marked": optim.adamw(lr=marked, weight_decay=0.1),
        "unmarked": optim.adamw(lr=lambda h: h["log_lr"].exp() * outside[0], weight_decay=0.1),
    }
    h = {"log_lr": torch.tensor(math.log(1e-2))}
    runs = {k: (params, opt.init(params)) for k, opt in forms.items()}
    with torch.no_grad():
        for t in range(6):
            if t == 2:
                h["log_lr"].add_(math.log(3.0))  # written in place
            if t == 4:
                h = {"log_lr": torch.tensor(math.log(2e-3))}  # a new tensor
            if t == 5:
                outside[0] = 0.5
            grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
            for k, opt in forms.items():
                p, s = runs[k]
                fresh = {"marked": optim.adamw(lr=marked, weight_decay=0.1), "unmarked": (
                    optim.adamw(lr=lambda h: h["log_lr"].exp() * outside[0], weight_decay=0.1)
                )}[k]  # fmt: skip
                want, _ = optim.step(fresh, grads, s, p, h)
                runs[k] = optim.step(opt, grads, s, p, h)
                for name in params:
                    assert torch.equal(runs[k][0][name], want[name]), (k, t, name)


def test_fused_step_steps_aside_inside_autograd():
    """Inside autograd ``optim.step`` is ``update`` + ``apply_updates``: differentiable in
    the learning rate."""
    params = {"w": torch.randn(3, 2, requires_grad=True)}
    log_lr = torch.tensor(-3.0, requires_grad=True)
    opt = optim.adamw(lr=lambda h: h["log_lr"].exp())
    grads = {"w": torch.randn(3, 2)}
    new, _ = optim.step(opt, grads, opt.init(params), params, {"log_lr": log_lr})
    (d_lr,) = torch.autograd.grad(new["w"].sum(), log_lr)
    assert torch.isfinite(d_lr) and float(d_lr) != 0.0


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_donated_step_is_the_same_step_written_in_place(name):
    """``donate=True``: a fused step writes the params and moments it is given and returns
    them, with the values of the out-of-place step bit for bit; an optimizer without a fused
    step (SGD) steps out of place as always."""
    gen = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(5, 3, generator=gen), "b": torch.randn(5, generator=gen)}
    opt = getattr(optim, name)(lr=1e-2, weight_decay=0.1)
    kept, donated = (params, opt.init(params)), tree.clone(params)
    donated = (donated, opt.init(donated))
    with torch.no_grad():
        for _ in range(3):
            grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
            before = dict(donated[0])
            kept = optim.step(opt, grads, kept[1], kept[0])
            donated = optim.step(opt, grads, donated[1], donated[0], donate=True)
            for k in params:
                assert torch.equal(donated[0][k], kept[0][k])
                assert (donated[0][k] is before[k]) == (name != "sgd")
