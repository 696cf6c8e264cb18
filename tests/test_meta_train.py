"""Learned-optimizer meta-training: distributed equals single-process, checkpoints verify and
resume, configs reject bad values in one line."""

import json

import pytest
import torch
import torch.multiprocessing as mp

from selfmod.meta.train import MetaTrainConfig, load_checkpoint, meta_train
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
    assert (tmp_path / "dist" / "checkpoint.json").exists()  # written by rank 0


def test_checkpoint_is_verified_and_resume_continues(tmp_path):
    tasks = _tasks()
    cfg = _cfg(tmp_path, meta_steps=4, checkpoint_every=2)
    weights = meta_train(cfg, tasks)
    manifest = json.loads((tmp_path / "checkpoint.json").read_text())
    assert manifest["step"] == 4
    template = chain(clip_by_global_norm(1.0), adam(1e-3)).init(weights)
    loaded, state, step = load_checkpoint(tmp_path, template)
    assert step == 4 and all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert state[1][0].count == 4  # Adam's step count came back
    more = meta_train(_cfg(tmp_path, meta_steps=6, checkpoint_every=2), tasks, resume=True)
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == 6
    assert any(not torch.equal(more[k], weights[k]) for k in weights)
    data = bytearray((tmp_path / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its sha256"):
        load_checkpoint(tmp_path, template)


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
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "selfmod.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
    )


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
    manifest = json.loads((tmp_path / "meta" / "checkpoint.json").read_text())
    assert manifest["step"] == 2 and set(manifest["sha256"]) == {
        "weights.safetensors",
        "meta_state.safetensors",
    }
