"""Choices made by the run (``selfmod.arch.Choice`` and the ``choice`` modifier): one-line errors
for bad choices, sampling and argmax, a commit that keeps the chosen branch's function and
optimizer state exactly, a run that converges to the clearly better option by gradient
(``race = 0``; the options' race: ``test_option_race.py``), and a bitwise resume through a
commit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from user_models import Abs, abs_task

from selfmod import arch, optim, ttt
from selfmod.arch import Choice
from selfmod.data import as_batches
from selfmod.introspect import registry
from selfmod.introspect.loop import Loop, Source
from selfmod.introspect.modifiers import Proposal
from selfmod.introspect.problem import Problem
from selfmod.introspect.state import RunState
from selfmod.runs import fit
from selfmod.runs.api import make_config
from selfmod.runs.ledger import Ledger
from selfmod.runs.recorder import RunRecorder


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def act_model(seed: int = 1) -> nn.Sequential:
    torch.manual_seed(seed)
    options = {"tanh": nn.Tanh(), "abs": Abs(), "sigmoid": nn.Sigmoid()}
    return nn.Sequential(nn.Linear(8, 16), Choice(options), nn.Linear(16, 2))


# ----------------------------------------------------------------------------- bad choices


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({}, "at least two options (got none)"),
        ({"relu": nn.ReLU()}, "at least two options (got only 'relu')"),
        ([nn.ReLU(), nn.GELU()], "must be a dict of name -> nn.Module"),
        ({"a.b": nn.ReLU(), "c": nn.GELU()}, "without '.'"),
        ({"relu": nn.ReLU(), "f": torch.relu}, "not an nn.Module"),
    ],
)
def test_bad_choices_are_one_line_errors(options, says):
    with pytest.raises(ValueError, match=r"Choice") as err:
        Choice(options)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_options_whose_outputs_differ_in_shape_are_a_one_line_error_on_the_first_call():
    c = Choice({"same": nn.Linear(4, 4), "wider": nn.Linear(4, 8)})
    says = r"differ in shape \(same -> \(2, 4\), wider -> \(2, 8\)\)"
    with pytest.raises(ValueError, match=says):
        c(torch.zeros(2, 4))


def test_logits_of_the_wrong_length_are_a_one_line_error():
    with pytest.raises(ValueError, match=r"logits needs one value per option \(2; got shape"):
        Choice({"a": nn.ReLU(), "b": nn.GELU()}, logits=[1.0])


def test_fit_names_a_mismatched_choice_in_one_line(tmp_path):
    x, y = abs_task(400)
    model = nn.Sequential(Choice({"a": nn.Linear(8, 2), "b": nn.Linear(8, 3)}))
    with pytest.raises(ValueError, match=r"^model: .*differ in shape") as err:
        fit(model, F.cross_entropy, (x[:300], y[:300]), (x[300:], y[300:]),
            config={"steps": 10, "report": False, "out": str(tmp_path)})  # fmt: skip
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- forward


def test_training_samples_softmax_and_eval_takes_the_argmax():
    c = Choice({"zero": arch.Zero(), "id": nn.Identity(), "neg": Abs()}, logits=[0.0, 1.0, -1.0])
    x = -torch.ones(1, 3)
    assert torch.equal(c.eval()(x), x)  # argmax: identity
    c.train()
    torch.manual_seed(0)
    outs = torch.stack([c(x)[0, 0] for _ in range(3000)])  # 0, -1 or 1 by option
    freq = torch.stack([(outs == v).float().mean() for v in (0.0, -1.0, 1.0)])
    p = torch.softmax(torch.tensor([0.0, 1.0, -1.0]), 0)
    assert torch.allclose(freq, p, atol=0.03)


def test_relaxed_weights_give_the_mixture_and_its_gradient():
    c = Choice({"id": nn.Identity(), "abs": Abs()}).eval()
    x = torch.tensor([[-2.0, 3.0]])
    w = torch.tensor([0.25, 0.75], requires_grad=True)
    out = torch.func.functional_call(c, {**dict(c.named_buffers()), "weights": w}, (x,))
    assert torch.allclose(out, 0.25 * x + 0.75 * x.abs())
    (g,) = torch.autograd.grad(out.sum(), w)
    assert torch.allclose(g, torch.tensor([1.0, 5.0]))


# ----------------------------------------------------------------------------- commit


def test_commit_keeps_the_chosen_branch_function_and_optimizer_state_exactly():
    torch.manual_seed(0)
    mixer = Choice(
        {"lin": nn.Linear(6, 6), "mlp": nn.Sequential(nn.Linear(6, 12), nn.GELU(),
                                                      nn.Linear(12, 6))},
        logits=[0.0, 2.0],
    )  # fmt: skip
    model = nn.Sequential(nn.Linear(4, 6), mixer, nn.Linear(6, 3))
    problem = Problem(model, F.cross_entropy)
    params, buffers = problem.init()
    opt = optim.adam(1e-2)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    grads = torch.func.grad(
        lambda p: F.cross_entropy(problem.forward(p, buffers, x, train=False)[0], y)
    )(params)
    _, opt_state = opt.update(grads, opt.init(params), params)
    state = RunState(params, buffers, opt_state, {}, 16, {}, 0.5)
    before = problem.predict(params, buffers, x)
    m = registry()["choice"]()
    committed = m.apply(Proposal("choice", surgery={"commit": {"1": 1}}), state, problem)
    assert int(committed.buffers["1.chosen"]) == 1 and int(state.buffers["1.chosen"]) == -1
    assert torch.equal(problem.predict(committed.params, committed.buffers, x), before)
    for k, v in committed.params.items():
        if k.startswith("1.options.lin."):
            assert v.numel() == 0 and state.params[k].numel() > 0  # the state is not touched
        else:
            assert v is params[k]
    mu = committed.opt_state[0].mu
    assert mu["1.options.lin.weight"].numel() == 0
    assert torch.equal(mu["1.options.mlp.0.weight"], opt_state[0].mu["1.options.mlp.0.weight"])
    exported = problem.export(committed.params, committed.buffers)
    assert isinstance(exported[1], nn.Sequential)  # the Choice replaced by its option
    assert torch.equal(exported(x), before)


# ----------------------------------------------------------------------------- runs

CONFIG = {
    "steps": 400, "cycle": 50, "lookahead": 5, "batch_size": 64, "guard_size": 300,
    "replay_size": 300, "keep_checkpoints": 20, "compare_fixed": False, "report": False,
    "modifiers": ["lr", "choice"], "meta_budget": 0.5, "modifiers.choice.race": 0,
}  # fmt: skip


def test_a_choice_with_one_clearly_better_option_converges_to_it(tmp_path):
    x, y = abs_task()
    result = fit(
        act_model(), F.cross_entropy, (x[:2000], y[:2000]), (x[2000:2500], y[2000:2500]),
        test=(x[2500:], y[2500:]), config={**CONFIG, "out": str(tmp_path)},
    )  # fmt: skip
    choices = [d for d in result.run.history["decisions"] if d["modifier"] == "choice"]
    assert choices and all(d["decision"] == "commit" for d in choices)
    assert isinstance(result.module[1], Abs)  # committed, and exported as the option itself
    assert result.summary["test_metric"] > 0.9


def _loop(recorder, x, y):
    cfg = make_config(
        {**CONFIG, "steps": 300, "optimizer": "adamw", "lr": 3e-3, "meta_budget": None}
    )  # a cycle, so a checkpoint, after the commit
    torch.manual_seed(0)
    source = Source(as_batches((x[500:2000], y[500:2000]), 0), x[:500], y[:500],
                    x[2500:], y[2500:])  # fmt: skip
    problem = Problem(act_model(), F.cross_entropy)
    mods = [registry()[n].from_config(cfg) for n in ("lr", "choice")]
    return Loop(problem, [source], cfg, modifiers=mods, recorder=recorder)


def test_resume_through_a_commit_is_bitwise(tmp_path):
    x, y = abs_task()
    run = _loop(RunRecorder(tmp_path), x, y)
    run.run()
    choices = [d for d in run.history["decisions"] if d["modifier"] == "choice"]
    assert int(run.state.buffers["1.chosen"]) == 1
    at = max(d["step"] for d in choices) + 50  # the checkpoint after the commit
    recorder = RunRecorder(tmp_path)
    back = _loop(recorder, x, y)
    recorder.resume(back, at_most=at)
    assert back.step == at and int(back.state.buffers["1.chosen"]) == 1
    back.run()
    assert all(torch.equal(back.params[k], run.params[k]) for k in run.params)
    assert all(torch.equal(back.state.buffers[k], run.state.buffers[k]) for k in run.state.buffers)
    assert torch.equal(back.hparams["log_lr"], run.hparams["log_lr"])


# ----------------------------------------------------------------------------- TTT layers


class Tokens(nn.Module):
    """``x (B, 8, 4)`` -> a causal token mixer (a choice, or one TTT-Linear) -> mean -> 2."""

    def __init__(self, mixer: nn.Module) -> None:
        super().__init__()
        self.embed, self.mixer, self.head = nn.Linear(4, 8), mixer, nn.Linear(8, 2)

    def forward(self, x):
        h = self.embed(x)
        return self.head((h + self.mixer(h)).mean(1))


def test_a_ttt_inner_rate_buffer_gets_its_exact_gradient_through_the_guard_loss():
    torch.manual_seed(0)
    model = Tokens(ttt.TTTLinear(8, 2, mini_batch=4, tune_lr=True)).eval()
    x, y = torch.randn(16, 8, 4), torch.randint(0, 2, (16,))
    buffers = dict(model.named_buffers())

    def guard(log_lr):
        out = torch.func.functional_call(model, {**buffers, "mixer.log_inner_lr": log_lr}, (x,))
        return F.cross_entropy(out, y)

    at = buffers["mixer.log_inner_lr"].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(guard(at), at)
    h = 1e-2
    with torch.no_grad():
        fd = (guard(at.detach() + h) - guard(at.detach() - h)) / (2 * h)
    assert float(g) != 0 and abs(float(g) - float(fd)) < 1e-3 * max(1.0, abs(float(fd)))


def test_a_mixer_choice_with_tuned_ttt_rates_runs_through_fit(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1200, 8, 4, generator=g)
    y = (x[:, :, 0].cumsum(1)[:, -1] > 0).long()
    torch.manual_seed(0)
    mixer = ttt.mixer_choice(["conv", "ttt_linear"], 8, 2, causal=True, mini_batch=4,
                             tune_lr=True)  # fmt: skip
    config = {**CONFIG, "steps": 200, "cycle": 25, "out": str(tmp_path),
              "modifiers": ["lr", "choice", "inner_lr"], "meta_budget": None}  # fmt: skip
    result = fit(Tokens(mixer), F.cross_entropy, (x[:800], y[:800]), (x[800:1000], y[800:1000]),
                 test=(x[1000:], y[1000:]), config=config)  # fmt: skip
    commits = [d["modifier"] for d in result.run.history["decisions"] if d["decision"] == "commit"]
    assert "choice" in commits and "inner_lr" in commits  # the rate tuned while still open
    buffers = result.run.state.buffers
    assert int(buffers["mixer.chosen"]) in (0, 1)  # committed (by decide_by at the latest)
    assert float(buffers["mixer.options.ttt_linear.log_inner_lr"]) != 0  # moved from lr 1
    assert result.summary["test_metric"] > 0.9


def test_the_cli_makes_a_users_choice_and_ledgers_it(tmp_path):
    here = Path(__file__).parent
    sets = ["model=user_models:choice_mlp", "data=user_models:digits", "optimizer=adamw",
            "lr=0.003", "steps=200", "cycle=50", "lookahead=5", "guard_size=200",
            "compare_fixed=false", "report=false", f"out={tmp_path}"]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "selfmod.cli", "train", *(a for s in sets for a in ("--set", s))]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=here, check=False)
    assert done.returncode == 0, done.stderr
    (run,) = tmp_path.iterdir()
    rows = Ledger(run / "ledger.sqlite", create=False).entries("proposal")
    choices = [r for r in rows if r.payload.get("modifier") == "choice"]
    assert choices and any("commit" in r.payload["change"].get("surgery", {}) for r in choices)


def test_fit_makes_the_choices_a_model_marks_without_being_told(tmp_path):
    """``fit``'s defaults name no tuning modifier, but the choices a model marks are made: the
    ``choice`` modifier for a ``Choice``, ``inner_lr`` for a TTT layer built with ``tune_lr``;
    a model that marks none runs without either (no error for a modifier that cannot apply)."""
    from selfmod.runs.api import marked

    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert marked(plain) == []
    act = Choice({"relu": nn.ReLU(), "tanh": nn.Tanh()})
    assert marked(nn.Sequential(nn.Linear(4, 8), act, nn.Linear(8, 2))) == ["choice"]
    mixer = ttt.mixer_choice(["conv", "ttt_linear"], 8, 2, causal=True, mini_batch=4, tune_lr=True)
    assert marked(mixer) == ["choice", "inner_lr"]
    x = torch.randn(600, 4)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), act, nn.Linear(8, 2))
    config = {"steps": 60, "cycle": 20, "lookahead": 4, "report": False, "out": str(tmp_path)}
    run = fit(model, F.cross_entropy, (x[:400], y[:400]), (x[400:], y[400:]), config=config).run
    assert run.summary()["modifiers"] == ["choice"]
