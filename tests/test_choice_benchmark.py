"""``benchmarks/choice.py``'s pooled verdict: saved runs taken together, the choice against the
best fixed option with an interval from resampling the seeds, and the hand-written reading
kept when the tables are written again (synthetic rows, nothing trained); and its runner, on two
runs of a few steps."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # importable by name in its worker processes
    yield importlib.import_module("choice")
    sys.path.remove(str(ROOT / "benchmarks"))
    del sys.modules["choice"]


def _rows(bench, seeds, test_of):
    """Full runs of the ``block`` workload: ``test_of(option, seed)`` its test accuracy (the
    validation accuracy the same, so a pick by validation picks the best on test)."""
    options = (*bench.WORKLOADS["block"][2], "choice")
    return [
        {"workload": "block", "option": o, "seed": s, "share": 1.0, "test": test_of(o, s),
         "val": test_of(o, s), "val_loss": 0.1, "cpu": 1.0, "wall": 1.0, "examples": 10,
         "meta_examples": 0.0, "pick": "skip" if o == "choice" else o}
        for s in seeds for o in options
    ]  # fmt: skip


def test_a_choice_of_the_best_option_on_every_seed_is_at_least_the_best_in_every_resample(bench):
    # skip is best on every seed by 2 points: the best option of every resample is skip
    test = {"mlp2": 0.95, "linear": 0.96, "skip": 0.98, "choice": 0.98}
    lines, summary = bench.pooled(_rows(bench, range(6), lambda o, s: test[o] + 0.001 * s))
    c = summary["block"]["choice"]
    assert c["gap"] == pytest.approx(0.0, abs=1e-7) and c["share_at_least"] == 1.0
    assert summary["block"]["by_val"]["share_at_least"] == 1.0
    assert any(line.startswith("| block | 6 |") for line in lines)


def test_a_choice_under_the_best_on_every_seed_has_an_interval_below_zero(bench):
    test = {"mlp2": 0.95, "linear": 0.96, "skip": 0.98, "choice": 0.96}
    _, summary = bench.pooled(_rows(bench, range(6), lambda o, s: test[o] + 0.01 * (s % 3)))
    c = summary["block"]["choice"]
    assert c["gap"] == pytest.approx(-0.02, abs=1e-6)
    assert c["interval"][1] < 0 and c["share_at_least"] == 0.0


def test_the_interval_counts_the_luck_of_which_option_looks_best(bench):
    # two options equal in truth, each best on half the seeds: the best mean over all seeds
    # beats both options' per-seed average, and a choice of one of them is under it, yet a
    # resample often finds the chosen option best
    def test_of(o, s):
        return {"mlp2": 0.96 + 0.02 * (s % 2), "linear": 0.98 - 0.02 * (s % 2) + 1e-4,
                "skip": 0.90, "choice": 0.96 + 0.02 * (s % 2)}[o]  # fmt: skip

    _, summary = bench.pooled(_rows(bench, range(8), test_of))
    c = summary["block"]["choice"]
    assert c["gap"] < 0 and c["interval"][0] < c["gap"] < c["interval"][1]
    assert 0.05 < c["share_at_least"] < 0.95


def test_pooling_refuses_a_seed_in_two_runs_and_keeps_the_hand_written_reading(bench, tmp_path):
    def saved(name, seeds, draw=False):
        path = tmp_path / f"{name}.json"
        rows = [{**r, "draw": draw} for r in _rows(bench, seeds, lambda o, s: 0.97)]
        payload = {"command": f"python benchmarks/choice.py --seeds {seeds[0]}", "split": 0,
                   "draw": draw, "seeds": list(seeds), "settings": {}, "seconds": 1.0,
                   "runs": rows}  # fmt: skip
        path.write_text(json.dumps(payload))
        return path

    a, b, again, drawn = (
        saved("a", [0, 1]),
        saved("b", [2, 3]),
        saved("c", [1, 4]),
        saved("d", [5, 6], draw=True),
    )
    with pytest.raises(SystemExit, match="--pool: a seed is in two runs"):
        bench.main(["--pool", str(a), str(again), "--out", str(tmp_path / "x")])
    # runs on the fixed partition and on partitions drawn per seed measure different things
    with pytest.raises(SystemExit, match="--pool: the runs differ in draw"):
        bench.main(["--pool", str(a), str(drawn), "--out", str(tmp_path / "x")])
    out = tmp_path / "pooled"
    reading = "\n## Reading (added by hand)\n\nBy hand.\n"
    out.with_suffix(".md").write_text("# old tables\n" + reading)
    bench.main(["--pool", str(a), str(b), "--out", str(out)])
    text = out.with_suffix(".md").read_text()
    assert "# old tables" not in text and text.endswith(reading)
    assert "--seeds 0" in text and "--seeds 2" in text and "| block | 4 |" in text
    assert json.loads(out.with_suffix(".json").read_text())["seeds"] == [0, 1, 2, 3]
    assert "validation accuracy (mean)" in text and "drawn with the seed" not in text


def test_runs_come_back_in_the_jobs_order_with_progress_on_stderr(bench, capfd):
    jobs = [("block", o, 0, 1, False, {}, 0.01) for o in ("linear", "skip")]  # a few steps each
    rows = bench.run_all(jobs, 2)
    assert [(r["option"], r["share"]) for r in rows] == [("linear", 0.01), ("skip", 0.01)]
    err = capfd.readouterr().err  # not a terminal: a line per finished run
    assert "2/2" in err and "block linear seed 0" in err and "block skip seed 0" in err
