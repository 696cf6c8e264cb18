"""The examples run end to end and do what they say."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _example(name: str, cwd: Path | None = None) -> str:
    """The standard output of ``examples/name`` run to completion (a failure raises)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        cwd=cwd,
    ).stdout


def test_tune_learning_rates_lowers_the_validation_loss():
    out = _example("tune_learning_rates.py")
    losses = [float(x) for x in re.findall(r"val loss ([0-9.]+)", out)]
    lrs = re.findall(r"lrs \[([0-9.e, -]+)\]", out)
    assert len(losses) >= 2 and losses[-1] < losses[0] - 0.3
    first, last = ([float(x) for x in row.split(",")] for row in (lrs[0], lrs[-1]))
    assert min(last) > 5 * max(first)  # every tensor's rate moved up from 100x too small


def test_your_own_model_is_tuned_by_fit(tmp_path):
    out = _example("your_own_model.py", cwd=tmp_path)
    tuned, fixed = (
        float(x) for x in re.search(r"test accuracy ([0-9.]+) .*: ([0-9.]+)", out).groups()
    )
    assert tuned > 0.95 and tuned >= fixed
    assert "'rollback': 0" in out
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "summary.json").is_file() and (run_dir / "report.html").is_file()


def test_every_config_file_the_readme_names_exists_and_loads():
    from selfmod.meta.train import MetaTrainConfig
    from selfmod.runs.config import load_config
    from selfmod.validation import load

    named = set(re.findall(r"configs/[\w.]+\.toml", (ROOT / "README.md").read_text()))
    assert "configs/meta.toml" in named
    for path in sorted(named):
        assert (ROOT / path).is_file(), path
        if "meta" in path:
            assert load(MetaTrainConfig, ROOT / path) == MetaTrainConfig()
        else:
            load_config(ROOT / path)


def test_drop_in_optimizer_recovers_from_a_learning_rate_too_small():
    out = _example("drop_in_optimizer.py")
    acc = dict(re.findall(r"^(.*): test accuracy ([0-9.]+)$", out, re.M))
    picked, plain = float(acc["AdamW (lr 3e-3, picked by hand)"]), float(acc["AdamW (lr 1e-4)"])
    tuned = float(acc["AdamWHD (from lr 1e-4)"])
    assert tuned > plain + 0.05 and tuned > picked - 0.05  # near the hand-picked rate's
    rates = [float(r) for r in re.findall(r"'([0-9.e+-]+)'", out)]
    assert len(rates) == 4 and min(rates) >= 1e-4 and max(rates) > 1e-3  # rose, some > 10x
