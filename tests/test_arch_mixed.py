"""selfmod.arch mixed ops, connections, penalties, collapse guard and discretisation: the
GDAS eval function survives discretisation (float64) and optimizer state carries over."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from selfmod import arch, optim, tree


def test_darts_weights_are_softmax_and_gdas_is_straight_through_one_hot():
    a = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    assert torch.allclose(arch.mixture_weights(a, "darts"), torch.softmax(a, -1))
    w = arch.mixture_weights(a, "gdas", tau=0.5, generator=torch.Generator().manual_seed(0))
    assert sorted(w.detach().tolist()) == [0.0, 0.0, 1.0]
    (w * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert (a.grad != 0).all()  # the gradient reaches every architecture weight
    assert arch.mixture_weights(a, "gdas", training=False).tolist() == [0.0, 0.0, 1.0]


def test_gdas_samples_follow_softmax():
    a = torch.tensor([0.0, 1.0, -0.5])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(4000):
        counts += arch.mixture_weights(a, "gdas", generator=g)
    assert torch.allclose(counts / 4000, torch.softmax(a, -1), atol=0.03)


def test_mixed_op_darts_is_the_weighted_sum_and_gdas_runs_one_op():
    torch.manual_seed(0)
    m = arch.MixedOp({o: arch.candidate_op(o, 3) for o in arch.OPS}).double()
    x = torch.randn(2, 3, 9, dtype=torch.float64)
    w = torch.softmax(m.alpha, -1)
    expect = sum(w[i] * op(x) for i, op in enumerate(m.ops.values()))
    assert torch.allclose(m(x), expect)
    m.mode = "gdas"
    calls = []
    for op in m.ops.values():
        op.register_forward_hook(lambda *a: calls.append(1))
    m(x)
    assert len(calls) == 1


@pytest.mark.parametrize("opt_kind", ["torch-adam", "selfmod-wrapper"])
def test_discretise_keeps_gdas_eval_function_and_optimizer_state(opt_kind):
    torch.manual_seed(0)
    model = arch.SearchCNN1d(12, channels=4, cells=3, mode="gdas").double()
    x = torch.randn(5, 12, dtype=torch.float64)
    y = torch.randint(0, 10, (5,))
    opt = (
        torch.optim.Adam(model.parameters(), 1e-2)
        if opt_kind == "torch-adam"
        else optim.Optimizer(list(model.named_parameters()), optim.adam(1e-2))
    )
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    before = model(x).detach()
    params = tree.clone(dict(model.named_parameters()))
    choices = {n: m.chosen() for n, m in model.named_modules() if isinstance(m, arch.MixedOp)}
    mapping = arch.discretise(model, [opt])
    assert not any(isinstance(m, arch.MixedOp | arch.Connections) for m in model.modules())
    assert torch.allclose(model(x), before, atol=1e-6, rtol=0)
    # functional form: renamed params give the same function
    small = arch.rename_params(params, mapping)
    assert set(small) == set(dict(model.named_parameters()))
    assert torch.allclose(functional_call(model, small, (x,)), before, atol=1e-6, rtol=0)
    assert all(v is None for k, v in mapping.items() if k.endswith((".alpha", ".beta")))
    for name, op in choices.items():
        kept = [v for k, v in mapping.items() if k.startswith(f"{name}.ops.{op}.") and v]
        gone = [
            k
            for k in mapping
            if k.startswith(f"{name}.ops.") and not k.startswith(f"{name}.ops.{op}.")
        ]
        assert all(mapping[k] is None for k in gone)
        assert all(v.startswith(f"{name}.") for v in kept)
    # the optimizer holds exactly the surviving params, with their state
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}
    if opt_kind == "torch-adam":
        assert all(
            p in opt.state and opt.state[p]["exp_avg"].abs().sum() > 0
            for p in model.parameters()
            if p.requires_grad and opt.state.get(p, {}).get("step", 0)
        )
    else:
        _, mu, _ = opt.functional_state[0]
        assert set(mu) == set(opt.names) == set(dict(model.named_parameters()))
        for k, p in model.named_parameters():
            assert mu[k].shape == p.shape
    model.train()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()  # keeps training after surgery


def test_connections_choose_inputs():
    c = arch.Connections(3).double()
    xs = [torch.full((2, 2), float(i)) for i in range(3)]
    with torch.no_grad():
        c.beta.copy_(torch.tensor([0.0, 1.0, 0.0]))
    assert torch.allclose(
        c(xs), sum(w * t for w, t in zip(torch.softmax(c.beta, -1), xs, strict=True))
    )
    c.mode = "gdas"
    c.eval()
    assert torch.equal(c(xs), xs[1])
    with pytest.raises(ValueError, match="weights but got"):
        c(xs[:2])


def test_entropy_and_diversity_penalties():
    uniform, peaked = torch.zeros(4), torch.tensor([10.0, 0, 0, 0])
    assert torch.allclose(arch.entropy(uniform), torch.log(torch.tensor(4.0)))
    assert arch.entropy_penalty([uniform]) < arch.entropy_penalty([peaked])
    same = [peaked, peaked.clone()]
    spread = [peaked, peaked.roll(1), peaked.roll(2), peaked.roll(3)]
    assert arch.diversity_penalty(spread) < 1e-3
    assert arch.diversity_penalty(same) > 1.3
    a = torch.zeros(4, requires_grad=True)
    (arch.entropy_penalty([a + peaked]) + arch.diversity_penalty([a + peaked])).backward()
    assert a.grad[0] > 0  # both push weight off the dominant op


def test_collapse_guard_detects_parameter_free_takeover():
    torch.manual_seed(0)
    model = arch.SearchCNN1d(8, channels=2, cells=4)
    skip = arch.OPS.index("skip")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, arch.MixedOp):
                m.alpha.zero_()
                m.alpha[skip] = 3.0
    with pytest.warns(RuntimeWarning, match="COLLAPSED"):
        rep = arch.collapse_report(model)
    assert rep.collapsed and rep.fraction == 1.0 and rep.mean_weight > 0.5
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, arch.MixedOp):
                m.alpha[skip] = 0.0
                m.alpha[0] = 3.0
    rep = arch.collapse_report(model, warn=False)
    assert not rep.collapsed and rep.fraction == 0.0 and "ok" in str(rep)


def test_discretise_can_exclude_parameter_free_ops():
    torch.manual_seed(0)
    model = arch.SearchCNN1d(8, channels=2, cells=2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, arch.MixedOp):
                m.alpha.copy_(torch.tensor([0.1, 0.2, 0.3, 2.0, 3.0, 0.0]))  # none > skip > dil
    assert model.cells[0].chosen() == "none"
    assert model.cells[0].chosen(("none",)) == "skip"
    mapping = arch.discretise(model, exclude=("none", "skip"))
    assert all(isinstance(c, torch.nn.Sequential) for c in model.cells)  # dil_conv3
    assert any(k.startswith("cells.0.ops.dil_conv3.") and v for k, v in mapping.items())
    with pytest.raises(ValueError, match="no candidate"):
        arch.MixedOp({"skip": torch.nn.Identity()}).chosen(("skip",))
