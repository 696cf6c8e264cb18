"""The introspective loop's safeguards: harmful changes rejected with the run state bitwise
unchanged, NaN anywhere rolls back and the run goes on, manual approval changes nothing."""

import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cycles
import pytest
import torch
import torch.nn.functional as F
import warm
from faults import FaultyIntrospector
from torch import nn
from torch.utils import _pytree as pytree

from selfmod import tree
from selfmod.arch.dropout import concrete_dropout
from selfmod.data import Stream
from selfmod.introspect import Introspector, Proposal, replay, verifier
from selfmod.introspect.lookahead import Lookahead
from selfmod.introspect.modifiers.batch_size import noise_scale
from selfmod.introspect.modifiers.hyper import gap_step
from selfmod.runs.config import TrainConfig
from selfmod.runs.ledger import Ledger
from selfmod.runs.recorder import RunRecorder

CRASH_AT = str(Path(__file__).parent / "crash_at.py")  # kills the CLI at a base step

FAST = dict(
    steps=60,
    cycle=20,
    lookahead=5,
    width=8,
    max_width=32,
    guard_size=100,
    replay_size=200,
    compare_fixed=False,
)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _run_state(run: Introspector):
    return (
        run.state.clone(),
        run.rng.get_state().clone(),
        torch.get_rng_state().clone(),
        run.sources[run.counters.source_id].train.position(),
    )


def _lookahead(run: Introspector) -> float:
    """Queue the lookahead batches and estimate, as a cycle does; the current guard loss."""
    return cycles.estimate(run)[0]


def _lr_step(run: Introspector, factor: float) -> Proposal:
    h = run.hparams["log_lr"] + math.log(factor)
    return Proposal("lr", {"log_lr": h}, strict=True, group="hypergradient")


def _resumed(cfg, run_dir) -> Introspector:
    recorder = RunRecorder(run_dir)
    run = Introspector(cfg, recorder=recorder)
    recorder.resume(run)
    return run


def _equal(a, b) -> bool:
    fa, fb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return len(fa) == len(fb) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        for x, y in zip(fa, fb, strict=True)
    )


def test_harmful_change_is_rejected_and_the_state_is_bitwise_unchanged():
    run = Introspector(TrainConfig(**{**FAST, "lr": 0.1, "steps": 200}))
    run.run()  # a trained run at a good learning rate
    current = _lookahead(run)
    before = _run_state(run)
    run.verify_and_decide(_lr_step(run, 100.0), current)
    d = run.history["decisions"][-1]
    assert d["decision"] == "reject", d
    assert _equal(before, _run_state(run))


def test_trust_region_bounds_every_hyperparameter_step():
    cfg = TrainConfig(**{**FAST, "trust_region": 0.1, "meta_lr": 10.0})
    run = Introspector(cfg)
    _, g = cycles.estimate(run)
    proposals = cycles.propose(run, g, {"gap": 0.0})
    assert {p.modifier for p in proposals} >= {"hypergradient", "regularize", "grow"}
    for p in proposals:
        for k, v in p.hparams.items():
            assert (v - run.hparams[k]).abs().max() <= 0.1 + 1e-6, p.modifier
        if p.modifier == "grow":
            assert all(
                a <= math.ceil(cfg.settings_of("grow").grow_fraction * w)
                for a, w in zip(p.surgery["add"], run.widths(), strict=True)
            )


@pytest.mark.parametrize("strict", [False, True])
def test_strict_regularization_needs_a_lower_guard_loss_where_the_gap_rule_has_a_tolerance(
    strict,
):
    cfg = TrainConfig(**{**FAST, "modifiers": ["weight_decay", "dropout"],
                         "regularize_strict": strict})  # fmt: skip
    run = Introspector(cfg)
    _lookahead(run)
    (proposal,) = cycles.propose(run, {}, {"gap": 1.0})  # far above the target: both step up
    assert proposal.modifier == "regularize" and proposal.strict is strict
    changed = cycles.apply(run, proposal)
    _, value = cycles.check(run, changed, math.inf, 0.0)
    before = _run_state(run)
    run.verify_and_decide(proposal, value / 1.005)  # 0.5% worse: inside epsilon, not lower
    d = run.history["decisions"][-1]
    assert d["decision"] == ("reject" if strict else "commit"), d
    assert _equal(before, _run_state(run)) is strict


def test_gap_rule_steps_by_sign_or_in_proportion_within_the_trust_region():
    # gain 0: +-trust_region / 2 by the sign of gap - target, however far off
    assert gap_step(10.0, 0.15, 0.0, 0.7) == 0.35
    assert gap_step(0.151, 0.15, 0.0, 0.7) == 0.35
    assert gap_step(0.01, 0.15, 0.0, 0.7) == -0.35
    # gain > 0: gain * log(G / G*), clipped; a gap <= 0 is a full step down
    assert gap_step(0.3, 0.15, 0.5, 0.7) == pytest.approx(0.5 * math.log(2.0))
    assert gap_step(0.15, 0.15, 1.0, 0.7) == 0.0
    assert gap_step(10.0, 0.15, 1.0, 0.7) == 0.7
    assert gap_step(-0.2, 0.15, 1.0, 0.7) == -0.7
    cfg = TrainConfig(**{**FAST, "gap_gain": 1.0, "dropout": 0.1})
    run = Introspector(cfg)
    _lookahead(run)
    zero = {k: torch.zeros_like(v) for k, v in run.hparams.items()}
    (change,) = [p for p in cycles.propose(run, zero, {"gap": 0.3}) if p.modifier == "regularize"]
    moved = change.hparams["log_wd"] - run.hparams["log_wd"]
    assert float(moved) == pytest.approx(math.log(2.0), rel=1e-5)
    moved = change.hparams["drop_logit"] - run.hparams["drop_logit"]
    assert float(moved.max()) == pytest.approx(math.log(2.0), rel=1e-5)


def test_fixed_lr_mean_redistributes_the_rates_at_the_same_geometric_mean():
    proposals = {}
    for mean in ("free", "fixed"):
        run = Introspector(TrainConfig(**{**FAST, "lr_mean": mean, "modifiers": ["lr"]}))
        _, g = cycles.estimate(run)
        made = cycles.propose(run, g, {"gap": 0.0})
        (change,) = [p for p in made if p.modifier == "hypergradient"]
        proposals[mean] = change.hparams["log_lr"] - run.hparams["log_lr"]
    free, fixed = proposals["free"], proposals["fixed"]
    assert abs(float(free.mean())) > 1e-3  # the meta-gradient moves the mean here
    assert float(fixed.mean()) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(fixed, free - free.mean())  # same relative move


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_a_rising_lr_mean_takes_a_step_up_as_it_is_and_only_redistributes_a_step_down(direction):
    from selfmod.introspect.modifiers.lr import LearningRates

    current = torch.tensor([-3.0, -2.0, -4.0, -1.0])
    step = direction * torch.tensor([0.5, 0.1, 0.3, -0.1])  # mean +-0.2
    ctx = SimpleNamespace(state=SimpleNamespace(params={str(i): torch.ones(2) for i in range(4)}))
    rising = LearningRates(lr_mean="rising").adjust(current, current + step, ctx)
    if direction > 0:  # the level rises: the step as it is
        torch.testing.assert_close(rising, current + step)
    else:  # the level would fall: centred, the geometric mean kept
        torch.testing.assert_close(rising, current + step - step.mean())
        assert float(rising.mean()) == pytest.approx(float(current.mean()))
    assert LearningRates().settings.lr_mean == "rising"  # the default
    free = LearningRates(lr_mean="free").adjust(current, current + step, ctx)
    torch.testing.assert_close(free, current + step)


@pytest.mark.parametrize(
    "mods, schedule, regularize, want",
    [
        (["lr", "grow"], {}, "gap", [0, 1, 2, 3, 4]),  # lr is due every cycle
        (["lr", "grow"], {"lr": 2}, "gap", [0, 2, 4]),  # only where lr is due
        (["weight_decay", "grow", "batch_size"], {}, "gap", []),  # nobody reads it
        (["weight_decay"], {}, "hypergradient", [0, 1, 2, 3, 4]),
    ],
)
def test_the_meta_gradient_is_estimated_only_in_cycles_where_a_due_modifier_reads_it(
    monkeypatch, mods, schedule, regularize, want
):
    cfg = {**FAST, "steps": 100, "modifiers": mods, "schedule": schedule, "regularize": regularize}
    run = Introspector(TrainConfig(**cfg))
    estimated, estimate = [], Lookahead.estimate

    def counted(look, *args):
        estimated.append(run.cycle)
        return estimate(look, *args)

    monkeypatch.setattr(Lookahead, "estimate", counted)
    run.run()
    assert estimated == want
    decided = [d for d in run.history["decisions"] if d["decision"] in ("commit", "reject")]
    assert decided  # every proposal was still verified against a finite baseline
    assert all(math.isfinite(d["guard_current"]) for d in decided)


@pytest.mark.parametrize("where", ["loss", "grad", "hypergrad"])
def test_nan_in_loss_gradient_or_hypergradient_rolls_back_and_the_run_goes_on(where):
    faults = {where: {1} if where == "hypergrad" else {25}}
    run = FaultyIntrospector(TrainConfig(**FAST), **faults)
    run.run()
    rollbacks = [d for d in run.history["decisions"] if d["decision"] == "rollback"]
    assert len(rollbacks) == 1, rollbacks
    assert "non-finite" in rollbacks[0]["reason"]
    assert (
        rollbacks[0]["after"]["lr"][0]
        == pytest.approx(rollbacks[0]["before"]["lr"][0] / 2, rel=0.3)
        or where == "hypergrad"
    )
    assert run.state.meta_lr == pytest.approx(run.config.meta_lr / 2)
    assert run.step == run.config.steps and tree.is_finite(run.params)
    assert len(run.history["probes"]) == 3  # every cycle still ran


def test_divergence_rolls_back_to_the_last_good_state():
    run = Introspector(TrainConfig(**{**FAST, "lr": 10.0, "modifiers": []}))
    run.run()
    rollbacks = [d for d in run.history["decisions"] if d["decision"] == "rollback"]
    assert rollbacks and tree.is_finite(run.params)


def _spiking_run() -> tuple[Any, Callable[[int], None]]:
    """A ``SelfModifier`` trained 60 steps (its losses' average far below the first loss) and
    ``train(k)``: ``k`` more steps on the data."""
    from selfmod.runs import SelfModifier

    torch.manual_seed(0)
    x = torch.randn(512, 4)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    config = {"lr": 0.05, "cycle": 1000, "steps": 1000, "modifiers": [], "batch_size": 32}
    sm = SelfModifier(model, F.cross_entropy, (x[:200], y[:200]), config=config)

    def train(k: int) -> None:
        for i in range(k):
            rows = torch.arange(32) + (i * 32) % 480
            sm.step((x[rows], y[rows]))

    train(60)
    assert sm.run.counters.average < 0.1 * sm.run.counters.first_loss
    sm.spike = lambda: sm.step((x[:32] * 30, 1 - y[:32]))  # labels flipped, inputs scaled
    return sm, train


def test_one_spiking_batch_is_counted_and_trained_on_and_a_second_soon_after_rolls_back():
    """Near a loss of 0 one batch with a few confident mistakes is far above the average: it
    is counted (and said in the ledger) but rolls nothing back; a second spike within
    ``SPIKE_WINDOW`` steps (a loss that keeps spiking) is a divergence and rolls back."""
    sm, train = _spiking_run()
    sm.spike()
    train(verifier.SPIKE_WINDOW + 1)
    sm.spike()  # a lone spike again: the last one is out of the window
    assert sm.run.counters.divergences == 2
    assert not [d for d in sm.run.history["decisions"] if d["decision"] == "rollback"]
    sm.spike()
    (rollback,) = [d for d in sm.run.history["decisions"] if d["decision"] == "rollback"]
    assert "1 step(s) after the last spike" in rollback["reason"]
    sm.close()


def test_after_a_rollback_the_restored_state_is_not_judged_by_the_later_losses():
    """A divergence late in a run rolls back to an earlier good state, whose losses are higher
    than the trained state's running average. The divergence check starts its average again
    from the restored state's losses, so the run trains on: one rollback, not one every other
    step to the end with the rates halved each time."""
    sm, train = _spiking_run()
    sm.spike()
    sm.spike()  # a divergence: back to the start, whose losses are far above the average
    train(30)
    rollbacks = [d for d in sm.run.history["decisions"] if d["decision"] == "rollback"]
    assert len(rollbacks) == 1, [d["reason"] for d in rollbacks[:3]]
    sm.close()


def test_the_fixed_baseline_never_changes_itself_and_is_reported_as_diverged():
    spiking = Introspector(TrainConfig(**{**FAST, "lr": 10.0}), tune=False)
    spiking.run()  # loss spikes: counted, never rolled back, the rates stay
    assert spiking.counters.divergences > 0 and not spiking.history["decisions"]
    assert torch.allclose(spiking.hparams["log_lr"].exp(), torch.full((6,), 10.0))
    nan = FaultyIntrospector(TrainConfig(**FAST), loss={25}, tune=False)
    nan.run()  # a NaN ends it, reported as diverged, at its last finite parameters
    assert nan.diverged_at == nan.step == 25 and not nan.history["decisions"]
    assert tree.is_finite(nan.params) and nan.summary()["diverged_at"] == 25


@pytest.mark.parametrize("safeguards", [True, False])
def test_a_dead_hidden_layer_is_rolled_back_though_the_loss_did_not_spike(safeguards):
    cfg = TrainConfig(**{**FAST, "lr": 0.05, "modifiers": [], "safeguards": safeguards})
    run = Introspector(cfg)
    run.run_cycle()  # the first probe: the untrained model, and the last good state
    good, lr = tree.clone(run.params), run.hparams["log_lr"].clone()
    assert verifier.dead(run.problem, run.state, run.guard("verify")[0]) is None
    # the second hidden layer's units never fire: the output is the last layer's bias
    dead = {**run.params, "2.bias": run.params["2.bias"] * 0 - 10.0}
    run.state = run.state.with_(params=dead)
    run.run_cycle()
    rollbacks = [d for d in run.history["decisions"] if d["decision"] == "rollback"]
    if not safeguards:
        assert not rollbacks and bool((run.params["2.bias"] == -10.0).all())
        return
    assert len(rollbacks) == 1 and "output is the same for every guard" in rollbacks[0]["reason"]
    assert _equal(run.params, good)
    torch.testing.assert_close(run.hparams["log_lr"], lr - math.log(2.0))


def test_growth_keeps_the_function_and_maps_the_optimizer_state():
    run = Introspector(TrainConfig(**FAST))
    run.run()
    x = run.guard()[0]
    before = run.problem.predict(run.params, run.state.buffers, x)
    grown = cycles.apply(run, Proposal("grow", surgery={"add": [4, 8], "seed": 3}))
    params = grown.params
    assert run.problem.widths(params) == [run.widths()[0] + 4, run.widths()[1] + 8]
    after = run.problem.predict(params, run.state.buffers, x)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert grown.opt_state[1].trace["2.weight"].shape == params["2.weight"].shape


def test_manual_approval_changes_nothing_until_approved_and_stale_changes_expire(tmp_path):
    cfg = TrainConfig(**{**FAST, "steps": 100, "approval": "manual"})
    args = [
        f"--set={k}={str(v).lower() if isinstance(v, bool) else v}"
        for k, v in {**FAST, "steps": 100, "approval": "manual", "out": tmp_path}.items()
    ]
    crashed = warm.run([CRASH_AT, "step=70", "train", *args])
    assert crashed.returncode == -9, crashed.stderr
    (run_dir,) = tmp_path.iterdir()
    with Ledger(run_dir / "ledger.sqlite") as ledger:
        pending = [e for e in ledger.entries("proposal") if e.decision == "pending"]
        assert pending and not [e for e in ledger.entries("proposal") if e.decision == "commit"]
    # the run so far: hyperparameters and widths exactly the initial ones at every log point
    run = _resumed(cfg, run_dir)
    first = run.history["log"][0]
    for row in run.history["log"]:
        assert (row["lr"], row["widths"], row["weight_decay"], row["batch_size"]) == (
            first["lr"],
            first["widths"],
            first["weight_decay"],
            first["batch_size"],
        )
    run.recorder.close()
    # the run resumes at cycle 3: a grow from cycle 2 is fresh, the cycle-0 one has expired
    grows = {e.cycle: e for e in pending if e.payload["modifier"] == "grow"}
    grow, stale = grows[2], grows[0]

    def approve(seq):
        return warm.run(["-m", "selfmod.cli", "approve", str(run_dir), str(seq)])

    ok = approve(grow.seq)
    assert ok.returncode == 0, ok.stderr
    late = approve(stale.seq)  # the run expired it at cycle 3, before the kill
    assert late.returncode == 2 and f"change {stale.seq} was expired" in late.stderr
    again = warm.run(["-m", "selfmod.cli", "approve", str(run_dir), "99999"])
    assert again.returncode == 2 and "ID must be a pending change" in again.stderr
    run = _resumed(cfg, run_dir)
    run.run()
    applied = [d for d in run.history["decisions"] if d["decision"] == "applied"]
    assert len(applied) == 1 and applied[0]["reason"] == f"approved proposal {grow.seq} applied"
    assert applied[0]["after"]["widths"] != applied[0]["before"]["widths"]
    expired = [d for d in run.history["decisions"] if d["decision"] == "expired"]
    assert any(f"proposal {stale.seq} from cycle 0 expired" in d["reason"] for d in expired)
    assert all(d["before"] == d["after"] for d in expired)  # an expired change changes nothing


def test_stream_position_and_replay_buffer():
    s = Stream(0, 10)
    a = [s.next(4) for _ in range(5)]
    t = Stream(0, 10, **{k: v for k, v in Stream(0, 10).position().items() if k != "n"})
    assert torch.equal(a[0], t.next(4))
    assert s.position()["epoch"] == 2
    g = torch.Generator().manual_seed(0)
    buf = replay.empty(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    for i in range(10):
        buf = replay.add_train(buf, torch.randn(20, 3), torch.arange(20), i, 0, 50, g)
    assert int((buf.split == replay.TRAIN).sum()) == 50 and int(buf.seen) == 200
    buf = replay.add_guard(buf, torch.randn(40, 3), torch.zeros(40, dtype=torch.long), 0, 0, 40, g)
    buf = replay.add_guard(buf, torch.randn(40, 3), torch.zeros(40, dtype=torch.long), 5, 1, 40, g)
    guard_sources = buf.source[buf.split == replay.GUARD]
    assert int((guard_sources == 0).sum()) == 20 and int((guard_sources == 1).sum()) == 20


def _add_train_one_at_a_time(buf, x, y, step, source, capacity, generator):
    """Algorithm R offering one row at a time: the reference ``replay.add_train`` must match."""
    seen = int(buf.seen)
    train_idx = torch.nonzero(buf.split == replay.TRAIN).squeeze(1)
    n_train, replaced, append = len(train_idx), {}, []
    u = torch.rand(len(y), generator=generator, dtype=torch.float64)
    for i in range(len(y)):
        seen += 1
        if n_train + len(append) < capacity:
            append.append(i)
        elif (j := int(u[i] * seen)) < capacity:
            if j < n_train:
                replaced[int(train_idx[j])] = i
            else:
                append[j - n_train] = i
    x2, y2, step2, source2 = (t.clone() for t in (buf.x, buf.y, buf.step, buf.source))
    for row, i in replaced.items():
        x2[row], y2[row], step2[row], source2[row] = x[i], y[i], step, source
    out = replay.Replay(x2, y2, step2, source2, buf.split, torch.tensor(seen))
    if append:
        a = torch.tensor(append)
        out = replay._cat(out, x[a], y[a], step, source, replay.TRAIN)
        out = out._replace(seen=torch.tensor(seen))
    return out


@pytest.mark.parametrize("capacity,batch", [(50, 20), (7, 20), (300, 64), (1, 5), (64, 64)])
def test_the_train_reservoir_is_algorithm_r_one_offer_at_a_time(capacity, batch):
    g, h = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    fast = ref = replay.empty(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    guard = torch.randn(6, 3)  # guard rows in between: train slots are not buffer rows
    fast = ref = replay.add_guard(fast, guard, torch.zeros(6, dtype=torch.long), 0, 0, 6,
                                  torch.Generator())  # fmt: skip
    data = torch.Generator().manual_seed(2)
    for step in range(12):
        x = torch.randn(batch, 3, generator=data)
        y = torch.randint(0, 10, (batch,), generator=data)
        fast = replay.add_train(fast, x, y, step, step % 2, capacity, g)
        ref = _add_train_one_at_a_time(ref, x, y, step, step % 2, capacity, h)
        for a, b in zip(fast, ref, strict=True):
            assert torch.equal(a, b)
    assert int((fast.split == replay.TRAIN).sum()) == capacity
    assert int(fast.seen) == 12 * batch
    # a smaller capacity than the rows held (nothing appended, only the first slots replaced)
    x, y = torch.randn(batch, 3), torch.arange(batch)
    small = max(1, capacity // 2)
    for a, b in zip(
        replay.add_train(fast, x, y, 12, 0, small, g),
        _add_train_one_at_a_time(ref, x, y, 12, 0, small, h),
        strict=True,
    ):
        assert torch.equal(a, b)  # fmt: skip


@pytest.mark.parametrize("capacity", [30, 100, 500])
def test_offering_a_cycles_batches_at_once_equals_offering_them_in_turn(capacity):
    """The loop offers a cycle's queued batches to the reservoir in one call: the same buffer,
    bit for bit, as one call per batch (the same random numbers, drawn in the same order)."""
    data = torch.Generator().manual_seed(3)
    start = replay.empty(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    start = replay.add_train(start, torch.randn(40, 3, generator=data), torch.arange(40), 0, 0,
                             capacity, torch.Generator())  # fmt: skip
    batches = [(torch.randn(b, 3, generator=data), torch.randint(0, 9, (b,), generator=data))
               for b in (16, 16, 7, 32)]  # fmt: skip
    g, h = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    in_turn = start
    for x, y in batches:
        in_turn = replay.add_train(in_turn, x, y, 5, 1, capacity, g)
    x, y = (torch.cat(t) for t in zip(*batches, strict=True))
    at_once = replay.add_train(start, x, y, 5, 1, capacity, h)
    for a, b in zip(at_once, in_turn, strict=True):
        assert torch.equal(a, b)


def test_concrete_dropout_and_noise_scale():
    h = torch.ones(20000, 1)
    p = torch.tensor(0.3, requires_grad=True)
    out = concrete_dropout(h, p, torch.rand(20000, 1, generator=torch.Generator().manual_seed(0)))
    assert abs(float((out < 0.5).float().mean()) - 0.3) < 0.02  # about p of the units dropped
    assert abs(float(out.detach().mean()) - 1.0) < 0.03  # inverted scaling keeps the mean
    (g,) = torch.autograd.grad(out.sum(), p)
    assert torch.isfinite(g)
    # gradients g_i = G + noise with per-example variance s: B_noise = s * D / |G|^2
    gen = torch.Generator().manual_seed(1)
    true, b = torch.full((100,), 0.1), 32
    grads = [{"w": true + torch.randn(100, generator=gen) / b**0.5} for _ in range(64)]
    assert noise_scale(grads, b) == pytest.approx(100 / (100 * 0.01), rel=0.3)


def test_forgetting_budget_refuses_a_change_that_costs_accuracy_on_older_data():
    from selfmod.data import hold_out, load_mnist1d

    cfg = TrainConfig(
        **{
            **FAST,
            "lr": 0.05,
            "steps": 160,
            "shift_step": 80,
            "epsilon": 1.0,
            "forgetting_delta": 0.0,
            "verify_on": "shared",  # all 50 old guard examples judge (the split halves them)
        }
    )
    splits = [
        hold_out(load_mnist1d(seed=42, num_samples=1000), 100, 0),
        hold_out(load_mnist1d(seed=43, num_samples=1000, noise_scale=0.5), 100, 1),
    ]
    run = Introspector(cfg, splits=splits)
    run.run()
    assert run.counters.source_id == 1 and run.shift_cycle == 4
    old = replay.split(run.buffer, (replay.GUARD, replay.PROPOSE), exclude_source=1)
    assert len(old[1]) == 50  # the guard set kept half its room for the old distribution
    current = _lookahead(run)
    reasons = []
    for factor in (0.05, 0.2, 2.0, 3.0):  # check is pure: each starts from the same state
        proposed = cycles.apply(run, _lr_step(run, factor))
        reasons.append(cycles.check(run, proposed, current, 1.0)[0] or "")
    assert any(r.startswith("forgetting budget: accuracy on older data") for r in reasons), reasons


def test_meta_metrics():
    from selfmod.introspect.probes import adaptation, convergence, meta_metrics, stability

    assert convergence([2.0, 1.0, 0.5, 0.5])[1] == 2
    assert adaptation([0.9, 0.9, 0.3, 0.5, 0.6, 0.62], 2) == 2.0  # 0.6 >= 0.95 * 0.62
    std, osc = stability([1.0, 1.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0])
    assert osc == 1.0 and std > 0.4
    probes = [
        {"guard_loss": 2.0 - 0.1 * i, "guard_acc": 0.1 * i, "test_acc": 0.1 * i + 0.05}
        for i in range(6)
    ]
    assert meta_metrics(probes)["internal_vs_external_acc_gap"] == pytest.approx(0.05)


ONLINE = dict(
    steps=300,
    cycle=300,  # one cycle (at step 0): the online modifier alone moves the rates
    lookahead=5,
    width=32,
    max_width=32,
    guard_size=100,
    replay_size=200,
    compare_fixed=False,
    lr=1e-3,  # 100x too small
    online_lr_step=0.05,
)


def test_online_lr_raises_a_learning_rate_100x_too_small_with_bounded_steps():
    deltas = []

    def watch(r, last=[None]):  # noqa: B006 - the previous step's log lr
        if last[0] is not None:
            deltas.append(float((r.hparams["log_lr"] - last[0]).abs().max()))
        last[0] = r.hparams["log_lr"].clone()

    run = Introspector(TrainConfig(**{**ONLINE, "modifiers": ["online_lr"]}))
    run.run(watch)
    fixed = Introspector(TrainConfig(**{**ONLINE, "modifiers": []}))
    fixed.run()
    lr = run.hparams["log_lr"].exp()
    assert bool((lr > 1e-2).all()), lr  # every tensor's rate at least 10x higher
    assert len(deltas) == 299 and max(deltas) <= 0.05 + 1e-6  # |delta log lr| per step
    ours, theirs = run.summary(), fixed.summary()
    assert ours["test_loss"] < theirs["test_loss"] - 0.5, (ours["test_loss"], theirs["test_loss"])
    assert fixed.hparams["log_lr"].exp().tolist() == pytest.approx([1e-3] * 6)


def test_nan_in_the_gradient_during_an_online_step_restores_the_online_state():
    cfg = TrainConfig(**{**FAST, "modifiers": ["online_lr", "lr"]})
    seen = {}

    def watch(r):
        if r.step == 25:  # the last good state, and the online rate just before the fault
            seen["good"] = tree.clone(r.good.hparams), tree.clone(r.good.memory["online_lr"])
            seen["lr"] = r.hparams["log_lr"].clone()
        if r.step == 26:  # right after the rollback
            seen["after"] = r.hparams["log_lr"].clone(), tree.clone(r.state.memory["online_lr"])

    run = FaultyIntrospector(cfg, grad={25})
    run.run(watch)
    (rollback,) = [d for d in run.history["decisions"] if d["decision"] == "rollback"]
    assert "non-finite gradient" in rollback["reason"] and rollback["step"] == 25
    good_h, good_prev = seen["good"]
    assert not torch.equal(seen["lr"], good_h["log_lr"])  # the online rates had moved ...
    lr_after, prev_after = seen["after"]
    torch.testing.assert_close(lr_after, good_h["log_lr"] - math.log(2.0), rtol=0, atol=0)
    assert good_prev and _equal(prev_after, good_prev)  # ... and both came back
    assert run.step == cfg.steps and tree.is_finite(run.params)
    assert tree.is_finite(run.hparams) and run.state.memory["online_lr"]  # online steps went on
    assert len(run.history["probes"]) == 3


def test_schedule_runs_each_modifier_on_exactly_its_cycles(tmp_path):
    cfg = TrainConfig(
        **{
            **FAST,
            "steps": 120,
            "max_width": 256,
            "modifiers": ["lr", "grow", "online_lr"],
            "schedule": {"grow": 2, "lr": 3, "online_lr": "step"},
        }
    )
    run = Introspector(cfg, recorder=RunRecorder(tmp_path))
    run.run()
    cycles = {}
    for e in run.recorder.ledger.entries("proposal"):
        cycles.setdefault(e.payload["modifier"], []).append(e.cycle)
    assert cycles["grow"] == [0, 2, 4]
    assert cycles["hypergradient"] == [0, 3]  # the lr modifier's meta-gradient step
    assert cycles["online_lr"] == [1, 2, 3, 4, 5]  # a record of the online steps per cycle
    assert [p["cycle"] for p in run.history["probes"]] == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("budget", "reason"),
    [
        ({"max_params": 600}, "parameter budget"),
        ({"max_flops": 1200}, "FLOPs budget"),
        ({"max_memory": 2500}, "memory budget"),
    ],
)
def test_growth_past_a_params_flops_or_memory_budget_is_refused(budget, reason):
    # the 8-wide MLP: 490 parameters, 954 FLOPs and 2,192 bytes (params + activations) per
    # example; one growth step (+4 units per layer) passes all three budgets
    cfg = TrainConfig(**{**FAST, "modifiers": ["grow"], "steps": 20, **budget})
    run = Introspector(cfg)
    c = run.problem.cost(run.params, run.example)
    assert (c.params, c.flops, c.activation_bytes + 4 * c.params) == (490, 954, 2192)
    run.run()
    (grow,) = [d for d in run.history["decisions"] if d["modifier"] == "grow"]
    assert grow["decision"] == "reject" and grow["reason"].startswith(reason), grow
    assert run.widths() == [8, 8]
    free = Introspector(TrainConfig(**{**FAST, "modifiers": ["grow"], "steps": 20}))
    free.run()
    assert free.widths() == [12, 12]  # without the budget the same growth commits


def test_examples_counts_what_the_base_steps_drew_and_resumes_exactly(
    tmp_path, monkeypatch, drawn_batches
):
    drawn = drawn_batches
    cfg = TrainConfig(**{**FAST, "steps": 100, "modifiers": ["lr", "batch_size"]})
    full = Introspector(cfg, recorder=RunRecorder(tmp_path / "a", keep=50))
    full.run()
    assert len(set(drawn)) > 1  # the batch size changed, so steps x batch would be wrong
    assert full.summary()["examples"] == full.counters.examples == sum(drawn)
    back = Introspector(cfg, recorder=(recorder := RunRecorder(tmp_path / "a", keep=50)))
    recorder.resume(back, at_most=50)
    assert back.step < 100 and 0 < back.counters.examples < full.counters.examples
    back.run()
    assert back.counters.examples == full.counters.examples
    # a checkpoint written before the counter existed resumes, the count unknown (None)
    checkpoint = Introspector.checkpoint

    def older(self):
        tensors, meta = checkpoint(self)
        return tensors, {k: v for k, v in meta.items() if k not in ("examples", "meta_seconds")}

    monkeypatch.setattr(Introspector, "checkpoint", older)
    Introspector(cfg, recorder=RunRecorder(tmp_path / "b", keep=50)).run()
    monkeypatch.setattr(Introspector, "checkpoint", checkpoint)
    old = Introspector(cfg, recorder=(recorder := RunRecorder(tmp_path / "b", keep=50)))
    recorder.resume(old, at_most=50)
    old.run()
    assert old.step == 100 and old.counters.examples is None and old.summary()["examples"] is None
    assert math.isnan(old.summary()["meta_overhead"])  # its cycles' time is not known either


def test_the_summary_splits_the_wall_time_between_training_and_self_modification():
    run = Introspector(TrainConfig(**FAST))
    run.run()
    s = run.summary()
    assert 0 < s["meta_seconds"] < s["seconds"]  # the cycles and the log points
    logs = len(run.history["log"])
    run.log_point()  # a log point's time is self-modification's, not training's
    assert run.counters.meta_seconds > s["meta_seconds"] and len(run.history["log"]) == logs + 1
    assert s["base_seconds"] == pytest.approx(s["seconds"] - s["meta_seconds"])
    assert s["meta_overhead"] == pytest.approx(s["meta_seconds"] / s["base_seconds"])
    fixed = Introspector(TrainConfig(**FAST), tune=False)
    fixed.run()
    assert fixed.summary()["meta_seconds"] == 0.0  # no cycles, no self-modification


def test_a_change_the_lookahead_cannot_tell_apart_is_marked_as_accepted_by_rule():
    run = Introspector(TrainConfig(**{**FAST, "modifiers": ["weight_decay"]}))
    run.run()
    current = cycles.estimate(run)[0]
    same = Proposal("weight_decay", {"log_wd": run.hparams["log_wd"].clone()}, group="regularize")
    run.verify_and_decide(same, run.lookahead.baseline(run.state))
    d = run.history["decisions"][-1]
    assert d["decision"] == "commit" and "accepted by rule" in d["reason"], d
    bigger = Proposal("lr", {"log_lr": run.hparams["log_lr"] + 1.0})
    run.verify_and_decide(bigger, current)
    assert "accepted by rule" not in run.history["decisions"][-1]["reason"]


def test_a_checkpoint_with_the_old_replay_loss_column_resumes_without_it():
    """0.2's checkpoints hold a per-entry loss in the replay buffer, which nothing read: a
    restore drops it and continues with the same buffer."""
    run = Introspector(TrainConfig(**{**FAST, "steps": 40, "keep_best": True}))
    run.run()
    tensors, meta = run.checkpoint()
    again = Introspector(TrainConfig(**{**FAST, "steps": 40, "keep_best": True}))
    again.restore({**tensors, "replay.loss": torch.zeros(len(run.buffer.y))}, meta)
    assert again.buffer._fields == run.buffer._fields and "loss" not in again.buffer._fields
    for a, b in zip(again.buffer, run.buffer, strict=True):
        assert torch.equal(a, b)
