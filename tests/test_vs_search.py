"""The vs-search harness end to end on a tiny budget, the way it picks and counts, and the
safeguards switch it compares."""

import json
import math
import subprocess
import sys

import cycles
import pytest
import torch
from faults import FaultyIntrospector
from test_introspect import FAST  # the tiny Introspector run shared with its tests

from selfmod.bench import contenders as C
from selfmod.bench.vs_search import load_budget, run_benchmark, verdict
from selfmod.errors import NonFiniteError
from selfmod.introspect import Introspector, Proposal
from selfmod.runs.config import TrainConfig
from selfmod.validation import ConfigError


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _trial(val, test, steps=10, seconds=1.0, diverged=False, pruned=False):
    return C.Trial(C.DEFAULT, val, test, steps, seconds, diverged, pruned)


def test_fold_hands_over_the_best_by_validation_never_by_test_or_a_pruned_trial():
    trials = [
        _trial(0.5, 0.9),  # best test accuracy, but not the best on validation
        _trial(0.9, 0.6, pruned=True),  # best validation, but stopped early
        _trial(0.7, 0.7, steps=4, diverged=True),
        _trial(0.6, 0.5),
    ]
    out = C.fold("s", trials)
    assert (out.val_acc, out.test_acc) == (0.7, 0.7)
    assert (out.trials, out.steps, out.seconds, out.diverged) == (4, 34, 4.0, 1)
    assert [a for _, _, a in out.curve] == [0.9, 0.9, 0.7, 0.7]
    assert out.seconds_to(0.7) == 1.0 and out.seconds_to(0.95) == math.inf
    short = C.fold("s", trials[:2])  # a prefix is the shorter search
    assert (short.test_acc, short.steps, short.curve) == (0.9, 20, out.curve[:2])


def test_grid_and_random_points_stay_inside_the_search_space():
    import random

    for model in ("mlp", "cnn"):
        space = C.space(model)
        grid = C.grid_points(model)
        points = grid + [C.sample_point(random.Random(s), space) for s in range(50)]
        assert len(grid) == 24 and len(set(grid)) == 24
        for p in points:
            assert len(p.lr) == C.DEPTH + 1
            assert all(space["lr"][0] <= v <= space["lr"][1] for v in p.lr)
            for k in ("weight_decay", "momentum", "dropout", "width"):
                lo, hi = space[k]
                assert lo <= getattr(p, k) <= hi, (model, k, p)
    assert C.space("cnn")["width"] != C.SPACE["width"]


def test_without_safeguards_a_nan_ends_the_run_and_a_harmful_change_commits():
    cfg = TrainConfig(**{**FAST, "safeguards": False})
    with pytest.raises(NonFiniteError):
        FaultyIntrospector(cfg, loss={7}).run()
    guarded = FaultyIntrospector(TrainConfig(**FAST), loss={7})
    guarded.run()  # the same fault is rolled back and the run finishes
    assert guarded.step == FAST["steps"]
    assert [d["decision"] for d in guarded.history["decisions"]].count("rollback") == 1

    run = Introspector(TrainConfig(**{**FAST, "lr": 0.1, "steps": 100, "safeguards": False}))
    run.run()
    current, _ = cycles.estimate(run)
    harmful = run.hparams["log_lr"] + math.log(100.0)
    run.verify_and_decide(Proposal("lr", {"log_lr": harmful}, strict=True), current)
    assert run.history["decisions"][-1]["decision"] == "commit"
    assert torch.allclose(run.hparams["log_lr"], harmful)


def test_initial_learning_rates_per_tensor():
    cfg = TrainConfig(**FAST)  # 8 tensors: the factorable layer's left and right too
    lrs = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    run = Introspector(cfg, lrs=lrs)
    assert torch.allclose(run.hparams["log_lr"].exp(), torch.tensor(lrs))
    with pytest.raises(ValueError, match="lrs needs one rate per tensor"):
        Introspector(cfg, lrs=[0.1])


def test_harness_end_to_end_on_a_tiny_budget(tmp_path):
    budget = load_budget(
        [
            "seeds=[0, 1]",
            "steps=40",
            "tpe_trials=[2, 3]",
            "random_trials=2",
            "grid_points=2",
            "large_lr=10",
            "guard_size=200",
            f"out='{tmp_path}'",
        ]
    )
    ticks = []
    text = run_benchmark(budget, "test", lambda d, t, n: ticks.append((d, t)))
    assert ticks[-1][0] == ticks[-1][1] == 2 * 11
    names = [
        "fixed default", "grid search (2)", "random search (2)", "optuna tpe (2)",
        "optuna tpe (3)", "sgd-hd", "adam-hd", "stack", "selfmod introspective",
        "selfmod introspective (no safeguards)",
    ]  # fmt: skip
    for name in names:
        assert f"| {name} |" in text
    raw = json.loads((tmp_path / "vs_search.json").read_text())
    assert (tmp_path / "vs_search.png").stat().st_size > 10_000
    rows = {r["name"]: r for r in raw["summary"]["rows"]}
    assert rows["optuna tpe (3)"]["trials"] == [3, 3]
    for seed in range(2):  # the 3-trial study extends the 2-trial one
        assert rows["optuna tpe (3)"]["steps"][seed] >= rows["optuna tpe (2)"]["steps"][seed]
        assert rows["optuna tpe (3)"]["seconds"][seed] > rows["optuna tpe (2)"]["seconds"][seed]
        assert rows["grid search (2)"]["steps"][seed] == 80
        assert rows["selfmod introspective"]["steps"][seed] == 40
    for r in raw["summary"]["rows"]:
        assert all(0.0 <= a <= 1.0 for a in r["test_acc"]), r
    # lr = 10: the unguarded run diverges on every seed, the guarded one rolls back instead
    large = {r["name"]: r for r in raw["summary"]["large_lr"]}
    assert large["selfmod introspective (no safeguards)"]["diverged"] == [1, 1]
    assert large["selfmod introspective"]["diverged"] == [0, 0]
    assert min(large["selfmod introspective"]["rollbacks"]) >= 1
    lines = verdict(raw["summary"], 2)
    assert lines[1].startswith("Target 2 (met)")
    assert all(line in text for line in lines)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("steps=5", "steps must be an integer in [20, 100000] (got 5)"),
        ("seeds=[]", "seeds must be a list of 1 to 100 integers"),
        ("tpe_trials=[0]", "tpe_trials must be a list of 1 to 5 integers in [1, 500]"),
        ("grid_points=25", "grid_points must be an integer in [1, 24] (got 25)"),
        ("large_lr=0", "large_lr must be a number in (0, 100] (got 0)"),
        ("model=rnn", "model must be one of 'mlp', 'cnn' (got 'rnn')"),
        ("magic=1", "unknown config field 'magic'"),
    ],
)
def test_bad_budget_is_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_budget([override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_bad_budget_exits_2_with_one_line():
    r = subprocess.run(
        [sys.executable, "-m", "selfmod.cli", "bench", "vs-search", "--set", "steps=5"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == "error: steps must be an integer in [20, 100000] (got 5)"


def test_harness_runs_the_cnn_workload(tmp_path):
    overrides = ["model=cnn", "seeds=[3]", "steps=40", "tpe_trials=[2]", "random_trials=1"]
    budget = load_budget([*overrides, "grid_points=1", "guard_size=200", f"out='{tmp_path}'"])
    text = run_benchmark(budget, "test")
    assert "1-D CNN" in text and "width [8, 64]" in text
    raw = json.loads((tmp_path / "vs_search_cnn.json").read_text())
    assert not (tmp_path / "vs_search.json").exists()
    (seed,) = raw["seeds"]
    me = next(o for o in seed["main"] if o["name"] == "selfmod introspective")
    assert me["steps"] == 40 and len(me["best"]["widths"]) == 2
    grid = next(o for o in seed["main"] if o["name"] == "grid search (1)")
    assert grid["best"]["width"] == C.GRID_WIDTHS["cnn"][0]
