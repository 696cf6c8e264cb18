"""The loop on a CUDA device (skipped without one): any model learns there, the built-in run
grows there, and a run resumed on the GPU from a checkpoint ends bitwise where it would have."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import user_models

from selfmod.introspect import Introspector
from selfmod.runs import fit
from selfmod.runs.config import TrainConfig
from selfmod.runs.recorder import RunRecorder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SMALL = dict(steps=120, cycle=40, lookahead=4, guard_size=200, replay_size=200, device="cuda")


@pytest.mark.parametrize("name", ["residual_mlp", "digit_cnn", "tiny_transformer"])
def test_fit_on_cuda_learns(name, tmp_path):
    x, y, xt, yt = user_models.digits()
    torch.manual_seed(0)
    result = fit(
        getattr(user_models, name)(),
        F.cross_entropy,
        (x[200:], y[200:]),
        (x[:200], y[:200]),
        test=(xt, yt),
        optimizer="adamw",
        config={**SMALL, "lr": 3e-3, "keep_checkpoints": 10},
        run_dir=tmp_path / "run",
    )
    assert result.summary["test_accuracy"] > 0.5
    assert all(p.device.type == "cuda" for p in result.module.parameters())


def test_builtin_run_grows_on_cuda_and_resumes_bitwise(tmp_path, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    cfg = TrainConfig(**{**SMALL, "steps": 200, "cycle": 50, "lr": 0.05, "keep_checkpoints": 10})
    run = Introspector(cfg, recorder=RunRecorder(tmp_path))
    run.run()
    assert run.widths()[0] > cfg.width and run.params["0.weight"].device.type == "cuda"
    recorder = RunRecorder(tmp_path)
    back = Introspector(cfg, recorder=recorder)
    recorder.resume(back, at_most=100)
    assert back.step == 100
    back.run()
    assert all(torch.equal(back.params[k], run.params[k]) for k in run.params)
