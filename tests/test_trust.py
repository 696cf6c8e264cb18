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
    return subprocess.run(
        [*SELFMOD, *args], capture_output=True, text=True, check=False, cwd=cwd,
        env={**env, "PYTHONPATH": path}, timeout=300,
    )  # fmt: skip


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
