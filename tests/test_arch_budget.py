"""selfmod.arch budget: the expected parameter count is exact for independent gates, the
multiplier update ascends, projects and restarts, and the PI controller drives a small gated
MLP's expected parameter count to its target (plain dual ascent overshoots it)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from selfmod import arch
from selfmod.arch import budget


def test_expected_mlp_params_counts_weights_and_biases():
    torch.manual_seed(0)
    for sizes in ([5, 7, 3], [40, 12, 9, 10]):
        model = arch.gated_mlp(sizes, gate=None)
        n = sum(p.numel() for p in model.parameters())
        assert float(budget.expected_mlp_params(sizes)) == n


def test_gated_expected_params_is_the_mean_of_sampled_counts():
    torch.manual_seed(0)
    model = arch.gated_mlp([6, 10, 8, 3], init_open=0.5)
    gates = [m for m in model if isinstance(m, arch.HardConcreteGate)]
    with torch.no_grad():
        for g in gates:
            g.log_alpha.copy_(torch.randn(g.log_alpha.shape) * 2)
    expected = budget.gated_mlp_expected_params(model).item()
    gen = torch.Generator().manual_seed(1)
    counts = []
    for _ in range(2000):
        n1, n2 = (
            float((arch.hard_concrete_sample(g.log_alpha.detach(), generator=gen) > 0).sum())
            for g in gates
        )
        counts.append(float(budget.expected_mlp_params([6, n1, n2, 3])))
    mc = torch.tensor(counts)
    # the product term E[n1 n2] = E[n1] E[n2] only for independent gates
    assert abs(mc.mean().item() - expected) < 4 * mc.std().item() / len(counts) ** 0.5
    # and the count is differentiable in the gates
    budget.gated_mlp_expected_params(model).backward()
    assert all(g.log_alpha.grad is not None and g.log_alpha.grad.abs().sum() > 0 for g in gates)


def test_gated_expected_params_rejects_ungated():
    with pytest.raises(ValueError, match="one gate per hidden layer"):
        budget.gated_mlp_expected_params(arch.gated_mlp([4, 5, 2], gate=None))


def test_budget_update_ascends_projects_and_restarts():
    s = budget.budget_init()
    s = budget.budget_update(s, 2.0, 1.0, lr=0.5)  # violation +1
    assert float(s.multiplier) == pytest.approx(0.5)
    s = budget.budget_update(s, 1.5, 1.0, lr=0.5)
    assert float(s.multiplier) == pytest.approx(0.75)
    kept = budget.budget_update(s, 0.9, 1.0, lr=0.5, restart=False)  # violation -0.1
    assert float(kept.multiplier) == pytest.approx(0.7)
    assert float(budget.budget_update(s, 0.0, 1.0, lr=10.0, restart=False).multiplier) == 0.0
    assert float(budget.budget_update(s, 0.9, 1.0, lr=0.5).multiplier) == 0.0  # restart
    pi = budget.budget_update(s, 1.5, 1.0, lr=0.5, kp=2.0)  # I = 0.75 + 0.25, lam = I + 2 * 0.5
    assert float(pi.integral) == pytest.approx(1.0) and float(pi.multiplier) == pytest.approx(2.0)
    eq = budget.budget_update(budget.budget_init(), 0.5, 1.0, lr=1.0, equality=True)
    assert float(eq.multiplier) == pytest.approx(-0.5)  # an equality may push the cost up
    cost = torch.tensor(3.0, requires_grad=True)
    budget.budget_penalty(
        cost, 2.0, budget.BudgetState(torch.tensor(4.0), torch.tensor(0.0))
    ).backward()
    assert float(cost.grad) == pytest.approx(2.0)  # lam / target
    with pytest.raises(ValueError, match="lr must be > 0"):
        budget.budget_update(s, 1.0, 1.0, lr=0.0)
    with pytest.raises(ValueError, match="target must be > 0"):
        budget.budget_penalty(cost, 0.0, s)
    with pytest.raises(ValueError, match="kp must be >= 0"):
        budget.budget_update(s, 1.0, 1.0, lr=1.0, kp=-1.0)
    with pytest.raises(ValueError, match="multiplier must be >= 0"):
        budget.budget_init(-1.0)


def test_ramp_is_cubic_and_clamped():
    assert budget.ramp(0, 10, 1.0, 0.2) == pytest.approx(1.0)
    assert budget.ramp(10, 10, 1.0, 0.2) == pytest.approx(0.2)
    assert budget.ramp(25, 10, 1.0, 0.2) == pytest.approx(0.2)
    assert budget.ramp(5, 10, 1.0, 0.2) == pytest.approx(0.2 + 0.8 / 8)
    vals = [budget.ramp(i, 10, 1.0, 0.2) for i in range(11)]
    assert all(a > b for a, b in itertools.pairwise(vals))


def _train_gated(control: bool, target: float = 0.3, steps: int = 300, kp: float = 20.0):
    torch.manual_seed(0)
    model = arch.gated_mlp([8, 32, 32, 3], init_open=0.9)
    total = float(budget.expected_mlp_params([8, 32, 32, 3]))
    gates = [m.log_alpha for m in model if isinstance(m, arch.HardConcreteGate)]
    weights = [p for p in model.parameters() if all(p is not g for g in gates)]
    opt = torch.optim.Adam([{"params": weights}, {"params": gates, "lr": 0.05}], 1e-2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, :3] * 2 + x[:, 3:6]).argmax(-1)  # (256,) a learnable 3-class task
    state = budget.budget_init()
    for step in range(steps):
        frac = budget.gated_mlp_expected_params(model) / total
        tgt = budget.ramp(step, steps // 2, 1.0, target)
        loss = F.cross_entropy(model(x), y)
        if control:
            loss = loss + budget.budget_penalty(frac, tgt, state)
            state = budget.budget_update(state, frac.detach(), tgt, lr=0.05, kp=kp)
        else:
            loss = loss + 0.0 * frac
        opt.zero_grad()
        loss.backward()
        opt.step()
    return budget.gated_mlp_expected_params(model).item() / total


def test_controller_drives_expected_params_to_the_target():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add contention
    try:
        assert _train_gated(control=False) > 0.8  # the task alone keeps the gates open
        for target in (0.3, 0.5):
            frac = _train_gated(control=True, target=target)
            assert abs(frac - target) < 0.02 * target / 0.3, (target, frac)
        # plain dual ascent (no proportional term) winds up while the target ramps, overshoots
        assert _train_gated(control=True, target=0.3, kp=0.0) < 0.27
    finally:
        torch.set_num_threads(threads)
