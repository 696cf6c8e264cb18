"""selfmod.optim.Optimizer in ordinary PyTorch code: lr schedulers, state_dict, GradScaler and
zero_grad, against torch.optim in float64; and what it refuses, with the fix named."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch.optim import lr_scheduler

from selfmod import optim
from selfmod.models import mlp

# One table: (factory, its hyperparameters, the torch.optim twin). Every entry meets every
# scheduler below.
OPTS = {
    "sgd-momentum-wd": (
        optim.sgd,
        {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2},
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    ),
    "sgd-nesterov": (
        optim.sgd,
        {"lr": 0.05, "momentum": 0.8, "nesterov": True},
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True),
    ),
    "adam": (
        optim.adam,
        {"lr": 1e-2, "betas": (0.8, 0.99), "weight_decay": 1e-3},
        lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-3),
    ),
    "adamw": (
        optim.adamw,
        {"lr": 1e-2, "weight_decay": 0.1},
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    ),
    "rmsprop-momentum": (
        optim.rmsprop,
        {"lr": 1e-2, "momentum": 0.5},
        lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5),
    ),
}

# (scheduler factory, whether it multiplies the lr: then it also works on a built transform)
SCHEDULERS = {
    "step": (lambda o: lr_scheduler.StepLR(o, step_size=3, gamma=0.5), True),
    "lambda": (lambda o: lr_scheduler.LambdaLR(o, lambda e: min(1.0, (e + 1) / 4)), True),
    "exponential": (lambda o: lr_scheduler.ExponentialLR(o, gamma=0.8), True),
    "cosine": (lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=8, eta_min=1e-3), False),
    "onecycle": (lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=12), False),
    "plateau": (lambda o: lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0), True),
}
STEPS = 10


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    module = mlp([5, 7, 3]).double()
    x = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    return module, x, y


def _twin(module):
    twin = mlp([5, 7, 3]).double()
    twin.load_state_dict(module.state_dict())
    return twin


def _train(module, opt, sched, x, y, steps=STEPS, scaler=None):
    """The usual loop; returns the lr the group had at each step."""
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(module(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if isinstance(sched, lr_scheduler.ReduceLROnPlateau):
            sched.step(1.0)  # a flat metric: the lr is cut every step after the first
        elif sched is not None:
            sched.step()
    return lrs


def _assert_same(a, b, tol=1e-12):
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=tol, atol=tol)


@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
@pytest.mark.parametrize("opt_name", list(OPTS))
def test_scheduler_moves_the_step_as_for_torch(opt_name, sched_name):
    factory, hyper, theirs = OPTS[opt_name]
    make_sched, _ = SCHEDULERS[sched_name]
    module, x, y = _problem()
    twin = _twin(module)
    ours = optim.Optimizer(module.named_parameters(), factory, **hyper)
    reference = theirs(twin.parameters())
    lrs = _train(module, ours, make_sched(ours), x, y)
    ref_lrs = _train(twin, reference, make_sched(reference), x, y)
    assert lrs == pytest.approx(ref_lrs, rel=1e-15)
    assert len(set(lrs)) > 1  # the scheduler did move the lr
    if sched_name == "onecycle":  # momentum / beta1 cycled too, and read from the same key
        key = "betas" if "betas" in reference.defaults else "momentum"
        assert ours.param_groups[0][key] == reference.param_groups[0][key]
    _assert_same(module, twin)


@pytest.mark.parametrize("sched_name", [k for k, (_, mul) in SCHEDULERS.items() if mul])
def test_built_transform_lr_is_a_multiplier_for_multiplicative_schedulers(sched_name):
    make_sched, _ = SCHEDULERS[sched_name]
    module, x, y = _problem()
    twin = _twin(module)
    ours = optim.Optimizer(module.named_parameters(), optim.adam(1e-2, b1=0.8))
    reference = torch.optim.Adam(twin.parameters(), lr=1e-2, betas=(0.8, 0.999))
    assert ours.param_groups[0]["lr"] == 1.0
    lrs = _train(module, ours, make_sched(ours), x, y)
    ref_lrs = _train(twin, reference, make_sched(reference), x, y)
    assert [lr * 1e-2 for lr in lrs] == pytest.approx(ref_lrs, rel=1e-15)
    _assert_same(module, twin)


def test_factory_form_is_bitwise_the_built_transform():
    module, x, y = _problem()
    twin = _twin(module)
    a = optim.Optimizer(module.named_parameters(), optim.adam, lr=1e-2, weight_decay=0.1)
    b = optim.Optimizer(twin.named_parameters(), optim.adam(1e-2, weight_decay=0.1))
    _train(module, a, None, x, y)
    _train(twin, b, None, x, y)
    _assert_same(module, twin, tol=0)


@pytest.mark.parametrize("form", ["factory", "built"])
def test_state_dict_resumes_bitwise_by_name_with_scheduler(form):
    def build(module, order):
        named = list(module.named_parameters())[::order]
        opt = (
            optim.Optimizer(named, optim.adam, lr=1e-2, betas=(0.8, 0.99))
            if form == "factory"
            else optim.Optimizer(named, optim.adam(1e-2, b1=0.8, b2=0.99))
        )
        return opt, lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    module, x, y = _problem()
    opt, sched = build(module, 1)
    _train(module, opt, sched, x, y, steps=5)
    buffer = io.BytesIO()
    torch.save(
        {"opt": opt.state_dict(), "sched": sched.state_dict(), "model": module.state_dict()},
        buffer,
    )
    lrs = _train(module, opt, sched, x, y, steps=4)
    expected = [p.detach().clone() for p in module.parameters()]

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, _, _ = _problem(seed=1)
    resumed.load_state_dict(saved["model"])
    opt2, sched2 = build(resumed, -1)  # parameters in the reverse order: state goes by name
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert _train(resumed, opt2, sched2, x, y, steps=4) == lrs
    for a, b in zip(resumed.parameters(), expected, strict=True):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)


def test_state_dict_is_torchs_layout_and_refuses_a_mismatch():
    module, x, y = _problem()
    opt = optim.Optimizer(module.named_parameters(), optim.sgd, lr=0.1, momentum=0.9)
    _train(module, opt, None, x, y, steps=1)
    sd = opt.state_dict()
    names = [n for n, _ in module.named_parameters()]
    assert sd["param_groups"][0]["params"] == [0, 1, 2, 3]
    assert sd["param_groups"][0]["param_names"] == names
    assert sd["param_groups"][0]["lr"] == 0.1
    for i, p in enumerate(module.parameters()):  # the momentum buffer, per parameter, as torch's
        assert set(sd["state"][i]) == {"momentum_buffer"}
        assert sd["state"][i]["momentum_buffer"].shape == p.shape
    torch_sgd = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    torch_sgd.load_state_dict(sd)  # and torch's SGD takes it
    assert torch.equal(
        torch_sgd.state[module[0].weight]["momentum_buffer"], sd["state"][0]["momentum_buffer"]
    )

    adam = optim.Optimizer(module.named_parameters(), optim.adam, lr=0.1)
    with pytest.raises(ValueError, match="another transformation"):
        adam.load_state_dict(sd)
    other = optim.Optimizer(list(module.named_parameters())[:2], optim.sgd, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict(sd)
    with pytest.raises(ValueError, match=r"not an optimizer state_dict"):
        opt.load_state_dict({"names": names, "leaves": []})


@pytest.mark.parametrize("enabled", [True, False])
def test_grad_scaler_on_cpu_steps_as_without_it(enabled):
    module, x, y = _problem()
    twin = _twin(module)
    ours = optim.Optimizer(module.named_parameters(), optim.adam, lr=1e-2)
    plain = optim.Optimizer(twin.named_parameters(), optim.adam, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=enabled)
    _train(module, ours, None, x, y, scaler=scaler)
    _train(twin, plain, None, x, y)
    _assert_same(module, twin, tol=0)  # scaling by a power of two is exact


def test_grad_scaler_skips_a_step_with_inf_gradients():
    module, x, y = _problem()
    opt = optim.Optimizer(module.named_parameters(), optim.adam, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in module.parameters()]
    scaler.scale(F.cross_entropy(module(x), y)).backward()
    next(module.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    for a, b in zip(module.parameters(), before, strict=True):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)
    assert opt.functional_state[1].count == 0  # the pure update never ran
    assert scaler.get_scale() == 2.0**9


def test_zero_grad_set_to_none_and_to_zero():
    module, x, y = _problem()
    twin = _twin(module)
    ours = optim.Optimizer(module.named_parameters(), optim.sgd, lr=0.1, momentum=0.9)
    reference = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    _train(module, ours, None, x, y)  # zero_grad(set_to_none=True) every step
    _train(twin, reference, None, x, y)
    _assert_same(module, twin)
    ours.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in module.parameters())
    F.cross_entropy(module(x), y).backward()
    ours.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in module.parameters())


def test_refusals_name_the_alternative():
    module, _, _ = _problem()
    named = list(module.named_parameters())
    with pytest.raises(TypeError, match="should be an iterable of Tensors or dicts"):  # torch's
        optim.Optimizer(named[0][1], optim.sgd, lr=0.1)
    with pytest.raises(ValueError, match="lr must be in"):  # a group's own value, checked
        optim.Optimizer([{"params": [named[0][1]], "lr": -1.0}], optim.sgd, lr=0.1)
    with pytest.raises(TypeError, match=r"no `lr: HParam`.*built transformation"):
        optim.Optimizer(named, optim.sgd_hd, lr=0.1)
    with pytest.raises(TypeError, match="go with a factory"):
        optim.Optimizer(named, optim.sgd(0.1), lr=0.1)
    with pytest.raises(TypeError, match="must be a float or a 1-element tensor to live in the"):
        optim.Optimizer(named, optim.sgd, lr={"0.weight": 0.1})
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        optim.Optimizer(named, optim.sgd, lr=torch.tensor([0.1, 0.1]))
    with pytest.raises(TypeError, match="no argument"):
        optim.Optimizer(named, optim.sgd, lr=0.1, dampening=0.1)
    with pytest.raises(TypeError, match="betas= has nowhere to go"):
        optim.Optimizer(named, optim.sgd, lr=0.1, betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="lr must be in"):
        optim.Optimizer(named, optim.sgd, lr=-0.1)
    with pytest.raises(ValueError, match="nesterov=True needs momentum"):
        optim.Optimizer(named, optim.sgd, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="clash"):
        optim.Optimizer(named, optim.sgd, {"lr": torch.tensor(0.0)}, lr=0.1)


def test_onecycle_on_a_built_transform_is_refused_at_the_first_step():
    module, x, y = _problem()
    opt = optim.Optimizer(module.named_parameters(), optim.adam(1e-2))
    with pytest.raises(ValueError, match="momentum or beta1"):  # torch's own check
        lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=12)
    lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=12, cycle_momentum=False)
    with pytest.raises(TypeError, match=r"absolute learning rates.*build it from a factory"):
        _train(module, opt, None, x, y, steps=1)
