"""The command line: one-line errors with exit code 2, and a run that writes its report."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from selfmod.runs.config import ConfigError, TrainConfig, load_config

SELFMOD = [sys.executable, "-m", "selfmod.cli"]


def _selfmod(*args, cwd=None):
    return subprocess.run([*SELFMOD, *args], capture_output=True, text=True, cwd=cwd, check=False)


# Every field with a value outside its range, and the words the error must contain.
BAD_VALUES = {
    "seed": ("-1", "seed must be an integer in [0, 2147483647] (got -1)"),
    "steps": ("0", "steps must be an integer in [1, 1000000] (got 0)"),
    "batch_size": ("5000", "batch_size must be an integer in [1, 4000] (got 5000)"),
    "width": ("0", "width must be an integer in [1, 4096] (got 0)"),
    "depth": ("9", "depth must be an integer in [1, 8] (got 9)"),
    "lr": ("-0.1", "lr must be a number in (0, 10] (got -0.1)"),
    "momentum": ("1.0", "momentum must be a number in [0, 1) (got 1.0)"),
    "cycle": ("0", "cycle must be an integer in [1, 100000] (got 0)"),
    "lookahead": ("2000", "lookahead must be an integer in [1, 1000] (got 2000)"),
    "estimator": ("magic", "estimator must be one of 'reverse', 'checkpointed'"),
    "meta_lr": ("0", "meta_lr must be a number in (0, 10] (got 0)"),
    "trust_region": ("11", "trust_region must be a number in (0, 10] (got 11)"),
    "guard_size": ("5", "guard_size must be an integer in [10, 2000] (got 5)"),
    "out": ('""', "out must be a string"),
    "threads": ("0", "threads must be an integer in [1, 256] (got 0)"),
}


def test_every_config_field_has_a_bad_value_case():
    assert set(BAD_VALUES) == set(TrainConfig.model_fields)


@pytest.mark.parametrize("field", sorted(BAD_VALUES))
def test_bad_value_is_one_line_naming_the_field(field):
    value, message = BAD_VALUES[field]
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{field}={value}"])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "steps=-5"], "error: steps must be an integer in [1, 1000000] (got -5)"),
        (["--set", "colour=blue"], "error: unknown config field 'colour'"),
        (["--set", "steps"], "error: --set expects key=value"),
        (["missing.toml"], "error: config file 'missing.toml' does not exist"),
    ],
)
def test_cli_rejects_bad_input_with_exit_2_and_one_line(args, message, tmp_path):
    out = _selfmod("train", *args, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == message or out.stderr.strip().startswith(message)
    assert len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr


def test_toml_file_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('steps = 40\nestimator = "forward"\nlr = 0.01\n')
    cfg = load_config(path, ["steps=50"])
    assert (cfg.steps, cfg.estimator, cfg.lr) == (50, "forward", 0.01)
    path.write_text("steps = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_train_writes_report_weights_and_fixes_a_small_learning_rate(tmp_path):
    out = _selfmod("train", "--set", "steps=200", "--set", f"out={tmp_path}", "--set", "cycle=40")
    assert out.returncode == 0, out.stderr
    (run_dir,) = list(tmp_path.iterdir())
    html = (run_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3
    manifest = json.loads((run_dir / "final.json").read_text())
    weights = run_dir / manifest["file"]
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == manifest["sha256"]
    assert set(load_file(str(weights))) == {"0.weight", "0.bias", "2.weight", "2.bias",
                                            "4.weight", "4.bias"}
    history = json.loads((run_dir / "history.json").read_text())
    tuned, fixed = history["tuned"], history["fixed"]
    assert max(tuned["lrs"][-1]) > 3 * max(fixed["lrs"][-1])  # it raised its own rates
    assert tuned["final_test_loss"] < fixed["final_test_loss"]
    commits = [c for c in tuned["cycles"] if c["decision"] == "commit"]
    assert commits and all(c["guard_proposed"] < c["guard_current"] for c in commits)
    assert "test accuracy" in out.stdout


def test_divergence_in_base_training_rolls_back_and_halves_rates():
    from selfmod.data import load_mnist1d
    from selfmod.introspect import train

    cfg = TrainConfig(steps=30, lr=10.0, momentum=0.9, guard_size=100)
    history, params = train(cfg, load_mnist1d(), tune=False)
    rollbacks = [c for c in history.cycles if c.decision == "rollback"]
    assert rollbacks, "lr=10 with momentum should diverge on MNIST-1D"
    assert rollbacks[0].lrs_after[0] == pytest.approx(rollbacks[0].lrs_before[0] / 2)
    assert all(torch.isfinite(v).all() for v in params.values())
