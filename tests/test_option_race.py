"""The options of a model's choices raced at the run's start (``modifiers.choice.race``,
:mod:`selfmod.introspect.option_race`): the candidates, a race that commits the clearly better
option and keeps its training as the run's own (the same state as a run that started with it),
its work counted, a bitwise resume after it, and choices too many to race made by gradient."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from events import Events
from torch import nn
from user_models import Abs, abs_task

from selfmod.arch import Choice
from selfmod.data import as_batches
from selfmod.determinism import random_state
from selfmod.errors import NonFiniteError
from selfmod.introspect import option_race, registry
from selfmod.introspect import race as level_race
from selfmod.introspect.budget import FORWARD
from selfmod.introspect.loop import Loop, Source
from selfmod.introspect.modifiers.choice import ChoiceSettings
from selfmod.introspect.option_race import MAX_CANDIDATES, Candidate, candidates, race
from selfmod.introspect.problem import Problem
from selfmod.introspect.state import RunState
from selfmod.runs import fit
from selfmod.runs.api import make_config
from selfmod.runs.ledger import Ledger
from selfmod.runs.recorder import RunRecorder


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def options() -> dict[str, nn.Module]:
    return {"tanh": nn.Tanh(), "abs": Abs(), "sigmoid": nn.Sigmoid()}


def act_model(chosen: int = -1, seed: int = 1) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), Choice(options()), nn.Linear(16, 2))
    model[1].chosen.fill_(chosen)
    return model


STEPS, RACE, BATCH = 200, 0.1, 32
CONFIG = {
    "steps": STEPS, "cycle": 50, "lookahead": 5, "batch_size": BATCH, "guard_size": 300,
    "replay_size": 300, "compare_fixed": False, "optimizer": "adamw", "lr": 1e-2,
    "modifiers": ["choice"], "meta_budget": None, "modifiers.choice.race": RACE,
}  # fmt: skip


def _loop(model: nn.Module, recorder=None, train_rows: int = 1500, **config) -> Loop:
    cfg = make_config({**CONFIG, **config})
    x, y = abs_task()
    torch.manual_seed(0)
    train = (x[500 : 500 + train_rows], y[500 : 500 + train_rows])
    source = Source(as_batches(train, 0), x[:500], y[:500], x[2500:], y[2500:])
    mods = [registry()["choice"].from_config(cfg)]
    return Loop(Problem(model, F.cross_entropy), [source], cfg, modifiers=mods, recorder=recorder)


def test_candidates_are_one_option_everywhere_for_alike_choices_else_the_combinations():
    same, why = candidates([["relu", "gelu"], ["relu", "gelu"]])
    assert same == [("relu", (0, 0)), ("gelu", (1, 1))] and why == ""
    mixed, _ = candidates([["a", "b"], ["c", "d", "e"]])
    assert [n for n, _ in mixed] == ["a+c", "a+d", "a+e", "b+c", "b+d", "b+e"]
    assert mixed[4] == ("b+d", (1, 1))
    many, why = candidates([["a", "b", "c"], ["d", "e", "f"]])
    assert many == [] and "9 combinations" in why and str(MAX_CANDIDATES) in why


@pytest.mark.parametrize(
    ("level_race", "level"), [([], None), ([0.3], "reject"), ([3.0], "commit")]
)
def test_the_race_commits_the_clearly_better_option_and_is_the_run_of_it(level_race, level):
    """``abs`` wins the race before the first cycle, and the run ends bitwise as the one that
    started with ``abs`` committed (same batches, schedule and random numbers): without a level
    race its two rungs' training is the run's own; with one, the level is raced from the start
    with ``abs`` as in that run, and the winner's training kept where the level stays
    (``reject``) or trained again at the new level (``commit``). Both train exactly their
    steps' examples; early stopping's record is the same (the race's states offered at the
    run's log points inside it); the race's work is counted."""
    # early stopping with log points every 10 steps: four inside the race's 40 steps
    set_level = {"level_race": level_race, "race_share": 0.04, "keep_best": True,
                 "log_every": 10, "log_share": 0}  # fmt: skip
    raced = _loop(act_model(), **set_level)
    direct = _loop(act_model(chosen=1), **set_level, **{"modifiers.choice.race": 0})
    for run in (raced, direct):
        run.run_cycle = lambda: None  # the races alone
        run.run()
    (d,) = [d for d in raced.history["decisions"] if d["modifier"] == "choice"]
    assert (d["step"], d["decision"]) == (0, "commit") and d["reason"].startswith("abs won")
    levels = [d["decision"] for d in raced.history["decisions"] if d["modifier"] == "level_race"]
    assert levels == ([level] if level else [])
    assert int(raced.state.buffers["1.chosen"]) == 1
    assert raced.best.step == direct.best.step and raced.best.step > 0
    assert _rows(raced) == _rows(direct)  # the log points inside the race too
    shared = [k for k in direct.params if not k.startswith("1.")]
    assert all(torch.equal(raced.params[k], direct.params[k]) for k in shared)
    assert raced.step == direct.step == STEPS
    assert raced.counters.examples == direct.counters.examples == STEPS * BATCH
    h = round(RACE * STEPS)
    # rung 1: three candidates over h batches, rung 2: two more over h; the winner's 2h kept
    race_work = raced.counters.meta_examples - direct.counters.meta_examples
    assert race_work >= (3 + 2 - 2) * h * BATCH + (2 * h * BATCH if level == "commit" else 0)


def _rows(run: Loop) -> str:
    """The run's log rows, comparable (NaN equals NaN); every log point's step is there (the
    last twice where early stopping returned a state: its row)."""
    steps = [r["step"] for r in run.history["log"]]
    assert sorted(set(steps)) == list(range(run.log_interval, run.step + 1, run.log_interval))
    return json.dumps(run.history["log"], sort_keys=True)


def test_a_level_race_that_keeps_the_level_logs_as_the_run_without_it():
    """The unchanged level's training is the run's own (``x10`` loses): its log rows inside the
    race (steps 10 and 20 of its 20) and early stopping's offers there are those of the run
    with no level race, which logs them as it trains; the runs end bitwise alike."""
    setting = {"race_share": 0.1, "keep_best": True, "log_every": 10, "log_share": 0,
               "lr": 0.1, "modifiers.choice.race": 0}  # fmt: skip
    raced = _loop(act_model(chosen=1), train_rows=64, level_race=[10.0], **setting)
    plain = _loop(act_model(chosen=1), train_rows=64, level_race=[], **setting)
    for run in (raced, plain):
        run.run_cycle = lambda: None
        run.run()
    levels = [d["decision"] for d in raced.history["decisions"] if d["modifier"] == "level_race"]
    assert levels == ["reject"]
    assert _rows(raced) == _rows(plain)
    assert raced.best.step == plain.best.step
    assert all(torch.equal(raced.params[k], plain.params[k]) for k in plain.params)


def test_early_stopping_can_return_a_state_from_inside_the_race():
    """64 training rows at lr 0.1 overfit: the verifying guard metric is best at step 30, inside
    the race's 40 steps. The winner's states were offered at the run's log points there, so
    the raced run returns the same state as the run that started with ``abs``."""
    setting = {"race_share": 0.04, "keep_best": True, "log_every": 10, "log_share": 0, "lr": 0.1}
    raced = _loop(act_model(), train_rows=64, **setting)
    direct = _loop(act_model(chosen=1), train_rows=64, **setting, **{"modifiers.choice.race": 0})
    for run in (raced, direct):
        run.run_cycle = lambda: None
        run.run()
    assert 0 < direct.best.step < 2 * round(RACE * STEPS)  # inside the race
    assert raced.best.step == direct.best.step
    assert all(torch.equal(raced.params[k], direct.params[k]) for k in direct.params)


def test_fit_exports_the_raced_choice_and_learns(tmp_path):
    x, y = abs_task()
    config = {k: v for k, v in CONFIG.items() if k != "modifiers"}
    result = fit(
        act_model(), F.cross_entropy, (x[:2000], y[:2000]), (x[2000:2500], y[2000:2500]),
        test=(x[2500:], y[2500:]), config={**config, "steps": 400, "out": str(tmp_path)},
    )  # fmt: skip
    assert isinstance(result.module[1], Abs)
    assert result.summary["test_metric"] > 0.9
    report = (result.run_dir / "report.html").read_text()
    assert "race, guard metric: abs 0." in report and "tanh 0." in report  # every candidate
    history = json.loads((result.run_dir / "history.json").read_text())
    steps = [row["step"] for row in history["tuned"]["log"]]  # the log points inside the race too
    race_steps = 2 * round(RACE * 400)
    assert steps[0] < race_steps and steps == sorted(set(steps)) and steps[-1] == 400, steps


def _raced(**config) -> tuple[Loop, Events]:
    """A choice model's run of the races alone (no cycle), and its events."""
    events = Events()
    run = _loop(act_model(), events, **config)
    run.run_cycle = lambda: None
    run.run()
    return run, events


@pytest.mark.parametrize("levels", [[], [3.0]])
def test_the_races_work_at_most_is_planned_and_a_meta_budget_shortens_or_skips_them(levels):
    """Uncapped, the races' work is at most what :func:`option_race.planned` and
    :func:`race.planned` foresee (a level race may commit another level, and the run then
    trains the winner's batches again). Under ``meta_budget`` the options' race is shortened
    to fit it (a ledger event), the run's self-modification stays within it, and a budget
    below one step's work leaves the choice open, to the gradient."""
    setting = {"level_race": levels, "race_share": 0.1}
    free, events = _raced(**setting)
    h, rows = round(RACE * STEPS), (len(free.guard("propose")[1]), len(free.guard("verify")[1]))
    reads = ChoiceSettings().race_reads  # the default's guard reads a rung
    most = option_race.planned(h, BATCH, 3, 2, rows, bool(levels), reads)
    most += level_race.planned(round(0.1 * STEPS), BATCH, 1, rows) if levels else 0.0
    assert 0 < free.counters.meta_examples <= most
    assert not events.titled("options' race") and not events.titled("level race")

    share = 0.6 * most / (STEPS * BATCH)  # room for about 60% of the races' length
    capped, events = _raced(**setting, meta_budget=share)
    ((_, why, values),) = events.titled("options' race shortened to")
    assert 0 < values["steps"] < h == values["asked"] and "meta_budget" in why
    assert capped.counters.meta_examples <= share * STEPS * BATCH
    assert int(capped.state.buffers["1.chosen"]) >= 0  # raced, committed
    assert capped.counters.examples == STEPS * BATCH

    tiny, events = _raced(**setting, meta_budget=1e-3)
    assert events.titled("options' race not run")
    assert int(tiny.state.buffers["1.chosen"]) == -1  # open: the cycles' gradient choice
    assert tiny.counters.meta_examples <= 1e-3 * STEPS * BATCH


def test_each_step_of_the_races_is_reported_to_on_race_step():
    """``run(on_race_step=...)`` hears of every step of both races, counted up to their totals:
    ``(3 candidates + 2 finalists) x h`` and ``(1 + 1 level) x h_level``."""
    heard: dict[str, list[tuple[int, int]]] = {}
    run = _loop(act_model(), level_race=[3.0], race_share=0.05)
    run.run_cycle = lambda: None
    run.run(
        on_race_step=lambda r, name, done, total: heard.setdefault(name, []).append((done, total))
    )
    h, h_level = round(RACE * STEPS), round(0.05 * STEPS)
    assert list(heard) == ["options' race", "level race"]
    for name, total in [("options' race", 5 * h), ("level race", 2 * h_level)]:
        assert heard[name] == [(t, total) for t in range(1, total + 1)], name


def test_fits_default_meta_budget_makes_room_for_the_options_race(tmp_path):
    """``fit``'s default ``meta_budget`` (0.3) grows by the options' race's most: its training,
    ``race x (K + race_keep)``, and its guard reads; so the default race runs its length. A
    budget the caller sets is kept, and the race shortened to fit it."""
    x, y = abs_task()
    config = {k: v for k, v in CONFIG.items() if k not in ("modifiers", "meta_budget")}
    data = ((x[:2000], y[:2000]), (x[2000:2500], y[2000:2500]))
    for given in [{}, {"modifiers": None}, {"meta_budget": 0.5}]:  # None: every modifier
        run_config = {**config, **given, "steps": 100, "out": str(tmp_path)}
        result = fit(act_model(), F.cross_entropy, *data, config=run_config)
        budget, kept = result.run.config.meta_budget, "meta_budget" in given
        assert budget == given["meta_budget"] if kept else budget > 0.3 + RACE * (3 + 2)
        events = Ledger(result.run_dir / "ledger.sqlite", create=False).entries("event")
        shortened = [e for e in events if e.decision.startswith("options' race shortened")]
        assert bool(shortened) == kept
        assert int(result.run.state.buffers["1.chosen"]) >= 0  # raced, committed


def test_resume_after_the_race_is_bitwise(tmp_path):
    run = _loop(act_model(), RunRecorder(tmp_path), keep_checkpoints=20)
    run.run()
    at = 50  # the race's 40 steps, then the first cycle's checkpoint
    recorder = RunRecorder(tmp_path)
    back = _loop(act_model(), recorder, keep_checkpoints=20)
    recorder.resume(back, at_most=at)
    assert 0 < back.step <= at and int(back.state.buffers["1.chosen"]) == 1
    back.run()
    races = [d for d in back.history["decisions"] if d["modifier"] == "choice" and not d["step"]]
    assert len(races) <= 1  # not raced again
    assert all(torch.equal(back.params[k], run.params[k]) for k in run.params)
    assert all(torch.equal(back.state.buffers[k], run.state.buffers[k]) for k in run.state.buffers)


def test_choices_with_too_many_combinations_are_made_by_gradient():
    torch.manual_seed(1)
    pair = {"tanh": nn.Tanh(), "abs": Abs(), "sigmoid": nn.Sigmoid()}
    other = {"relu": nn.ReLU(), "gelu": nn.GELU(), "elu": nn.ELU()}
    model = nn.Sequential(nn.Linear(8, 16), Choice(pair), nn.Linear(16, 16), Choice(other),
                          nn.Linear(16, 2))  # fmt: skip
    run = _loop(model, steps=150)
    run.run()
    choices = [d for d in run.history["decisions"] if d["modifier"] == "choice"]
    assert choices and not any("rung" in d["reason"] for d in choices)  # the cycles', no race
    assert run.counters.examples == 150 * BATCH


def _race_of(names, score, batches: int, rows=None, reads: int = 1, diverges=()):
    """A race of stub candidates ``names`` over ``batches`` batches: each one's guard ``(loss,
    accuracy)`` is ``score(name, steps it has trained, split)``; those in ``diverges`` raise at
    their first step. Returns ``race``'s result and the steps each candidate trained."""
    steps: dict[str, list[int]] = {n: [] for n in names}

    def commit(state, picks):
        return replace(state, buffers={"who": torch.tensor(picks["x"])})

    def step(state, t, batch):
        who = names[int(state.buffers["who"])]
        if who in diverges:
            raise NonFiniteError("inner loss", t, "")
        steps[who].append(t)
        return state, 0.0

    def evaluate(state, split):
        who = names[int(state.buffers["who"])]
        return score(who, len(steps[who]), split)

    start = RunState({"w": torch.zeros(1)}, {"who": torch.tensor(-1)}, (), {}, 1, {}, 0.5)
    cands = [Candidate(n, {"x": i}) for i, n in enumerate(names)]
    cpu = torch.device("cpu")
    got = race(
        start, cands, commit, list(range(batches)), 2, step, evaluate, "accuracy",
        random_state(cpu), cpu, rows=rows, reads=reads,
    )  # fmt: skip
    return got, steps


def _stub_race(scores: dict[str, list[tuple[float, float]]], rows: tuple[int, int]):
    """:func:`_race_of` over four batches (rungs of two), each candidate's guard ``(loss,
    accuracy)`` given by ``scores``: after rung 1 and rung 2 on the proposing split, then on the
    verifying split (no scores: it diverges)."""

    def score(who, trained, split):
        return scores[who][2] if split == "verify" else scores[who][trained // 2 - 1]

    diverges = {n for n, s in scores.items() if not s}
    return _race_of(list(scores), score, 4, rows, diverges=diverges)


def test_rungs_rank_by_accuracy_then_loss_and_the_winner_reads_both_splits():
    """A stub race: rung 1 keeps the two best by guard accuracy (a tie broken by the lower
    loss; a diverged candidate out), rung 2 continues them over the second half of the
    batches, and the finalist best on both splits wins even where the proposing split alone
    prefers the other; the verdict gives its margin in guard rows."""
    (entries, won, i, (decision, why)), steps = _stub_race(
        {
            "a": [(0.5, 0.9), (0.4, 0.95), (0.2, 0.80)],
            "b": [(0.3, 0.9), (0.3, 0.93), (0.2, 0.95)],
            "c": [(0.1, 0.8)],  # lowest loss, lower accuracy: out
            "d": [],  # diverges
        },
        rows=(20, 40),
    )
    assert [len(e.propose) for e in entries] == [2, 2, 1, 1]
    assert steps == {"a": [0, 1, 2, 3], "b": [0, 1, 2, 3], "c": [0, 1], "d": []}
    assert math.isinf(entries[3].propose[0][0]) and entries[2].verify is None
    assert decision == "commit" and entries[i].name == "b" and "a led on the proposing split" in why
    assert "by 6 of 60 rows over a" in why  # 0.93 x 20 + 0.95 x 40 against 0.95 x 20 + 0.8 x 40
    assert won is not None and won.losses == [0.0] * 4


def test_a_finalist_level_on_guard_accuracy_wins_by_the_lower_loss_and_says_so():
    (entries, _, i, (decision, why)), _ = _stub_race(
        {"a": [(0.5, 0.9), (0.4, 0.95), (0.3, 0.9)], "b": [(0.3, 0.9), (0.3, 0.95), (0.2, 0.9)]},
        rows=(20, 20),
    )
    assert decision == "commit" and entries[i].name == "b"
    assert "b won on the whole guard set, level with a on 40 rows, by the lower guard loss" in why


def test_a_rung_read_several_times_is_scored_by_the_mean_of_its_reads():
    """Two candidates whose guard accuracy swings: read at each rung's end alone, a wins; read
    twice a rung (at three quarters of it and at its end), b's steadier figures win, and the
    verdict says its figures are means."""
    curves = {  # after steps 1-8; rung 1 is steps 1-4, rung 2 steps 5-8
        "a": [0.0, 0.0, 0.9, 0.5, 0.0, 0.0, 0.5, 0.9],
        "b": [0.0, 0.0, 0.6, 0.6, 0.0, 0.0, 0.8, 0.8],
    }
    won = {}
    for reads in (1, 2):
        (entries, _, i, (_, why)), _ = _race_of(
            list(curves), lambda who, trained, split: (1.0, curves[who][trained - 1]), 8,
            reads=reads,
        )  # fmt: skip
        won[reads] = entries[i].name
        assert ("each the mean of 2 reads" in why) == (reads == 2)  # the ledger says so
        if reads == 2:
            assert [e.propose for e in entries] == [
                [(1.0, 0.7), (1.0, 0.7)],
                [(1.0, 0.6), (1.0, 0.8)],
            ]
            assert [e.verify for e in entries] == [(1.0, 0.7), (1.0, 0.8)]
    assert won == {1: "a", 2: "b"}


@pytest.mark.parametrize(("batches", "reads"), [(4, 3), (6, 3), (16, 3), (16, 1)])
def test_the_race_is_charged_the_guard_reads_it_made(batches, reads):
    """:func:`option_race.cost` charges every candidate's training but the adopted winner's and
    each guard read the race made, also where a rung is too short to hold ``reads`` reads apart
    (rungs of two and three steps)."""
    made = {"propose": 0, "verify": 0}

    def score(who, trained, split):
        made[split] += 1
        return 1.0, {"a": 0.9, "b": 0.8, "c": 0.7}[who]

    (entries, won, _, _), _ = _race_of(["a", "b", "c"], score, batches, reads=reads)
    rows, size, h = (20, 40), 8, batches // 2
    trained = (3 + 2 - 2) * h * size  # three over rung 1, two over rung 2, less the run's own
    expected = trained + FORWARD * (rows[0] * made["propose"] + rows[1] * made["verify"])
    charged = option_race.cost(entries, [(None, [0] * size)] * batches, rows, True, reads)
    assert won is not None and charged == pytest.approx(expected)
