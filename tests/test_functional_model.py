"""``FunctionalModel``: an ``nn.Module`` as a pure function of params and buffers. BatchNorm
statistics are returned, never written behind the caller's back; plain ``nn.Sequential`` models
run as direct functional calls that equal the module's own forward bitwise."""

import torch
from torch import nn
from torch.func import functional_call

from selfmod.arch.dropout import ConcreteDropout
from selfmod.models import FunctionalModel, direct_plan


def test_batchnorm_statistics_are_returned_never_written():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    fm = FunctionalModel(m)
    params, buffers = fm.init()
    x = torch.randn(16, 4)
    _, same = fm(params, buffers, x, train=True)  # batch statistics, nothing written
    assert same is buffers and int(m[1].num_batches_tracked) == 0
    _, new = fm(params, buffers, x, train=True, update_buffers=True)
    assert int(new["1.num_batches_tracked"]) == 1 and int(buffers["1.num_batches_tracked"]) == 0
    assert not torch.equal(new["1.running_mean"], buffers["1.running_mean"])
    assert int(m[1].num_batches_tracked) == 0 and m.training  # the module is untouched
    out, _ = fm(params, new, x, train=False)  # eval: the running statistics
    m.eval()
    assert torch.equal(out, functional_call(m, {**params, **new}, (x,)))


def test_plain_sequential_runs_directly_and_equals_the_module_bitwise():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Unflatten(1, (1, 12)),
        nn.Conv1d(1, 5, 3, 2, 1),
        nn.ReLU(),
        ConcreteDropout(),
        nn.Flatten(),
        nn.Linear(30, 7),
        nn.ReLU(),
        ConcreteDropout(),
        nn.Linear(7, 3),
    )
    assert direct_plan(m) is not None
    assert direct_plan(nn.Sequential(nn.Linear(2, 2), nn.Tanh())) is None
    fm = FunctionalModel(m)
    params, buffers = fm.init()
    x = torch.randn(9, 12)
    extra = {
        "3.rate": torch.tensor(0.3),
        "3.noise": torch.rand(9, 8),
        "7.rate": torch.tensor(0.2),
        "7.noise": torch.rand(9, 8),
    }
    for train in (True, False):
        out, _ = fm(params, buffers, x, train=train, extra=extra)
        m.train(train)
        assert torch.equal(out, functional_call(m, {**params, **extra}, (x,)))
    seen = []
    hook = m[3].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    fm(params, buffers, x, train=True, extra=extra)  # hooks need the module: they still run
    hook.remove()
    assert seen == [torch.Size([9, 5, 6])]
