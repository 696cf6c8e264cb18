"""The run's compute budget (examples, self-modification's share), the learning-rate schedule
over it, and the first-order meta-gradient that shares the verifier's replay."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import safetensors.torch
import torch

from selfmod.checkpoint import load_checkpoint, save_checkpoint
from selfmod.introspect import Introspector, replay
from selfmod.introspect.budget import examples_budget, longest
from selfmod.introspect.hparams import LR_SCHEDULE
from selfmod.introspect.schedule import COOLDOWN, WARMUP, factor
from selfmod.runs.config import TrainConfig

FAST = dict(
    steps=60, cycle=20, lookahead=5, width=8, max_width=32, guard_size=100, replay_size=200,
    compare_fixed=False, dtype="float64",
)  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_first_order_equals_reverse_over_one_step(optimizer):
    """Over one lookahead step the update's own dependence on the rates is all there is: the
    first-order d guard / d log lr and d guard / d log wd (decoupled) equal the reverse
    unroll's up to Adam's ``eps_root``: the first-order replay steps by the fused kernel,
    ``sqrt(v)``; the reverse unroll by the chain, ``sqrt(v + 1e-16)``, which moves a coordinate
    by a relative ``1e-16 / 2v`` (under 1e-7 here)."""
    cfg = {**FAST, "lookahead": 1, "optimizer": optimizer, "momentum": 0.0, "lr": 0.05}
    cfg |= {"weight_decay": 0.01}
    run = Introspector(TrainConfig(**cfg, modifiers=["lr"]))
    run.run_cycle()  # a first cycle: a real state, a real replay buffer
    look = run.look_ahead()
    v_first, g_first = look.estimate(run.state, "first_order")
    v_rev, g_rev = look.estimate(run.state, "reverse")
    assert v_first == pytest.approx(v_rev, rel=1e-9)
    torch.testing.assert_close(g_first["log_lr"], g_rev["log_lr"], rtol=1e-6, atol=1e-12)
    assert bool(g_first["log_lr"].abs().sum() > 0)
    if optimizer == "adamw":  # decoupled decay: exact over one step
        torch.testing.assert_close(g_first["log_wd"], g_rev["log_wd"], rtol=1e-9, atol=1e-14)


def test_first_order_is_the_verifiers_baseline_replay_and_points_like_reverse():
    """Over K steps the first-order estimate reuses the replay the verifier's baseline reads
    (one replay for both), and its sign agrees with the full unroll's on most tensors."""
    run = Introspector(TrainConfig(**{**FAST, "lookahead": 5, "optimizer": "adamw"}))
    run.run_cycle()
    look = run.look_ahead()
    before = look.cost.total
    _, g = look.estimate(run.state, "first_order")
    after_estimate = look.cost.total
    look.baseline(run.state)  # the replay is kept: no second replay is counted
    assert look.cost.total - after_estimate == pytest.approx(len(look.verify[1]) / 3)
    assert after_estimate - before == pytest.approx(look.examples + len(look.propose[1]))
    _, g_rev = look.estimate(run.state, "reverse")
    agree = (torch.sign(g["log_lr"]) == torch.sign(g_rev["log_lr"])).float().mean()
    assert float(agree) >= 0.5


def test_an_examples_budget_is_spent_sooner_by_a_larger_batch():
    """``budget_unit = "examples"``: steps x the initial batch bounds the examples drawn, so a
    batch the modifier grows buys fewer steps, never more examples than a plain run's."""
    cfg = {**FAST, "steps": 80, "batch_size": 32, "modifiers": []}
    cfg = TrainConfig(**cfg, budget_unit="examples")
    run = Introspector(cfg)
    run.state = replace(run.state, batch_size=128)  # as if the modifier had grown it
    run.run()
    limit = examples_budget(cfg)
    assert limit == 80 * 32
    assert limit <= run.counters.examples < limit + 128
    assert run.step == 20  # steps traded for batch size
    steps = Introspector(TrainConfig(**{**FAST, "steps": 80, "batch_size": 32, "modifiers": []}))
    steps.state = replace(steps.state, batch_size=128)
    steps.run()
    assert steps.step == 80 and steps.counters.examples > limit  # "steps": on top


@pytest.mark.parametrize("share", [0.05, 0.5])
def test_self_modification_stays_within_its_meta_budget(share):
    """A cycle whose turn comes while self-modification's work is over ``meta_budget`` times
    the base steps' examples is skipped: the share holds at every cycle's start, and a
    tighter budget runs fewer cycles; the summary reports the counts."""
    cfg = TrainConfig(**{**FAST, "steps": 200, "meta_budget": share})
    run = Introspector(cfg)
    starts = []
    run_cycle = run.run_cycle

    def counted():
        n = run.counters
        starts.append((n.meta_examples, n.examples))
        run_cycle()

    run.run_cycle = counted
    run.run()
    assert all(meta <= share * ex for meta, ex in starts)
    summary = run.summary()
    assert summary["cycles_skipped"] + len(starts) == 200 // 20
    assert summary["meta_examples"] == pytest.approx(run.counters.meta_examples)
    if share == 0.05:
        assert summary["cycles_skipped"] > 0
    n = run.counters
    assert summary["meta_share"] == pytest.approx(n.meta_examples / n.examples)


def test_longest_is_the_most_steps_whose_work_fits_the_room():
    def work(t: int) -> float:
        return 10 * t + 5

    assert [longest(20, work, room) for room in (4, 15, 95, 104.9, 1e9)] == [0, 1, 9, 9, 20]
    assert longest(0, work, 1e9) == 0


def test_cosine_schedule_scales_every_rate_and_leaves_the_levels_to_the_modifiers():
    """``lr_schedule = "cosine"``: warm-up to the level over the first 5%, then down to
    (nearly) 0 at the budget's end; the optimizer reads level x factor."""
    assert factor("cosine", WARMUP / 2) == pytest.approx(0.5, rel=1e-6)
    assert factor("cosine", WARMUP) == pytest.approx(1.0)
    assert factor("cosine", 1.0) < 0.01
    assert factor("constant", 0.7) == 1.0
    seen = []
    cfg = TrainConfig(**{**FAST, "steps": 40, "lr_schedule": "cosine", "modifiers": []})
    run = Introspector(cfg)
    run.run(on_step=lambda r: seen.append(float(r.state.hparams[LR_SCHEDULE].exp())))
    want = [factor("cosine", t / 40) for t in range(40)]
    assert seen == pytest.approx(want, rel=1e-9)
    assert run.values()["lr"] == pytest.approx([cfg.lr] * len(run.names))  # the levels


@pytest.mark.parametrize("at", [WARMUP / 2, WARMUP, 0.5, 1 - COOLDOWN, 1 - COOLDOWN / 2, 1.0])
def test_wsd_schedule_holds_the_level_then_cools_down_linearly(at):
    """``lr_schedule = "wsd"``: the cosine's warm-up, then the full level until the last
    ``COOLDOWN`` of the budget, then linearly down to the floor at its end; at or above the
    cosine everywhere (more steps at the full rate)."""
    want = min(at / WARMUP, 1.0, (1 - at) / COOLDOWN)
    assert factor("wsd", at) == pytest.approx(max(want, 1e-3), rel=1e-6)
    assert factor("wsd", at) >= factor("cosine", at) - 1e-12


def test_wsd_schedule_keeps_its_factor_tensor_through_the_stable_phase():
    """``wsd``'s factor tensor is made where the factor changes and kept while it holds (the
    stable phase: the same object, so a fused step need not read its rates again), and the
    rates read are the schedule's at every step, also after the tensor is written in place."""
    cfg = TrainConfig(**{**FAST, "steps": 100, "lr_schedule": "wsd", "modifiers": []})
    run, seen, ids = Introspector(cfg), [], []

    def look(r) -> None:
        t = r.state.hparams[LR_SCHEDULE]
        seen.append(float(t.exp()))
        ids.append(id(t))
        if r.step == 50:
            with torch.no_grad():
                t.add_(math.log(0.5))  # written in place: the next step must make it again

    run.run(on_step=look)
    want = [factor("wsd", t / 100) for t in range(100)]
    assert seen == pytest.approx(want, rel=1e-9)
    stable = [ids[t] for t in range(100) if WARMUP * 100 <= t < 49]
    assert len(stable) > 30 and len(set(stable)) == 1
    assert ids[50] != ids[48]  # written in place at step 50: a new tensor for step 51


def test_a_checkpoint_streamed_to_disk_is_the_same_file_as_one_serialized_in_memory(tmp_path):
    tensors = {"a": torch.randn(300, 7), "b": torch.arange(5)}
    path = save_checkpoint(tmp_path, 3, tensors, {"x": 1})
    data = (tmp_path / "checkpoints" / path.name.replace(".json", ".safetensors")).read_bytes()
    assert data == safetensors.torch.save(tensors)
    loaded, manifest = load_checkpoint(path)
    assert torch.equal(loaded["a"], tensors["a"]) and manifest["meta"] == {"x": 1}


def test_budget_fields_are_validated_in_one_line():
    for field, value in [("meta_budget", 0), ("budget_unit", "epochs"), ("lr_schedule", "x")]:
        with pytest.raises(Exception) as err:
            TrainConfig(**{field: value})
        assert field in str(err.value).splitlines()[0] or field in str(err.value)
    assert math.isfinite(TrainConfig(meta_budget=0.3).meta_budget)


def test_a_batch_below_the_default_batch_size_floor_skips_that_modifier_instead_of_refusing():
    """Naming no modifiers, a batch of 16 (below the batch-size modifier's floor of 32) trains,
    the modifier skipped and the summary saying why; naming it is still refused in one line."""
    run = Introspector(TrainConfig(**{**FAST, "batch_size": 16, "steps": 20}))
    run.run()
    skipped = run.summary()["modifiers_skipped"]
    assert "min_batch" in skipped["batch_size"] and run.counters.examples == 20 * 16
    with pytest.raises(ValueError, match=r"batch_size must be in \[min_batch, max_batch\]"):
        TrainConfig(**{**FAST, "batch_size": 16, "modifiers": ["batch_size"]})


def test_keep_best_returns_the_best_verified_state_when_the_run_ends_worse(tmp_path):
    """Early stopping: with ``keep_best`` a run whose verify guard loss turned up ends with
    the params of the cycle start where it was lowest (the ledger says so), and the record
    survives a checkpoint; without the option, or ending no worse, the final params stay."""
    cfg = {**FAST, "steps": 120, "modifiers": [], "optimizer": "sgd", "lr": 0.5}
    plain = Introspector(TrainConfig(**cfg))
    plain.problem.metric = "loss"  # judged by its loss, as a regression is
    plain.run()
    run = Introspector(TrainConfig(**cfg, keep_best=True))
    run.problem.metric = "loss"
    events = []
    run.event = lambda kind, decision, reason, payload: events.append((decision, payload))
    run.run()
    summary = run.summary()
    best = summary["best_verified"]
    verify = run.guard("verify")
    final_plain, _ = plain.problem.evaluate(plain.params, plain.state.buffers, *verify)
    final, _ = run.problem.evaluate(run.params, run.state.buffers, *verify)
    assert best is not None and final == pytest.approx(best["guard_loss"], rel=1e-9)
    assert final_plain > best["guard_loss"] * (1 + run.config.epsilon)  # it did turn up
    assert events[-1][0] == "best state returned" and events[-1][1]["step"] == best["step"]
    assert 0 < best["step"] < 100  # an earlier cycle's start, not the end
    last, before = run.history["log"][-1], run.history["log"][-2]
    assert last["step"] == before["step"] == run.step  # the returned state's row, logged again
    whole = run.problem.evaluate(run.params, run.state.buffers, *run.guard())
    assert last["guard_loss"] == pytest.approx(whole[0], rel=1e-9) != before["guard_loss"]
    assert plain.summary()["best_verified"] is None  # off: nothing kept, the end returned
    save_checkpoint(tmp_path, run.step, *run.checkpoint())  # the best may be the current state
    (manifest,) = (tmp_path / "checkpoints").glob("*.json")
    again = Introspector(TrainConfig(**cfg, keep_best=True))
    again.restore(*load_checkpoint(manifest)[:1], load_checkpoint(manifest)[1]["meta"])
    assert again.summary()["best_verified"] == best


@pytest.mark.parametrize("metric", ["accuracy", "loss"])
def test_best_offers_keep_the_best_metric_and_return_it_only_past_epsilon(metric):
    """A classifier's record is kept by accuracy (a lower loss at a lower accuracy does not
    replace it) and returned when the end is more than ``epsilon`` below it; a run whose metric
    is the loss, by the loss, returned past ``1 + epsilon`` times it."""
    from selfmod.introspect.best import Best

    run = Introspector(TrainConfig(**{**FAST, "modifiers": []}))
    run.problem.metric = metric
    verify = run.guard("verify")
    first = Best().offer(run.problem, verify, 0, run.state)
    run.run()
    kept = first.offer(run.problem, verify, 60, run.state)
    assert kept.step == 60 and kept.loss < first.loss  # trained: lower loss, higher accuracy
    assert (kept.accuracy >= first.accuracy) if metric == "accuracy" else kept.accuracy == -math.inf
    state, why = first.returned(run.problem, verify, run.state, 0.01)
    assert state is None and why == ""  # the end is better than step 0's
    state, why = kept.returned(run.problem, verify, run.state, 0.01)
    assert state is None  # the end is the best
    if metric == "accuracy":
        confident = Best(kept.loss * 2, 7, first.params, first.buffers, kept.accuracy + 0.005)
        assert confident.offer(run.problem, verify, 9, run.state) is confident  # accuracy first
        assert confident.returned(run.problem, verify, run.state, 0.01)[0] is None  # within eps
        worse = Best(kept.loss * 2, 7, first.params, first.buffers, kept.accuracy + 0.05)
    else:
        worse = Best(kept.loss / 2, 7, first.params, first.buffers)
    state, why = worse.returned(run.problem, verify, run.state, 0.01)
    assert state is not None and state.params is first.params and "step 7" in why
    assert metric in why
    scored = run.problem.evaluate(run.params, run.state.buffers, *verify)
    run.problem.evaluate = None  # the caller's figures: no pass of its own
    assert worse.returned(run.problem, verify, run.state, 0.01, scored) == (state, why)


def test_early_stopping_never_returns_a_state_of_another_architecture():
    """A committed change of structure (here one more row in one tensor, as growth makes)
    starts the record again: the changed state replaces a better record of the old shapes,
    and a record of the old shapes is never returned to a state of the new ones."""
    from selfmod.introspect.best import Best

    run = Introspector(TrainConfig(**{**FAST, "modifiers": []}))
    run.problem.metric = "loss"
    verify = run.guard("verify")
    run.run()
    kept = Best().offer(run.problem, verify, 60, run.state)
    worse = (kept.loss * 10, -math.inf)
    same = replace(run.state, params=dict(run.state.params))
    assert kept.offer(run.problem, verify, 80, same, worse) is kept  # same shapes: by score
    state, why = kept.returned(run.problem, verify, same, 0.01, worse)
    assert state is not None and state.params is kept.params and "step 60" in why
    name, value = next(iter(run.state.params.items()))
    grown = replace(run.state, params={**run.state.params, name: torch.cat([value, value[:1]])})
    assert kept.fits(same) and not kept.fits(grown)
    again = kept.offer(run.problem, verify, 80, grown, worse)
    assert again.step == 80 and again.params is grown.params and again.loss == worse[0]
    assert kept.returned(run.problem, verify, grown, 0.01, worse) == (None, "")
    extra = replace(run.state, buffers={**run.state.buffers, "gate": torch.ones(3)})
    assert not kept.fits(extra)  # a buffer more (a choice's or a mask's) counts too


def test_the_runs_end_reads_the_guard_scores_of_its_last_log_point():
    """The last log point scores the final state on the guard set; the summary's internal gap
    (the whole guard set's loss minus the replay's training rows') reads that figure, so the
    summary passes over the test set and the training rows only."""
    run = Introspector(TrainConfig(**{**FAST, "modifiers": [], "keep_best": True}))
    run.run()
    assert run.history["log"][-1]["step"] == run.step
    params, buffers = run.params, run.state.buffers
    guard_loss = run.problem.evaluate(params, buffers, *run.guard())[0]
    train = replay.split(run.buffer, replay.TRAIN)
    gap = guard_loss - run.problem.evaluate(params, buffers, *train)[0]
    passes, predict = [], run.problem.predict
    run.problem.predict = lambda *a: passes.append(len(a[-1])) or predict(*a)
    summary = run.summary()
    assert sum(passes) == len(run.sources[0].test_y) + len(train[1])  # no guard pass
    assert summary["meta_metrics"]["gap_final"] == pytest.approx(gap, rel=1e-9)
    passes.clear()
    run.state = replace(run.state)  # another state (a cycle's, say): its figures are not known
    run.summary()
    assert sum(passes) == len(run.sources[0].test_y) + len(train[1]) + len(run.guard()[1])


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_level_step_moves_every_rate_together_against_the_levels_meta_gradient(sign):
    """``modifiers.lr.level_step``: on top of the per-tensor Rprop step, every rate moves by
    ``exp(-level_step sign(sum g))``; the whole move stays within the trust region."""
    import cycles

    cfg = {**FAST, "modifiers": ["lr"], "modifiers.lr.lr_mean": "free", "trust_region": 1.0}
    run = Introspector(TrainConfig(**cfg, **{"modifiers.lr.level_step": 0.6}))
    n = len(run.names)
    g = torch.full((n,), sign, dtype=torch.float64)
    g[0] = -sign  # one tensor against the rest: the sum keeps the rest's sign
    (proposal,) = cycles.propose(run, {"log_lr": g}, {})
    move = proposal.hparams["log_lr"] - run.hparams["log_lr"]
    rprop = -run.config.meta_lr * torch.sign(g)  # the per-tensor part
    want = (rprop - sign * 0.6).clamp(-1.0, 1.0)
    torch.testing.assert_close(move, want)
    assert float(move.abs().max()) <= 1.0


@pytest.mark.parametrize("verify_on", ["held_out", "shared"])
def test_a_log_points_guard_scores_come_from_one_pass_and_match_passes_of_their_own(verify_on):
    """A log point reads the guard set once: the whole set's loss and accuracy are a pass over
    it, the verifying split's equal a pass over that split alone to rounding (shared: the
    same set)."""
    from selfmod.introspect.summary import guard_scores

    run = Introspector(TrainConfig(**{**FAST, "modifiers": [], "verify_on": verify_on}))
    run.run()
    passes, predict = [], run.problem.predict
    run.problem.predict = lambda *a: passes.append(len(a[-1])) or predict(*a)
    whole, verified = guard_scores(run.problem, run.state, run.buffer, verify_on == "shared")
    assert passes == [len(run.guard()[1])]  # the whole guard set, once
    assert whole == run.problem.evaluate(run.params, run.state.buffers, *run.guard())
    alone = run.problem.evaluate(run.params, run.state.buffers, *run.guard("verify"))
    assert verified == pytest.approx(alone, rel=1e-6)
    assert (verified == whole) == (verify_on == "shared")


@pytest.mark.parametrize("log_every,steps", [(40, [40, 80, 100]), (50, [50, 100])])
def test_log_points_come_every_log_every_steps_and_at_the_end(log_every, steps):
    """``log_every`` sets the log points' interval (the last step always logs), and with it
    early stopping's candidates."""
    cfg = {**FAST, "modifiers": [], "steps": 100, "log_every": log_every, "keep_best": True}
    run = Introspector(TrainConfig(**cfg))
    run.run()
    assert [r["step"] for r in run.history["log"]] == steps
    assert run.best.step in steps


@pytest.mark.parametrize("share", [0.05, 0.01])
def test_log_share_spaces_log_points_so_their_guard_reads_stay_within_it(share):
    """``log_share``: the log points' guard passes (a forward pass, a third of a training
    example per row) cost at most that share of the base training's examples: the interval
    is the smallest number of steps whose examples pay for one pass, at least ``log_every``;
    the last step logs whatever the interval."""
    cfg = {**FAST, "modifiers": [], "steps": 100, "log_every": 10, "log_share": share}
    run = Introspector(TrainConfig(**cfg))
    rows, batch = len(run.guard()[1]), run.config.batch_size
    interval = next(k for k in range(1, 10_000) if rows / 3 <= share * k * batch)
    run.run()
    logged = [r["step"] for r in run.history["log"]]
    assert logged == [*range(max(10, interval), 100, max(10, interval)), 100]
    assert len(logged) * rows / 3 <= share * 100 * batch + rows / 3  # the last one aside
    plain = Introspector(TrainConfig(**{**cfg, "log_share": 0}))
    assert plain.log_interval == 10


def test_a_log_interval_under_one_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="log_every"):
        TrainConfig(**{**FAST, "log_every": 0})


def test_a_run_over_its_meta_budget_still_checkpoints_and_resumes_bitwise(tmp_path):
    """A meta budget smaller than one cycle's probes runs no cycle (the first one's work is
    its probes at least, so it is not run on an estimate of 0), yet every cycle's turn still
    writes its checkpoint; a run killed after one resumes from it to the uninterrupted end."""
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from selfmod.runs import fit

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 6, generator=g), torch.randint(0, 3, (400,), generator=g)
    guard = (torch.randn(60, 6, generator=g), torch.randint(0, 3, (60,), generator=g))
    config = {"steps": 40, "cycle": 10, "lookahead": 3, "replay_size": 50, "report": False,
              "keep_checkpoints": 10, "batch_size": 32, "meta_budget": 1e-3}  # fmt: skip

    def run(folder, resume=False, trained=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        on_step = (lambda loop: trained.append(loop.step)) if trained is not None else None
        return fit(model, F.cross_entropy, (x, y), guard, config=config, run_dir=folder,
                   resume=resume, on_step=on_step)  # fmt: skip

    whole = run(tmp_path / "whole")
    assert whole.summary["meta_examples"] == 0 and whole.summary["cycles_skipped"] >= 3
    steps = sorted(int(p.stem.split("-")[1]) for p in (tmp_path / "whole").rglob("ckpt-*.json"))
    assert {10, 20, 30} <= set(steps)
    crashed = tmp_path / "crashed"
    run(crashed)
    for p in crashed.rglob("*"):  # as if killed just after the step-20 checkpoint
        late = p.name.startswith("ckpt-") and int(p.name.split("-")[1].split(".")[0]) > 20
        if p.is_file() and (late or p.name.startswith(("final.", "summary."))):
            p.unlink()
    trained: list[int] = []
    resumed = run(crashed, resume=True, trained=trained)
    assert trained == list(range(21, 41))  # from the step-20 checkpoint, not from the start
    assert resumed.summary["cycles_skipped"] == whole.summary["cycles_skipped"]
    want = load_file(tmp_path / "whole" / "final.safetensors")
    got = load_file(crashed / "final.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
