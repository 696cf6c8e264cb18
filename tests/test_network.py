"""The Introspector's networks: the MLP and the 1-D CNN are the modules they claim to be, keep
their function through growth and pruning (to 1e-6) with the optimizer state re-indexed, and
train, grow and resume as a self-modifying run."""

import cycles
import pytest
import torch
from torch.func import functional_call

from selfmod import tree
from selfmod.arch.dropout import concrete_dropout
from selfmod.introspect import Introspector, Proposal
from selfmod.introspect.network import Network
from selfmod.runs.config import TrainConfig
from selfmod.runs.recorder import RunRecorder

CNN = dict(
    model="cnn",
    steps=60,
    cycle=20,
    lookahead=5,
    width=6,
    max_width=24,
    guard_size=100,
    replay_size=200,
    compare_fixed=False,
    dropout=0.0,
)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _x(n: int = 16, d: int = 40) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_apply_is_the_module_it_describes(kind):
    net = Network(kind, depth=3, num_features=40)
    torch.manual_seed(0)
    params = tree.map(lambda v: v.double(), net.init(7))
    module = net.module([7, 7, 7]).double()
    x = _x()
    xin = x if kind == "mlp" else x.unsqueeze(1)
    assert torch.allclose(net.apply(params, x), functional_call(module, params, (xin,)))
    if kind == "cnn":
        assert net.lengths() == [20, 10, 5]
        assert params["6.weight"].shape == (10, 7 * 5)


def test_cnn_cost_counts_its_convolutions():
    net = Network("cnn", depth=2, num_features=40)
    params = net.init(8)
    # conv1: 20 positions x (2 * 8*1*5 + 8); conv2: 10 x (2 * 8*8*5 + 8); head: 2 * 80 * 10 + 10
    flops = 20 * (2 * 40 + 8) + 10 * (2 * 320 + 8) + (2 * 80 * 10 + 10)
    c = net.cost(params)
    assert c.flops == flops and c.params == sum(v.numel() for v in params.values())


def test_channel_dropout_shares_one_mask_along_the_length():
    h = torch.ones(4, 3, 10)
    u = torch.rand(4, 3, generator=torch.Generator().manual_seed(0))
    out = concrete_dropout(h, torch.tensor(0.3), u)
    assert out.shape == h.shape
    assert torch.equal(out, out[:, :, :1].expand_as(out))
    assert not torch.allclose(out[:, :, 0], out[:, :1, 0].expand(4, 3))  # masks differ per unit


def _cnn_run(**overrides) -> Introspector:
    cfg = TrainConfig(**{**CNN, **overrides})
    run = Introspector(cfg)
    params = tree.map(lambda v: v.double(), run.params)
    run.state = run.state.with_(params=params, opt_state=run.opt.init(params))
    run.problem.module.double()
    return run


@pytest.mark.parametrize("layer", [0, 1])
def test_growing_a_cnn_layer_keeps_its_function_and_optimizer_state(layer):
    run = _cnn_run(lr=0.05)
    x = _x(32)
    # one real momentum step so the state is not all zeros
    g = torch.func.grad(lambda p: run.problem.predict(p, run.state.buffers, x).square().mean())(
        run.params
    )
    _, opt_state = run.opt.update(g, run.state.opt_state, run.params, run.hparams)
    run.state = run.state.with_(opt_state=opt_state)
    before = run.problem.predict(run.params, run.state.buffers, x)
    add = [0, 0]
    add[layer] = 5
    grown = cycles.apply(run, Proposal("grow", surgery={"add": add, "seed": 3}))
    params, state = grown.params, grown.opt_state
    assert run.problem.widths(params)[layer] == 6 + 5
    assert (params[f"{2 * layer}.weight"][6:] != 0).any()  # new fan-in is random, not zero
    assert (before - run.problem.predict(params, run.state.buffers, x)).abs().max() < 1e-6
    old, new = tree.float_leaves(run.state.opt_state), tree.float_leaves(state)
    moved = [(a, b) for a, b in zip(old, new, strict=True) if a.shape != b.shape]
    assert len(moved) == 3  # the grown layer's weight, bias and fan-out momenta
    for a, b in moved:  # old units keep their momenta, new units start at zero
        dim = next(d for d in range(a.dim()) if a.shape[d] != b.shape[d])
        assert torch.equal(b.narrow(dim, 0, a.shape[dim]), a)
        assert not b.narrow(dim, a.shape[dim], b.shape[dim] - a.shape[dim]).any()


def test_pruning_dead_cnn_channels_keeps_the_function():
    run = _cnn_run()
    p = dict(run.params)
    # channels 1 and 4 of the last conv layer never fire; channel 2 of the first has no fan-out
    p["2.weight"] = p["2.weight"].clone()
    p["2.weight"][[1, 4]] = 0.0
    p["2.bias"] = p["2.bias"].clone()
    p["2.bias"][[1, 4]] = -1.0
    p["2.weight"][:, 2] = 0.0
    run.state = run.state.with_(params=p)
    x = _x(32)
    before = run.problem.predict(p, run.state.buffers, x)
    params = cycles.apply(run, Proposal("prune", surgery={"remove": [[2], [1, 4]]})).params
    assert run.problem.widths(params) == [5, 4]
    assert params["4.weight"].shape == (10, 4 * 10)  # the head lost both channels' 10 columns
    assert (before - run.problem.predict(params, run.state.buffers, x)).abs().max() < 1e-6


def test_cnn_saliency_and_active_channels():
    net = Network("cnn", depth=2, num_features=40)
    torch.manual_seed(0)
    p = net.init(6)
    for i in range(2):
        sal = net.saliency(p, i)
        w_out = p[f"{2 * i + 2}.weight"]
        for j in range(6):
            fan_out = w_out[:, j] if i == 0 else w_out.reshape(10, 6, 10)[:, j]
            assert torch.allclose(sal[j], p[f"{2 * i}.weight"][j].norm() * fan_out.norm())
    x = _x(64).float()
    assert net.active_units(p, x)[1] == 6
    p["2.bias"] = p["2.bias"] - 100.0 * torch.tensor([1.0, 0, 0, 1, 0, 0])
    assert net.active_units(p, x)[1] == 4


def test_a_self_modifying_cnn_grows_learns_and_resumes(tmp_path):
    cfg = TrainConfig(
        **{**CNN, "steps": 200, "cycle": 50, "lr": 0.05, "out": str(tmp_path)},
        modifiers=["lr", "weight_decay", "grow", "prune"],
    )
    run = Introspector(cfg, recorder=RunRecorder(tmp_path / "run"))
    run.run()
    assert run.widths()[0] > 6  # grew
    guard_x, guard_y = run.guard()
    acc = (
        (run.problem.predict(run.params, run.state.buffers, guard_x).argmax(1) == guard_y)
        .float()
        .mean()
    )
    assert acc > 0.3  # 10 classes: chance is 0.1
    recorder = RunRecorder(tmp_path / "run")
    back = Introspector(cfg, recorder=recorder)
    recorder.resume(back)
    assert back.step == 150  # the checkpoint before the last cycle
    back.run()
    assert all(torch.equal(back.params[k], run.params[k]) for k in run.params)
