"""Learned-optimizer meta-training: distributed equals single-process, checkpoints verify and
resume, configs reject bad values in one line."""

import json
import shutil

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from selfmod.checkpoint import list_checkpoints
from selfmod.meta.train import (
    MetaTrainConfig,
    _reset,
    learned_optimizer,
    load_checkpoint,
    meta_train,
)
from selfmod.optim import adam, chain, clip_by_global_norm
from selfmod.tasks import TemplateTasks
from selfmod.validation import ConfigError, validate


def _tasks():
    return TemplateTasks(num_templates=30, examples_per_class=20, seed=0)


def _cfg(out, **kw):
    base = dict(
        meta_steps=3,
        meta_batch=4,
        unroll=3,
        horizon=6,
        width=8,
        n_way=3,
        inner_batch=16,
        out=str(out),
        checkpoint_every=100,
    )
    return MetaTrainConfig(**{**base, **kw})


def _rank_worker(rank, world, store, out_dir, result):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        weights = meta_train(_cfg(out_dir), _tasks())
        if rank == 0:
            torch.save(weights, result)
    finally:
        dist.destroy_process_group()


def test_two_ranks_meta_train_like_one_process(tmp_path):
    result = tmp_path / "weights.pt"
    mp.spawn(
        _rank_worker,
        args=(2, str(tmp_path / "store"), str(tmp_path / "dist"), str(result)),
        nprocs=2,
    )
    distributed = torch.load(result)
    single = meta_train(_cfg(tmp_path / "single"), _tasks())
    for k in single:
        torch.testing.assert_close(distributed[k], single[k], rtol=0, atol=1e-6)
    assert list_checkpoints(tmp_path / "dist")  # written by rank 0


def test_checkpoint_is_verified_and_resume_continues(tmp_path):
    tasks = _tasks()
    cfg = _cfg(tmp_path, meta_steps=4, checkpoint_every=2)
    weights = meta_train(cfg, tasks)
    manifests = list_checkpoints(tmp_path)
    assert [json.loads(m.read_text())["step"] for m in manifests] == [2, 4]
    opt, fresh = learned_optimizer(cfg.optimizer, cfg.seed)
    template = chain(clip_by_global_norm(1.0), adam(1e-3)).init(fresh)
    loaded, state, step, slots = load_checkpoint(
        tmp_path, cfg, fresh, template, lambda i, e: _reset(i, e, cfg, tasks, opt)
    )
    assert step == 4 and all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert list(loaded) == list(fresh)  # the fresh key order, not the file's sorted one
    assert state[1][0].count == 4  # Adam's step count came back
    assert sorted(slots) == list(range(cfg.meta_batch))
    more = meta_train(_cfg(tmp_path, meta_steps=6, checkpoint_every=2), tasks, resume=True)
    assert json.loads(list_checkpoints(tmp_path)[-1].read_text())["step"] == 6
    assert any(not torch.equal(more[k], weights[k]) for k in weights)
    assert len(list_checkpoints(tmp_path)) == 2  # the previous set is kept, older ones pruned


def _three_legs(out, steps, tasks, **kw):
    weights = None
    for i, n in enumerate(steps):
        weights = meta_train(_cfg(out, meta_steps=n, **kw), tasks, resume=i > 0)
    return weights


@pytest.mark.parametrize("optimizer", ["lstm", "mlp"])
def test_meta_train_resumed_twice_equals_the_uninterrupted_run(tmp_path, optimizer):
    # issue 14 item 1: the second resume failed (Adam state saved by position, keys re-sorted)
    tasks = _tasks()
    kw = dict(optimizer=optimizer, checkpoint_every=5, meta_batch=2, unroll=5, horizon=20)
    full = meta_train(_cfg(tmp_path / "full", meta_steps=15, **kw), tasks)
    resumed = _three_legs(tmp_path / "legs", [5, 10, 15], tasks, **kw)
    assert list(resumed) == list(full)
    for k in full:
        assert torch.equal(resumed[k], full[k]), k


A = [
    "--set", "checkpoint_every=5", "--set", "meta_batch=2", "--set", "unroll=5",
    "--set", "horizon=20", "--set", "width=8", "--set", "n_way=3", "--set", "inner_batch=16",
]  # fmt: skip


def _meta_cli(out, steps, *extra, resume=False, crash_in=None):
    """``selfmod meta-train``; with ``crash_in``, killed halfway through writing that file."""
    from pathlib import Path

    import warm

    args = [*A, "--set", f"meta_steps={steps}", "--set", f"out={out}", *extra]
    harness = [str(Path(__file__).parent / "crash_at.py"), f"write={crash_in}"]
    program = harness if crash_in else ["-m", "selfmod.cli"]
    return warm.run([*program, "meta-train", *args, *(["--resume"] if resume else [])], timeout=300)


@pytest.fixture(scope="module")
def meta_runs(tmp_path_factory):
    """An uninterrupted 15-step CLI run and a 5-step one (one checkpoint set), made once."""
    root = tmp_path_factory.mktemp("meta_runs")
    for name, steps in (("full", 15), ("five", 5)):
        res = _meta_cli(root / name, steps)
        assert res.returncode == 0, res.stderr
    return root


@pytest.mark.parametrize(
    "crash_in", ["ckpt-00000010.safetensors", "ckpt-00000010.json", "weights.safetensors"]
)
def test_meta_train_killed_during_any_checkpoint_file_write_still_resumes(
    tmp_path, meta_runs, crash_in
):
    # issue 14 item 2: a kill while writing one file of a checkpoint left a set that could
    # never resume; now the newest complete set (step 5) is used, and the result is the same
    out = tmp_path / "killed"
    shutil.copytree(meta_runs / "five", out)
    killed = _meta_cli(out, 15, resume=True, crash_in=crash_in)
    assert killed.returncode == -9
    resumed = _meta_cli(out, 15, resume=True)
    assert resumed.returncode == 0, resumed.stderr
    a, b = (load_file(str(d / "weights.safetensors")) for d in (meta_runs / "full", out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((out / "checkpoints").glob(".*.tmp"))  # the kill's temp file was cleaned


def _flip_a_byte(out):
    (data,) = (out / "checkpoints").glob("*.safetensors")
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))


def _break_manifest(out):
    (manifest,) = (out / "checkpoints").glob("*.json")
    manifest.write_text(manifest.read_text()[:-20])


def _edit_manifest_meta(out):
    (manifest,) = (out / "checkpoints").glob("*.json")
    m = json.loads(manifest.read_text())
    m["meta"]["config"]["meta_lr"] = 0.5
    manifest.write_text(json.dumps(m))


def _remove_manifest(out):
    (manifest,) = (out / "checkpoints").glob("*.json")
    manifest.unlink()


@pytest.mark.parametrize(
    ("damage", "extra", "message"),
    [
        (None, ["--set", "optimizer=mlp"], "optimizer is 'mlp' but the checkpoint"),
        (_flip_a_byte, [], "does not match"),
        (_break_manifest, [], "unreadable"),
        (_edit_manifest_meta, [], "manifest_sha256"),
    ],
    ids=["other-optimizer", "flipped-byte", "broken-manifest", "edited-meta"],
)  # fmt: skip
def test_meta_train_resume_refuses_a_bad_checkpoint_in_one_line(
    tmp_path, meta_runs, damage, extra, message
):
    out = tmp_path / "m"
    shutil.copytree(meta_runs / "five", out)
    if damage is not None:
        damage(out)
    res = _meta_cli(out, 10, *extra, resume=True)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_meta_train_killed_before_its_first_checkpoint_starts_again(tmp_path, meta_runs):
    # a kill inside the first checkpoint leaves its tensors without a manifest: nothing was
    # checkpointed, so --resume starts again (as selfmod train does) instead of refusing
    out = tmp_path / "m"
    shutil.copytree(meta_runs / "five", out)
    _remove_manifest(out)
    (out / "weights.safetensors").unlink()
    res = _meta_cli(out, 15, resume=True)
    assert res.returncode == 0, res.stderr
    a, b = (load_file(str(d / "weights.safetensors")) for d in (meta_runs / "full", out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("FILE", "is a file"),
        ("FILE/sub", "is under"),
        ("x" * 300, "at most 255"),
    ],
)
def test_meta_train_out_that_cannot_be_a_folder_is_one_line(tmp_path, value, message):
    (tmp_path / "FILE").write_text("x")
    value = value.replace("FILE", str(tmp_path / "FILE"))
    with pytest.raises(ConfigError, match=message) as err:
        validate(MetaTrainConfig, {"out": value})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="NUL"):
        validate(MetaTrainConfig, {"out": "a\0b"})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("optimizer", "rnn", "optimizer must be one of 'lstm', 'mlp' (got 'rnn')"),
        ("meta_batch", 0, "meta_batch must be an integer in [1, 4096] (got 0)"),
        ("meta_lr", 2.0, "meta_lr must be a number in (0, 1] (got 2.0)"),
        ("n_way", 1, "n_way must be an integer in [2, 160] (got 1)"),
        ("colour", 1, "unknown config field 'colour'"),
    ],
)
def test_meta_train_config_errors_are_one_line(field, value, message):
    with pytest.raises(ConfigError) as err:
        validate(MetaTrainConfig, {field: value})
    assert message in str(err.value) and "\n" not in str(err.value)


def _cli(*args, cwd=None):
    import warm

    return warm.run(["-m", "selfmod.cli", *args], cwd=cwd)


def test_meta_train_cli_rejects_bad_values_with_exit_2(tmp_path):
    out = _cli("meta-train", "--set", "meta_batch=0", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: meta_batch must be an integer in [1, 4096] (got 0)"


@pytest.mark.slow
def test_meta_train_under_torchrun_with_two_processes(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "selfmod.cli",
            "meta-train",
            "--set",
            "meta_steps=2",
            "--set",
            "meta_batch=2",
            "--set",
            "unroll=2",
            "--set",
            "width=8",
            "--set",
            f"out={tmp_path / 'meta'}",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    manifest = json.loads(list_checkpoints(tmp_path / "meta")[-1].read_text())
    assert manifest["step"] == 2 and set(manifest["meta"]["slots"]) == {"0", "1"}
