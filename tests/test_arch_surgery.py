"""selfmod.arch gates and pruning surgery: expected L0 against Monte Carlo, function kept on a
probe batch (float64), optimizer state kept and the next step equal on surviving units, for
selfmod.optim and torch.optim optimizers."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from selfmod import arch, optim, tree

# ----------------------------------------------------------------------------- gates


def test_expected_l0_matches_monte_carlo():
    log_alpha = torch.tensor([-4.0, -2.0, -0.5, 0.0, 0.7, 2.0, 5.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    n = 40_000
    z = arch.hard_concrete_sample(log_alpha.expand(n, -1), generator=g)  # (n, 7)
    mc = (z != 0).double().mean(0)
    exact = arch.prob_nonzero(log_alpha)
    assert torch.allclose(mc, exact, atol=0.01), (mc, exact)
    assert abs(arch.expected_l0(log_alpha).item() - (z != 0).double().sum(1).mean().item()) < 0.03


def test_hard_concrete_is_in_unit_interval_and_hits_both_ends():
    z = arch.hard_concrete_sample(torch.zeros(20_000), generator=torch.Generator().manual_seed(1))
    assert z.min() == 0 and z.max() == 1
    assert 0.1 < (z == 0).float().mean() < 0.3 and 0.1 < (z == 1).float().mean() < 0.3


def test_eval_gate_is_deterministic_and_closes_below_threshold():
    gate = arch.HardConcreteGate(4).eval()
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-3.0, -2.3, -2.4, 3.0]))
    # z = clamp(1.2 sigmoid(a) - 0.1, 0, 1) is 0 iff sigmoid(a) <= 1/12, i.e. a <= -log(11)
    assert gate.closed().tolist() == [True, False, True, False]
    assert gate.gate()[3] == 1.0
    x = torch.randn(5, 4, 3)
    assert torch.equal(gate(x), gate(x))


def test_hard_concrete_gradient_reaches_log_alpha():
    la = torch.zeros(3, requires_grad=True)
    z = arch.hard_concrete_sample(la, generator=torch.Generator().manual_seed(0))
    (z * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert la.grad is not None and la.grad.abs().sum() > 0
    arch.expected_l0(la).backward()
    assert (la.grad != 0).all()


def test_straight_through_mask_is_binary_with_sigmoid_gradient():
    s = torch.tensor([-1.0, 0.5, 2.0], requires_grad=True)
    m = arch.straight_through_mask(s)
    assert m.tolist() == [0.0, 1.0, 1.0]
    m.sum().backward()
    sig = torch.sigmoid(s.detach())
    assert torch.allclose(s.grad, sig * (1 - sig))


def test_gate_shape_mismatch_names_the_fix():
    with pytest.raises(ValueError, match="must match the layer's width"):
        arch.apply_gate(torch.randn(2, 5), torch.ones(4))


# ----------------------------------------------------------------------------- models


def _mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return arch.gated_mlp([6, 10, 8, 3]).to(dtype)


def _cnn1d(dtype=torch.float64):
    torch.manual_seed(0)
    return arch.gated_cnn1d(length=12, channels=[2, 6, 5], num_classes=4, kernel_size=3).to(dtype)


def _cnn2d(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.ReLU(),
        arch.HardConcreteGate(6),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 5, 3, padding=1),
        nn.ReLU(),
        arch.HardConcreteGate(5),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 3),
    ).to(dtype)


MODELS = {
    "mlp": (_mlp, (7, 6)),
    "cnn1d": (_cnn1d, (7, 2, 12)),
    "cnn2d": (_cnn2d, (7, 2, 8, 8)),
}


def _close_some_gates(model: nn.Module) -> list[torch.Tensor]:
    """Close about a third of every gate layer (log_alpha = -6) and spread the others."""
    masks = []
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, arch.HardConcreteGate):
                n = m.log_alpha.numel()
                m.log_alpha.copy_(torch.linspace(-1.0, 3.0, n, dtype=m.log_alpha.dtype))
                closed = torch.arange(n) % 3 == 1
                m.log_alpha[closed] = -6.0
                masks.append(closed)
    return masks


def _prune_plans(model: nn.Module, params: dict) -> tuple[list[arch.Surgery], list]:
    """One surgery per gated group, computed on the successively pruned params."""
    groups = arch.sequential_groups(model)
    plans = []
    for g in groups:
        gate_key = next(s.key for s in g.producers if s.key.endswith("log_alpha"))
        keep = arch.hard_concrete_eval(params[gate_key]) > 0
        plans.append(arch.prune_plan(g, keep))
    return plans, groups


@pytest.mark.parametrize("name", list(MODELS))
def test_sequential_groups_find_units(name):
    model = MODELS[name][0]()
    groups = arch.sequential_groups(model)
    assert len(groups) == 2
    params = dict(model.named_parameters())
    for g in groups:
        widths = {params[s.key].shape[s.dim] // s.repeat for s in g.slots()}
        assert len(widths) == 1, g


@pytest.mark.parametrize("name", list(MODELS))
def test_prune_closed_units_keeps_function(name):
    make, shape = MODELS[name]
    model = make().eval()
    _close_some_gates(model)
    params = tree.clone(dict(model.named_parameters()))
    x = torch.randn(*shape, dtype=torch.float64)
    before = functional_call(model, params, (x,))
    plans, _ = _prune_plans(model, params)
    new = params
    for p in plans:
        new = arch.apply_params(p, new)
    after = functional_call(model, new, (x,))
    assert tree.size(new) < tree.size(params)
    assert torch.allclose(before, after, atol=1e-6, rtol=0)
    # the removed rows and columns leave the weights for real
    g0 = arch.sequential_groups(model)[0]
    assert new[g0.producers[0].key].shape[0] == int((~_close_some_gates(make())[0]).sum())


def test_pruning_every_unit_is_refused():
    g = arch.sequential_groups(_mlp())[0]
    with pytest.raises(ValueError, match="keep at least one"):
        arch.prune_plan(g, torch.zeros(10, dtype=torch.bool))


def test_take_units_index_semantics():
    x = torch.arange(12.0).reshape(2, 6)  # 3 units x repeat 2 along dim 1
    s = arch.Slot("w", 1, 2)
    out = arch.take_units(x, s, torch.tensor([2, -1, 0]), scale=torch.tensor([1.0, 1.0, 0.5]))
    assert out.tolist() == [[4, 5, 0, 0, 0, 0.5], [10, 11, 0, 0, 3, 3.5]]
    fill = torch.full((2, 2), 7.0)
    out = arch.take_units(x, s, torch.tensor([-1, 1]), fill=fill)
    assert out.tolist() == [[7, 7, 2, 3], [7, 7, 8, 9]]


# ----------------------------------------------------------------------------- optimizer state

SELFMOD_OPTS = {
    "sgd-momentum": lambda: optim.sgd(0.05, momentum=0.9),
    "adam": lambda: optim.adam(1e-2),
    "adamw": lambda: optim.adamw(1e-2, weight_decay=0.1),
    "rmsprop-centered": lambda: optim.rmsprop(1e-2, momentum=0.5, centered=True),
    "adam-hd": lambda: optim.adam_hd(1e-2, per_tensor=True),
}

TORCH_OPTS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5, centered=True),
    "selfmod-wrapper-adam": lambda p: optim.Optimizer(p, optim.adam(1e-2)),
}


def _loss_fn(model, x, y):
    def loss(params):
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return loss


def _surviving(full: dict, plans: list[arch.Surgery]) -> dict:
    out = full
    for p in plans:
        out = arch.apply_params(p, out)
    return out


@pytest.mark.parametrize("name", ["mlp", "cnn1d"])
@pytest.mark.parametrize("opt_name", list(SELFMOD_OPTS))
def test_prune_keeps_selfmod_optimizer_state_and_next_step(name, opt_name):
    make, shape = MODELS[name]
    model = make().eval()
    _close_some_gates(model)
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, 3, (shape[0],))
    loss = _loss_fn(model, x, y)
    opt = SELFMOD_OPTS[opt_name]()
    params = tree.clone(dict(model.named_parameters()))
    state = opt.init(params)
    for _ in range(3):
        grads = torch.func.grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)

    plans, _ = _prune_plans(model, params)
    small, small_state, cur = params, state, params
    for p in plans:
        small_state = arch.apply_state(p, small_state, cur)
        cur = arch.apply_params(p, cur)
    small = cur

    # surviving units keep their state: the pruned state equals the full state, sliced
    full_leaves = _state_dicts(state)
    small_leaves = _state_dicts(small_state)
    assert len(full_leaves) == len(small_leaves) > 0
    for fd, sd in zip(full_leaves, small_leaves, strict=True):
        sliced = {k: v for k, v in _surviving_state(fd, plans, params).items()}
        for k in sd:
            assert torch.equal(sd[k], sliced[k]), k

    # the next step on surviving units equals the unmodified network's step
    grads = torch.func.grad(loss)(params)
    up_full, _ = opt.update(grads, state, params)
    up_small, _ = opt.update(torch.func.grad(loss)(small), small_state, small)
    expect = _surviving(up_full, plans)
    for k in up_small:
        assert torch.allclose(up_small[k], expect[k], atol=1e-10, rtol=1e-8), k


def _state_dicts(state) -> list[dict]:
    """Every dict in a state pytree whose values are tensors (the per-param dicts)."""
    out = []

    def walk(s):
        if isinstance(s, dict):
            if s and all(isinstance(v, torch.Tensor) and v.dim() > 0 for v in s.values()):
                out.append(s)
        elif isinstance(s, tuple | list):
            for v in s:
                walk(v)

    walk(state)
    return out


def _surviving_state(d: dict, plans, params) -> dict:
    cur_d, cur_p = d, params
    for p in plans:
        cur_d = arch.apply_state(p, cur_d, cur_p)
        cur_p = arch.apply_params(p, cur_p)
    return cur_d


@pytest.mark.parametrize("name", ["mlp", "cnn2d"])
@pytest.mark.parametrize("opt_name", list(TORCH_OPTS))
def test_prune_keeps_torch_optimizer_state_and_next_step(name, opt_name):
    make, shape = MODELS[name]
    model = make().eval()
    _close_some_gates(model)
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, 3, (shape[0],))
    named = name == "mlp" and opt_name.startswith("selfmod")
    opt = TORCH_OPTS[opt_name](list(model.named_parameters()) if named else model.parameters())

    def step(m, o):
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()

    for _ in range(3):
        step(model, opt)
    twin, twin_opt = copy.deepcopy(model), None
    # the twin is the unmodified network with the same optimizer state
    twin_opt = TORCH_OPTS[opt_name](list(twin.named_parameters()) if named else twin.parameters())
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))

    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    plans, _ = _prune_plans(model, before)
    arch.operate(model, plans, [opt])
    after = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert tree.size(after) < tree.size(before)
    assert torch.allclose(model(x), twin(x), atol=1e-6, rtol=0)

    step(model, opt)
    step(twin, twin_opt)
    expect = _surviving({k: v.detach() for k, v in twin.named_parameters()}, plans)
    for k, v in model.named_parameters():
        assert torch.allclose(v, expect[k], atol=1e-10, rtol=1e-8), k
    # the state of torch.optim is keyed by the new parameter objects
    if not opt_name.startswith("selfmod"):
        assert all(p in opt.state for p in model.parameters())
