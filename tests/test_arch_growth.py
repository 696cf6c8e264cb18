"""selfmod.arch growth: GradMax, zero-fan-out and Net2Net growth keep the function (float64),
GradMax's directions maximise the new units' gradient, optimizer state is extended with zeros
and the next step on existing units is unchanged."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from selfmod import arch, optim, tree


def _net(act=arch.GrowReLU):
    torch.manual_seed(0)
    return arch.gated_mlp([6, 5, 4, 3], gate=None, activation=act).double()


def _batch(n=16):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def _loss(model, x, y):
    return lambda p: F.cross_entropy(functional_call(model, p, (x,)), y)


def _signals(model, params, x, y):
    return arch.linear_signals(model, params, lambda out: F.cross_entropy(out, y), x)


def _plans(model, params, x, y, kind):
    g0, g1 = arch.sequential_groups(model)
    gen = torch.Generator().manual_seed(0)
    if kind == "gradmax":
        sig = _signals(model, params, x, y)
        return [arch.gradmax_plan(g0, params, sig["2"].out_grad, sig["0"].inputs, k=3)]
    if kind == "dual":
        sig = _signals(model, params, x, y)
        return [arch.gradmax_fan_in_plan(g0, params, sig["2"].out_grad, sig["0"].inputs, k=3)]
    if kind == "zero":
        return [arch.zero_plan(g1, params, k=2, generator=gen)]
    return [arch.split_plan(g0, params, torch.tensor([0, 3]), generator=gen)]


@pytest.mark.parametrize("kind", ["gradmax", "dual", "zero", "split"])
@pytest.mark.parametrize("act", [arch.GrowReLU, torch.nn.ReLU])
def test_growth_keeps_function(kind, act):
    model = _net(act)
    params = tree.clone(dict(model.named_parameters()))
    x, y = _batch()
    (plan,) = _plans(model, params, x, y, kind)
    new = arch.apply_params(plan, params)
    assert tree.size(new) > tree.size(params)
    assert torch.allclose(
        functional_call(model, params, (x,)), functional_call(model, new, (x,)), atol=1e-6, rtol=0
    )


def test_split_conv_keeps_function():
    torch.manual_seed(0)
    model = arch.gated_cnn1d(10, [2, 4, 3], 5, kernel_size=3, gate=None).double()
    params = tree.clone(dict(model.named_parameters()))
    x = torch.randn(4, 2, 10, dtype=torch.float64)
    for g in arch.sequential_groups(model):
        plan = arch.split_plan(g, params, torch.tensor([1]), generator=torch.Generator())
        new = arch.apply_params(plan, params)
        assert new[g.producers[0].key].shape[0] == params[g.producers[0].key].shape[0] + 1
        assert torch.allclose(
            functional_call(model, params, (x,)),
            functional_call(model, new, (x,)),
            atol=1e-6,
            rtol=0,
        )


def test_gradmax_maximises_new_fan_in_gradient():
    model = _net()
    params = tree.clone(dict(model.named_parameters()))
    x, y = _batch()
    sig = _signals(model, params, x, y)
    g0 = arch.sequential_groups(model)[0]
    k, scale = 2, 0.7
    plan = arch.gradmax_plan(g0, params, sig["2"].out_grad, sig["0"].inputs, k=k, scale=scale)
    new = arch.apply_params(plan, params)
    grad = torch.func.grad(_loss(model, x, y))(new)["0.weight"][-k:]  # (k, n_in)
    _, sigma = arch.gradmax_directions(sig["2"].out_grad, sig["0"].inputs)
    expect = scale * sigma[:k].square().sum().sqrt()
    assert torch.allclose(grad.norm(), expect, rtol=1e-8)
    # any other fan-out of the same spectral norm gives a smaller gradient
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        w = torch.randn(4, k, generator=gen, dtype=torch.float64)
        w = w / torch.linalg.matrix_norm(w, ord=2) * scale
        other = arch.apply_params(arch.grow_plan(g0, 5, {"2.weight": w}), params)
        assert torch.func.grad(_loss(model, x, y))(other)["0.weight"][-k:].norm() <= grad.norm()


def test_dual_gradmax_sets_fan_in_along_the_right_singular_vectors():
    model = _net(torch.nn.ReLU)
    params = tree.clone(dict(model.named_parameters()))
    x, y = _batch()
    sig = _signals(model, params, x, y)
    g0 = arch.sequential_groups(model)[0]
    args = (g0, params, sig["2"].out_grad, sig["0"].inputs)
    plan = arch.gradmax_fan_in_plan(*args, k=2, scale=0.7)
    new = arch.apply_params(plan, params)
    vh = torch.linalg.svd(sig["2"].out_grad.T @ sig["0"].inputs, full_matrices=False)[2]
    assert torch.equal(new["0.weight"][-2:], 0.7 * vh[:2])  # fan-in rows: scale * V[:, :k]^T
    assert (new["2.weight"][:, -2:] == 0).all()  # zero fan-out: the function is kept
    same = arch.apply_params(arch.gradmax_plan(*args, k=2, scale=0.7, side="fan_out"), params)
    assert all(torch.equal(new[k], same[k]) for k in new)
    with pytest.raises(ValueError, match="side must be"):
        arch.gradmax_plan(*args, k=2, side="fan-in")
    with pytest.raises(ValueError, match="at most rank"):
        arch.gradmax_fan_in_plan(*args, k=99)


def test_growth_with_nn_relu_gets_no_fan_in_gradient_which_growrelu_fixes():
    """Why GrowReLU exists: with nn.ReLU (f'(0) = 0) zero fan-in units never start learning."""
    x, y = _batch()
    norms = {}
    for act in (torch.nn.ReLU, arch.GrowReLU):
        model = _net(act)
        params = tree.clone(dict(model.named_parameters()))
        (plan,) = _plans(model, params, x, y, "gradmax")
        new = arch.apply_params(plan, params)
        norms[act] = torch.func.grad(_loss(model, x, y))(new)["0.weight"][-3:].norm()
    assert norms[torch.nn.ReLU] == 0 and norms[arch.GrowReLU] > 0


@pytest.mark.parametrize("kind", ["gradmax", "dual", "zero", "split"])
@pytest.mark.parametrize(
    "opt",
    [lambda: optim.adam(1e-2), lambda: optim.sgd(0.1, momentum=0.9)],
    ids=["adam", "sgd-momentum"],
)
def test_growth_extends_selfmod_state_and_keeps_next_step(kind, opt):
    model = _net()
    x, y = _batch()
    loss = _loss(model, x, y)
    tx = opt()
    params = tree.clone(dict(model.named_parameters()))
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update(torch.func.grad(loss)(params), state, params)
        params = optim.apply_updates(params, updates)
    (plan,) = _plans(model, params, x, y, kind)
    new, new_state = arch.apply_params(plan, params), arch.apply_state(plan, state, params)
    old_idx = plan.index >= 0
    for s in plan.group.slots():
        for leaf_old, leaf_new in _pairs(state, new_state, s.key):
            sel = arch.take_units(leaf_old, s, plan.index)
            assert torch.equal(leaf_new, sel)  # old units keep state, new units start at 0
            assert leaf_new.shape == new[s.key].shape
    if kind == "split":
        return  # splitting changes the old unit's fan-out, so its next step differs by design
    up_old, _ = tx.update(torch.func.grad(loss)(params), state, params)
    up_new, _ = tx.update(torch.func.grad(loss)(new), new_state, new)
    for k, u in up_old.items():
        s = next((s for s in plan.group.slots() if s.key == k), None)
        got = (
            up_new[k] if s is None else arch.take_units(up_new[k], s, old_idx.nonzero().squeeze(1))
        )
        assert torch.allclose(got, u, atol=1e-10, rtol=1e-8), k


def _pairs(a, b, key):
    out = []

    def walk(x, y):
        if isinstance(x, dict):
            if key in x and isinstance(x[key], torch.Tensor) and x[key].dim() > 0:
                out.append((x[key], y[key]))
        elif isinstance(x, tuple | list):
            for u, v in zip(x, y, strict=True):
                walk(u, v)

    walk(a, b)
    assert out, "no state tensors found"
    return out


def test_growth_through_operate_with_torch_adam():
    model = _net()
    x, y = _batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    params = {k: v.detach() for k, v in model.named_parameters()}
    (plan,) = _plans(model, params, x, y, "gradmax")
    out = model(x).detach()
    arch.operate(model, [plan], [opt])
    assert model[0].out_features == 8 and model[2].in_features == 8
    assert torch.allclose(model(x), out, atol=1e-6, rtol=0)
    st = opt.state[model[0].weight]
    assert st["exp_avg"].shape == (8, 6) and (st["exp_avg"][5:] == 0).all()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()  # runs with the extended state
    assert model[0].weight[5:].abs().sum() > 0  # the new units started learning


def test_growth_criterion():
    model = _net()
    params = tree.clone(dict(model.named_parameters()))
    x, y = _batch(64)
    sig = _signals(model, params, x, y)
    d = arch.growth_criterion(sig["0"], sig["2"], params["2.weight"], threshold=0.0, max_new=3)
    assert d.k == 3 and d.reference > 0 and (d.sigma[:-1] >= d.sigma[1:]).all()
    d = arch.growth_criterion(sig["0"], sig["2"], params["2.weight"], threshold=1e9)
    assert d.k == 0


def test_growth_criterion_respects_max_width():
    model = _net()  # hidden widths 5, 4
    params = tree.clone(dict(model.named_parameters()))
    x, y = _batch(64)
    sig = _signals(model, params, x, y)
    crit = lambda **kw: arch.growth_criterion(  # noqa: E731
        sig["0"], sig["2"], params["2.weight"], threshold=0.0, max_new=3, **kw
    )
    assert crit().k == 3
    assert crit(max_width=7).k == 2  # 5 + 2 = 7
    assert crit(max_width=5).k == 0 and crit(max_width=4).k == 0  # at or over the cap
    with pytest.raises(ValueError, match="max_width must be >= 1"):
        crit(max_width=0)
