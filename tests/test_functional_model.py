"""``FunctionalModel``: an ``nn.Module`` as a pure function of params and buffers. BatchNorm
statistics are returned, never written behind the caller's back; plain ``nn.Sequential`` models
run as direct functional calls that equal the module's own forward bitwise."""

import pytest
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


class _TiedLM(nn.Module):
    """An embedding whose weight the output layer shares, a GRU, BatchNorm over features."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.rnn = nn.GRU(6, 6, batch_first=True)
        self.norm = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.fail = False

    def forward(self, x):
        h, _ = self.rnn(self.embed(x))
        if self.fail:
            raise RuntimeError("inside forward")
        return self.head(self.norm(h.transpose(1, 2)).transpose(1, 2))


def test_a_module_runs_at_the_given_tensors_as_functional_call_runs_it():
    """Through the module (no direct plan): the same outputs as ``functional_call`` bitwise,
    tied weights swapped together, the module's own tensors back after every call (an error
    inside the forward included), and a replaced submodule's new tensors used."""
    torch.manual_seed(0)
    m = _TiedLM()
    own = {k: v for k, v in m.state_dict(keep_vars=True).items()}
    fm = FunctionalModel(m)
    params, buffers = fm.init()
    assert "head.weight" not in params  # named once, as named_parameters names it
    params = {k: v + 0.1 * torch.randn_like(v) for k, v in params.items()}
    x = torch.randint(0, 11, (3, 5))
    for train in (True, False):
        out, new = fm(params, buffers, x, train=train, update_buffers=True)
        m.train(train)
        clones = {k: v.clone() for k, v in buffers.items()}
        assert torch.equal(out, functional_call(m, {**params, **clones}, (x,)))
        assert all(torch.equal(new[k], clones[k]) for k in buffers)  # the same statistics
        m.train(True)
    assert all(t is own[k] for k, t in m.state_dict(keep_vars=True).items())
    assert m.head.weight is m.embed.weight
    m.fail = True
    with pytest.raises(RuntimeError, match="inside forward"):
        fm(params, buffers, x, train=True)
    assert all(t is own[k] for k, t in m.state_dict(keep_vars=True).items())
    m.fail = False
    m.norm = nn.BatchNorm1d(6)  # replaced, the same names: the next call uses the new one
    out, _ = fm(params, buffers, x, train=False)
    m.eval()
    assert torch.equal(out, functional_call(m, {**params, **buffers}, (x,)))
    m.head = nn.Linear(6, 11)  # replaced (untied, with a bias): the next call sees it
    params = {**params, "head.weight": torch.randn(11, 6), "head.bias": torch.randn(11)}
    out, _ = fm(params, buffers, x, train=False)
    assert torch.equal(out, functional_call(m, {**params, **buffers}, (x,)))


class _FrozenNorm(nn.Module):
    """A model whose ``train`` keeps its BatchNorm in eval mode (a common override)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.norm, self.seen = nn.Linear(4, 4), nn.BatchNorm1d(4), []

    def train(self, mode: bool = True) -> "_FrozenNorm":
        super().train(mode)
        self.norm.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.training, self.lin.training, self.norm.training))
        return self.norm(self.lin(x))


def test_each_call_runs_in_its_mode_and_leaves_every_flag_as_it_was():
    m = _FrozenNorm()
    m.eval()
    m.lin.train()  # mixed flags: each one must come back as it was
    fm = FunctionalModel(m)
    params, buffers = fm.init()
    x = torch.randn(8, 4)
    fm(params, buffers, x, train=True)
    fm(params, buffers, x, train=False)
    assert m.seen == [(True, True, False), (False, False, False)]  # the override had its say
    assert (m.training, m.lin.training, m.norm.training) == (False, True, False)
    plain = nn.Sequential(nn.Linear(4, 4), nn.GELU())  # no override: flags set directly
    plain[1].eval()
    fm = FunctionalModel(plain)
    p, b = fm.init()
    seen = []
    plain[1].register_forward_hook(lambda mod, i, o: seen.append(mod.training))
    fm(p, b, x, train=True)
    fm(p, b, x, train=False)
    assert seen == [True, False] and plain.training and not plain[1].training
