"""The learning rates' level, raced at the run's start (``level_race``).

A tuned sweep's main win is the rates' level; a lookahead of a few steps cannot see it (its
short-horizon bias favours small rates, Wu et al. 2018). So before the first cycle the run
trains the unchanged state and copies of it with every rate times each factor ``f`` of
``config.level_race`` over the same first ``h = race_share x steps`` batches, with the
schedule of those steps and the same random numbers. The level with the lowest guard loss on
the *proposing* split wins; it is committed only if its guard loss on the *verifying* split
(data the choice never read) is lower than the unchanged level's too, so the check can fail.
The run then trains those ``h`` batches itself with the chosen level: the race costs
``(1 + len(factors)) x h`` batches of meta work, with one candidate's copy alive at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from selfmod.errors import DivergenceError, NonFiniteError
from selfmod.introspect import schedule
from selfmod.introspect.budget import FORWARD
from selfmod.introspect.state import RunState

#: ``(state, t, batch) -> state`` one base step of the race (the schedule at its ``t``-th step)
Step = Callable[[RunState, int, Any], RunState]
#: ``state -> (guard loss on the proposing split, on the verifying split)``
Score = Callable[[RunState], tuple[float, float]]


@dataclass(frozen=True)
class Entry:
    """One candidate level: its factor on every rate and its guard losses after the race
    (``inf`` when it diverged)."""

    factor: float
    propose: float
    verify: float


def leveled(state: RunState, factor: float) -> RunState:
    """``state`` with every learning rate times ``factor``."""
    log_lr = state.hparams["log_lr"] + math.log(factor)
    return replace(state, hparams={**state.hparams, "log_lr": log_lr})


def race(
    state: RunState,
    batches: Sequence[Any],
    factors: Sequence[float],
    step: Step,
    score: Score,
    rng_state: torch.Tensor,
) -> list[Entry]:
    """Each level (``1`` and every ``factors``) trained from ``state`` over ``batches`` by
    ``step``, every one from the random state ``rng_state``, and scored; the run's random
    state is left as it was."""
    out = []
    for f in [1.0, *(f for f in factors if f != 1.0)]:
        s = leveled(state, f) if f != 1.0 else state
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(rng_state)
            try:
                for t, batch in enumerate(batches):
                    s = step(s, t, batch)
                propose, verify = score(s)
            except (NonFiniteError, DivergenceError):
                propose = verify = math.inf
        propose = propose if math.isfinite(propose) else math.inf
        out.append(Entry(f, propose, verify if math.isfinite(verify) else math.inf))
    return out


def verdict(entries: Sequence[Entry]) -> tuple[Entry, str, str]:
    """``(winner, decision, reason)``: the lowest proposing guard loss wins; ``commit`` if it
    is not the unchanged level and its verifying guard loss is lower than the unchanged
    level's, else ``reject``."""
    same = entries[0]  # the unchanged level
    best = min(entries, key=lambda e: (e.propose, e.factor != 1.0))
    scores = ", ".join(f"x{e.factor:g}: {e.propose:.5g}/{e.verify:.5g}" for e in entries)
    why = f"guard loss proposing/verifying after the race {scores}"
    if best is same:
        return same, "reject", f"the unchanged level won; {why}"
    if not best.verify < same.verify:
        return best, "reject", f"x{best.factor:g} won on the proposing split only; {why}"
    return best, "commit", f"x{best.factor:g} won on both splits; {why}"


def steps(config: Any) -> int:
    """The race's length in base steps: ``race_share`` of the run's steps, at least 1."""
    return max(1, round(config.race_share * config.steps))


def base_steps(train_step: Callable, config: Any, batch_size: int) -> Step:
    """The race's :data:`Step`: the schedule at the ``t``-th step's examples, then
    ``train_step(state, batch) -> (params, opt_state, buffers, loss, grads)`` (the run's)."""

    def step(state: RunState, t: int, batch: Any) -> RunState:
        state = schedule.at(state, config, t, t * batch_size)
        params, opt_state, buffers, _, _ = train_step(state, batch)
        return replace(state, params=params, opt_state=opt_state, buffers=buffers)

    return step


def guard_scores(guard: Callable, propose: Any, verify: Any) -> Score:
    """The race's :data:`Score`: ``guard(params, hparams, batch, buffers)`` (the run's guard
    loss) on the proposing and the verifying split."""

    def score(state: RunState) -> tuple[float, float]:
        with torch.no_grad():
            return tuple(  # type: ignore[return-value]
                float(guard(state.params, state.hparams, split, state.buffers))
                for split in (propose, verify)
            )

    return score


def cost(entries: Sequence[Entry], batches: Sequence[Any], guard_rows: int) -> float:
    """The race's work in example-equivalents (:mod:`.budget`): every level trained over the
    batches and evaluated on ``guard_rows`` guard rows."""
    trained = sum(len(b[1]) for b in batches)
    return len(entries) * (trained + FORWARD * guard_rows)


@dataclass(frozen=True)
class Outcome:
    """A race's result: every level's :class:`Entry`, ``(decision, why)``, the verifying guard
    losses ``(unchanged level, winner)``, the state with the winner's level (the run's on a
    commit) and the race's work in example-equivalents."""

    entries: list[Entry]
    decision: tuple[str, str]
    guard: tuple[float, float]
    state: RunState
    cost: float


def run(
    state: RunState,
    batches: Sequence[Any],
    config: Any,
    train_step: Callable,
    guard: Callable,
    split: Callable[[str], Any],
) -> Outcome:
    """The race of ``config.level_race`` from ``state`` over ``batches`` (the run's
    ``train_step``, and its ``guard`` loss on ``split("propose")`` and ``split("verify")``),
    judged by :func:`verdict`."""
    splits, rng = (split("propose"), split("verify")), torch.get_rng_state()
    propose, verify = splits
    step = base_steps(train_step, config, state.batch_size)
    entries = race(state, batches, config.level_race, step, guard_scores(guard, *splits), rng)
    won, decision, why = verdict(entries)
    work = cost(entries, batches, len(propose[1]) + len(verify[1]))
    return Outcome(
        entries, (decision, why), (entries[0].verify, won.verify), leveled(state, won.factor), work
    )
