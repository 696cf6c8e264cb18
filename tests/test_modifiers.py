"""The modifier protocol: a third-party modifier (defined here, not registered) gets the same
guarantees as the built-ins: verified before commit, its memory checkpointed and resumed with
no code of its own, a harmful proposal rejected with the run unchanged."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import user_models

from selfmod.data import as_batches
from selfmod.introspect import Context, Loop, Modifier, Proposal, registry
from selfmod.introspect.lookahead import Lookahead
from selfmod.introspect.loop import Recorder, Source
from selfmod.introspect.modifiers.base import merge
from selfmod.introspect.problem import Problem
from selfmod.runs.api import make_config
from selfmod.runs.recorder import RunRecorder


class Nudge(Modifier):
    """Proposes every learning rate times ``factor``; counts its proposals in its memory."""

    name = "nudge"
    default = False

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def propose(self, ctx: Context, memory):
        count = memory.get("count", torch.zeros(())) + 1
        h = ctx.state.hparams["log_lr"] + math.log(self.factor)
        return [Proposal(self.name, {"log_lr": h}, info={"count": int(count)})], {"count": count}


def _loop(tmp_path, factor, recorder=None, steps=120):
    x, y, xt, yt = user_models.digits()
    cfg = make_config(
        {"steps": steps, "cycle": 20, "lookahead": 4, "lr": 0.02, "guard_size": 200,
         "replay_size": 200, "keep_checkpoints": 10, "compare_fixed": False}
    )  # fmt: skip
    torch.manual_seed(0)
    source = Source(as_batches((x[200:], y[200:]), 0), x[:200], y[:200], xt, yt)
    problem = Problem(user_models.residual_mlp(), F.cross_entropy)
    return Loop(problem, [source], cfg, modifiers=[Nudge(factor)], recorder=recorder)


def test_a_third_party_modifier_is_verified_and_resumed_with_no_code_of_its_own(tmp_path):
    assert "nudge" not in registry()
    run = _loop(tmp_path, 1.5, RunRecorder(tmp_path))
    run.run()
    decisions = [d["decision"] for d in run.history["decisions"] if d["modifier"] == "nudge"]
    assert len(decisions) == 6 and "commit" in decisions
    assert int(run.state.memory["nudge"]["count"]) == 6
    recorder = RunRecorder(tmp_path)
    back = _loop(tmp_path, 1.5, recorder)
    recorder.resume(back, at_most=60)
    assert back.step == 60 and int(back.state.memory["nudge"]["count"]) == 3
    back.run()
    assert all(torch.equal(back.params[k], run.params[k]) for k in run.params)
    assert torch.equal(back.hparams["log_lr"], run.hparams["log_lr"])


def test_a_harmful_third_party_proposal_is_rejected_every_time(tmp_path):
    run = _loop(tmp_path, 1000.0, steps=60)
    run.run()
    nudges = [d for d in run.history["decisions"] if d["modifier"] == "nudge"]
    assert nudges and all(d["decision"] == "reject" for d in nudges)
    assert torch.allclose(run.hparams["log_lr"].exp(), torch.full_like(run.hparams["log_lr"], 0.02))


class Relayout(Modifier):
    """Surgery that keeps every value but hands the weights back column-major (as LAPACK's
    factors or a transpose would): the layout a checkpoint cannot store."""

    name = "relayout"
    default = False

    def propose(self, ctx: Context, memory):
        return [Proposal(self.name, surgery={"layout": "column-major"})], memory

    def apply(self, proposal, state, problem):
        params = {k: v.t().contiguous().t() if v.dim() == 2 else v for k, v in state.params.items()}
        return state.with_(params=params)


def test_a_modifier_that_returns_column_major_tensors_commits_row_major_and_resumes_bitwise(
    tmp_path,
):
    x, y, xt, yt = user_models.digits()
    cfg = make_config(
        {"steps": 80, "cycle": 20, "lookahead": 4, "lr": 0.02, "guard_size": 200,
         "replay_size": 200, "keep_checkpoints": 10, "compare_fixed": False}
    )  # fmt: skip

    def loop(recorder):
        torch.manual_seed(0)
        source = Source(as_batches((x[200:], y[200:]), 0), x[:200], y[:200], xt, yt)
        problem = Problem(user_models.residual_mlp(), F.cross_entropy)
        return Loop(problem, [source], cfg, modifiers=[Relayout()], recorder=recorder)

    run = loop(RunRecorder(tmp_path))
    run.run()
    decisions = [d["decision"] for d in run.history["decisions"] if d["modifier"] == "relayout"]
    assert "commit" in decisions
    assert all(v.is_contiguous() for v in run.params.values())
    recorder = RunRecorder(tmp_path)
    back = loop(recorder)
    recorder.resume(back, at_most=40)  # after a commit, from a row-major checkpoint
    back.run()
    assert all(torch.equal(back.params[k], run.params[k]) for k in run.params)


def test_proposals_round_trip_through_json_and_merge_by_group():
    like = {"log_lr": torch.zeros(3), "log_wd": torch.zeros(())}
    a = Proposal("lr", {"log_lr": torch.tensor([1.0, 2.0, 3.0])}, strict=True, group="g")
    b = Proposal("weight_decay", {"log_wd": torch.tensor(-4.0)}, group="g")
    joint = merge("g", [a, b])
    assert joint.modifier == "g" and joint.strict and set(joint.hparams) == {"log_lr", "log_wd"}
    back = Proposal.from_json(joint.to_json(), like)
    assert [p.modifier for p in back.parts] == ["lr", "weight_decay"]
    assert torch.equal(back.hparams["log_lr"], a.hparams["log_lr"]) and back.strict
    grow = Proposal("grow", surgery={"add": [2, 0], "seed": 7})
    assert Proposal.from_json(grow.to_json(), like).surgery == {"add": [2, 0], "seed": 7}


class _Changes(Recorder):
    """Keeps every proposal's ``change`` (unconstrained values, as the ledger has them)."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, dict]] = []

    def record(self, run, kind, decision, reason, payload):
        if kind == "proposal":
            self.changes.append((decision, payload["change"]))
        return None


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_the_optimizer_as_modifiers_lr_betas_and_weight_decay_each_take_the_rprop_step(
    optimizer, monkeypatch
):
    # issue 15 item 6: under Adam/AdamW the per-tensor rates, beta1, beta2 and weight decay are
    # each moved by the Rprop step on their own meta-gradient, verified together and committed
    torch.set_num_threads(1)
    x, y, xt, yt = user_models.digits()
    cfg = make_config(
        {"steps": 80, "cycle": 20, "lookahead": 4, "lr": 0.003, "guard_size": 200,
         "replay_size": 200, "compare_fixed": False, "optimizer": optimizer,
         "modifiers": ["lr", "weight_decay", "beta1", "beta2"], "regularize": "hypergradient",
         "beta1": 0.5, "beta2": 0.9, "lr_mean": "free"}  # the plain Rprop step, by hand
    )  # fmt: skip
    source = Source(as_batches((x[200:], y[200:]), 0), x[:200], y[:200], xt, yt)
    problem = Problem(user_models.residual_mlp(), F.cross_entropy)
    recorder = _Changes()
    run = Loop(problem, [source], cfg, recorder=recorder)
    assert [m.name for m in run.modifiers] == ["lr", "weight_decay", "beta1", "beta2"]
    seen: list[tuple[dict, dict, float]] = []  # (hparams, meta-gradient, meta_lr) per cycle
    estimate = Lookahead.estimate

    def spy(look, *args):
        value, g = estimate(look, *args)
        seen.append(({k: v.clone() for k, v in run.hparams.items()}, g, run.state.meta_lr))
        return value, g

    monkeypatch.setattr(Lookahead, "estimate", spy)
    run.run()
    assert len(seen) == 4 and len(recorder.changes) == 4
    keys = ("log_lr", "log_wd", "beta1_logit", "beta2_logit")
    steps: dict[str, torch.Tensor] = {}
    signs: dict[str, torch.Tensor] = {}
    for (h, g, meta_lr), (_, change) in zip(seen, recorder.changes, strict=True):
        parts = {p["modifier"]: p["hparams"] for p in change["parts"]}
        assert set(parts) == {"lr", "weight_decay", "beta1", "beta2"}
        for name, key in zip(("lr", "weight_decay", "beta1", "beta2"), keys, strict=True):
            hi = min(meta_lr, cfg.trust_region)
            sign = torch.sign(g[key])
            if key in steps:  # Rprop by hand: x1.2 on the same sign, x0.5 on a flip
                same, flip = sign * signs[key] > 0, sign * signs[key] < 0
                factor = torch.where(same, 1.2, torch.where(flip, 0.5, 1.0))
                step = (steps[key] * factor).clamp(1e-3 * hi, hi)
            else:
                step = torch.full_like(g[key], hi)
            steps[key], signs[key] = step, sign
            want = h[key] - step * sign
            got = torch.tensor(parts[name][key]).reshape(want.shape)
            assert torch.allclose(got, want, atol=1e-6), (name, got, want)
    decisions = [d for d, _ in recorder.changes]
    assert "commit" in decisions, decisions
    committed = next(c for d, c in recorder.changes if d == "commit")
    moved = {p["modifier"] for p in committed["parts"]}
    assert moved == {"lr", "weight_decay", "beta1", "beta2"}
