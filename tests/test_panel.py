"""The development panel's machinery on a tiny budget: runs in child processes, the seven
criteria of its rule, merging a later invocation's ``fit`` setting into the same table."""

import json
import math

import pytest

from selfmod.bench import panel
from selfmod.bench.training import make_workload


def test_tiny_panel_writes_every_criterion_and_merges_a_second_fit_setting(tmp_path):
    out = tmp_path / "panel.json"
    base = ["--workloads", "diabetes", "--seeds", "10", "--steps", "0.05", "--jobs", "2",
            "--out", str(out)]  # fmt: skip
    logged: list[str] = []
    panel.run_panel([*base, "--contenders", "adamw-1e-3", "fit", "--tag", "before"], logged.append)
    assert any("diabetes fit:before seed 10: test" in line for line in logged)
    panel.run_panel(
        [*base, "--contenders", "fit", "--fit-set", "lr=0.003", "--tag", "lr3"], logged.append
    )
    record = json.loads(out.read_text())
    runs = record["runs"]
    assert sorted((r["contender"], r["tag"]) for r in runs) == [
        ("adamw-1e-3", ""), ("fit", "before"), ("fit", "lr3")
    ]  # fmt: skip
    assert next(r for r in runs if r["tag"] == "lr3")["fit_set"] == {"lr": 0.003}
    steps = make_workload("diabetes", 0.05).steps
    for r in runs:
        assert r["seconds"] > 0 and r["cpu_s"] > 0 and r["peak_mb"] >= 0 and r["test"] > 0
        assert (
            r["examples"] >= steps * 32 if r["contender"] == "fit" else r["examples"] == steps * 32
        )
    w = record["workloads"]["diabetes"]
    assert list(w["rows"]) == ["adamw-1e-3", "fit:before", "fit:lr3"]
    assert set(w["verdicts"]) == {"fit:before", "fit:lr3"}
    for v in w["verdicts"].values():
        assert set(v) == {*panel.CRITERIA, "passed"}
        assert v["beats prodigy"][0] is False and v["beats prodigy"][1] is None  # not run
        assert not v["passed"]
    assert record["chosen"] in ("fit:before", "fit:lr3")
    text = (tmp_path / "panel.md").read_text()
    assert text == panel.markdown(record)
    for crit in panel.CRITERIA:
        assert crit in text
    assert "| fit:before | " in text and "| fit:lr3 | " in text and "## diabetes" in text
    assert text.count("`--workloads diabetes") == 2  # both invocations listed
    assert "Chosen by the rule:" in text and (" met" in text and " miss" in text)


def _rows(**tests):
    base = {"seconds": 1.0, "cpu_s": 1.0, "peak_mb": 10.0, "examples": 100}
    return {k: {**base, "test": t} for k, t in tests.items()}


def test_criteria_read_direction_tolerance_and_cost_ratios():
    work = make_workload("diabetes", 0.05)  # lower MSE is better, tolerance 0.02
    rows = _rows(**{"adamw-1e-3": 0.50, "adamw-sweep": 0.40, "prodigy": 0.45,
                    "schedulefree-adamw": 0.41, "fit": 0.415})  # fmt: skip
    rows["fit"].update(cpu_s=1.29, examples=131, peak_mb=20.0)
    v = panel.criteria(work, rows, "fit")
    assert v["beats adamw-1e-3"] == [True, pytest.approx(0.085)]
    assert v["beats prodigy"][0] and not v["beats schedulefree"][0]
    assert v["within tol. of sweep"] == [True, pytest.approx(-0.015)]  # worse, within 0.02
    assert v["time <= 1.3x"][0] and not v["examples <= 1.3x"][0] and v["memory <= 2x"][0]
    assert not v["passed"]
    rows["fit"].update(test=0.39, examples=130)
    assert panel.criteria(work, rows, "fit")["passed"]
    rows["adamw-1e-3"]["peak_mb"] = 0.1  # tiny peaks: floored at 1 MB
    assert panel.criteria(work, rows, "fit")["memory <= 2x"] == [False, pytest.approx(20.0)]
    del rows["prodigy"]
    missing = panel.criteria(work, rows, "fit")["beats prodigy"]
    assert missing[0] is False and math.isnan(missing[1])


def test_rule_chooses_most_workloads_passed_then_criteria_then_the_defaults():
    def verdicts(n_met: int) -> dict:
        v = {c: [i < n_met, 0.0] for i, c in enumerate(panel.CRITERIA)}
        return {**v, "passed": n_met == len(panel.CRITERIA)}

    summary = {
        "a": {"verdicts": {"fit:before": verdicts(7), "fit:x": verdicts(6)}},
        "b": {"verdicts": {"fit:before": verdicts(3), "fit:x": verdicts(7)}},
    }
    assert panel.choose(summary) == "fit:x"  # one workload passed each; 13 criteria met to 10
    summary["b"]["verdicts"]["fit:x"] = verdicts(4)
    assert panel.choose(summary) == "fit:before"  # 1 workload passed to 0
    summary["a"]["verdicts"]["fit:x"] = verdicts(7)
    summary["b"]["verdicts"]["fit:x"] = verdicts(3)
    assert panel.choose(summary) == "fit:before"  # a tie: the defaults
    assert panel.choose(summary, {"fit:before"}) == "fit:x"  # rule 7: a reference is no candidate


def test_references_are_the_settings_that_do_not_change_themselves():
    """Rule 7: a ``fit`` setting with no modifier and no race is a reference; fit_set is read
    over the defaults it ran with (runs recorded before them ran with every modifier on)."""
    now = {"modifiers": [], "level_race": [0.1, 0.3]}
    runs = [
        {"contender": "fit", "tag": "old", "fit_set": {"lr": 0.01}},
        {"contender": "fit", "tag": "old-fixed", "fit_set": {"modifiers": []}},
        {"contender": "fit", "tag": "raced", "fit_set": {}, "fit_defaults": now},
        {"contender": "fit", "tag": "fixed", "fit_set": {"level_race": []}, "fit_defaults": now},
        {"contender": "prodigy", "tag": "", "fit_set": {}},
    ]
    assert panel.references(runs) == {"fit:old-fixed", "fit:fixed"}


def test_published_split_and_a_different_protocol_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="published split"):
        panel.run_panel(["--split", "0", "--out", str(tmp_path / "p.json")])
    (tmp_path / "p.json").write_text(json.dumps({"protocol": {"split": 2, "steps": 1.0}}))
    with pytest.raises(SystemExit, match="pass another --out"):
        panel.run_panel(["--out", str(tmp_path / "p.json")])


def test_repeats_give_the_median_times_and_the_first_repeats_metrics():
    """Rule 8: a seed's repeated runs count once, at the medians of their times and peaks; a
    sweep's points still add up; the specs spread the repeats in rounds."""
    work = make_workload("diabetes", 0.05)

    def run(contender, cpu, repeat=0, lr=None, test=0.5):
        return {"contender": contender, "tag": "", "seed": 10, "lr": lr, "repeat": repeat,
                "val": test, "test": test, "seconds": cpu, "cpu_s": cpu, "peak_mb": cpu,
                "examples": 100}  # fmt: skip

    runs = [run("adamw-1e-3", c, i, test=0.5 + i) for i, c in enumerate((3.0, 1.0, 2.0, 9.0))]
    runs += [run("adamw-sweep", 1.0, lr=lr, test=lr) for lr in (0.1, 0.2)]
    rows = panel.summarize(work, runs)["rows"]
    assert rows["adamw-1e-3"]["cpu_s"] == 2.5 and rows["adamw-1e-3"]["peak_mb"] == 2.5
    assert rows["adamw-1e-3"]["test"] == 0.5  # the first repeat's
    assert rows["adamw-sweep"]["cpu_s"] == 2.0 and rows["adamw-sweep"]["test"] == 0.1

    args = panel.parser().parse_args(
        ["--workloads", "diabetes", "cancer", "--contenders", "prodigy", "fit", "--repeat", "3"]
    )
    specs = panel.jobs_of(args, {})
    assert [s["repeat"] for s in specs] == [0] * 12 + [1] * 6 + [2] * 6
    assert {s["contender"] for s in specs if s["repeat"]} == {"fit"}
    with pytest.raises(SystemExit, match="--repeat takes a count >= 1"):
        panel.run_panel(["--repeat", "0"])
