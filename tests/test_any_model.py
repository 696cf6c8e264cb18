"""Self-modification on models the project does not define (``tests/user_models.py``): a
residual MLP with LayerNorm (not an ``nn.Sequential``), a small CNN with BatchNorm and Dropout,
and a tiny transformer encoder; through ``fit``, the step-level API and the CLI; SGD and AdamW.

For each: a run that learns, a harmful change rejected with the state bitwise unchanged, NaN
rolled back, kill -9 + ``selfmod resume`` byte-identical, the ledger verifies.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import cycles
import pytest
import torch
import torch.nn.functional as F
import user_models
import warm
from faults import FaultyLoop

from selfmod.data import as_batches
from selfmod.introspect import Proposal, registry
from selfmod.introspect.loop import Source
from selfmod.introspect.problem import Problem
from selfmod.runs import SelfModifier, fit
from selfmod.runs.api import make_config
from selfmod.runs.ledger import Ledger

HERE = Path(__file__).parent
SELFMOD = [sys.executable, "-m", "selfmod.cli"]
CRASH_AT = str(HERE / "crash_at.py")
MODELS = {
    "residual": user_models.residual_mlp,
    "cnn_bn": user_models.digit_cnn,
    "transformer": user_models.tiny_transformer,
}
LR = {"sgd": 0.05, "adamw": 3e-3}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    x, y, xt, yt = user_models.digits()
    return {"train": (x[200:], y[200:]), "guard": (x[:200], y[:200]), "test": (xt, yt)}


def _config(optimizer: str, **overrides) -> dict:
    return {
        "steps": 120,
        "cycle": 40,
        "lookahead": 4,
        "lr": LR[optimizer],
        "guard_size": 200,
        "replay_size": 200,
        "keep_checkpoints": 10,
        # the properties here are about any model, not fit's schedule, race or early stopping:
        # a constant rate (as SelfModifier's, whose end is unknown) and the final state
        "lr_schedule": "constant",
        "keep_best": False,
        "level_race": [],
        **overrides,
    }


def _fit(name, optimizer, digits, tmp_path, **overrides):
    torch.manual_seed(0)
    return fit(
        MODELS[name](),
        F.cross_entropy,
        digits["train"],
        digits["guard"],
        test=digits["test"],
        optimizer=optimizer,
        config=_config(optimizer, **{"modifiers": None, **overrides}),  # every one that applies
        run_dir=tmp_path / "run",
    )


def _untrained_loss(name, digits) -> float:
    torch.manual_seed(0)
    with torch.no_grad():
        model = MODELS[name]().eval()
        return float(F.cross_entropy(model(digits["test"][0]), digits["test"][1]))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_fit_learns_and_writes_a_run_directory(name, optimizer, digits, tmp_path):
    result = _fit(name, optimizer, digits, tmp_path)
    s = result.summary
    assert s["test_accuracy"] > 0.5, s  # 10 classes: chance is 0.1
    assert s["test_loss"] < 0.7 * _untrained_loss(name, digits)
    # the returned module is the trained one
    module = result.module.eval()
    with torch.no_grad():
        acc = (module(digits["test"][0]).argmax(-1) == digits["test"][1]).float().mean()
    assert float(acc) == pytest.approx(s["test_accuracy"], abs=1e-6)
    written = json.loads((result.run_dir / "summary.json").read_text())
    for key in ("test_accuracy", "test_loss", "params", "flops", "seconds", "decisions", "fixed"):
        assert key in written
    assert written["fixed"] is None and set(written["decisions"]) == {
        "commit",
        "reject",
        "rollback",
    }
    with Ledger(result.run_dir / "ledger.sqlite") as ledger:
        assert ledger.verify() > 0
    assert (result.run_dir / "report.html").stat().st_size > 10_000


def test_fit_reads_the_test_set_once_at_the_end_unless_log_points_are_asked_to(digits, tmp_path):
    """fit's log points score the guard set only (``log_test = false``, its default): the test
    set is read whole by the summary, once; ``log_test = true`` adds each log point's read (the
    report's test curve). The training is the same either way."""
    runs = {}
    for name, over in (("default", {}), ("logged", {"log_test": True})):
        torch.manual_seed(0)
        config = _config("adamw", modifiers=[], steps=60, log_every=20, **over)
        runs[name] = fit(MODELS["residual"](), F.cross_entropy, digits["train"], digits["guard"],
                         test=digits["test"], optimizer="adamw", config=config,
                         run_dir=tmp_path / name)  # fmt: skip
    default, logged = (runs[k] for k in ("default", "logged"))
    assert [math.isnan(r["test_acc"]) for r in default.run.history["log"]] == [True] * 3
    assert all(0 <= r["test_acc"] <= 1 for r in logged.run.history["log"])
    assert default.summary["test_accuracy"] == logged.summary["test_accuracy"]
    for k, v in default.run.params.items():
        assert torch.equal(v, logged.run.params[k])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_harmful_change_is_rejected_and_the_state_is_bitwise_unchanged(name, digits, tmp_path):
    run = _fit(name, "sgd", digits, tmp_path).run
    current, _ = cycles.estimate(run)
    before = (run.state.clone(), run.rng.get_state(), torch.get_rng_state())
    harmful = run.hparams["log_lr"] + math.log(1000.0)
    run.verify_and_decide(Proposal("lr", {"log_lr": harmful}, strict=True), current)
    assert run.history["decisions"][-1]["decision"] == "reject"
    after = (run.state, run.rng.get_state(), torch.get_rng_state())
    a, b = (torch.utils._pytree.tree_leaves(t) for t in (before, after))
    assert len(a) == len(b)
    assert all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("name", sorted(MODELS))
def test_nan_in_a_base_step_rolls_back_and_the_run_goes_on(name, digits):
    torch.manual_seed(0)
    cfg = make_config({**_config("adamw"), "compare_fixed": False, "optimizer": "adamw"})
    source = Source(as_batches(digits["train"], cfg.seed), *digits["guard"], *digits["test"])
    run = FaultyLoop(Problem(MODELS[name](), F.cross_entropy), [source], cfg, loss={50})
    run.run()
    rollbacks = [d for d in run.history["decisions"] if d["decision"] == "rollback"]
    assert len(rollbacks) == 1 and "non-finite inner loss" in rollbacks[0]["reason"]
    assert run.step == cfg.steps
    assert all(bool(torch.isfinite(v).all()) for v in run.params.values())


@pytest.mark.parametrize(
    ("name", "optimizer"),
    [("residual", "sgd"), ("residual", "adamw"), ("cnn_bn", "adamw"), ("transformer", "sgd")],
)
def test_the_step_level_api_trains_exactly_as_fit(name, optimizer, digits, tmp_path):
    """The same batches through ``SelfModifier.step`` (a loop the caller owns) and through
    ``fit`` give bitwise the same model and decisions."""
    overrides = {"modifiers": ["lr", "weight_decay"]}
    ran = _fit(name, optimizer, digits, tmp_path / "fit", **overrides).run
    torch.manual_seed(0)
    sm = SelfModifier(
        MODELS[name](),
        F.cross_entropy,
        digits["guard"],
        test=digits["test"],
        optimizer=optimizer,
        config=_config(optimizer, **overrides),
        run_dir=tmp_path / "step",
    )
    batches = as_batches(digits["train"], 0)  # the stream fit draws from (seed 0, source 0)
    for _ in range(ran.config.steps):
        sm.step(batches.next(ran.config.batch_size))
    summary = sm.finish()
    assert sm.steps_done == ran.step
    assert all(torch.equal(sm.run.params[k], ran.params[k]) for k in ran.params)
    decisions = [(d["cycle"], d["modifier"], d["decision"]) for d in ran.history["decisions"]]
    assert decisions == [
        (d["cycle"], d["modifier"], d["decision"]) for d in sm.run.history["decisions"]
    ]
    assert summary["test_accuracy"] == ran.summary()["test_accuracy"]
    assert (tmp_path / "step" / "summary.json").is_file()


def test_batchnorm_statistics_are_run_state(digits, tmp_path):
    result = _fit("cnn_bn", "sgd", digits, tmp_path)
    bn = result.module.body[1]
    rollbacks = result.summary["decisions"]["rollback"]
    assert int(bn.num_batches_tracked) == result.run.step and rollbacks == 0
    assert not torch.equal(bn.running_mean, torch.zeros(8))
    from safetensors.torch import load_file

    final = load_file(str(result.run_dir / "final.safetensors"))
    assert torch.equal(final["body.1.running_mean"], bn.running_mean)


def _cli(*args, cwd=HERE, harness=None):
    cmd = [harness, *args] if harness else [*SELFMOD[1:], *args]
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
    return warm.run(cmd, cwd=cwd, env={**os.environ, "PYTHONPATH": path})


CLI_RUNS = [("residual_mlp", "sgd"), ("digit_cnn", "adamw"), ("tiny_transformer", "adamw")]


@pytest.mark.slow
@pytest.mark.parametrize(("model", "optimizer"), CLI_RUNS)
def test_cli_kill_and_resume_is_byte_identical(model, optimizer, tmp_path):
    sets = [
        f"model=user_models:{model}",
        "data=user_models:digits",
        f"optimizer={optimizer}",
        "compare_fixed=false",
        *(
            f"{k}={str(v).lower() if isinstance(v, bool) else v}"
            for k, v in _config(optimizer, guard_size=200).items()
        ),
    ]
    args = [a for s in sets for a in ("--set", s)]
    full = _cli("train", *args, "--set", f"out={tmp_path / 'a'}")
    assert full.returncode == 0, full.stderr
    crashed = _cli("step=70", "train", *args, "--set", f"out={tmp_path / 'b'}", harness=CRASH_AT)
    assert crashed.returncode == -9, crashed.stderr
    (run_b,) = (tmp_path / "b").iterdir()
    resumed = _cli("resume", str(run_b), "--allow-import", "user_models")
    assert resumed.returncode == 0, resumed.stderr
    (run_a,) = (tmp_path / "a").iterdir()
    assert (run_a / "final.safetensors").read_bytes() == (run_b / "final.safetensors").read_bytes()
    log = _cli("log", str(run_b))
    assert log.returncode == 0 and "hash chain verified" in log.stdout
    summary = json.loads((run_a / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.5


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["model=user_models:not_a_model"], "must return a torch.nn.Module (got int)"),
        (["model=nowhere_pkg:net"], "cannot import 'nowhere_pkg'"),
        (["model=user_models:nothing"], "module 'user_models' has no 'nothing'"),
        (["data=user_models:broken"], "raised RuntimeError: no weights here"),
        (["model=user_models:tiny_transformer"], "do not fit together"),
        (
            ["model=user_models:residual_mlp", "data=user_models:digits", 'modifiers=["grow"]'],
            "grow: ResidualMLP is not an nn.Sequential",
        ),
        (
            ["model=user_models:residual_mlp", "data=user_models:digits", 'modifiers=["beta2"]'],
            "beta2 needs the hyperparameter beta2_logit",
        ),
    ],
)
def test_cli_names_the_field_and_the_fix_in_one_line(sets, message, tmp_path):
    args = [
        a for s in [*sets, "steps=10", "guard_size=100", f"out={tmp_path}"] for a in ("--set", s)
    ]
    out = _cli("train", *args)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert not any(tmp_path.iterdir())  # refused before a run directory was made


def test_beta2_is_a_modifier_in_one_file(digits, tmp_path):
    assert registry()["beta2"].__module__ == "selfmod.introspect.modifiers.beta2"
    result = _fit(
        "residual", "adamw", digits, tmp_path, modifiers=["lr", "beta2"], trust_region=0.3,
        estimator="reverse",  # the first-order estimate gives the betas none
    )  # fmt: skip
    with Ledger(result.run_dir / "ledger.sqlite") as ledger:
        parts = [
            p["modifier"]
            for e in ledger.entries("proposal")
            for p in e.payload["change"].get("parts", [])
        ]
    assert "beta2" in parts
    beta2 = [
        d["after"]["beta2"] for d in result.run.history["decisions"] if d["decision"] == "commit"
    ]
    assert beta2 and beta2[-1] != pytest.approx(0.999)
    logit = math.log(0.999 / 0.001)
    moved = [abs(math.log(b / (1 - b)) - logit) for b in beta2]
    assert max(moved) <= 0.3 * len(beta2) + 1e-6  # trust region per cycle


def test_a_dataset_and_a_dataloader_train_and_a_dataloader_run_resumes_bitwise(digits, tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from selfmod.introspect.loop import Loop

    x, y = digits["train"]
    # a map-style Dataset: indexed, so the batch-size modifier applies
    result = _fit("residual", "sgd", {**digits, "train": TensorDataset(x, y)}, tmp_path / "ds")
    assert (
        result.summary["test_accuracy"] > 0.5 and "batch_size" in result.run.summary()["modifiers"]
    )
    # a DataLoader: its own batches (no batch-size modifier), its order re-seeded per epoch
    loader = DataLoader(
        TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator()
    )
    cfg = make_config({**_config("sgd"), "compare_fixed": False, "steps": 100})

    def run_of(recorder):
        torch.manual_seed(0)
        source = Source(as_batches(loader, 0), *digits["guard"], *digits["test"])
        return Loop(
            Problem(MODELS["residual"](), F.cross_entropy), [source], cfg, recorder=recorder
        )

    from selfmod.runs.recorder import RunRecorder

    full = run_of(RunRecorder(tmp_path / "dl"))
    assert "batch_size" in full.skipped  # it cannot resize a DataLoader's batches
    full.run()
    recorder = RunRecorder(tmp_path / "dl")
    back = run_of(recorder)
    recorder.resume(back, at_most=40)
    assert back.step == 40
    back.run()
    assert all(torch.equal(back.params[k], full.params[k]) for k in full.params)


def test_regression_reports_the_loss_as_its_metric(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(1200, 3) * 4 - 2
    y = (x[:, :1] * x[:, 1:2]).sin() + 0.3 * x[:, 2:]  # (N, 1) float targets
    model = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    with torch.no_grad():
        before = float(F.mse_loss(model(x[1000:]), y[1000:]))
    result = fit(
        model,
        F.mse_loss,
        (x[:800], y[:800]),
        (x[800:1000], y[800:1000]),
        test=(x[1000:], y[1000:]),
        config={**_config("sgd"), "lr": 0.02, "batch_size": 64, "min_batch": 32},
        run_dir=tmp_path / "run",
    )
    s = result.summary
    assert s["metric_name"] == "loss" and s["test_accuracy"] is None
    assert s["test_metric"] == s["test_loss"] < 0.5 * before
    widths = result.run.summary()["widths"]
    assert widths[0] >= 32  # an nn.Sequential of Linear layers: growth applies


def test_autocast_bf16_runs_the_forward_in_bfloat16_and_keeps_float32_state(digits, tmp_path):
    """``autocast = "bf16"``: the model's layers compute in bfloat16 during training (a forward
    hook sees their outputs), the run learns, and what it returns (parameters, the module's
    output, the summary's loss) is float32; with ``dtype = "float64"`` it is one line."""
    torch.manual_seed(0)
    model = MODELS["transformer"]()
    seen: set[torch.dtype] = set()
    layer = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    layer.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    result = fit(
        model, F.cross_entropy, digits["train"], digits["guard"], test=digits["test"],
        optimizer="adamw", config=_config("adamw", autocast="bf16"), run_dir=tmp_path / "run",
    )  # fmt: skip
    assert torch.bfloat16 in seen
    assert result.summary["test_accuracy"] > 0.5 and math.isfinite(result.summary["test_loss"])
    assert all(p.dtype == torch.float32 for p in result.module.parameters())
    with torch.no_grad():
        assert result.module.eval()(digits["test"][0][:4]).dtype == torch.float32
    with pytest.raises(Exception, match='autocast = "bf16" needs dtype = "float32"'):
        make_config({"autocast": "bf16", "dtype": "float64"})


def test_autocast_bf16_runs_through_a_second_order_estimator(digits, tmp_path):
    """``estimator = "reverse"`` (the step differentiated twice) under bfloat16 autocast: the
    cycles estimate and commit; ``"forward"`` with autocast is one line naming the others."""
    torch.manual_seed(0)
    config = _config("adamw", autocast="bf16", estimator="reverse", steps=80)
    result = fit(
        MODELS["residual"](), F.cross_entropy, digits["train"], digits["guard"],
        test=digits["test"], optimizer="adamw", config={**config, "modifiers": ["lr"]},
        run_dir=tmp_path / "run",
    )  # fmt: skip
    decided = [d for d in result.run.history["decisions"] if d["modifier"] == "hypergradient"]
    assert decided and math.isfinite(result.summary["test_loss"])
    with pytest.raises(Exception, match='does not combine with estimator = "forward"'):
        make_config({"autocast": "bf16", "estimator": "forward"})
