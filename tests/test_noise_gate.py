"""Growth that must beat the guard's noise (``modifiers.grow.grow_beats_noise``)."""

from __future__ import annotations

import pytest
import torch

from selfmod.introspect import Introspector
from selfmod.introspect.verifier import beats_noise
from selfmod.runs.config import TrainConfig

FAST = dict(
    steps=200, cycle=20, lookahead=5, width=8, guard_size=100, replay_size=200,
    compare_fixed=False, modifiers=["grow"],
)  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_beats_noise_is_the_paired_difference_and_its_standard_error():
    run = Introspector(TrainConfig(**{**FAST, "modifiers": []}))
    verify, start = run.guard("verify"), (run.params, run.state.buffers)
    assert beats_noise(run.problem, verify, start, start) == (0.0, 0.0)  # no change: no gain
    run.run()
    gain, noise = beats_noise(run.problem, verify, start, (run.params, run.state.buffers))
    x, y = verify
    whole = run.problem.evaluate(*start, x, y)[0] - run.problem.evaluate(run.params, run.state.buffers, x, y)[0]  # fmt: skip  # noqa: E501
    assert gain == pytest.approx(whole, rel=1e-5)  # size-weighted: the whole set's
    assert gain > noise > 0  # 200 steps of training beat the noise


def test_gated_growth_commits_only_past_the_noise_and_says_why_it_did_not():
    runs = {}
    for gate in (False, True):
        cfg = {**FAST, "modifiers.grow.grow_beats_noise": gate, "modifiers.grow.max_width": 64}
        run = Introspector(TrainConfig(**cfg))
        run.run()
        runs[gate] = [d for d in run.history["decisions"] if d["modifier"] == "grow"]
    assert all(d["decision"] == "commit" for d in runs[False])  # within epsilon: every one
    refused = [d for d in runs[True] if d["decision"] == "reject"]
    assert refused and all("not more than its noise" in d["reason"] for d in refused)
