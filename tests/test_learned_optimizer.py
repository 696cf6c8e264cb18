"""A learned optimizer from ``selfmod meta-train`` as a run's base optimizer
(``optimizer = "learned:DIR"``): it loads without unpickling, its updates are the run's
per-tensor learning rate times the learned update, a run with it trains and resumes bitwise,
and a missing or malformed DIR is one line (exit code 2 from the CLI)."""

import json
import subprocess
import sys

import pytest
import torch

from selfmod.errors import SelfmodError
from selfmod.introspect.builtin import sources_of
from selfmod.introspect.hparams import HParamSpace
from selfmod.introspect.loop import Loop
from selfmod.meta.train import MetaTrainConfig, meta_train
from selfmod.optim.saved import DESCRIPTION, WEIGHTS, load_learned
from selfmod.runs.api import make_config
from selfmod.runs.imports import build_problem
from selfmod.runs.recorder import RunRecorder
from selfmod.tasks import TemplateTasks
from selfmod.validation import ConfigError


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """``{kind: (folder, weights)}``: an MLP and an LSTM optimizer meta-trained for a few
    tiny meta-steps."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("learned")
    tasks = TemplateTasks(num_templates=30, examples_per_class=20, seed=0)
    out = {}
    for kind, steps in (("mlp", 10), ("lstm", 3)):
        cfg = MetaTrainConfig(
            optimizer=kind, meta_steps=steps, meta_batch=4, unroll=5, horizon=20, width=8,
            n_way=3, inner_batch=16, meta_lr=0.01, out=str(root / kind), checkpoint_every=100,
        )  # fmt: skip
        out[kind] = (root / kind, meta_train(cfg, tasks))
    return out


def _run(folder, **kw):
    cfg = make_config(
        {"steps": 300, "optimizer": f"learned:{folder}", "lr": 1.0, "cycle": 50, "lookahead": 5,
         "width": 16, "compare_fixed": False, "guard_size": 200, "replay_size": 200, **kw}
    )  # fmt: skip
    problem, splits = build_problem(cfg)
    return cfg, problem, sources_of(splits, cfg.seed)


def test_meta_train_output_loads_as_written_and_never_unpickles(learned):
    for kind, (folder, weights) in learned.items():
        got = load_learned(folder)
        assert got.kind == kind and set(got.weights) == set(weights)
        assert all(torch.equal(got.weights[k], weights[k]) for k in weights)
        desc = json.loads((folder / DESCRIPTION).read_text())
        assert desc["meta_train"]["optimizer"] == kind and desc["step"] >= 3


def test_the_update_is_the_run_learning_rate_times_the_learned_update(learned):
    folder, _ = learned["lstm"]
    names = ("a", "b")
    space = HParamSpace(f"learned:{folder}", names, 0)
    assert [e.name for e in space.entries] == ["lr", "weight_decay"]  # no momentum, no betas
    h = space.init({"lr": [0.5, 3.0], "weight_decay": 0.1})
    params = {"a": torch.randn(3, 2), "b": torch.randn(4)}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    opt = space.make_optimizer()
    updates, _ = opt.update(grads, opt.init(params), params, h)
    core = load_learned(folder).transform()
    decayed = {k: grads[k] + 0.1 * params[k] for k in grads}  # L2 decay, as SGD and Adam
    raw, _ = core.update(decayed, core.init(params), params, None)
    for i, k in enumerate(names):
        want = h["log_lr"][i].exp() * raw[k]
        assert torch.allclose(updates[k], want, atol=1e-6, rtol=1e-5), k
    assert not torch.allclose(updates["a"] / raw["a"], updates["b"][:1] / raw["b"][:1])


def test_a_run_with_a_learned_optimizer_trains_and_its_rates_are_tuned(learned):
    folder, _ = learned["mlp"]
    cfg, problem, sources = _run(folder, modifiers=["lr"])
    run = Loop(problem, sources, cfg)
    run.run()
    first = run.history["probes"][0]["guard_loss"]  # at step 0
    last = run.history["log"][-1]["guard_loss"]
    assert last < 0.75 * first, (first, last)
    commits = [d for d in run.history["decisions"] if d["decision"] == "commit"]
    assert commits and run.hparams["log_lr"].abs().max() > 0.1  # the lr modifier moved them


def test_a_learned_run_with_growth_resumes_bitwise(learned, tmp_path):
    # the LSTM's per-coordinate memory restarts when growth changes the coordinates; resume
    # reads whatever shape was saved, so the resumed run equals the uninterrupted one
    folder, _ = learned["lstm"]

    def loop(recorder):
        cfg, problem, sources = _run(folder, steps=200, lr=0.1, keep_checkpoints=10)
        return Loop(problem, sources, cfg, recorder=recorder)

    run = loop(RunRecorder(tmp_path))
    run.run()
    assert any(d["modifier"] == "grow" and d["decision"] == "commit" for d in run.history[
        "decisions"]) and run.widths() != [16, 16]  # fmt: skip
    recorder = RunRecorder(tmp_path)
    back = loop(recorder)
    recorder.resume(back, at_most=100)
    assert back.step == 100
    back.run()
    assert all(torch.equal(back.params[k], run.params[k]) for k in run.params)
    assert torch.equal(back.hparams["log_lr"], run.hparams["log_lr"])


def _broken(tmp_path, learned, how):
    folder = tmp_path / how
    src, _ = learned["mlp"]
    folder.mkdir()
    for name in (WEIGHTS, DESCRIPTION):
        (folder / name).write_bytes((src / name).read_bytes())
    desc = json.loads((folder / DESCRIPTION).read_text())
    if how == "no_weights":
        (folder / WEIGHTS).unlink()
    elif how == "bad_json":
        (folder / DESCRIPTION).write_text("{not json")
    elif how == "flipped_byte":
        raw = bytearray((folder / WEIGHTS).read_bytes())
        raw[-1] ^= 0xFF
        (folder / WEIGHTS).write_bytes(bytes(raw))
    elif how == "unknown_kind":
        (folder / DESCRIPTION).write_text(json.dumps({**desc, "optimizer": "rnn"}))
    elif how == "pickle":  # a torch.save file renamed: never unpickled, refused by the digest
        torch.save({"x": torch.zeros(1)}, folder / WEIGHTS)
    return folder


@pytest.mark.parametrize(
    ("how", "words"),
    [
        ("missing", "does not exist"),
        ("no_weights", "has no weights.safetensors"),
        ("bad_json", "is not valid JSON"),
        ("flipped_byte", "does not match the sha256"),
        ("unknown_kind", "optimizer must be one of 'lstm', 'mlp'"),
        ("pickle", "does not match the sha256"),
    ],
)
def test_a_missing_or_malformed_folder_is_one_line(tmp_path, learned, how, words):
    folder = tmp_path / "nowhere" if how == "missing" else _broken(tmp_path, learned, how)
    cfg, problem, sources = _run(folder)
    with pytest.raises(SelfmodError) as err:
        Loop(problem, sources, cfg)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert "selfmod meta-train" in str(err.value)  # names the fix


def test_the_cli_exits_2_with_one_line_before_making_a_run_directory(tmp_path, learned):
    folder = _broken(tmp_path, learned, "flipped_byte")
    out = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "selfmod.cli", "train", "--set", f"optimizer=learned:{folder}",
         "--set", f"out={out}", "--set", "steps=10"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and "sha256" in proc.stderr
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(ConfigError) as err:  # and a malformed name is the config's one line
        make_config({"optimizer": "learned:"})
    assert "'learned:DIR'" in str(err.value)
