"""Trust boundaries of a run directory (issue 36): it carries data, never code; it is not
followed out through links; it resumes only the run it holds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import warm

HERE = Path(__file__).parent
SELFMOD = [sys.executable, "-m", "selfmod.cli"]
SMALL = [
    "steps=40", "cycle=20", "lookahead=5", "width=8", "modifiers.grow.max_width=16",
    "guard_size=100", "replay_size=200", "compare_fixed=false", "report=false",
]  # fmt: skip
USER = ["model=user_models:residual_mlp", "data=user_models:digits", "guard_size=200"]


def _selfmod(*args, cwd=None):
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFMOD_LEDGER")}
    return warm.run([*SELFMOD[1:], *args], cwd=cwd, env={**env, "PYTHONPATH": path}, timeout=300)


def _one_line_exit_2(res, *messages):
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for message in messages:
        assert message in lines[0], lines[0]


def _train(out, *sets):
    res = _selfmod("train", *[a for s in [*SMALL, *sets, f"out={out}"] for a in ("--set", s)])
    assert res.returncode == 0, res.stderr
    (run,) = Path(out).iterdir()
    return run


@pytest.fixture(scope="module")
def builtin_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("builtin"))


@pytest.fixture
def run(builtin_run, tmp_path):
    """A copy of a finished built-in run, made resumable again (its end files removed)."""
    run = Path(shutil.copytree(builtin_run, tmp_path / "run"))
    for name in ("status.json", "final.json", "final.safetensors"):
        (run / name).unlink()
    return run


def _set_config(run, **values):
    cfg = json.loads((run / "config.json").read_text())
    cfg.update(values)
    (run / "config.json").write_text(json.dumps(cfg))


EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
def net():
    raise SystemExit(0)
"""


# --------------------------------------------------------------------------- no code


@pytest.mark.parametrize(
    ("field", "spec"),
    [("model", "os:abort"), ("model", "faulthandler:_sigsegv"), ("model", "builtins:exit"),
     ("data", "evil_mod:net"), ("loss", "evil_mod:net")],
)  # fmt: skip
def test_resume_never_imports_what_config_json_alone_names(run, tmp_path, field, spec):
    marker = tmp_path / "marker"
    (tmp_path / "evil_mod.py").write_text(EVIL.format(marker=str(marker)))
    _set_config(run, **{field: spec})
    res = _selfmod("resume", str(run), cwd=tmp_path)
    _one_line_exit_2(res, f"{field} = {spec!r}", f"--allow-import {spec}")
    assert not marker.exists()


def test_resume_never_imports_a_module_inside_the_run_directory(run):
    marker = run.parent / "marker"
    (run / "evil_mod.py").write_text(EVIL.format(marker=str(marker)))
    _set_config(run, model="evil_mod:net")
    res = _selfmod("resume", ".", "--allow-import", "evil_mod:net", cwd=run)
    _one_line_exit_2(res, "model = 'evil_mod:net'", "inside the run directory")
    assert not marker.exists()


def test_allow_import_names_the_spec_or_its_module(tmp_path):
    from selfmod.runs.imports import Imports

    imports = Imports.of(["pkg.mod:net", "other"], tmp_path)
    assert imports.permits("pkg.mod:net") and imports.permits("other:f")
    assert imports.permits("other.sub:f")
    for spec in ("pkg.mod:data", "pkg:net", "otherwise:f", "os:abort"):
        assert not imports.permits(spec), spec


def test_resume_imports_what_the_user_allows_and_ends_identical(tmp_path):
    full = _train(tmp_path / "a", *USER)
    run = Path(shutil.copytree(full, tmp_path / "b" / full.name))
    for name in ("status.json", "final.json", "final.safetensors"):
        (run / name).unlink()
    _one_line_exit_2(_selfmod("resume", str(run)), "model = 'user_models:residual_mlp'")
    _one_line_exit_2(
        _selfmod("resume", str(run), "--allow-import", "user_models:residual_mlp"),
        "data = 'user_models:digits'",
    )
    res = _selfmod("resume", str(run), "--allow-import", "user_models")
    assert res.returncode == 0, res.stderr
    assert (run / "final.safetensors").read_bytes() == (full / "final.safetensors").read_bytes()


def test_a_built_in_run_resumes_without_flags(run, builtin_run):
    res = _selfmod("resume", str(run))
    assert res.returncode == 0, res.stderr
    final = (run / "final.safetensors").read_bytes()
    assert final == (builtin_run / "final.safetensors").read_bytes()


def test_pbt_member_state_round_trips_without_pickle(tmp_path):
    from selfmod.bench.pbt import load_member_state, save_member_state

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    extra = {"step": 7, "schedule": [[0, 0.01, 0.1]], "stream": {"epoch": 1, "pos": 3}}
    save_member_state(str(tmp_path), model, opt, extra)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]
    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    assert load_member_state(str(tmp_path), model2, opt2) == extra
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    x = torch.randn(4, 3)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    source = (HERE.parent / "selfmod" / "bench" / "pbt.py").read_text()
    assert "torch.load" not in source and "weights_only" not in source


# --------------------------------------------------------------------------- links, modes

LINKED = ["scalars.csv", "ledger.sqlite", "checkpoints", "tensorboard", "config.json"]


@pytest.mark.parametrize("name", LINKED)
def test_resume_refuses_a_symlinked_file_and_touches_nothing_outside(run, tmp_path, name):
    outside = tmp_path / "outside"
    (run / name).rename(outside)
    (run / name).symlink_to(outside)
    before = sorted(p.name for p in outside.iterdir()) if outside.is_dir() else outside.read_bytes()
    _one_line_exit_2(_selfmod("resume", str(run)), f"{run / name} is a symbolic link")
    after = sorted(p.name for p in outside.iterdir()) if outside.is_dir() else outside.read_bytes()
    assert after == before


@pytest.mark.parametrize(
    ("name", "command"),
    [("config.json", ["log"]), ("history.json", ["report"]), ("ledger.sqlite", ["log"]),
     ("checkpoints", ["rollback", "--to", "1"]), ("config.json", ["approve", "1"])],
)  # fmt: skip
def test_readers_refuse_a_symlinked_file(builtin_run, tmp_path, name, command):
    run = Path(shutil.copytree(builtin_run, tmp_path / "run"))
    outside = tmp_path / "outside"
    (run / name).rename(outside)
    (run / name).symlink_to(outside)
    res = _selfmod(command[0], str(run), *command[1:])
    _one_line_exit_2(res, f"{run / name} is a symbolic link")


def test_a_symlinked_checkpoint_inside_the_folder_is_refused(run, tmp_path):
    first = sorted((run / "checkpoints").glob("*.json"))[0]
    outside = tmp_path / first.name
    first.rename(outside)
    first.symlink_to(outside)
    _one_line_exit_2(_selfmod("resume", str(run)), f"{first} is a symbolic link")


def test_every_file_of_a_run_is_0600_and_every_folder_0700(builtin_run):
    paths = [builtin_run, *builtin_run.rglob("*")]
    assert {p.name for p in paths} >= {".lock", "ledger.sqlite", "scalars.csv", "tensorboard"}
    for path in paths:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))


# --------------------------------------------------------------------------- forged files


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("CREATE TRIGGER drop_some BEFORE INSERT ON entries WHEN NEW.seq % 3 = 0 "
         "BEGIN SELECT RAISE(IGNORE); END", "trigger 'drop_some'"),
        ("ALTER TABLE entries RENAME TO old_entries; "
         "CREATE VIEW entries AS SELECT * FROM old_entries", "view 'entries'"),
        ("ALTER TABLE entries ADD COLUMN note TEXT", "columns"),
        ("CREATE TABLE extra (x)", "table 'extra'"),
    ],
    ids=["trigger", "view", "column", "table"],
)  # fmt: skip
def test_a_ledger_with_anything_but_its_own_schema_is_refused(run, sql, message):
    import sqlite3

    db = sqlite3.connect(run / "ledger.sqlite")
    db.executescript(sql)
    db.close()
    for command in ("log", "resume"):
        _one_line_exit_2(_selfmod(command, str(run)), "is not a selfmod ledger", message)


def _forge_newest(run, edit_meta=None, edit_tensors=None):
    """Edit the newest checkpoint as an attacker would, every sha256 recomputed."""
    import hashlib

    from safetensors.torch import load, save

    from selfmod.checkpoint import manifest_digest

    path = sorted((run / "checkpoints").glob("ckpt-*.json"))[-1]
    m = json.loads(path.read_text())
    if edit_meta:
        edit_meta(m["meta"])
    if edit_tensors:
        weights = path.with_suffix(".safetensors")
        tensors = load(weights.read_bytes())
        edit_tensors(tensors)
        data = save(tensors)
        weights.write_bytes(data)
        m["sha256"], m["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    m["manifest_sha256"] = manifest_digest(m)
    path.write_text(json.dumps(m))


def _wider(tensors):
    name = "state.params['0.weight']"
    tensors[name] = torch.zeros(tensors[name].shape[0] + 3, tensors[name].shape[1])


@pytest.mark.parametrize(
    "forge",
    [dict(edit_meta=lambda m: m.pop("scalars")), dict(edit_meta=lambda m: m.update(step="20")),
     dict(edit_meta=lambda m: m.pop("ledger_head")), dict(edit_meta=lambda m: m.pop("stream")),
     dict(edit_tensors=_wider)],
    ids=["no-scalars", "string-step", "no-ledger-head", "no-stream", "wrong-shape"],
)  # fmt: skip
def test_a_forged_or_partial_manifest_is_one_line(run, forge):
    _forge_newest(run, **forge)
    _one_line_exit_2(_selfmod("resume", str(run)), "checkpoint ckpt-")


# --------------------------------------------------------------------------- another run


@pytest.mark.parametrize(
    ("field", "value"),
    [("seed", 1), ("cycle", 10), ("width", 9), ("model", "cnn"), ("optimizer", "adamw"),
     ("guard_size", 50), ("dtype", "float64"), ("steps", 60)],
)  # fmt: skip
def test_resume_refuses_an_edited_config_naming_the_field(run, field, value):
    cfg = json.loads((run / "config.json").read_text())
    assert cfg[field] != value
    _set_config(run, **{field: value})
    _one_line_exit_2(_selfmod("resume", str(run)), "config.json differs", f"in {field} (")
    assert not (run / "final.safetensors").exists()


def test_a_new_run_into_a_folder_holding_a_run_is_refused(builtin_run, tmp_path):
    from selfmod.runs.rundir import RunDirError, config_of, open_run_dir

    run = Path(shutil.copytree(builtin_run, tmp_path / "run"))
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(RunDirError, match=r"already holds a run \(config\.json\); resume it"):
        open_run_dir(run, config_of(run), resume=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert config_of(run) == config_of(builtin_run)
    fresh, _ = open_run_dir(tmp_path / "empty", config_of(run), resume=False)
    assert (fresh / "config.json").is_file()


def test_fit_resume_with_another_config_is_refused_and_a_second_fit_too(tmp_path):
    import torch.nn.functional as F

    from selfmod.runs import fit
    from selfmod.runs.rundir import RunDirError

    torch.manual_seed(0)
    x, y = torch.randn(300, 6), torch.randint(0, 3, (300,))
    gx, gy = torch.randn(60, 6), torch.randint(0, 3, (60,))
    config = {"steps": 20, "cycle": 10, "lookahead": 3, "replay_size": 50, "report": False}

    def run(config, resume):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        return fit(model, F.cross_entropy, (x, y), (gx, gy), config=config,
                   run_dir=tmp_path / "run", resume=resume)  # fmt: skip

    run(config, resume=False)
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    with pytest.raises(RunDirError, match=r"differs in seed \(seed: 0 recorded, 1 given\)"):
        run({**config, "seed": 1}, resume=True)
    with pytest.raises(RunDirError, match="already holds a run"):
        run(config, resume=False)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
    assert run(config, resume=True).run.counters.examples == 20 * 128  # continues to its end


# --------------------------------------------------------------------------- the run's data


def _small_fit(run_dir, data, resume, stop_at=None, config=None):
    """A 20-step fit on ``data`` (``(x, y)``); ``stop_at``: killed (an exception) there."""
    import torch.nn.functional as F

    from selfmod.runs import fit

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    gx, gy = torch.linspace(-1, 1, 360).reshape(60, 6), torch.arange(60) % 3

    def stop(run):
        if run.step == stop_at:
            raise RuntimeError("killed")

    config = config or {"steps": 20, "cycle": 10, "lookahead": 3, "replay_size": 50,
                        "budget_unit": "steps"}  # fmt: skip
    return fit(model, F.cross_entropy, data, (gx, gy), config={**config, "report": False},
               run_dir=run_dir, resume=resume, on_step=stop)  # fmt: skip


def _data(n=300, shift=0.0):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=g) + shift, torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("keyed", [False, True])
def test_a_resume_on_other_data_is_refused_naming_data(tmp_path, monkeypatch, keyed):
    from selfmod.errors import SelfmodError

    if keyed:
        monkeypatch.setenv("SELFMOD_LEDGER_KEY", "a secret")
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):
        _small_fit(run_dir, _data(), resume=False, stop_at=15)
    x, y = _data()
    for other in ((x + 1e-3, y), (x[:200], y[:200]), (x.double(), y)):
        with pytest.raises(SelfmodError, match=r"the data differs .*\(data: sha256-rows:") as err:
            _small_fit(run_dir, other, resume=True)
        assert "\n" not in str(err.value)
    if keyed:  # the data entry and the checkpoints' record forged, the chain recomputed
        _forge_data(run_dir, "sha256:" + "0" * 64)
        with pytest.raises(SelfmodError, match="does not match its hash chain"):
            _small_fit(run_dir, _data(), resume=True)
        return
    assert _small_fit(run_dir, _data(), resume=True).run.step == 20  # its own data continues


def test_a_large_tensor_is_fingerprinted_by_its_sampled_rows(tmp_path, monkeypatch):
    """Above ``WHOLE_BYTES`` a tensor is hashed by rows evenly spaced from its first to its
    last: another order or a changed sampled row is refused, the same data resumes."""
    import selfmod.runs.fingerprint as fingerprint
    from selfmod.errors import SelfmodError

    monkeypatch.setattr(fingerprint, "WHOLE_BYTES", 24 * 40)  # 40 of the 300 rows of 6 floats
    x, y = _data()
    rows = fingerprint.sampled_rows(x)
    assert len(rows) == 40 and torch.equal(rows[0], x[0]) and torch.equal(rows[-1], x[-1])
    small = x[:40]  # at most the budget: whole
    assert fingerprint.sampled_rows(small) is small
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):
        _small_fit(run_dir, (x, y), resume=False, stop_at=15)
    edited = x.clone()
    edited[-1, 0] += 1.0  # the last row is always sampled
    for other in ((x.flip(0), y.flip(0)), (edited, y)):
        with pytest.raises(SelfmodError, match="the data differs"):
            _small_fit(run_dir, other, resume=True)
    assert _small_fit(run_dir, (x, y), resume=True).run.step == 20


def test_a_fingerprint_recorded_whole_is_checked_whole(tmp_path, monkeypatch):
    """A run whose ledger holds a ``sha256:`` fingerprint (every byte hashed, as before the
    sample) resumes on its data and is refused on other data."""
    import selfmod.runs.fingerprint as fingerprint
    from selfmod.errors import SelfmodError
    from selfmod.runs.ledger import Ledger

    monkeypatch.setattr(fingerprint, "WHOLE_BYTES", 24 * 40)  # the sample would differ
    whole = fingerprint.fingerprint(
        _small_fit(tmp_path / "done", _data(), False).run.sources, "sha256:"
    )
    assert whole.startswith("sha256:") and whole != fingerprint.fingerprint(
        _small_fit(tmp_path / "done2", _data(), False).run.sources
    )
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):
        _small_fit(run_dir, _data(), resume=False, stop_at=15)
    _forge_data(run_dir, whole)  # as an old ledger holds it; the checkpoint's head follows
    with Ledger(run_dir / "ledger.sqlite", create=False) as ledger:
        hashes = {e.seq: e.hash for e in ledger.entries()}
    _forge_newest(
        run_dir,
        edit_meta=lambda m: m.update(
            ledger_head=[m["ledger_head"][0], hashes[m["ledger_head"][0]]]
        ),
    )
    x, y = _data()
    with pytest.raises(SelfmodError, match=r"\(data: sha256:"):
        _small_fit(run_dir, (x + 1e-3, y), resume=True)
    assert _small_fit(run_dir, _data(), resume=True).run.step == 20


def _forge_data(run_dir, value):
    """Record ``value`` as the run's data in its ledger (every hash recomputed, plain sha256,
    as one without the key would) and in its newest checkpoint."""
    import sqlite3

    from selfmod.runs.ledger import GENESIS, _digest

    db = sqlite3.connect(run_dir / "ledger.sqlite")
    prev = GENESIS
    for seq, cycle, step, kind, decision, reason, payload, _, _ in db.execute(
        "SELECT * FROM entries ORDER BY seq"
    ).fetchall():
        if decision == "data":
            payload = json.dumps({"data": value}, sort_keys=True, separators=(",", ":"))
        h = _digest(prev, seq, cycle, step, kind, decision, reason, payload)
        db.execute(
            "UPDATE entries SET payload=?, prev_hash=?, hash=? WHERE seq=?",
            (payload, prev, h, seq),
        )
        prev = h
    db.commit()
    db.close()
    _forge_newest(run_dir, edit_meta=lambda m: m.update(data=value))


def test_selfmod_resume_of_a_fit_run_says_how_to_continue_it(tmp_path):
    with pytest.raises(RuntimeError, match="killed"):
        _small_fit(tmp_path / "run", _data(), resume=False, stop_at=15)
    res = _selfmod("resume", str(tmp_path / "run"))
    _one_line_exit_2(res, "is a run of fit()", "fit(..., run_dir=", "resume=True)")


# --------------------------------------------------------------------------- forged claims


def test_a_forged_completion_of_a_killed_run_is_not_believed(run, builtin_run):
    (run / "status.json").write_text(json.dumps({"state": "complete", "step": 40}))
    final = {"file": "final.safetensors", "step": 40, "sha256": "0" * 64, "ledger_head": [1, "x"]}
    (run / "final.json").write_text(json.dumps(final))
    res = _selfmod("resume", str(run))
    assert res.returncode == 0 and "nothing to resume" not in res.stdout, res.stderr
    final = (run / "final.safetensors").read_bytes()
    assert final == (builtin_run / "final.safetensors").read_bytes()


def test_a_final_json_of_wrong_types_is_one_line_or_ignored(builtin_run, tmp_path):
    run = Path(shutil.copytree(builtin_run, tmp_path / "run"))
    for final in ({"step": "40", "ledger_head": 5}, {"ledger_head": ["1", 2]}, [1, 2]):
        (run / "final.json").write_text(json.dumps(final))
        _one_line_exit_2(_selfmod("log", str(run)), "final.json")
    res = _selfmod("resume", str(run))  # not complete as claimed: continued from its checkpoint
    assert res.returncode == 0, res.stderr
    assert (run / "final.safetensors").read_bytes() == (
        builtin_run / "final.safetensors"
    ).read_bytes()


def _opt_wider(tensors):
    name = next(k for k in tensors if k.startswith("state.opt_state") and k.endswith("weight']"))
    tensors[name] = torch.zeros(tensors[name].shape[0] + 2, *tensors[name].shape[1:])


@pytest.mark.parametrize(
    "forge",
    [dict(edit_meta=lambda m: m.pop("python_random")),
     dict(edit_meta=lambda m: m.update(cycle="1")), dict(edit_tensors=_opt_wider),
     dict(edit_meta=lambda m: m.update(shared={"good.params['0.weight']": "state.nothing"})),
     dict(edit_meta=lambda m: m.update(shared={"replay.x": "state.params['0.weight']"}))],
    ids=["no-random", "string-cycle", "opt-shape", "shared-missing", "shared-not-good"],
)  # fmt: skip
def test_more_forged_manifests_are_one_line(run, forge):
    _forge_newest(run, **forge)
    _one_line_exit_2(_selfmod("resume", str(run)), "checkpoint ckpt-")


# --------------------------------------------------------------------------- approvals

MANUAL = [*SMALL, "steps=160", "approval=manual"]


def _crash(where, *args):
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFMOD_LEDGER")}
    return subprocess.run(
        [sys.executable, str(HERE / "crash_at.py"), where, *args], capture_output=True,
        text=True, check=False, env={**env, "PYTHONPATH": path}, timeout=300,
    )  # fmt: skip


def _decisions(run):
    history = json.loads((run / "history.json").read_text())
    return [(d["cycle"], d["step"], d["modifier"], d["decision"]) for d in history["tuned"]
            ["decisions"]]  # fmt: skip


@pytest.fixture(scope="module")
def manual_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("manual"), *MANUAL[len(SMALL) :])


def test_a_manual_approval_run_killed_before_any_approval_resumes_identical(manual_run, tmp_path):
    sets = [a for s in [*MANUAL, f"out={tmp_path}"] for a in ("--set", s)]
    assert _crash("step=70", "train", *sets).returncode == -9
    (run,) = tmp_path.iterdir()
    res = _selfmod("resume", str(run))
    assert res.returncode == 0, res.stderr
    assert _decisions(run) == _decisions(manual_run)  # no expiry twice, nothing lost
    assert (run / "final.safetensors").read_bytes() == (
        manual_run / "final.safetensors"
    ).read_bytes()
    # a finished run applies nothing more: approving is refused, not promised
    from selfmod.runs.ledger import Ledger

    with Ledger(run / "ledger.sqlite", create=False) as ledger:
        pending = [e.seq for e in ledger.entries("proposal") if e.decision == "pending"]
    _one_line_exit_2(_selfmod("approve", str(run), str(pending[-1])), "is complete (step 160)")


@pytest.mark.slow
def test_a_proposal_superseded_by_a_resume_cannot_be_approved(tmp_path):
    from selfmod.runs.ledger import Ledger

    sets = [a for s in [*MANUAL, f"out={tmp_path}"] for a in ("--set", s)]
    assert _crash("step=70", "train", *sets).returncode == -9
    (run,) = tmp_path.iterdir()
    again = _crash("step=75", "resume", str(run))  # cycle 3 proposed again, then killed
    assert again.returncode == -9, again.stderr
    with Ledger(run / "ledger.sqlite", create=False) as ledger:
        pending = [e for e in ledger.entries("proposal") if e.decision == "pending"]
    old, new = [e for e in pending if e.cycle == 3 and e.payload["modifier"] == "grow"]
    refused = _selfmod("approve", str(run), str(old.seq))  # the first resume went back on it
    _one_line_exit_2(refused, f"change {old.seq} was superseded by a resume")
    refused = _selfmod("approve", str(run), str(new.seq))  # the next resume goes back on it
    _one_line_exit_2(refused, f"change {new.seq} was proposed after the newest checkpoint")
    (kept,) = [e for e in pending if e.cycle == 2 and e.payload["modifier"] == "grow"]
    assert _selfmod("approve", str(run), str(kept.seq)).returncode == 0
    assert _selfmod("resume", str(run)).returncode == 0
    applied = [d for d in _decisions(run) if d[3] == "applied"]
    assert applied == [(3, 60, "grow", "applied")], applied


# --------------------------------------------------------------------------- crash consistency


def test_a_kill_inside_the_scalars_csv_rewrite_loses_no_row(tmp_path, monkeypatch):
    import csv

    from selfmod.runs.logs import Logs

    rows = "step,loss\n50,1.0\n100,0.5\n150,0.25\n"
    (tmp_path / "scalars.csv").write_text(rows)

    def killed(self, rows):
        raise KeyboardInterrupt  # as a kill halfway through the rewrite

    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    with pytest.raises(KeyboardInterrupt):
        Logs(tmp_path, start=100)
    assert (tmp_path / "scalars.csv").read_text() == rows
    monkeypatch.undo()
    Logs(tmp_path, start=100).close()
    assert (tmp_path / "scalars.csv").read_text().splitlines() == ["step,loss", "50,1.0", "100,0.5"]


def test_self_modifier_holds_the_run_lock_until_close(tmp_path):
    import torch.nn.functional as F

    from selfmod.runs import SelfModifier
    from selfmod.runs.lock import RunLockedError, run_lock

    model = torch.nn.Sequential(torch.nn.Linear(6, 3))
    guard = (torch.randn(30, 6), torch.arange(30) % 3)
    sm = SelfModifier(model, F.cross_entropy, guard, config={"cycle": 5, "lookahead": 2},
                      run_dir=tmp_path / "run")  # fmt: skip
    with pytest.raises(RunLockedError), run_lock(tmp_path / "run"):
        pass
    sm.close()
    with run_lock(tmp_path / "run"):
        pass


HOLDER = """
import sys, time
from selfmod.runs.lock import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_new_fit_takes_the_lock_before_it_writes_config_json(tmp_path):
    from selfmod.runs.lock import RunLockedError

    (tmp_path / "run").mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError):
            _small_fit(tmp_path / "run", _data(), resume=False)
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]
    finally:
        proc.kill()
        proc.wait()


def test_a_run_directory_is_resolved_once_when_taken(tmp_path):
    """A command or a run takes the real path of its run directory once: a link swapped in
    afterwards does not redirect it."""
    from selfmod.runs.rundir import resolved

    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    taken = resolved(tmp_path / "link")
    (tmp_path / "link").unlink()
    (tmp_path / "link").symlink_to(tmp_path)  # swapped after the command took the path
    assert taken == real.resolve() and taken.is_absolute()
