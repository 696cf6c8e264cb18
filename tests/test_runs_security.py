"""The run directory against tampering and misuse (issue 14, items 3-7): manifests that name
files elsewhere or were edited, a deleted, garbage or forged ledger, two processes on one run,
and error paths of log / approve / rollback / report that must be one line and exit 2."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest
import torch
import warm

from selfmod.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    manifest_digest,
    save_checkpoint,
)
from selfmod.errors import SelfmodError
from selfmod.runs.ledger import GENESIS, Ledger, LedgerError, LedgerTamperedError, _digest
from selfmod.runs.lock import RunLockedError, run_lock

SELFMOD = [sys.executable, "-m", "selfmod.cli"]
SMALL = [
    "steps=80", "cycle=20", "lookahead=5", "width=8",
    "modifiers.grow.max_width=32", "guard_size=100", "replay_size=200", "compare_fixed=false",
    "keep_checkpoints=10",
]  # fmt: skip


def _selfmod(*args, env=None):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SELFMOD_LEDGER")},
           **(env or {})}  # fmt: skip
    return warm.run([*SELFMOD[1:], *args], env=env, timeout=300)


def _one_line_exit_2(res, message):
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert message in lines[0], lines[0]


def _rewrite_manifest(path, **changes):
    """Edit a manifest as an attacker would: change keys and fix up its manifest_sha256."""
    m = json.loads(path.read_text())
    m.update(changes)
    m["manifest_sha256"] = manifest_digest(m)
    path.write_text(json.dumps(m))


# --------------------------------------------------------------------------- checkpoints


def _one_checkpoint(tmp_path, step=1):
    return save_checkpoint(tmp_path, step, {"w": torch.arange(4.0)}, {"cycle": step}, keep=5)


@pytest.mark.parametrize(
    "name",
    ["../../outside.safetensors", "/etc/passwd", "sub/ckpt-00000001.safetensors",
     "ckpt-00000002.safetensors", "..", ""],
)  # fmt: skip
def test_manifest_may_name_only_its_own_file_in_its_folder(tmp_path, name):
    path = _one_checkpoint(tmp_path)
    _one_checkpoint(tmp_path, 2)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(path.with_suffix(".safetensors"), outside)
    sha = hashlib.sha256(outside.read_bytes()).hexdigest()
    _rewrite_manifest(path, file=name, sha256=sha)
    with pytest.raises(CheckpointError, match="may name only its own"):
        load_checkpoint(path)


def test_manifest_naming_a_symlink_is_refused(tmp_path):
    path = _one_checkpoint(tmp_path)
    data = path.with_suffix(".safetensors")
    outside = tmp_path / "outside.safetensors"
    data.rename(outside)
    data.symlink_to(outside)
    with pytest.raises(CheckpointError, match="plain file"):
        load_checkpoint(path)


def test_edited_manifest_meta_is_detected(tmp_path):
    path = _one_checkpoint(tmp_path)
    m = json.loads(path.read_text())
    m["meta"]["cycle"] = 7  # sha256 of the tensors still matches: only the manifest hash sees it
    path.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="manifest_sha256"):
        load_checkpoint(path)


@pytest.mark.parametrize("key", ["meta", "sha256", "manifest_sha256", "step", "file"])
def test_manifest_missing_a_key_is_a_checkpoint_error(tmp_path, key):
    path = _one_checkpoint(tmp_path)
    m = json.loads(path.read_text())
    del m[key]
    path.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(path)


def test_non_safetensors_file_with_a_valid_sha_is_a_checkpoint_error(tmp_path):
    path = _one_checkpoint(tmp_path)
    data = path.with_suffix(".safetensors")
    data.write_bytes(b"not a safetensors file at all")
    _rewrite_manifest(path, sha256=hashlib.sha256(data.read_bytes()).hexdigest())
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(path)


def test_checkpoint_of_another_run_is_refused_and_skipped(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, {}, run_id="mine")
    save_checkpoint(tmp_path, 2, {"w": torch.ones(2)}, {}, run_id="other")
    with pytest.raises(CheckpointError, match="belongs to run 'other'"):
        load_checkpoint(list_checkpoints(tmp_path)[-1], run_id="mine")
    assert load_latest(tmp_path, run_id="mine")[1]["step"] == 1
    assert load_latest(tmp_path)[1]["step"] == 2  # without a run id: not checked


def test_a_run_prunes_only_its_own_checkpoints(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, {}, run_id="other")
    for step in (2, 3, 4):
        save_checkpoint(tmp_path, step, {"w": torch.ones(2)}, {}, keep=2, run_id="mine")
    steps = [json.loads(p.read_text())["step"] for p in list_checkpoints(tmp_path)]
    assert steps == [1, 3, 4]  # the other run's is kept, this run's oldest pruned
    assert (tmp_path / "checkpoints" / "ckpt-00000001.safetensors").is_file()


def test_stale_temp_files_are_removed_by_the_next_save(tmp_path):
    _one_checkpoint(tmp_path)
    stale = tmp_path / "checkpoints" / ".ckpt-00000002.safetensors.abc.tmp"
    stale.write_bytes(b"half")
    _one_checkpoint(tmp_path, 2)
    assert not stale.exists()


# --------------------------------------------------------------------------- ledger


def _entries(path, n=3, key=None):
    with Ledger(path, key=key) as ledger:
        for i in range(n):
            ledger.append("proposal", cycle=i, step=i, decision="commit", reason=f"e{i}")


def test_reading_a_missing_ledger_never_creates_one(tmp_path):
    with pytest.raises(LedgerError, match="does not exist"):
        Ledger(tmp_path / "ledger.sqlite", create=False)
    assert not (tmp_path / "ledger.sqlite").exists()


def test_garbage_ledger_is_a_ledger_error(tmp_path):
    (tmp_path / "ledger.sqlite").write_bytes(b"this is not sqlite" * 100)
    for create in (False, True):
        with pytest.raises(LedgerError, match="not a selfmod ledger"):
            Ledger(tmp_path / "ledger.sqlite", create=create)


def test_keyed_ledger_detects_a_recomputed_chain(tmp_path):
    path = tmp_path / "ledger.sqlite"
    _entries(path, key=b"secret")
    with Ledger(path, key=b"secret") as ledger:
        assert ledger.keyed and ledger.verify() == 3
    # the attacker edits a row and recomputes every hash without the key (plain sha256)
    db = sqlite3.connect(path)
    rows = db.execute("SELECT * FROM entries ORDER BY seq").fetchall()
    prev = GENESIS
    for seq, cycle, step, kind, decision, reason, payload, _, _ in rows:
        decision = "reject" if seq == 2 else decision
        h = _digest(prev, seq, cycle, step, kind, decision, reason, payload)
        db.execute(
            "UPDATE entries SET decision=?, prev_hash=?, hash=? WHERE seq=?",
            (decision, prev, h, seq),
        )
        prev = h
    db.commit()
    db.close()
    with Ledger(path, key=b"secret") as ledger, pytest.raises(LedgerTamperedError, match="1"):
        ledger.verify()
    # and flipping the ledger to "unkeyed" is refused while the key is set
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value='0' WHERE key='keyed'")
    db.commit()
    db.close()
    with Ledger(path, key=b"secret") as ledger, pytest.raises(LedgerError, match="not keyed"):
        ledger.verify()


def test_keyed_ledger_refuses_no_key_and_a_wrong_key(tmp_path, monkeypatch):
    monkeypatch.delenv("SELFMOD_LEDGER_KEY", raising=False)
    monkeypatch.delenv("SELFMOD_LEDGER_KEY_FILE", raising=False)
    path = tmp_path / "ledger.sqlite"
    _entries(path, key=b"secret")
    with Ledger(path, create=False) as ledger, pytest.raises(LedgerError, match="is keyed"):
        ledger.verify()
    with pytest.raises(LedgerError, match="another key"):
        Ledger(path, key=b"wrong")
    _entries(tmp_path / "plain.sqlite")
    with Ledger(tmp_path / "plain.sqlite") as ledger:
        assert not ledger.keyed and ledger.verify() == 3


def test_ledger_key_from_env_or_a_file_outside_the_run(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.delenv("SELFMOD_LEDGER_KEY", raising=False)
    inside = run / "key"
    inside.write_text("secret\n")
    monkeypatch.setenv("SELFMOD_LEDGER_KEY_FILE", str(inside))
    with pytest.raises(LedgerError, match="outside the run directory"):
        Ledger(run / "ledger.sqlite")
    outside = tmp_path / "key"
    outside.write_text("secret\n")
    monkeypatch.setenv("SELFMOD_LEDGER_KEY_FILE", str(outside))
    _entries(run / "ledger.sqlite")
    with Ledger(run / "ledger.sqlite", key=b"secret") as ledger:  # the file's bytes, no newline
        assert ledger.keyed and ledger.verify() == 3
    monkeypatch.delenv("SELFMOD_LEDGER_KEY_FILE")
    monkeypatch.setenv("SELFMOD_LEDGER_KEY", "secret")
    with Ledger(run / "ledger.sqlite") as ledger:
        assert ledger.verify() == 3


# --------------------------------------------------------------------------- lock

HOLDER = """
import sys, time
from selfmod.runs.lock import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def held(tmp_path):
    """A second process holding ``tmp_path``'s run lock; yields its pid."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_run_lock_refuses_a_second_process_naming_the_holder(tmp_path, held):
    message = f"in use by another selfmod process \\(pid {held}\\)"
    with pytest.raises(RunLockedError, match=message), run_lock(tmp_path):
        pass


def test_run_lock_is_released_when_the_holder_dies(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    proc.kill()  # kill -9: the kernel drops the lock
    proc.wait()
    with run_lock(tmp_path) as path:
        assert path.read_text().strip() == str(os.getpid())


# --------------------------------------------------------------------------- the CLI on a run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    res = _selfmod("train", *[a for s in [*SMALL, f"out={out}"] for a in ("--set", s)])
    assert res.returncode == 0, res.stderr
    (run,) = out.iterdir()
    return run


@pytest.fixture
def run(finished_run, tmp_path):
    """A fresh copy of a finished run (4 cycles, a checkpoint at the start of each)."""
    return shutil.copytree(finished_run, tmp_path / "run")


def test_log_on_a_deleted_ledger_is_an_error_and_creates_nothing(run):
    (run / "ledger.sqlite").unlink()
    _one_line_exit_2(_selfmod("log", str(run)), "does not exist")
    assert not (run / "ledger.sqlite").exists()
    for command in (["report"], ["approve", "1"], ["rollback", "--to", "1"]):
        _one_line_exit_2(_selfmod(*command[:1], str(run), *command[1:]), "does not exist")
    assert not (run / "ledger.sqlite").exists()


def test_log_says_whether_the_chain_is_keyed(run, tmp_path):
    res = _selfmod("log", str(run))
    assert res.returncode == 0 and "unkeyed" in res.stdout
    # a keyed run: the ledger is made while SELFMOD_LEDGER_KEY is set
    keyed = tmp_path / "keyed"
    _entries(keyed / "ledger.sqlite", key=b"k3y")
    shutil.copy(run / "config.json", keyed / "config.json")
    _one_line_exit_2(_selfmod("log", str(keyed)), "is keyed")
    res = _selfmod("log", str(keyed), env={"SELFMOD_LEDGER_KEY": "k3y"})
    assert res.returncode == 0 and "keyed (HMAC-SHA256)" in res.stdout


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: (r / "ledger.sqlite").write_bytes(b"garbage" * 200), "not a selfmod ledger"),
        (lambda r: (r / "config.json").write_text("{broken"), "is not valid JSON"),
        (lambda r: (r / "config.json").write_text("[1, 2]"), "must hold a JSON object"),
        (lambda r: (r / "config.json").write_bytes(b"\xff\xfe{}"), "is not UTF-8"),
    ],
    ids=["garbage-ledger", "broken-config", "non-object-config", "non-utf8-config"],
)
@pytest.mark.parametrize("command", [["log"], ["report"], ["rollback", "--to", "1"]])
def test_damaged_run_files_are_one_line_for_every_reader(run, damage, message, command):
    damage(run)
    _one_line_exit_2(_selfmod(command[0], str(run), *command[1:]), message)


def test_unreadable_config_is_one_line(run, monkeypatch):
    # as root every file is readable: fail the read itself as an unprivileged user sees it
    from pathlib import Path

    from selfmod.runs import rundir
    from selfmod.runs.rundir import config_of

    real = rundir.read_bytes

    def read_bytes(path):
        if Path(path).name == "config.json":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(rundir, "read_bytes", read_bytes)
    with pytest.raises(SelfmodError, match=r"config\.json is unreadable: Permission denied"):
        config_of(run)


def test_report_with_a_broken_history_is_one_line(run):
    (run / "history.json").write_text('{"tuned": ')
    _one_line_exit_2(_selfmod("report", str(run)), "history.json is not valid JSON")


def _manifest_of_cycle(run, cycle):
    for path in list_checkpoints(run):
        if json.loads(path.read_text())["meta"]["cycle"] == cycle:
            return path
    raise AssertionError(cycle)


def _tree(run):
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.name != ".lock")


def test_rollback_never_moves_a_file_from_outside_the_run(run, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "x.safetensors"
    victim.write_bytes(b"precious")
    path = _manifest_of_cycle(run, 3)
    _rewrite_manifest(
        path, file="../../../outside/x.safetensors", sha256=hashlib.sha256(b"precious").hexdigest()
    )
    before = _tree(run)
    _one_line_exit_2(_selfmod("rollback", str(run), "--to", "1"), "may name only its own")
    assert victim.read_bytes() == b"precious" and _tree(run) == before
    _rewrite_manifest(path, file=str(victim))  # absolute
    _one_line_exit_2(_selfmod("rollback", str(run), "--to", "1"), "may name only its own")
    assert victim.read_bytes() == b"precious" and _tree(run) == before


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        ("UPDATE entries SET reason = 'forged' WHERE seq = 2", "does not match its hash chain"),
        ("DELETE FROM entries WHERE seq = 3", "missing"),
        ("DELETE FROM entries WHERE seq >= {head}", "truncated"),  # back past a checkpoint
    ],
    ids=["edited-row", "deleted-row", "truncated-tail"],
)
def test_rollback_verifies_the_ledger_before_it_moves_anything(run, tamper, message):
    head = json.loads(list_checkpoints(run)[-1].read_text())["meta"]["ledger_head"][0]
    db = sqlite3.connect(run / "ledger.sqlite")
    db.execute(tamper.format(head=head))
    db.commit()
    db.close()
    before = _tree(run)
    _one_line_exit_2(_selfmod("rollback", str(run), "--to", "1"), message)
    assert _tree(run) == before  # nothing moved, nothing written


def test_rollback_refuses_an_edited_or_incomplete_manifest(run):
    path = _manifest_of_cycle(run, 3)
    m = json.loads(path.read_text())
    before = _tree(run)
    m["meta"]["step"] = 1  # edited meta, hash not fixed up
    path.write_text(json.dumps(m))
    _one_line_exit_2(_selfmod("rollback", str(run), "--to", "1"), "manifest_sha256")
    del m["meta"]["cycle"]  # a manifest missing meta.cycle, hash fixed up
    _rewrite_manifest(path, meta=m["meta"])
    _one_line_exit_2(_selfmod("rollback", str(run), "--to", "1"), "meta.cycle")
    assert _tree(run) == before


def test_rollback_approve_and_report_refuse_a_locked_run(run):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        for command in (["report"], ["approve", "1"], ["rollback", "--to", "1"]):
            res = _selfmod(command[0], str(run), *command[1:])
            _one_line_exit_2(res, f"in use by another selfmod process (pid {proc.pid})")
    finally:
        proc.kill()
        proc.wait()
    assert _selfmod("rollback", str(run), "--to", "1").returncode == 0  # free again


def test_the_lock_file_is_no_part_of_what_rollback_moves(run):
    assert _selfmod("rollback", str(run), "--to", "2").returncode == 0
    assert load_latest(run)[1]["meta"]["cycle"] == 2
    assert not list((run / "checkpoints" / "rolled-back").glob("*.lock"))
    with run_lock(run):  # released when the command exited
        pass


def test_selfmod_error_is_the_base_of_every_new_error():
    assert issubclass(RunLockedError, SelfmodError) and issubclass(LedgerError, SelfmodError)


SCRIPT = "<script>alert(1)</script>"


def test_report_escapes_every_string_from_the_run(run):
    history = json.loads((run / "history.json").read_text())
    history["config"]["approval"] = SCRIPT  # a config value
    history["config"]["modifiers"] = [SCRIPT]
    for d in history["tuned"]["decisions"]:
        d["modifier"] = SCRIPT  # a modifier name
    (run / "history.json").write_text(json.dumps(history))
    with Ledger(run / "ledger.sqlite") as ledger:  # a reason and a modifier in the ledger
        ledger.append("event", cycle=0, step=0, decision=SCRIPT, reason=SCRIPT,
                      payload={"modifier": SCRIPT})  # fmt: skip
    res = _selfmod("report", str(run))
    assert res.returncode == 0, res.stderr
    page = (run / "report.html").read_text()
    assert "<script" not in page.lower()
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 5  # all five places, as text


def test_report_with_a_history_of_another_shape_is_one_line(run):
    (run / "history.json").write_text('{"tuned": 1}')
    _one_line_exit_2(_selfmod("report", str(run)), "not a history selfmod train writes")
