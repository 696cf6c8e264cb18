"""The learning rates' level raced at the run's start (``level_race``, :mod:`.race`)."""

from __future__ import annotations

import math

import pytest
import torch
from events import Events

from selfmod.introspect import Introspector
from selfmod.introspect.race import Entry, planned, verdict
from selfmod.runs.config import TrainConfig

FAST = dict(
    steps=60, cycle=20, lookahead=5, width=8, guard_size=100, replay_size=200,
    compare_fixed=False, dtype="float64", batch_size=32,
)  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _race(run: Introspector) -> dict:
    (d,) = [d for d in run.history["decisions"] if d["modifier"] == "level_race"]
    return d


def test_a_rate_far_too_small_is_raised_by_the_race_and_the_run_keeps_its_budget():
    """SGD from lr 1e-4: the race's x100 level wins on both guard splits and is committed
    before the first cycle; the run still trains exactly its steps' examples (the race's
    batches are trained by the base steps), and the race's work is counted as meta work."""
    cfg = TrainConfig(**FAST, optimizer="sgd", lr=1e-4, modifiers=[], level_race=[100.0])
    run = Introspector(cfg)
    run.run()
    d = _race(run)
    assert d["decision"] == "commit" and "x100 won on both splits" in d["reason"]
    assert run.hparams["log_lr"].exp().tolist() == pytest.approx([1e-2] * 6)
    assert d["guard_proposed"] < d["guard_current"]  # the verifying split agreed
    assert run.step == 60 and run.counters.examples == 60 * 32
    h = round(0.1 * 60)
    assert run.counters.meta_examples >= h * 32  # the unchanged level over h batches
    assert run.summary()["meta_examples"] == pytest.approx(run.counters.meta_examples)


@pytest.mark.parametrize("room", [0.6, 1e-3])
def test_a_race_over_the_meta_budget_is_shortened_or_not_run(room):
    """With ``meta_budget`` under the race's work at most (:func:`.race.planned`), the race runs
    the most steps that fit (``room = 0.6``: fewer than asked) or none (the rate stays); a
    ledger event says which, and the run's self-modification stays within its budget."""
    steps, batch, h = FAST["steps"], FAST["batch_size"], round(0.1 * FAST["steps"])
    rows = (FAST["guard_size"] // 2,) * 2
    share = room * planned(h, batch, 1, rows) / (steps * batch)
    events = Events()
    config = TrainConfig(**FAST, optimizer="sgd", lr=1e-4, modifiers=[], level_race=[100.0],
                         meta_budget=share)  # fmt: skip
    run = Introspector(config, recorder=events)
    run.run_cycle = lambda: None  # the race alone
    run.run()
    ((title, why, values),) = events.rows
    assert "meta_budget" in why and values["asked"] == h
    assert run.counters.meta_examples <= share * steps * batch
    races = [d for d in run.history["decisions"] if d["modifier"] == "level_race"]
    if room == 1e-3:
        assert title == "level race not run" and values["steps"] == 0 and not races
        assert run.hparams["log_lr"].exp().tolist() == pytest.approx([1e-4] * 6)
    else:
        assert title == f"level race shortened to {values['steps']} steps"
        assert 0 < values["steps"] < h and len(races) == 1


def test_a_committed_winner_is_the_run_that_started_at_its_level():
    """A committed winner is trained again from the race's start (its race state is not kept):
    the run ends as one that started at the winning level without a race (same batches,
    schedule and random numbers), with the same counters; both levels' race steps are meta
    work."""
    base = {**FAST, "optimizer": "adamw", "modifiers": [], "dropout": 0.2, "lr_schedule": "cosine"}
    raced = Introspector(TrainConfig(**base, lr=1e-4, level_race=[30.0], race_share=0.2))
    direct = Introspector(TrainConfig(**base, lr=3e-3))
    for run in (raced, direct):
        run.run_cycle = lambda: None
        run.run()
    assert _race(raced)["decision"] == "commit"
    for k in direct.params:
        # the rates agree to rounding (log 1e-4 + log 30 vs log 3e-3), amplified over 60 steps
        torch.testing.assert_close(raced.params[k], direct.params[k], rtol=1e-4, atol=1e-7)
    a, b = raced.counters, direct.counters
    assert (a.step, a.examples) == (b.step, b.examples) == (60, 60 * 32)
    assert a.last_loss == pytest.approx(b.last_loss, rel=1e-6)
    h = round(0.2 * 60)
    guard = sum(len(raced.guard(p)[1]) for p in ("propose", "verify"))
    assert a.meta_examples == pytest.approx(2 * h * 32 + 2 * guard / 3)  # both levels' steps


def test_each_read_takes_at_most_as_many_guard_rows_as_a_level_trained_on():
    """A one-step race of batch 8 against a guard set of 100 rows: each level is scored on 8
    rows of a split, so the race's counted work is the other level's 8 examples and at most
    four reads of 8 rows (a third each), not the splits' 50 rows."""
    cfg = {**FAST, "batch_size": 8, "race_share": 0.02, "optimizer": "adamw", "modifiers": []}
    run = Introspector(TrainConfig(**cfg, level_race=[0.3]))
    assert min(len(run.guard(p)[1]) for p in ("propose", "verify")) > 8
    run.run_cycle = lambda: None  # the race's work alone
    run.run()
    d = _race(run)
    reads = 3 if d["decision"] == "reject" and "unchanged level won" in d["reason"] else 4
    extra = 0 if d["decision"] == "reject" else 8  # a committed winner trains again
    assert run.counters.meta_examples == pytest.approx(8 + extra + reads * 8 / 3)


def test_when_the_unchanged_level_wins_nothing_changes_and_no_randomness_is_consumed():
    """A race the unchanged level wins (x1e-3 barely trains) is a rejection; the run then
    ends exactly as the same run without a race (same batches, same random numbers)."""
    base = {**FAST, "optimizer": "sgd", "lr": 0.1, "modifiers": [], "dropout": 0.2}
    raced = Introspector(TrainConfig(**base, level_race=[1e-3], race_share=0.3))
    raced.run_cycle = lambda: None  # cycles aside: the race alone differs
    raced.run()
    d = _race(raced)
    assert d["decision"] == "reject" and "the unchanged level won" in d["reason"]
    plain = Introspector(TrainConfig(**base))
    plain.run_cycle = lambda: None
    plain.run()
    assert all(torch.equal(raced.params[k], plain.params[k]) for k in plain.params)


def test_a_level_whose_steps_go_non_finite_scores_infinity_and_is_not_chosen():
    """A level whose training step raises the run's non-finite error scores ``inf`` on both
    splits; the race goes on, every level starts from the same random state, and the run's
    random state is left as it was."""
    from selfmod.errors import NonFiniteError
    from selfmod.introspect.race import race

    run = Introspector(TrainConfig(**FAST, optimizer="sgd", lr=0.05, modifiers=[]))
    seen = []

    def step(state, t, batch):
        seen.append((float(state.hparams["log_lr"][0].exp()), t, torch.rand(()).item()))
        if state.hparams["log_lr"][0].exp() > 1.0:
            raise NonFiniteError("loss", hint="a test")
        return state, 0.0

    def score(state, split):
        return float(state.hparams["log_lr"][0]) if split == "propose" else 0.0

    before = torch.get_rng_state()
    rng = (torch.get_rng_state(), None)
    entries, kept = race(run.state, [None, None], [100.0, 0.5, 0.7], step, score, rng)
    assert torch.equal(torch.get_rng_state(), before)
    assert [(e.factor, e.propose, e.verify) for e in entries] == [  # nearest to x1 first
        (1.0, pytest.approx(math.log(0.05)), 0.0),
        (0.7, pytest.approx(math.log(0.035)), 0.0),
        (0.5, pytest.approx(math.log(0.025)), 0.0),
        (100.0, math.inf, math.inf),
    ]
    assert kept is not None and kept.factor == 1.0  # only the unchanged level's training
    assert kept.losses == [0.0, 0.0]
    firsts = [(lr, draw) for lr, t, draw in seen if t == 0]  # the x1 level trains last
    assert [lr for lr, _ in firsts] == pytest.approx([0.035, 0.025, 5.0, 0.05])
    assert len({draw for _, draw in firsts}) == 1  # each level's first step: the same draw
    assert verdict(entries)[0].factor == 0.5


@pytest.mark.parametrize(
    "losses, read",
    [
        ({1.0: 1.0, 0.3: 2.0, 0.1: 3.0}, [0.3]),  # x1 leads: only the nearest level is read
        ({1.0: 1.0, 0.3: 2.0, 0.1: 1.5}, [0.3, 0.1]),  # the farther one led it
        ({1.0: 2.0, 0.3: 1.0, 0.1: 3.0}, [0.3, 1.0]),  # x1 trails: the verdict needs both
        ({1.0: 1.0, 0.3: 1.0, 0.1: 3.0}, [0.3]),  # a tie keeps x1
    ],
)
def test_the_verifying_split_is_read_only_where_the_verdict_may_need_it(losses, read):
    """Each level's proposing guard loss is read; its verifying one only for a changed level
    that leads the ones trained before it (nearest to x1 first) and for x1 where it does not
    lead. The verdict is the one every split read would give, and the race's counted work
    counts the verifying rows it read."""
    from selfmod.introspect.race import cost, race

    run = Introspector(TrainConfig(**FAST, optimizer="sgd", lr=0.1, modifiers=[]))
    reads = []

    def factor(state):
        return round(float((state.hparams["log_lr"] - run.state.hparams["log_lr"])[0].exp()), 6)

    def score(state, split):
        f = factor(state)
        if split == "verify":
            reads.append(f)
            return losses[f] + 0.5  # the verifying split agrees
        return losses[f]

    rng = (torch.get_rng_state(), None)
    entries, _ = race(run.state, [None], [0.1, 0.3], lambda s, t, b: (s, 0.0), score, rng)
    assert reads == read
    everything = [Entry(e.factor, e.propose, losses[e.factor] + 0.5) for e in entries]
    (won, decision, _), (won_all, decision_all, _) = verdict(entries), verdict(everything)
    assert (won.factor, decision) == (won_all.factor, decision_all)
    assert cost(entries, [(None, torch.zeros(4))], (10, 20), True) == pytest.approx(
        2 * 4 + (3 * 10 + 20 * len(read)) / 3
    )


@pytest.mark.parametrize(
    "entries, want",
    [
        ([Entry(1.0, 1.0, 1.0), Entry(3.0, 0.5, 0.9)], ("commit", 3.0)),
        ([Entry(1.0, 1.0, 1.0), Entry(3.0, 0.5, 1.1)], ("reject", 3.0)),  # verify disagrees
        ([Entry(1.0, 0.4, 1.0), Entry(3.0, 0.5, 0.1)], ("reject", 1.0)),  # x1 wins proposing
        ([Entry(1.0, 0.5, 1.0), Entry(3.0, 0.5, 0.1)], ("reject", 1.0)),  # a tie keeps x1
        ([Entry(1.0, math.inf, math.inf), Entry(0.3, 2.0, 2.0)], ("commit", 0.3)),
    ],
)
def test_the_verdict_needs_the_verifying_split_to_agree(entries, want):
    won, decision, _ = verdict(entries)
    assert (decision, won.factor) == want


def test_bad_race_settings_are_one_line_errors():
    from selfmod.runs.config import validate
    from selfmod.validation import ConfigError

    for bad, field in [
        ({"level_race": [-1.0]}, "level_race"),
        ({"level_race": [2.0] * 9}, "level_race"),
        ({"race_share": 0.0}, "race_share"),
        ({"race_share": 0.6}, "race_share"),
    ]:
        with pytest.raises(ConfigError) as err:
            validate(bad)
        assert str(err.value).startswith(field) and "\n" not in str(err.value)
