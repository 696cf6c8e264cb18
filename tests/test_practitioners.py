"""The practitioners benchmark end to end on a tiny budget (every contender, one seed), the
schema of its JSON, its command line's errors, the byte-level LM's split by file and the bits
per byte it reports."""

import importlib.util
import json
import math
import random
import subprocess
import sys

import pytest
import torch

from selfmod.bench import practitioners as P
from selfmod.bench import workloads as W
from selfmod.validation import ConfigError

needs_bench = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("schedulefree", "prodigyopt", "dadaptation")),
    reason="the bench extra is not installed",
)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _check_schema(raw: dict, workloads: list[str], contenders: list[str]) -> None:
    assert set(raw) == {"workloads"} and list(raw["workloads"]) == workloads
    for name, entry in raw["workloads"].items():
        assert set(entry) == {"metric", "higher_is_better", "tolerance", "contenders"}
        acc = entry["metric"] == "test_accuracy"
        assert entry["metric"] in ("test_accuracy", "bits_per_byte")
        assert entry["higher_is_better"] is acc
        assert entry["tolerance"] == (0.005 if acc else 0.02)
        assert list(entry["contenders"]) == contenders, name
        for c in entry["contenders"].values():
            assert set(c) == {"median", "min", "max", "wall_s", "steps"}
            assert c["min"] <= c["median"] <= c["max"]
            assert c["wall_s"] > 0 and isinstance(c["steps"], int) and c["steps"] > 0
            if acc:
                assert 0.0 <= c["min"] <= c["max"] <= 1.0
            else:
                assert 0.0 < c["min"] <= c["max"] < 12.0


@needs_bench
def test_every_contender_end_to_end_on_a_tiny_budget(tmp_path):
    budget = P.load_budget(
        ["workload=[cancer, pylm]", "seeds=[0]", "steps=0.1", "tpe_trials=3", "grid_points=2",
         "pbt=off", f"out='{tmp_path}'"]
    )  # fmt: skip
    ticks = []
    text = P.run_benchmark(budget, "test", lambda d, t, n: ticks.append((d, t, n)))
    contenders = [c for c in P.CONTENDERS if c != "pbt"]
    assert ticks[-1][:2] == (14, 14)
    raw = json.loads((tmp_path / "practitioners.json").read_text())
    _check_schema(raw, ["cancer", "pylm"], contenders)
    cancer, n = raw["workloads"]["cancer"]["contenders"], P.make_workload("cancer", 0.1).steps
    assert cancer["adamw-grid"]["steps"] == 3 * n  # 2 grid points + 1 final run
    assert cancer["selfmod"]["steps"] == cancer["prodigy"]["steps"] == n
    assert cancer["selfmod-hd"]["steps"] == n
    assert 3 * n <= cancer["tpe-50"]["steps"] <= 4 * n
    pylm = P.make_workload("pylm", 0.1).steps
    assert raw["workloads"]["pylm"]["contenders"]["selfmod"]["steps"] == pylm
    assert (tmp_path / "practitioners.png").stat().st_size > 10_000
    assert "## pylm" in text and "| selfmod (one run) |" in text
    assert "x a plain run's examples" in text  # selfmod's batch-size changes, disclosed
    assert (
        "| selfmod AdamWHD (one run) | " in text
        and "lr 0.01 at start, cool-down 0.2; final" in text
    )
    assert "Target, selfmod (one run): " in text and "Target, selfmod AdamWHD (one run): " in text
    runs = json.loads((tmp_path / "practitioners_runs.json").read_text())
    assert runs["runs"]["cancer"]["adamw-grid"]["chosen"]["lr"] in P.GRID_LR


def test_self_tuning_optimizer_run_is_the_plain_loop_with_its_learned_rates():
    """selfmod-hd trains in the contenders' own loop; its extras are what the optimizer learned,
    and the run is the same as one built by hand from ``AdamWHD``."""
    from selfmod.optim import AdamWHD

    work = P.make_workload("cancer", 0.25)
    run = P.fit_selfmod_hd(work, 3)
    seen = {}

    def keep(opt):
        seen["rates"] = [r for group in opt.rates() for r in group]
        return {}

    cool = lambda t: min(1.0, (work.steps - t) / (0.2 * work.steps))  # noqa: E731
    again = P.train(work, 3, lambda ps: AdamWHD(ps, lr=1e-2), factor=cool, inspect=keep)
    assert run.steps == work.steps and run.test == again.test and run.val == again.val
    assert run.extra["rates"] == [float(f"{r:.3g}") for r in seen["rates"]]
    assert len(run.extra["rates"]) == len(list(work.model().parameters()))
    assert run.extra["skipped"] == 0 and any(r != 0.01 for r in run.extra["rates"])
    plain = P.fit_selfmod_hd(work, 3, cooldown=0.0)
    assert plain.extra["rates"] != run.extra["rates"]  # the cool-down changed the trajectory
    assert [P.linear_cooldown(t, 100, 0.2) for t in (0, 79, 80, 90, 99)] == pytest.approx(
        [1.0, 1.0, 1.0, 0.5, 0.05]
    )


def test_selfmod_run_reports_the_training_examples_it_drew(drawn_batches):
    drawn = drawn_batches
    work = P.make_workload("cancer", 0.5)  # 100 steps, batch 32
    run = P.fit_selfmod(work, 0, {**P.SELFMOD_CONFIG, "cycle": 20})
    assert run.extra["examples"] == sum(drawn) > 0
    assert run.extra["examples"] >= run.steps * min(drawn)
    assert run.extra["batch_size"] == drawn[-1]


@pytest.mark.slow
@pytest.mark.skipif(not P.ray_available(), reason="ray is not installed (selfmod[pbt])")
def test_pbt_with_ray_end_to_end():
    from selfmod.bench.pbt import pbt_search, replay

    budget = P.load_budget(["pbt_members=2", "steps=0.1", "split=1"])  # Ray's workers too
    work = P.make_workload("cancer", budget.steps, budget.split)
    chosen, seconds, steps = pbt_search(work, budget)
    schedule = chosen["schedule"]
    assert steps == 2 * work.steps and seconds > 0
    starts = [s for s, _, _ in schedule]  # a new segment where a member was perturbed
    assert starts[0] == 0 and starts == sorted(set(starts)) and starts[-1] < work.steps
    assert all(P.LR_RANGE[0] / 2 <= lr <= 2 * P.LR_RANGE[1] for _, lr, _ in schedule)
    run = replay(work, 0, schedule)
    assert run.steps == work.steps and 0.0 <= run.test <= 1.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("workload=imagenet", "workload must be a list of distinct names from 'mnist1d'"),
        ("seeds=[]", "seeds must be a list of 1 to 100 integers"),
        ("tpe_trials=0", "tpe_trials must be an integer in [1, 500] (got 0)"),
        ("pbt=maybe", "pbt must be one of 'auto', 'on', 'off' (got 'maybe')"),
        ("magic=1", "unknown config field 'magic'"),
        ("split=-1", "split must be an integer in [0, 2147483647] (got -1)"),
    ],
)
def test_bad_budget_is_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        P.load_budget([override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_workload_is_one_name_or_a_comma_separated_list_like_every_list_field():
    assert P.load_budget(["workload=pylm"]).workload == ["pylm"]
    assert P.load_budget(["workload=mnist1d,pylm"]).workload == ["mnist1d", "pylm"]
    assert P.load_budget(["seeds=3,4"]).seeds == [3, 4]


def test_cli_bad_set_exits_2_with_one_line():
    r = subprocess.run(
        [sys.executable, "-m", "selfmod.cli", "bench", "practitioners", "--set", "seeds=[-1]"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: seeds must be a list of 1 to 100 integers")
    assert len(r.stderr.strip().splitlines()) == 1


def test_lm_split_is_by_file_and_deterministic():
    files = W.stdlib_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert all("site-packages" not in f.parts for f in files)
    shuffled = files[:]
    random.Random(1).shuffle(shuffled)
    train, val, test = W.split_files(files)
    assert W.split_files(shuffled) == (train, val, test)  # the input order does not matter
    assert len(set(train) | set(val) | set(test)) == len(files)
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    assert len(val) == len(test) == round(0.1 * len(files))
    assert W.split_files(files, seed=1) != (train, val, test)
    # windows come from their files only, the same ones every time
    x, y = W.windows(test[:3], 8, 16, seed=5)
    text = b"".join(p.read_bytes() for p in test[:3])
    assert torch.equal(x, W.windows(test[:3], 8, 16, seed=5)[0])
    for row_x, row_y in zip(x, y, strict=True):
        assert bytes(row_x.tolist()) + bytes(row_y[-1:].tolist()) in text
        assert torch.equal(row_x[1:], row_y[:-1])


def test_bits_per_byte_against_a_hand_computation():
    # uniform over 256 bytes: exactly 8 bits
    assert W.bits_per_byte(torch.zeros(2, 3, 256), torch.zeros(2, 3, dtype=torch.long)) == (
        pytest.approx(8.0)
    )
    # target logit log(3), the other 255 at 0: p = 3 / 258 for the first byte; the second is
    # predicted with p = 1 / 256
    logits = torch.zeros(1, 2, 256)
    logits[0, 0, 65] = math.log(3.0)
    targets = torch.tensor([[65, 66]])
    hand = (-math.log2(3 / 258) + -math.log2(1 / 256)) / 2
    assert W.bits_per_byte(logits, targets) == pytest.approx(hand, rel=1e-6)
    work = P.make_workload("pylm", 0.1)
    assert work.metric == "bits_per_byte" and not work.higher_is_better
    assert work.better(1.0, 2.0) and not work.better(math.nan, 2.0)


def test_verdict_reads_medians_tolerance_and_wall_time():
    def entry(me, grid, free, me_s=1.0, grid_s=20.0, hib=True):
        row = lambda m, s: {"median": m, "min": m, "max": m, "wall_s": s, "steps": 1}  # noqa: E731
        return {
            "higher_is_better": hib,
            "tolerance": 0.005 if hib else 0.02,
            "contenders": {
                "adamw-grid": row(grid, grid_s), "prodigy": row(free, 1.0),
                "selfmod": row(me, me_s),
            },
        }  # fmt: skip

    assert P.verdict(entry(0.90, 0.904, 0.89))[0]
    assert not P.verdict(entry(0.90, 0.91, 0.89))[0]  # 0.01 below the grid
    assert not P.verdict(entry(0.90, 0.90, 0.91))[0]  # below an LR-free optimizer
    assert not P.verdict(entry(0.90, 0.90, 0.89, me_s=3.0))[0]  # 0.15x the grid's time
    assert P.verdict(entry(2.01, 2.0, 2.2, hib=False))[0]  # bits per byte: lower is better
    assert "missed by" in P.verdict(entry(2.05, 2.0, 2.2, hib=False))[1]
    # the other selfmod run is judged by its own row
    both = entry(0.88, 0.90, 0.89)
    both["contenders"]["selfmod-hd"] = {**both["contenders"]["selfmod"], "median": 0.9}
    assert not P.verdict(both)[0] and P.verdict(both, "selfmod-hd")[0]
    del both["contenders"]["selfmod-hd"]
    assert P.verdict(both, "selfmod-hd") == (False, "selfmod-hd or the grid was not run")


def test_development_splits_hold_no_published_test_row():
    train, val, test = W._split(569, 114, 114)
    published, held = set(torch.cat([train, val]).tolist()), set(test.tolist())
    for split in (1, 2):
        parts = W._split(569, 114, 114, split)
        rows = [set(p.tolist()) for p in parts]
        assert set().union(*rows) == published and not set().union(*rows) & held
        assert sum(map(len, rows)) == len(published)  # disjoint
        assert [len(p) for p in parts] == [273, 91, 91]  # the published fractions of 455
        again = W._split(569, 114, 114, split)
        assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not torch.equal(W._split(569, 114, 114, 1)[2], W._split(569, 114, 114, 2)[2])
    # pylm: by file, from the published training and validation files only
    pub = W.pylm_files()
    dev = W.pylm_files(3)
    assert set().union(*dev) == set(pub[0]) | set(pub[1]) and not set().union(*dev) & set(pub[2])
    assert len(dev[1]) == len(dev[2]) == round(len(pub[0] + pub[1]) / 9)
    # MNIST-1D: every development row is one of the published training or validation rows
    work, dev_work = P.make_workload("mnist1d"), P.make_workload("mnist1d", split=1)
    seen = {r.numpy().tobytes() for r in torch.cat([work.train[0], work.val[0]])}
    for x, _ in (dev_work.train, dev_work.val, dev_work.test):
        assert all(r.numpy().tobytes() in seen for r in x)
    assert not any(r.numpy().tobytes() in seen for r in work.test[0])
    assert [len(p[1]) for p in (dev_work.train, dev_work.val, dev_work.test)] == [2800, 400, 800]
    assert "development split 1" in dev_work.describe and "development" not in work.describe


def test_drawn_partitions_are_the_published_sizes_redrawn_from_their_pool():
    """``draw``: a partition per seed, reproducible, disjoint, in the published sizes; on split
    0 from every row (MNIST-1D's official test rows too), on a development split from the
    published training and validation rows only."""
    n, n_val, n_test = 569, 114, 114
    published = W._split(n, n_val, n_test)
    for split, pool in ((0, set(range(n))), (2, set(torch.cat(published[:2]).tolist()))):
        sizes = [len(p) for p in W._split(n, n_val, n_test, split)]
        parts = W._split(n, n_val, n_test, split, draw=5)
        rows = [set(p.tolist()) for p in parts]
        assert set().union(*rows) == pool and sum(map(len, rows)) == len(pool)  # disjoint
        assert [len(p) for p in parts] == sizes
        again, other = W._split(n, n_val, n_test, split, 5), W._split(n, n_val, n_test, split, 6)
        assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))
        assert not torch.equal(parts[2], other[2]) and not torch.equal(parts[2], published[2])
    assert not torch.equal(W._split(n, n_val, n_test, 1, 5)[2], W._split(n, n_val, n_test, 2, 5)[2])
    with pytest.raises(ValueError, match="draw=-1"):
        W._split(n, n_val, n_test, 0, -1)
    fixed, drawn = W.mnist1d(10), W.mnist1d(10, draw=0)
    key = lambda x: x.numpy().tobytes()  # noqa: E731
    official = {key(r) for r in fixed.test[0]}
    rows = [{key(r) for r in part[0]} for part in (drawn.train, drawn.val, drawn.test)]
    assert [len(p[1]) for p in (drawn.train, drawn.val, drawn.test)] == [3500, 500, 1000]
    assert rows[0] & official and rows[2] - official  # the 5,000 pooled, then cut
    assert "partition drawn with seed 0" in drawn.describe
    cancer = W.cancer(10, draw=3)  # standardized by its own training rows
    assert torch.allclose(cancer.train[0].mean(0), torch.zeros(30), atol=1e-5)
    files, fixed_files = W.pylm_files(0, draw=1), W.pylm_files()
    assert {f for part in files for f in part} == {f for part in fixed_files for f in part}
    assert [len(f) for f in files] == [len(f) for f in fixed_files] and files != fixed_files


@needs_bench
def test_a_development_split_run_says_so(tmp_path):
    budget = P.load_budget(
        ["workload=cancer", "seeds=[0]", "steps=0.05", "contenders=[prodigy]", "split=4",
         f"out='{tmp_path}'"]
    )  # fmt: skip
    text = P.run_benchmark(budget, "test")
    assert "**Development split 4**" in text
    assert "(273 train / 91 val / 91 test rows; development split 4)" in text
    runs = json.loads((tmp_path / "practitioners_runs.json").read_text())
    assert runs["budget"]["split"] == 4


@needs_bench
def test_development_splits_benchmark_tabulates_each_split(tmp_path):
    r = subprocess.run(
        [sys.executable, "benchmarks/practitioners_dev.py", "--splits", "1", "2", "--seeds", "0",
         "--workloads", "cancer", "--steps", "0.05", "--jobs", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    text = (tmp_path / "practitioners_dev.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2 and all(line.count("|") == 8 for line in rows)
    assert all(("met" in line or "missed" in line) for line in rows)
    assert "Medians over all 2 runs: AdamW grid (12) " in text and "## cancer" in text
    assert "## mnist1d" not in text


@pytest.mark.parametrize("name", ["diabetes", "seqdigits"])
def test_panel_workloads_split_like_the_others_and_their_models_fit_the_data(name):
    """The two workloads only the development panel runs: a development split is cut from the
    published training and validation rows alone (no published test row), and the model maps
    a batch to what the loss and the metric read."""
    pub, dev = P.make_workload(name), P.make_workload(name, split=2)
    sizes = [len(part[1]) for part in (pub.train, pub.val, pub.test)]
    n, n_val, n_test = sum(sizes), sizes[1], sizes[2]
    parts = [set(p.tolist()) for p in W._split(n, n_val, n_test, 2)]
    published = W._split(n, n_val, n_test)
    assert set().union(*parts) == set(torch.cat(published[:2]).tolist())  # no test row
    assert [len(p) for p in parts] == [len(part[1]) for part in (dev.train, dev.val, dev.test)]
    if name == "seqdigits":  # unscaled pixels: the rows themselves can be compared
        key = lambda x: x.numpy().tobytes()  # noqa: E731
        seen = {key(r) for r in torch.cat([pub.train[0], pub.val[0]])}
        rows = {key(r) for part in (dev.train, dev.val, dev.test) for r in part[0]}
        assert rows <= seen and not rows & {key(r) for r in pub.test[0]}
    assert "development split 2" in dev.describe
    torch.manual_seed(0)
    model = pub.model()
    out = model(pub.train[0][:5])
    loss = pub.loss(out, pub.train[1][:5])
    assert loss.ndim == 0 and loss.item() > 0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert pub.tolerance == 0.02 if name == "diabetes" else pub.tolerance == 0.005


def test_diabetes_is_standardized_regression_scored_by_mse():
    work = P.make_workload("diabetes")
    x, y = work.train
    assert x.shape[1] == 10 and y.dtype == torch.float32 and y.ndim == 1
    assert torch.allclose(x.mean(0), torch.zeros(10), atol=1e-5)  # the training rows' statistics
    assert abs(float(y.mean())) < 1e-5 and abs(float(y.std()) - 1) < 1e-5
    assert work.metric == "test_mse" and not work.higher_is_better
    assert work.better(0.4, 0.5) and not work.better(0.5, 0.4)
    pred = torch.zeros(len(y), 1)  # the mean: MSE = the (biased) variance of the target
    assert work.score(pred, y) == pytest.approx(float(y.var(unbiased=False)), rel=1e-5)
    assert work.loss(pred, y).item() == pytest.approx(work.score(pred, y), rel=1e-6)
    with pytest.raises(ValueError, match="metric must be one of"):
        W.Workload("x", "", "r2", work.train, work.val, work.test, work.model, 1, 1)


def test_sequence_digits_are_eight_rows_of_eight_pixels_for_a_recurrent_model():
    work = P.make_workload("seqdigits")
    x, y = work.train
    assert x.shape[1:] == (8, 8) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert set(y.tolist()) == set(range(10))
    model = work.model()
    assert any(isinstance(m, torch.nn.GRU) for m in model.modules())
    assert model(x[:3]).shape == (3, 10)
    assert work.evaluate(model, work.val) < 0.5  # untrained: near chance
