"""Runs that lose nothing: hash-chained ledger, atomic checkpoints, bitwise resume after kill -9."""

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import warm
from safetensors.torch import load_file

from selfmod.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    save_checkpoint,
)
from selfmod.runs.ledger import Ledger, LedgerTamperedError

SELFMOD = [sys.executable, "-m", "selfmod.cli"]

# A small, fast run: every cycle checkpointed, every modifier on.
SMALL = [
    "steps=120",
    "cycle=20",
    "lookahead=5",
    "width=8",
    "modifiers.grow.max_width=32",
    "guard_size=100",
    "replay_size=200",
    "compare_fixed=false",
    "keep_checkpoints=10",
]


def _selfmod(*args, env=None):
    return warm.run([*SELFMOD[1:], *args], env={**os.environ, **(env or {})}, timeout=300)


def _crash_at(where, *args):
    """The CLI (or ``-c CODE``) killed with SIGKILL at ``where`` (tests/crash_at.py)."""
    harness = str(Path(__file__).parent / "crash_at.py")
    return subprocess.run(
        [sys.executable, harness, where, *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def _sets(items):
    return [a for item in items for a in ("--set", item)]


def _ledger_with_entries(path, n=5):
    with Ledger(path) as ledger:
        for i in range(n):
            ledger.append(
                "proposal",
                cycle=i,
                step=10 * i,
                decision="commit",
                reason=f"entry {i}",
                payload={"x": i, "nan": float("nan")},
            )


def test_ledger_chain_verifies_and_detects_an_edited_row(tmp_path):
    path = tmp_path / "ledger.sqlite"
    _ledger_with_entries(path)
    with Ledger(path) as ledger:
        assert ledger.verify() == 5
        head = ledger.head()
    db = sqlite3.connect(path)
    db.execute("UPDATE entries SET decision = 'reject' WHERE seq = 3")
    db.commit()
    db.close()
    with Ledger(path) as ledger, pytest.raises(LedgerTamperedError, match="entry 3"):
        ledger.verify()
    # deleting the last row leaves a valid chain, caught against a checkpoint's recorded head
    _ledger_with_entries(tmp_path / "b.sqlite")
    db = sqlite3.connect(tmp_path / "b.sqlite")
    db.execute("DELETE FROM entries WHERE seq = 5")
    db.commit()
    db.close()
    with Ledger(tmp_path / "b.sqlite") as ledger:
        assert ledger.verify() == 4  # a truncated tail is a valid chain ...
        with pytest.raises(LedgerTamperedError, match="truncated"):
            ledger.verify(head)  # ... but not against the head a checkpoint recorded


class _InterruptAt:
    """A connection that raises ``KeyboardInterrupt`` (a Ctrl-C) right after running the SQL
    statement that starts with ``at``."""

    def __init__(self, db: sqlite3.Connection, at: str) -> None:
        self.db, self.at = db, at

    def execute(self, sql: str, *args):
        out = self.db.execute(sql, *args)
        if sql.startswith(self.at):
            raise KeyboardInterrupt
        return out

    def __getattr__(self, name: str):
        return getattr(self.db, name)


@pytest.mark.parametrize("at, kept", [("INSERT", 5), ("COMMIT", 6)])
def test_a_ctrl_c_inside_a_ledger_append_is_raised_as_it_is_and_the_chain_stays_valid(
    tmp_path, at, kept
):
    path = tmp_path / "ledger.sqlite"
    _ledger_with_entries(path)
    with Ledger(path) as ledger:
        db = ledger._db
        ledger._db = _InterruptAt(db, at)  # type: ignore[assignment]
        with pytest.raises(KeyboardInterrupt):  # not sqlite's "cannot rollback"
            ledger.append("decision", cycle=9, step=9, decision="commit")
        ledger._db = db
        assert not db.in_transaction
        assert ledger.verify() == kept  # before COMMIT: rolled back; after: kept, chained
        assert ledger.append("decision", cycle=10, step=10).seq == kept + 1


def test_ledger_detects_deleted_middle_row(tmp_path):
    path = tmp_path / "ledger.sqlite"
    _ledger_with_entries(path)
    db = sqlite3.connect(path)
    db.execute("DELETE FROM entries WHERE seq = 2")
    db.commit()
    db.close()
    with Ledger(path) as ledger, pytest.raises(LedgerTamperedError, match="missing"):
        ledger.verify()


def test_checkpoint_roundtrip_sha_and_keep_last(tmp_path):
    for step in range(5):
        save_checkpoint(tmp_path, step, {"a": torch.full((3,), float(step))}, {"s": step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt-00000003.json",
        "ckpt-00000004.json",
    ]
    tensors, manifest = load_latest(tmp_path)
    assert manifest["meta"] == {"s": 4} and torch.equal(tensors["a"], torch.full((3,), 4.0))
    weights = tmp_path / "checkpoints" / manifest["file"]
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert load_latest(tmp_path)[1]["step"] == 3  # the corrupted one is skipped


WRITER = """
import sys, torch
from selfmod.checkpoint import save_checkpoint
for step in range(int(sys.argv[2])):
    save_checkpoint(sys.argv[1], step, {"w": torch.full((200_000,), float(step))}, {"s": step})
"""


def test_kill_9_during_a_checkpoint_write_leaves_the_last_complete_one(tmp_path):
    # deterministic worst moment: SIGKILL with half of checkpoint 3's tensors on disk
    out = _crash_at("write=ckpt-00000003.safe", "-c", WRITER, str(tmp_path), "5")
    assert out.returncode == -9
    tensors, manifest = load_latest(tmp_path)
    assert manifest["step"] == 2 and torch.equal(tensors["w"], torch.full((200_000,), 2.0))
    # and the manifest write of checkpoint 3: its tensors exist but it is not complete
    tmp2 = tmp_path / "b"
    out = _crash_at("write=ckpt-00000003.json", "-c", WRITER, str(tmp2), "5")
    assert out.returncode == -9
    assert load_latest(tmp2)[1]["step"] == 2


# Every modifier plus the online one (per step) and a modifier every 2nd cycle.
ONLINE = [
    'modifiers=["lr","weight_decay","dropout","batch_size","grow","prune","online_lr"]',
    'schedule={grow=2, online_lr="step"}',
]


RACE = ["level_race=[0.3,3]", "lr_schedule=cosine", "optimizer=adamw"]  # the level raced first


@pytest.mark.parametrize("extra", [[], ONLINE, RACE], ids=["cycle", "online", "race"])
def test_crash_at_step_k_then_resume_is_bitwise_identical(tmp_path, extra):
    full = _selfmod("train", *_sets([*SMALL, *extra, f"out={tmp_path / 'a'}"]))
    assert full.returncode == 0, full.stderr
    crashed = _crash_at("step=77", "train", *_sets([*SMALL, *extra, f"out={tmp_path / 'b'}"]))
    assert crashed.returncode == -9
    (run_b,) = (tmp_path / "b").iterdir()
    assert not (run_b / "final.safetensors").exists()
    resumed = _selfmod("resume", str(run_b))
    assert resumed.returncode == 0, resumed.stderr
    (run_a,) = (tmp_path / "a").iterdir()
    a, b = (load_file(str(r / "final.safetensors")) for r in (run_a, run_b))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (run_a / "final.safetensors").read_bytes() == (run_b / "final.safetensors").read_bytes()
    ha, hb = (json.loads((r / "history.json").read_text()) for r in (run_a, run_b))
    assert ha["tuned"]["log"] == hb["tuned"]["log"]
    # the standard logs too: the resumed run's CSV has no row twice and equals the other's
    assert (run_a / "scalars.csv").read_text() == (run_b / "scalars.csv").read_text()
    if extra == RACE:
        (race,) = [d for d in hb["tuned"]["decisions"] if d["modifier"] == "level_race"]
        assert race["decision"] in ("commit", "reject") and race["step"] == 0
    elif extra:  # the online modifier moved the rates between cycles, also after the resume
        online = [d for d in hb["tuned"]["decisions"] if d["modifier"] == "online_lr"]
        assert [d["cycle"] for d in online] == [1, 2, 3, 4, 5]
        assert all(d["before"]["lr"] != d["after"]["lr"] for d in online)

    def strip(ds):  # ledger ids differ: the resumed ledger also holds the superseded tail
        return [{k: v for k, v in d.items() if k != "id"} for d in ds]

    assert strip(ha["tuned"]["decisions"]) == strip(hb["tuned"]["decisions"])
    manifest = json.loads((run_b / "final.json").read_text())
    assert (
        manifest["sha256"] == hashlib.sha256((run_b / "final.safetensors").read_bytes()).hexdigest()
    )
    with Ledger(run_b / "ledger.sqlite") as ledger:
        ledger.verify()
        assert [e.decision for e in ledger.entries("resume")] == ["resume"]
    log = _selfmod("log", str(run_b))
    assert log.returncode == 0 and "hash chain verified" in log.stdout


def test_rollback_cli_goes_back_to_a_cycle_and_resume_continues(tmp_path):
    out = _selfmod("train", *_sets([*SMALL, f"out={tmp_path}"]))
    assert out.returncode == 0, out.stderr
    (run,) = tmp_path.iterdir()
    bad = _selfmod("rollback", str(run), "--to", "99")
    assert bad.returncode == 2 and "--to must be a cycle with a kept checkpoint" in bad.stderr
    final = (run / "final.safetensors").read_bytes()
    assert _selfmod("rollback", str(run), "--to", "2").returncode == 0
    assert not (run / "final.safetensors").exists()
    assert load_latest(run)[1]["meta"]["cycle"] == 2
    assert _selfmod("resume", str(run)).returncode == 0
    assert (run / "final.safetensors").read_bytes() == final  # deterministic replay
    with Ledger(run / "ledger.sqlite") as ledger:
        assert any("manual rollback to cycle 2" in e.reason for e in ledger.entries("rollback"))


def test_log_detects_rows_cut_from_the_end_of_a_finished_run(tmp_path):
    out = _selfmod("train", *_sets([*SMALL, "steps=40", f"out={tmp_path}"]))
    assert out.returncode == 0, out.stderr
    (run_dir,) = tmp_path.iterdir()
    assert _selfmod("log", str(run_dir)).returncode == 0
    db = sqlite3.connect(run_dir / "ledger.sqlite")
    db.execute("DELETE FROM entries WHERE seq = (SELECT MAX(seq) FROM entries)")
    db.commit()
    db.close()
    cut = _selfmod("log", str(run_dir))  # still a valid chain, but not the head final.json holds
    assert cut.returncode == 2 and "truncated" in cut.stderr and cut.stderr.count("\n") == 1


def test_runs_started_in_the_same_second_get_distinct_directories(tmp_path, monkeypatch):
    import threading

    from selfmod.runs import rundir

    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: "train-20260101-000000")
    start, made = threading.Barrier(12), []

    def claim() -> None:
        start.wait()
        made.append(rundir.new_run_dir(tmp_path / "runs"))

    threads = [threading.Thread(target=claim) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 12 and all(d.is_dir() for d in made)
    names = sorted(d.name for d in made)
    assert names[0] == "train-20260101-000000"
    assert set(names[1:]) == {f"train-20260101-000000-{i}" for i in range(1, 12)}
