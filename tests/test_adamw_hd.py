"""AdamW with self-tuning per-tensor rates: the functional ``adamw_hd`` (the reference) against
finite differences and hand computation, and the in-place ``AdamWHD`` against it."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfmod import optim
from selfmod.optim.hypergradient import LOG_LR_RANGE, cosine_hypergradient, online_log_lr


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _data():
    """64 points in 5-D labelled by a random linear teacher (3 classes)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64)
    return x, (x @ torch.randn(5, 3, generator=g, dtype=torch.float64)).argmax(1)


def _steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    x, y = _data()
    for t in range(start, start + steps):
        idx = slice(t % 4 * 16, t % 4 * 16 + 16)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def test_hypergradient_is_the_finite_difference_of_the_next_loss_in_log_lr():
    """dL(theta_1)/dlog alpha = g_1 . u_0 (theta_1 = theta_0 - alpha g_0, u_0 = theta_1 - theta_0);
    the normalized step moves log alpha against its sign by max_step |cos|."""
    a = torch.tensor([[2.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
    loss = lambda th: 0.5 * th @ a @ th  # noqa: E731
    theta0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    g0 = a @ theta0
    for alpha in (0.05, 0.9):  # below and beyond the curvature's stable step: both signs
        at = lambda la: loss(theta0 - math.exp(la) * g0)  # noqa: E731
        h = 1e-6
        fd = (at(math.log(alpha) + h) - at(math.log(alpha) - h)) / (2 * h)
        u0 = -alpha * g0
        g1 = a @ (theta0 + u0)
        assert float(g1 @ u0) == pytest.approx(float(fd), rel=1e-6)
        cos = cosine_hypergradient({"w": g1}, {"w": u0})
        expected = -float(g1 @ u0) / float(g1.norm() * u0.norm())
        assert float(cos) == pytest.approx(expected, rel=1e-12)
        new = online_log_lr(
            torch.tensor([math.log(alpha)], dtype=torch.float64), {"w": g1}, {"w": u0}, 0.1
        )
        assert math.copysign(1, float(new) - math.log(alpha)) == -math.copysign(1, fd)
        assert abs(float(new) - math.log(alpha)) <= 0.1 + 1e-15


def test_functional_adamw_hd_is_adamw_at_the_rates_it_learned():
    """Each step: rates from the hypergradient of the previous update, then AdamW's update at those
    rates (the direction and decay computed independently here)."""
    params = {
        "a": torch.tensor([1.0, -0.5], dtype=torch.float64),
        "b": torch.tensor([[0.2]], dtype=torch.float64),
    }
    opt = optim.adamw_hd(lr=0.1, weight_decay=0.05, max_step=0.3)
    ref = optim.adamw(lr=1.0, weight_decay=0.05)  # unit rate: the direction plus decay
    state, ref_state = opt.init(params), ref.init(params)
    log_lr, previous = torch.full((2,), math.log(0.1), dtype=torch.float64), None
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        grads = {
            k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()
        }
        if previous is not None:
            for i, k in enumerate(params):
                cos = -float(grads[k].flatten() @ previous[k].flatten()) / float(
                    grads[k].norm() * previous[k].norm()
                )
                log_lr[i] += 0.3 * max(-1.0, min(1.0, cos))
        direction, ref_state = ref.update(grads, ref_state, params)
        updates, state = opt.update(grads, state, params)
        for i, k in enumerate(params):
            torch.testing.assert_close(
                updates[k], math.exp(log_lr[i]) * direction[k], rtol=1e-12, atol=0
            )
        torch.testing.assert_close(state.log_lr, log_lr, rtol=1e-13, atol=0)
        params = optim.apply_updates(params, updates)
        previous = updates


def test_in_place_optimizer_equals_the_functional_one():
    a, b = _net(), _net()
    fa = optim.Optimizer(
        a.named_parameters(), optim.adamw_hd(lr=0.05, weight_decay=0.1, max_step=0.1)
    )
    fb = optim.AdamWHD(b.parameters(), lr=0.05, weight_decay=0.1, max_step=0.1)
    _steps(a, fa, 40)
    _steps(b, fb, 40)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        fa.functional_state.log_lr.exp().tolist(), fb.rates()[0], rtol=1e-12, atol=0
    )
    assert len(set(fb.rates()[0])) == 4  # one rate per tensor, each its own
    assert all(r != 0.05 for r in fb.rates()[0])  # every rate moved


def test_rates_move_at_most_max_step_per_step_and_stay_in_range():
    model = _net()
    opt = optim.AdamWHD(model.parameters(), lr=9.0, max_step=0.5)
    before = None
    for t in range(30):
        _steps(model, opt, 1, start=t)
        now = [math.log(r) for r in opt.rates()[0]]
        assert all(LOG_LR_RANGE[0] <= v <= LOG_LR_RANGE[1] + 1e-12 for v in now)
        if before is not None:
            assert max(abs(x - y) for x, y in zip(now, before, strict=True)) <= 0.5 + 1e-12
        before = now


def test_a_non_finite_gradient_changes_nothing_but_halves_the_rates():
    model = _net()
    opt = optim.AdamWHD(model.parameters(), lr=0.02)
    _steps(model, opt, 3)
    params = [p.detach().clone() for p in model.parameters()]
    moments = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    rates = opt.rates()[0]
    for i, p in enumerate(model.parameters()):
        p.grad = torch.full_like(p, math.nan if i == 2 else 1.0)
    opt.step()
    assert opt.skipped == 1
    for p, before, m in zip(model.parameters(), params, moments, strict=True):
        assert torch.equal(p, before) and torch.equal(opt.state[p]["exp_avg"], m)
    assert opt.rates()[0] == pytest.approx([r / 2 for r in rates], rel=1e-12)
    _steps(model, opt, 2, start=3)  # and training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_state_dict_round_trip_continues_bitwise():
    a = _net()
    opt = optim.AdamWHD(a.parameters(), lr=0.03, weight_decay=0.1)
    _steps(a, opt, 10)
    opt.skipped = 2  # as if two steps had been refused
    saved_model = copy.deepcopy(a.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    _steps(a, opt, 10, start=10)
    b = _net(seed=5)
    b.load_state_dict(saved_model)
    opt_b = optim.AdamWHD(b.parameters(), lr=0.03, weight_decay=0.1)
    opt_b.load_state_dict(saved_opt)
    _steps(b, opt_b, 10, start=10)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert opt.rates() == opt_b.rates()
    assert opt_b.skipped == 2


def test_a_scheduler_multiplies_the_learned_rates():
    a, b = _net(), _net()
    plain = optim.AdamWHD(a.parameters(), lr=0.05)
    halved = optim.AdamWHD(b.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(halved, lambda t: 0.5)
    _steps(a, plain, 1)
    _steps(b, halved, 1)
    sched.step()
    for p0, pa, pb in zip(_net().parameters(), a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pb - p0, 0.5 * (pa - p0), rtol=1e-12, atol=1e-15)
    assert halved.rates() == plain.rates()  # the learned rates are the scheduler's base


def test_param_groups_and_parameters_without_gradients():
    model = _net()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = optim.AdamWHD(
        [{"params": first, "lr": 0.1}, {"params": second, "weight_decay": 0.0}], lr=0.01
    )
    frozen = second[1].detach().clone()
    second[1].requires_grad_(False)
    _steps(model, opt, 5)
    assert torch.equal(second[1], frozen)  # never had a gradient: untouched, no state
    assert second[1] not in opt.state
    rates = opt.rates()
    assert rates[1][1] == 0.01 and all(r != 0.1 for r in rates[0])


def test_it_trains_from_a_rate_100x_too_small():
    x, y = _data()
    losses = {}
    for name, make in {
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-4),
        "hd": lambda p: optim.AdamWHD(p, lr=1e-4, max_step=0.05),
    }.items():
        model = _net()
        opt = make(model.parameters())
        _steps(model, opt, 200)
        losses[name] = F.cross_entropy(model(x), y).item()
        if name == "hd":
            assert min(opt.rates()[0]) > 1e-3  # raised every rate > 10x
    assert losses["hd"] < losses["adamw"] / 5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1e-3}, "Invalid learning rate: -0.001; lr must be >= 0"),
        ({"max_step": 0.0}, "max_step must be in (0.0, 1.0]"),
        ({"betas": (0.9, 1.0)}, "Invalid beta parameter at index 1: 1.0; it must be in [0, 1)"),
        ({"weight_decay": -1.0}, "Invalid weight_decay value: -1.0; it must be >= 0"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError) as err:
        optim.AdamWHD(_net().parameters(), **kwargs)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    net = _net()  # the same argument given to one param group
    groups = [{"params": net[0].parameters()}, {"params": net[2].parameters(), **kwargs}]
    with pytest.raises(ValueError) as err:
        optim.AdamWHD(groups)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: optim.AdamWHD(m.parameters(), lr=0.05),
        lambda m: optim.Optimizer(m.named_parameters(), optim.adamw_hd(lr=0.05)),
    ],
    ids=["AdamWHD", "Optimizer"],
)
def test_step_with_a_closure_returns_its_loss_and_steps_as_without(make):
    x, y = _data()
    a, b = _net(), _net()
    oa, ob = make(a), make(b)
    for _ in range(3):
        oa.zero_grad()
        F.cross_entropy(a(x), y).backward()
        oa.step()

        def closure():
            ob.zero_grad()
            loss = F.cross_entropy(b(x), y)
            loss.backward()
            return loss

        expected = F.cross_entropy(b(x), y).item()
        assert ob.step(closure).item() == expected
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_parameters_of_mixed_dtypes_step_like_each_alone():
    """A float32 layer and a float64 layer in one group: each as in its own optimizer."""
    x, y = _data()
    a, b = _net(), _net()
    b[2].float()
    a[2].float()
    mixed = optim.AdamWHD(a.parameters(), lr=0.05)
    alone = [optim.AdamWHD(b[0].parameters(), lr=0.05), optim.AdamWHD(b[2].parameters(), lr=0.05)]
    for _ in range(5):
        for model, opts in ((a, [mixed]), (b, alone)):
            for o in opts:
                o.zero_grad()
            F.cross_entropy(model[2](model[1](model[0](x)).float()), y).backward()
            for o in opts:
                o.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert pa.dtype == pb.dtype and torch.equal(pa, pb)
    assert {p.dtype for p in a.parameters()} == {torch.float32, torch.float64}


def test_functional_form_is_differentiable_and_agrees_with_its_base_step_path():
    """Under autograd (an unroll) the per-tensor path; outside it the foreach one: same values."""
    params = {"a": torch.tensor([1.0, -0.5], dtype=torch.float64), "b": torch.ones(2, 2).double()}
    opt = optim.adamw_hd(lr=0.1, weight_decay=0.05, max_step=0.3)
    g = torch.Generator().manual_seed(3)
    grads = [
        {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
        for _ in range(3)
    ]
    plain, tracked = opt.init(params), opt.init(params)
    leaf = grads[-1]["a"].clone().requires_grad_(True)
    for i, gr in enumerate(grads):
        with torch.no_grad():
            u_plain, plain = opt.update(gr, plain, params)
        tracked_grads = {**gr, "a": leaf} if i == len(grads) - 1 else gr
        u_tracked, tracked = opt.update(tracked_grads, tracked, params)
    for k in params:
        torch.testing.assert_close(u_tracked[k], u_plain[k], rtol=1e-12, atol=1e-15)
    (d_leaf,) = torch.autograd.grad(sum(u.sum() for u in u_tracked.values()), leaf)
    assert torch.isfinite(d_leaf).all() and d_leaf.abs().sum() > 0  # through the rate and Adam
