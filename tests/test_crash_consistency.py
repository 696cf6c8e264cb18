"""kill -9 of ``selfmod train`` before base steps and halfway through writing each of its files,
of ``selfmod meta-train`` in its checkpoint writes and at a random time, and of ``fit`` and a
``SelfModifier`` loop at a step and in a checkpoint write, then resume: every
kill resumes byte-identical or is refused in one line; none is lost (``tests/kill_resume.py``;
the README quotes a larger run of it). Also: a finished run is not run again, a run killed
before its first checkpoint starts again from step 0, another run's checkpoints are refused."""

import subprocess
import sys

import pytest
from kill_resume import (
    _sets,
    api_points,
    api_reference,
    api_trial,
    meta_reference,
    meta_trial,
    points,
    reference,
    trial,
)


@pytest.mark.slow
def test_kills_at_every_file_write_and_random_steps_lose_nothing(tmp_path):
    expected = reference(tmp_path / "reference")
    outcomes = {}
    for i, where in enumerate(points(13, seed=1)):  # every file, then a random step
        outcomes[where] = trial(where, tmp_path / f"kill{i}", expected)
    assert "lost" not in outcomes.values(), outcomes
    assert outcomes["write=config.json"] == "refused"  # no config: nothing defines the run
    resumed = [d for d in tmp_path.glob("kill*/*") if (d / "final.safetensors").is_file()]
    assert resumed and not [t for d in resumed for t in d.rglob(".*.tmp")]  # torn writes cleaned
    identical = [w for w, o in outcomes.items() if o == "identical"]
    assert len(identical) >= 11, outcomes


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    reference(tmp_path)
    (run_dir,) = tmp_path.iterdir()
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    out = subprocess.run(
        [sys.executable, "-m", "selfmod.cli", "resume", str(run_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0 and "is complete (step 120); nothing to resume" in out.stdout
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert after.keys() == before.keys()
    assert all(after[k] == before[k] for k in before if k != ".lock")


def test_batch_size_larger_than_the_training_set_is_one_line(tmp_path):
    out = subprocess.run(
        [
            sys.executable, "-m", "selfmod.cli", "train", "--set", "data=digits",
            "--set", "guard_size=1400", "--set", "batch_size=128", *_sets(tmp_path)[-2:],
        ],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "batch_size must be <= the 38 training examples (got 128)" in out.stderr
    assert not any(tmp_path.iterdir())  # refused before a run directory was made
    too_big = subprocess.run(
        [sys.executable, "-m", "selfmod.cli", "train", "--set", "data=digits",
         "--set", "guard_size=1700", *_sets(tmp_path)[-2:]],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    assert too_big.returncode == 2 and "guard_size must be in [1, 1437]" in too_big.stderr


@pytest.mark.slow
def test_meta_train_kills_in_checkpoint_writes_and_at_a_random_time_lose_nothing(tmp_path):
    weights, seconds = meta_reference(tmp_path / "reference")
    points = ["write=ckpt-00000005", "write=ckpt-00000010.json", f"time={0.8 * seconds:.2f}"]
    outcomes = {w: meta_trial(w, tmp_path / f"kill{i}", weights) for i, w in enumerate(points)}
    assert "lost" not in outcomes.values(), outcomes
    assert outcomes["write=ckpt-00000005"] == "identical"  # nothing checkpointed: starts again
    assert outcomes["write=ckpt-00000010.json"] == "identical", outcomes


def test_another_runs_checkpoints_are_not_resumed_under_this_runs_config(tmp_path):
    import shutil

    for name in ("a", "b"):
        out = subprocess.run(
            [sys.executable, "-m", "selfmod.cli", "train", *_sets(tmp_path / name)[:-2],
             "--set", "steps=60", "--set", f"out={tmp_path / name}"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
    (a,), (b,) = (tmp_path / "a").iterdir(), (tmp_path / "b").iterdir()
    shutil.rmtree(b / "checkpoints")
    shutil.copytree(a / "checkpoints", b / "checkpoints")
    (b / "final.json").unlink()
    out = subprocess.run(
        [sys.executable, "-m", "selfmod.cli", "resume", str(b)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "run" in out.stderr and "checkpoint" in out.stderr


@pytest.mark.parametrize(
    ("api", "where"),
    [pytest.param("fit", "step=25", marks=pytest.mark.slow), ("step", "write=ckpt-00000020.json")],
)
def test_fit_and_self_modifier_killed_resume_identical(tmp_path, api, where):
    expected = api_reference(tmp_path / "reference", api)
    assert api_trial(where, tmp_path / "kill", api, expected) == "identical"


@pytest.mark.slow
@pytest.mark.parametrize("api", ["fit", "step"])
def test_fit_and_self_modifier_kills_at_every_file_write_lose_nothing(tmp_path, api):
    expected = api_reference(tmp_path / "reference", api)
    outcomes = {w: api_trial(w, tmp_path / f"kill{i}", api, expected)
                for i, w in enumerate(api_points(11, seed=1, api=api))}  # fmt: skip
    assert set(outcomes.values()) <= {"identical", "refused"}, outcomes
    assert outcomes["write=config.json"] == "refused"  # no config: nothing defines the run
