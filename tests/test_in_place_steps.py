"""Base steps written in place (``Loop.donate``): copy-on-write, the same run bit for bit."""

from __future__ import annotations

import pytest
import torch

from selfmod import tree
from selfmod.introspect import Introspector
from selfmod.runs.config import TrainConfig

FAST = dict(
    steps=120, cycle=30, lookahead=5, width=8, guard_size=100, replay_size=200,
    compare_fixed=False, dtype="float64", batch_size=32, optimizer="adamw", lr=3e-3,
    keep_best=True, level_race=[0.1, 10.0],
)  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _run(donate: bool) -> tuple[Introspector, int, int]:
    """A run with cycles, a race, log points and early stopping's candidates; the steps that
    wrote their parameters in place, and the steps in all. Between steps, the last good state
    and the best state must still hold what they held when they were taken."""
    run = Introspector(TrainConfig(**FAST))
    run.donate = donate
    kept: dict[str, tuple] = {}
    counts = {"in place": 0, "steps": 0}
    last = [None]

    def check(loop) -> None:
        for name, params in (("good", loop.good.params), ("best", loop.best.params)):
            if params is None:
                continue
            if name not in kept or kept[name][0] is not params:
                kept[name] = (params, tree.clone(params))
            for k, v in kept[name][1].items():
                assert torch.equal(params[k], v), f"the {name} state's {k} was written"
        ptr = next(iter(loop.params.values())).data_ptr()
        counts["in place"] += ptr == last[0]
        counts["steps"] += 1
        last[0] = ptr

    run.run(on_step=check)
    return run, counts["in place"], counts["steps"]


def test_in_place_steps_give_the_same_run_and_leave_kept_states_alone():
    """With and without writing in place: the same parameters, optimizer state and decisions
    bit for bit; in place, most steps reuse the parameters' memory (a step after a log point,
    a cycle or the race copies), and never write the last good or the best state."""
    donated, in_place, steps = _run(True)
    copied, in_place_off, _ = _run(False)
    assert in_place > steps // 2 and in_place_off == 0
    for k, v in copied.params.items():
        assert torch.equal(donated.params[k], v), k
    mine, theirs = tree_leaves(donated.state.opt_state), tree_leaves(copied.state.opt_state)
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))
    strip = lambda h: [{k: v for k, v in d.items() if k != "seconds"} for d in h]  # noqa: E731
    assert strip(donated.history["decisions"]) == strip(copied.history["decisions"])
    assert len(donated.history["decisions"]) > 1  # the race and the cycles decided something


def tree_leaves(x) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]
