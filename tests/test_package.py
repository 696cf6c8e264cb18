"""The package: one version (``selfmod.__version__``, which pyproject reads), ``selfmod --version``,
LICENSE, CHANGELOG, ``py.typed`` shipped, and a wheel that carries them.

The shared venv holds an editable install whose metadata may be older than this checkout, so the
version is compared against ``selfmod.__version__`` and pyproject, never against a reinstall.
"""

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import selfmod
from selfmod import cli

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _source_version() -> str:
    """``__version__`` as setuptools reads it: statically from ``selfmod/__init__.py``."""
    tree = ast.parse((ROOT / "selfmod" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["__version__"]:
            return ast.literal_eval(node.value)
    raise AssertionError("selfmod/__init__.py defines no __version__")


def test_one_source_of_version():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "selfmod.__version__"}
    assert selfmod.__version__ == _source_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+", selfmod.__version__)


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_option_prints_selfmod_and_torch(flag):
    out = subprocess.run(
        [sys.executable, "-m", "selfmod.cli", flag], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first.split()[:2] == ["selfmod", selfmod.__version__]
    assert second == f"torch {torch.__version__}"
    installed = importlib.metadata.version("selfmod")
    if installed == selfmod.__version__:  # metadata and source agree: nothing else said
        assert first == f"selfmod {selfmod.__version__}"
    else:  # a stale (editable) install is named, never printed as the version
        assert f"installed metadata says {installed}" in first


def test_version_option_without_installed_metadata(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    result = CliRunner().invoke(cli.app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.splitlines()[0] == f"selfmod {selfmod.__version__}"


def test_version_option_runs_no_command(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: selfmod.__version__)
    result = CliRunner().invoke(cli.app, ["--version", "train", "--set", "steps=-1"])
    assert result.exit_code == 0  # prints and exits before train parses anything
    assert result.stdout.splitlines() == [
        f"selfmod {selfmod.__version__}",
        f"torch {torch.__version__}",
    ]


def test_license_is_mit():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert "Copyright (c) 2026 the selfmod authors" in text
    assert PYPROJECT["project"]["license"] == {"text": "MIT"}


def test_py_typed_in_package_and_package_data():
    assert (Path(selfmod.__file__).parent / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["selfmod"]


def test_changelog_has_current_and_first_release():
    text = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## (\d+\.\d+\.\d+)\b", text, flags=re.MULTILINE)
    assert headings[0] == selfmod.__version__  # newest first
    assert "0.1.0" in headings
    entry = text.split(f"## {selfmod.__version__}", 1)[1].split("\n## ", 1)[0]
    assert entry.count("\n- ") >= 3


def test_readme_install_follows_an_unchanged_quick_start():
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start\n", 1)[1].split("\n## ", 1)[0]
    block = quick.split("```bash\n", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in block.splitlines()] == ["make run", "make test"]
    install = quick.split("### Install\n", 1)[1]
    for needed in ("pip install torch==2.13.0", "pip install -e .", "pip wheel . --no-deps"):
        assert needed in install


@pytest.mark.slow
def test_wheel_carries_version_license_and_py_typed(tmp_path):
    """Built offline from a copy of the sources (setuptools from the venv, no build isolation)."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "selfmod", src / "selfmod", ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation"]
    cmd += ["-w", str(tmp_path / "dist"), "-q"]
    out = subprocess.run(cmd, capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr.decode()
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert wheel.name == f"selfmod-{selfmod.__version__}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    assert "selfmod/py.typed" in names
    assert f"selfmod-{selfmod.__version__}.dist-info/licenses/LICENSE" in names
