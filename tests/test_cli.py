"""The command line: one-line errors with exit code 2, and a run that writes its report."""

import hashlib
import json
import re
import subprocess
import sys

import pytest
import warm
from safetensors.torch import load_file

from selfmod.runs.config import TrainConfig, load_config
from selfmod.validation import ConfigError

SELFMOD = [sys.executable, "-m", "selfmod.cli"]


def _selfmod(*args, cwd=None):
    return warm.run([*SELFMOD[1:], *args], cwd=cwd)


# Every field with a value outside its range, and the words the error must contain (a
# modifier's setting in its table, modifiers.NAME.KEY).
BAD_VALUES = {
    "seed": ("-1", "seed must be an integer in [0, 2147483647] (got -1)"),
    "steps": ("0", "steps must be an integer in [1, 1000000] (got 0)"),
    "batch_size": ("5000", "batch_size must be an integer in [1, 4000] (got 5000)"),
    "width": ("0", "width must be an integer in [1, 4096] (got 0)"),
    "depth": ("9", "depth must be an integer in [1, 8] (got 9)"),
    "lr": ("-0.1", "lr must be a number in (0, 10] (got -0.1)"),
    "momentum": ("1.0", "momentum must be a number in [0, 1) (got 1.0)"),
    "weight_decay": ("2", "weight_decay must be a number in [0, 1] (got 2)"),
    "dropout": ("1", "dropout must be a number in [0, 1) (got 1)"),
    "modifiers": ('["lr","magic"]', "modifiers must be a list of distinct names from 'lr', "),
    "modifiers.weight_decay.regularize": (
        "l1",
        "modifiers.weight_decay.regularize must be one of 'gap', 'hypergradient' (got 'l1')",
    ),
    "modifiers.dropout.gap_target": (
        "0",
        "modifiers.dropout.gap_target must be a number in (0, 10] (got 0)",
    ),
    "modifiers.weight_decay.gap_gain": (
        "-1",
        "modifiers.weight_decay.gap_gain must be a number in [0, 10] (got -1)",
    ),
    "modifiers.lr.lr_mean": (
        "mean",
        "modifiers.lr.lr_mean must be one of 'free', 'fixed', 'rising' (got 'mean')",
    ),
    "model": ("rnn", 'model must be "mlp" | "cnn" | "package.module:callable" (returns an'),
    "data": ("mnist", 'data must be "mnist1d" | "digits" | "package.module:callable"'),
    "loss": ("l1", 'loss must be "cross_entropy" | "mse" | "package.module:callable"'),
    "metric": ("f1", "metric must be one of 'auto', 'accuracy', 'loss' (got 'f1')"),
    "optimizer": (
        "lion",
        "optimizer must be 'sgd', 'adam', 'adamw' or 'learned:DIR' (DIR: a "
        "folder written by selfmod meta-train) (got 'lion')",
    ),
    "beta1": ("1", "beta1 must be a number in (0, 1) (got 1)"),
    "beta2": ("0", "beta2 must be a number in (0, 1) (got 0)"),
    "device": ("tpu", 'device must be "cpu", "cuda", "cuda:N", "auto" (got \'tpu\')'),
    "run_id": ("xyz", "run_id must be"),
    "dtype": ("float16", "dtype must be one of 'float32', 'float64' (got 'float16')"),
    "cycle": ("0", "cycle must be an integer in [1, 100000] (got 0)"),
    "lookahead": ("2000", "lookahead must be an integer in [1, 1000] (got 2000)"),
    "estimator": ("magic", "estimator must be one of 'first_order', 'reverse', 'checkpointed'"),
    "budget_unit": ("epochs", "budget_unit must be one of 'examples', 'steps' (got 'epochs')"),
    "lr_schedule": (
        "linear",
        "lr_schedule must be one of 'cosine', 'wsd', 'constant' (got 'linear')",
    ),
    "meta_budget": ("0", "meta_budget must be a valid value in (0, 1000] (got 0)"),
    "level_race": ("[0.5,-2]", "level_race must be a list of at most 8 numbers in (0, 1000]"),
    "race_share": ("0.9", "race_share must be a number in (0, 0.5] (got 0.9)"),
    "meta_lr": ("0", "meta_lr must be a number in (0, 10] (got 0)"),
    "trust_region": ("11", "trust_region must be a number in (0, 10] (got 11)"),
    "modifiers.grow.grow_fraction": (
        "5",
        "modifiers.grow.grow_fraction must be a number in (0, 4] (got 5)",
    ),
    "modifiers.prune.prune_fraction": (
        "1",
        "modifiers.prune.prune_fraction must be a number in (0, 1) (got 1)",
    ),
    "modifiers.grow.max_width": (
        "0",
        "modifiers.grow.max_width must be an integer in [1, 8192] (got 0)",
    ),
    "modifiers.factorize.factorize_rank": (
        "1",
        "modifiers.factorize.factorize_rank must be a number in (0, 1) (got 1)",
    ),
    "modifiers.factorize.factorize_after": (
        "1",
        "modifiers.factorize.factorize_after must be a number in [0, 1) (got 1)",
    ),
    "modifiers.factorize.factorize_tolerance": (
        "2",
        "modifiers.factorize.factorize_tolerance must be a number in [0, 1] (got 2)",
    ),
    "max_params": ("0", "max_params must be an integer in [1, 1000000000] (got 0)"),
    "max_flops": ("-1", "max_flops must be an integer in [0, 1000000000000000] (got -1)"),
    "verify_on": ("both", "verify_on must be one of 'held_out', 'shared' (got 'both')"),
    "meta_horizon": ("-1", "meta_horizon must be an integer in [0, 1000000] (got -1)"),
    "modifiers.grow.grow_rule": (
        "cap",
        "modifiers.grow.grow_rule must be one of 'fraction', 'criterion' (got 'cap')",
    ),
    "modifiers.grow.grow_threshold": (
        "0",
        "modifiers.grow.grow_threshold must be a number in (0, 100] (got 0)",
    ),
    "modifiers.prune.prune_rule": (
        "l1",
        "modifiers.prune.prune_rule must be one of 'saliency', 'l0', 'lowest' (got 'l1')",
    ),
    "modifiers.prune.l0_strength": (
        "-1",
        "modifiers.prune.l0_strength must be a number in [0, 10] (got -1)",
    ),
    "modifiers.weight_decay.max_weight_decay": (
        "0",
        "modifiers.weight_decay.max_weight_decay must be a number in (1e-07, 1] (got 0)",
    ),
    "modifiers.dropout.max_dropout": (
        "1",
        "modifiers.dropout.max_dropout must be a number in (0.0025, 1) (got 1)",
    ),
    "max_memory": ("-1", "max_memory must be an integer in [0, 10000000000000] (got -1)"),
    "modifiers.choice.race": (
        "0.3",
        "modifiers.choice.race must be a number in [0, 0.25] (got 0.3)",
    ),
    "modifiers.choice.race_keep": (
        "1",
        "modifiers.choice.race_keep must be an integer in [2, 8] (got 1)",
    ),
    "modifiers.choice.race_reads": (
        "0",
        "modifiers.choice.race_reads must be an integer in [1, 8] (got 0)",
    ),
    "modifiers.choice.choice_lr": (
        "0",
        "modifiers.choice.choice_lr must be a number in (0, 10] (got 0)",
    ),
    "modifiers.choice.relax": (
        "darts2",
        "modifiers.choice.relax must be one of 'darts', 'gdas', 'expected' (got 'darts2')",
    ),
    "modifiers.choice.tau": (
        "0",
        "modifiers.choice.tau must be a number in (0, 100] (got 0)",
    ),
    "modifiers.choice.confidence": (
        "1",
        "modifiers.choice.confidence must be a number in (0, 1) (got 1)",
    ),
    "modifiers.choice.decide_by": (
        "0",
        "modifiers.choice.decide_by must be a number in (0, 1] (got 0)",
    ),
    "modifiers.choice.entropy_weight": (
        "-1",
        "modifiers.choice.entropy_weight must be a number in [0, 10] (got -1)",
    ),
    "modifiers.choice.diversity_weight": (
        "11",
        "modifiers.choice.diversity_weight must be a number in [0, 10] (got 11)",
    ),
    "modifiers.choice.warmup": (
        "1",
        "modifiers.choice.warmup must be a number in [0, 1) (got 1)",
    ),
    "modifiers.choice.choice_rows": (
        "0",
        "modifiers.choice.choice_rows must be an integer in [1, 100000] (got 0)",
    ),
    "modifiers.choice.choice_slack": (
        "2",
        "modifiers.choice.choice_slack must be a number in [0, 1] (got 2)",
    ),
    "modifiers.inner_lr.inner_rows": (
        "0",
        "modifiers.inner_lr.inner_rows must be an integer in [1, 100000] (got 0)",
    ),
    "modifiers.batch_size.min_batch": (
        "0",
        "modifiers.batch_size.min_batch must be an integer in [1, 4000] (got 0)",
    ),
    "modifiers.batch_size.max_batch": (
        "4001",
        "modifiers.batch_size.max_batch must be an integer in [1, 4000] (got 4001)",
    ),
    "epsilon": ("-1", "epsilon must be a number in [0, 1] (got -1)"),
    "forgetting_delta": ("2", "forgetting_delta must be a number in [0, 1] (got 2)"),
    "approval": ("sometimes", "approval must be one of 'auto', 'manual' (got 'sometimes')"),
    "approval_expiry": ("-1", "approval_expiry must be an integer in [0, 1000] (got -1)"),
    "guard_size": ("5", "guard_size must be an integer in [10, 2000] (got 5)"),
    "replay_size": ("5", "replay_size must be an integer in [10, 100000] (got 5)"),
    "checkpoint_every": ("0", "checkpoint_every must be an integer in [1, 100000] (got 0)"),
    "log_every": ("0", "log_every must be an integer in [1, 1000000] (got 0)"),
    "log_share": ("2", "log_share must be a number in [0, 1] (got 2)"),
    "log_test": ("maybe", "log_test must be true or false (got 'maybe')"),
    "keep_checkpoints": ("0", "keep_checkpoints must be an integer in [1, 1000] (got 0)"),
    "shift_step": ("-1", "shift_step must be an integer in [0, 1000000] (got -1)"),
    "shift_noise": ("-1", "shift_noise must be a number in [0, 10] (got -1)"),
    "shift_translation": ("500", "shift_translation must be an integer in [0, 200] (got 500)"),
    "compare_fixed": ("maybe", "compare_fixed must be true or false (got 'maybe')"),
    "report": ("maybe", "report must be true or false (got 'maybe')"),
    "safeguards": ("maybe", "safeguards must be true or false (got 'maybe')"),
    "deterministic": ("maybe", "deterministic must be true or false (got 'maybe')"),
    "modifiers.grow.grow_strict": ("2", "modifiers.grow.grow_strict must be true or false (got 2)"),
    "modifiers.grow.grow_beats_noise": (
        "maybe",
        "modifiers.grow.grow_beats_noise must be true or false (got 'maybe')",
    ),
    "modifiers.lr.level_step": (
        "-1",
        "modifiers.lr.level_step must be a number in [0, 10] (got -1)",
    ),
    "keep_best": ("maybe", "keep_best must be true or false (got 'maybe')"),
    "probe_rows": ("-1", "probe_rows must be an integer in [0, 1000000] (got -1)"),
    "modifiers.dropout.regularize_strict": (
        "2",
        "modifiers.dropout.regularize_strict must be true or false (got 2)",
    ),
    "modifiers.grow.grow_price": (
        "-1",
        "modifiers.grow.grow_price must be a number in [0, 100] (got -1)",
    ),
    "out": ('""', "out must be a string"),
    "threads": ("0", "threads must be an integer in [1, 256] (got 0)"),
    "autocast": ('"fp16"', "autocast must be one of 'off', 'bf16' (got 'fp16')"),
    "schedule": ("{grow=0}", "schedule must be a table of modifier = N (every N-th cycle"),
    "modifiers.online_lr.online_lr_step": (
        "0",
        "modifiers.online_lr.online_lr_step must be a number in (0, 1] (got 0)",
    ),
}

# Values valid alone but inconsistent with another field.
BAD_COMBINATIONS = [
    (["lookahead=50", "cycle=20"], "lookahead must be <= cycle (20) (got 50)"),
    (
        ["modifiers.batch_size.min_batch=64", "modifiers.batch_size.max_batch=32", "batch_size=32"],
        "modifiers.batch_size.min_batch must be <= modifiers.batch_size.max_batch (32)",
    ),
    (
        ["batch_size=300", 'modifiers=["batch_size"]'],
        "batch_size must be in [min_batch, max_batch] of modifiers.batch_size",
    ),
    (["width=400"], "width must be <= modifiers.grow.max_width (384) (got 400)"),
    (['autocast="bf16"', 'dtype="float64"'], 'autocast = "bf16" needs dtype = "float32"'),
    (['autocast="bf16"', 'estimator="forward"'], 'does not combine with estimator = "forward"'),
]


def test_every_config_field_has_a_bad_value_case():
    from selfmod.introspect.modifiers import registry

    settings = {k for c in registry().values() for k in c.Settings.model_fields}
    fields = set(TrainConfig.model_fields) - {"modifier_settings"}  # the tables, by their keys
    assert {k.rsplit(".", 1)[-1] for k in BAD_VALUES} == fields | settings


@pytest.mark.parametrize("field", sorted(BAD_VALUES))
def test_bad_value_is_one_line_naming_the_field(field):
    value, message = BAD_VALUES[field]
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{field}={value}"])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "value", ['{grow="step"}', "{online_lr=2}", "{magic=1}", "{lr=1001}", "{lr=2.0}", "3"]
)
def test_bad_schedule_is_one_line_naming_what_is_allowed(value):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"schedule={value}"])
    msg = str(err.value)
    assert msg.startswith("schedule must be a table of modifier = N") and "\n" not in msg
    assert 'online_lr = "step"' in msg


def test_schedule_is_normalized():
    cfg = load_config(None, ['schedule={lr="cycle", online_lr="step", grow=2}'])
    assert cfg.schedule == {"lr": 1, "online_lr": "step", "grow": 2}
    assert (cfg.every("lr"), cfg.every("grow"), cfg.every("prune")) == (1, 2, 1)


@pytest.mark.parametrize(("overrides", "message"), BAD_COMBINATIONS)
def test_inconsistent_values_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("field", sorted(BAD_VALUES))
def test_every_field_bad_value_exits_2_from_the_cli(field, tmp_path):
    """Through the real command line: one line on stderr, exit code 2, no traceback."""
    from typer.testing import CliRunner

    from selfmod import cli

    value, message = BAD_VALUES[field]
    result = CliRunner().invoke(cli.app, ["train", "--set", f"{field}={value}"])
    assert isinstance(result.exception, ConfigError) and message in str(result.exception)
    out = _selfmod("train", "--set", f"{field}={value}", cwd=tmp_path) if field == "seed" else None
    if out is not None:  # one real subprocess, to check the exit code path of main()
        assert out.returncode == 2 and out.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "steps=-5"], "error: steps must be an integer in [1, 1000000] (got -5)"),
        (["--set", "colour=blue"], "error: unknown config field 'colour'"),
        (["--set", "steps"], "error: --set expects key=value"),
        (["missing.toml"], "error: config file 'missing.toml' does not exist"),
        (
            ["--set", "model=cnn", "--set", "modifiers=[factorize]"],
            "error: modifiers: factorize: the model has no selfmod.arch.FactorableLinear layer",
        ),
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


def test_train_writes_report_weights_ledger_and_summary(tmp_path):
    out = _selfmod(
        "train",
        "--set",
        "steps=200",
        "--set",
        f"out={tmp_path}",
        "--set",
        "cycle=40",
        "--set",
        "modifiers.grow.max_width=32",
    )
    assert out.returncode == 0, out.stderr
    (run_dir,) = list(tmp_path.iterdir())
    html = (run_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6
    assert "Timeline of changes" in html and "Meta-metrics" in html
    manifest = json.loads((run_dir / "final.json").read_text())
    weights = run_dir / manifest["file"]
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == manifest["sha256"]
    assert set(load_file(str(weights))) == {
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
        "2.left",  # the factorable layer's factors (empty: 400 steps, no factorization)
        "2.right",
        "4.weight",
        "4.bias",
    }
    history = json.loads((run_dir / "history.json").read_text())
    tuned, fixed = history["tuned_summary"], history["fixed_summary"]
    assert max(tuned["lr"]) > 2 * max(fixed["lr"])  # it raised its own rates
    assert tuned["test_loss"] < fixed["test_loss"]
    commits = [d for d in history["tuned"]["decisions"] if d["decision"] == "commit"]
    # each within its own tolerance (the run's epsilon, or a modifier's: factorize's 5%) of the
    # guard loss the cycle's earlier commits left
    tolerances = [float(re.search(r"tolerance x([0-9.]+)", d["reason"]).group(1)) for d in commits]
    pairs = zip(commits, tolerances, strict=True)
    assert commits and all(d["guard_proposed"] <= d["guard_current"] * t for d, t in pairs)
    assert "test accuracy" in out.stdout and "self-modifying" in out.stdout
    log = _selfmod("log", str(run_dir))
    assert log.returncode == 0 and "commit" in log.stdout
    assert "before -> after" in log.stdout and " -> " in log.stdout.split("before -> after", 1)[1]
    (run_dir / "report.html").unlink()
    assert _selfmod("report", str(run_dir)).returncode == 0
    assert (run_dir / "report.html").is_file()
    bad = _selfmod("resume", str(tmp_path / "nope"))
    assert bad.returncode == 2 and "DIR must be a run directory" in bad.stderr


def test_train_help_lists_every_config_field_with_its_range_and_default():
    from selfmod.introspect.config import GROUPS

    out = _selfmod("train", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for name in (n for group in GROUPS.values() for n in group.model_fields):
        assert f"{name} = " in text, name
    assert "steps = 6000: an integer in [1, 1000000]" in text


def test_report_false_skips_the_html_until_selfmod_report_writes_it(tmp_path):
    settings = [
        "steps=60",
        f"out={tmp_path}",
        "cycle=30",
        "modifiers.grow.max_width=16",
        "compare_fixed=false",
    ]
    out = _selfmod("train", *(a for s in [*settings, "report=false"] for a in ("--set", s)))
    assert out.returncode == 0, out.stderr
    (run_dir,) = list(tmp_path.iterdir())
    assert (run_dir / "summary.json").is_file() and (run_dir / "final.safetensors").is_file()
    assert not (run_dir / "report.html").exists()
    assert "report: off (selfmod report" in " ".join(out.stdout.split())
    assert _selfmod("report", str(run_dir)).returncode == 0
    assert "Timeline of changes" in (run_dir / "report.html").read_text()


def test_the_cli_and_the_summary_table_do_not_import_matplotlib():
    # a run with report = false prints the summary table but draws nothing: matplotlib's import
    # (0.45 s of every `selfmod train`) waits for write_report
    code = (
        "import sys, selfmod.cli; from selfmod.runs.report import summary_rows; "
        "print('matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_plain_list_forms_need_no_toml_quotes():
    assert load_config(None, ["modifiers=[lr,grow]"]).modifiers == ["lr", "grow"]
    assert load_config(None, ["modifiers=lr,grow"]).modifiers == ["lr", "grow"]  # no brackets
    assert load_config(None, ["modifiers=lr"]).modifiers == ["lr"]
    with pytest.raises(ConfigError, match="modifiers must be a list of distinct names"):
        load_config(None, ["modifiers=lr,magic"])


def test_ctrl_c_leaves_an_interrupted_status_and_resume_continues(tmp_path):
    import signal
    import time

    sets = ["steps=3000", "cycle=20", "lookahead=5", "compare_fixed=false", f"out={tmp_path}"]
    proc = subprocess.Popen(
        [*SELFMOD, "train", *[a for s in sets for a in ("--set", s)]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a background job (``make test &``, an xdist worker) inherits SIGINT ignored, and so
        # would the run: give it the terminal's default, as a Ctrl-C at a prompt finds it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    status = None
    for _ in range(600):  # until the loop has started (at most 60 s)
        runs = list(tmp_path.iterdir())
        if runs and (runs[0] / "checkpoints").is_dir():
            status = runs[0] / "status.json"
            break
        time.sleep(0.1)
    assert status is not None
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=180)  # it writes its files first; slow under load
    assert proc.returncode == 130, err
    state = json.loads(status.read_text())
    assert state["state"] == "interrupted" and state["step"] > 0
    assert "selfmod resume" in err


def test_a_run_writes_csv_and_tensorboard_logs_and_a_line_per_decision(tmp_path):
    import csv

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sets = ["steps=120", "cycle=40", "lookahead=5", "compare_fixed=false", f"out={tmp_path}"]
    out = _selfmod("train", *[a for s in sets for a in ("--set", s)])
    assert out.returncode == 0, out.stderr
    (run_dir,) = tmp_path.iterdir()
    with (run_dir / "scalars.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["step"]) for r in rows] == [50.0, 100.0, 120.0]
    assert {"guard_loss", "test_acc", "lr/0", "widths/1", "batch_size"} <= set(rows[0])
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("guard_loss")] == [50, 100, 120]
    assert float(rows[-1]["guard_loss"]) == pytest.approx(events.Scalars("guard_loss")[-1].value)
    # one line per decision, readable when the output is a file (not a terminal)
    assert "cycle 0 step 0 grow: commit (widths [8, 8] -> [12, 12])" in out.stderr
    assert "step 50/120: guard loss" in out.stderr
    # and the report shows every change's values before -> after
    assert "widths [8, 8] -&gt; [12, 12]" in (run_dir / "report.html").read_text()
    # a wall-clock axis for the training curves, from the clock the history keeps
    clock = json.loads((run_dir / "history.json").read_text())["tuned"]["clock"]
    assert [c[0] for c in clock] == [50, 100, 120] and clock[0][1] < clock[-1][1]
    again = _selfmod("report", str(run_dir), "--x", "seconds")
    assert again.returncode == 0, again.stderr
    bad = _selfmod("report", str(run_dir), "--x", "hours")
    assert bad.returncode == 2 and "--x must be 'step' or 'seconds'" in bad.stderr
