"""``selfmod train`` and ``fit`` on several processes (gloo on the CPU): the same decisions and
weights as one process, one run directory, a killed rank that ``selfmod resume`` recovers from,
and ranks that disagree stopped in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from selfmod.errors import SelfmodError
from selfmod.introspect.loop import Loop
from selfmod.process_group import leave_process_group
from selfmod.runs.distributed import _GlobalDropout
from selfmod.runs.ledger import Ledger

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from faults import Faults  # noqa: E402

# growth in the first cycles, a NaN loss at step 230 (a rollback), batch-size changes; float64:
# float32's reduction-order differences (1e-7) grow past 1e-4 in this run once it has grown
CONFIG = dict(
    steps=400, cycle=50, lookahead=5, width=8, max_width=32, guard_size=100, replay_size=200,
    lr=0.05, seed=0, checkpoint_every=1, dtype="float64",
)  # fmt: skip
NAN_AT = 230
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}


class _FaultyLoop(Faults, Loop):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, loss=(NAN_AT,), **kwargs)


def _fit(out: Path, steps: int = CONFIG["steps"], diverge_at: int | None = None):
    """The built-in MLP on MNIST-1D through ``fit`` (run directory under ``out``)."""
    from unittest import mock

    from selfmod.introspect.builtin import builtin_module, builtin_splits
    from selfmod.runs import fit, session
    from selfmod.runs.config import validate

    torch.set_num_threads(1)
    cfg = validate({**CONFIG, "steps": steps, "out": str(out), "compare_fixed": False})
    s = builtin_splits(cfg)[0]
    torch.manual_seed(cfg.seed)
    model = builtin_module("mlp", cfg.depth, s.x.shape[1], cfg.width)
    on_step = None
    if diverge_at is not None:  # rank 1 alone nudges its weights: the ranks disagree

        def on_step(loop: Loop) -> None:
            if loop.step == diverge_at and loop.collective.rank == 1:
                loop.state.params["0.weight"][0, 0] += 1e-3

    with mock.patch.object(session, "Loop", _FaultyLoop):  # test-only fault injection
        return fit(
            model,
            F.cross_entropy,
            (s.x, s.y),
            (s.guard_x, s.guard_y),
            test=(s.x_test, s.y_test),
            config=cfg,
            on_step=on_step,
        )


def _rank(rank: int, world: int, store: str, out: str, diverge_at: int | None) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        try:
            result = _fit(Path(out), CONFIG["steps"] if diverge_at is None else 110, diverge_at)
        except SelfmodError as err:
            Path(out, f"error-{rank}.txt").write_text(str(err))
            return
        torch.save(dict(result.run.params), Path(out, f"params-{rank}.pt"))
    finally:
        leave_process_group()


def _decisions(run_dir: Path) -> list[tuple]:
    with Ledger(run_dir / "ledger.sqlite", create=False) as ledger:
        ledger.verify()
        return [
            (e.kind, e.cycle, e.step, e.payload.get("modifier"), e.decision)
            for e in ledger.entries()
            if e.kind in ("proposal", "rollback")
        ]


@pytest.mark.slow
def test_two_processes_decide_and_train_as_one(tmp_path):
    single = _fit(tmp_path / "single")
    out = tmp_path / "two"
    out.mkdir()
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), str(out), None), nprocs=2)
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]  # one run directory, by rank 0
    mine, theirs = _decisions(run_dir), _decisions(single.run_dir)
    assert mine == theirs
    kinds = [d[0] for d in mine]
    grown = [d for d in mine if d[3] == "grow" and d[4] == "commit"]
    assert "rollback" in kinds and grown
    final = load_file(run_dir / "final.safetensors")
    p0, p1 = (torch.load(out / f"params-{r}.pt") for r in (0, 1))
    for k, v in single.run.params.items():
        assert torch.equal(p0[k], p1[k])  # the ranks agree bitwise
        assert torch.equal(final[k], p0[k])
        torch.testing.assert_close(p0[k], v, rtol=1e-4, atol=1e-6)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == CONFIG["steps"] and summary["widths"] == single.summary["widths"]


@pytest.mark.slow
def test_ranks_that_disagree_stop_the_job_in_one_line(tmp_path):
    out = tmp_path / "two"
    out.mkdir()
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), str(out), 60), nprocs=2)
    for r in (0, 1):
        err = (out / f"error-{r}.txt").read_text()
        assert "\n" not in err
        assert err.startswith("ranks disagree at cycle 2 (step 100): rank 1's run state")


def _torchrun(*args: str, env: dict | None = None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += list(args)
    return subprocess.run(
        cmd, capture_output=True, text=True, env={**ENV, **(env or {})}, timeout=300, check=False
    )


def _sets(out: Path) -> list[str]:
    values = {**CONFIG, "out": str(out), "compare_fixed": "false", "keep_checkpoints": 20}
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


@pytest.mark.slow
def test_a_killed_rank_fails_the_job_and_resume_finishes_it_on_one_process(tmp_path):
    out = tmp_path / "runs"
    crash = [str(HERE / "crash_at.py"), "step=260", "train", *_sets(out)]
    killed = _torchrun(*crash, env={"CRASH_RANK": "1"})
    assert killed.returncode != 0
    (run_dir,) = [p for p in out.iterdir() if not p.name.startswith(".")]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "running"
    log = subprocess.run([sys.executable, "-m", "selfmod.cli", "log", str(run_dir)], env=ENV,
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert log.returncode == 0, log.stderr  # the ledger's hash chain holds
    # resumed on one process: N differs from the job that wrote the checkpoints
    resumed = subprocess.run([sys.executable, "-m", "selfmod.cli", "resume", str(run_dir)],
                             env=ENV, capture_output=True, text=True, check=False)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = json.loads((run_dir / "final.json").read_text())
    assert final["step"] == CONFIG["steps"]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "complete"
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == [run_dir.name]
    with Ledger(run_dir / "ledger.sqlite", create=False) as ledger:
        resumes = [e for e in ledger.entries() if e.kind == "resume"]
    assert len(resumes) == 1 and "resumed from checkpoint at step 250" in resumes[0].reason


def test_dropout_draws_the_global_batch_mask_and_keeps_its_rows():
    x = torch.randn(10, 6)
    torch.manual_seed(3)
    whole = F.dropout(x, 0.3, training=True)
    torch.manual_seed(3)
    with _GlobalDropout(4, 7, 10):
        rows = nn.Dropout(0.3)(x[4:7])
    assert torch.equal(rows, whole[4:7])
    assert not torch.equal(whole[4:7], whole[:3])  # not one mask repeated per shard
