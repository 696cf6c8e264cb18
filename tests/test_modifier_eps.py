"""The ``eps`` modifier: one file that moves a hyperparameter the optimizer declares
(Adam's epsilon), with nothing else of the library changed."""

import math

import cycles
import pytest
import torch

from selfmod.errors import SelfmodError
from selfmod.introspect import Introspector
from selfmod.runs.config import TrainConfig

FAST = dict(steps=60, cycle=20, lookahead=5, width=8, guard_size=100, replay_size=200,
            compare_fixed=False, optimizer="adamw")  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_eps_joins_the_space_only_when_chosen_at_the_optimizers_default():
    plain = Introspector(TrainConfig(**FAST, modifiers=["lr"]))
    assert "log_eps" not in plain.hparams and "eps" not in plain.values()
    run = Introspector(TrainConfig(**FAST, modifiers=["lr", "eps"]))
    assert [m.name for m in run.modifiers] == ["lr", "eps"]
    assert run.values()["eps"] == pytest.approx(1e-8)  # optim.adamw's own default
    assert "eps" in [h["name"] for h in run.summary()["hyperparameters"]]  # the report's list
    with pytest.raises(SelfmodError, match="eps needs the hyperparameter log_eps"):
        Introspector(TrainConfig(**{**FAST, "optimizer": "sgd"}, modifiers=["eps"]))


def test_the_meta_gradient_of_log_eps_matches_finite_differences():
    cfg = TrainConfig(**{**FAST, "steps": 20}, modifiers=["eps"], dtype="float64")
    run = Introspector(cfg)
    run.run()  # Adam's second moments are no longer zero
    value, g = cycles.estimate(run)
    look, state = run.lookahead, run.state
    h = 1e-3

    def guard_loss(delta: float) -> float:
        moved = {**state.hparams, "log_eps": state.hparams["log_eps"] + delta}
        params, _ = look.replay(state.with_(hparams=moved))
        return look.guard_loss(params, state, "propose")

    assert guard_loss(0.0) == pytest.approx(value, rel=1e-12)
    fd = (guard_loss(h) - guard_loss(-h)) / (2 * h)
    assert float(g["log_eps"]) != 0.0
    assert float(g["log_eps"]) == pytest.approx(fd, rel=1e-4)


def test_a_run_moves_eps_by_verified_rprop_steps():
    run = Introspector(TrainConfig(**{**FAST, "steps": 100}, modifiers=["eps"]))
    run.run()
    decided = [d for d in run.history["decisions"] if d["decision"] in ("commit", "reject")]
    assert decided and all("eps" in d["before"] for d in decided)
    for d in decided:  # each step on log eps is bounded by the trust region
        step = abs(math.log(d["after"]["eps"]) - math.log(d["before"]["eps"]))
        assert step <= run.config.trust_region + 1e-9
    commits = [d for d in decided if d["decision"] == "commit"]
    assert run.values()["eps"] == pytest.approx(commits[-1]["after"]["eps"] if commits else 1e-8)
