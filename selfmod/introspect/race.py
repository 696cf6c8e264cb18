"""The learning rates' level, raced at the run's start (``level_race``).

A tuned sweep's main win is the rates' level; a lookahead of a few steps cannot see it (its
short-horizon bias favours small rates, Wu et al. 2018). So before the first cycle the run
trains the unchanged state and copies of it with every rate times each factor ``f`` of
``config.level_race`` over the same first ``h = race_share x steps`` batches, with the
schedule of those steps and the same random numbers. The level with the lowest guard loss on
the *proposing* split wins; it is committed only if its guard loss on the *verifying* split
(data the choice never read) is lower than the unchanged level's too, so the check can fail.
The verifying split is read only where the verdict may need it: for a changed level that leads
the ones before it, and for the unchanged level where it does not lead (the changed levels
train nearest to the unchanged one first, so a farther one that loses is not read). Each read
takes at most as many rows of its split as a level trained on (the first ones; the splits are
in random order), so that on a short run with a large guard set a read costs no more than a
third of a level's training.
The unchanged level trains last; where it stays, it keeps its training as the run's own: its
``h`` steps, losses and random numbers, and the rows of the run's log points inside them
(offered to early stopping: :class:`Seen`); the race's work is the other levels'
``len(factors) x h`` batches. A committed winner's training is not kept: the run trains it
again from the start of the race, with the same batches and random numbers, so the same state
(``h`` more base steps, only where a changed level wins). So the race holds one state besides
the one training: its start, which the run's last good state shares.
The race counts against ``meta_budget``: the loop shortens ``h`` so that the most it may spend
(:func:`planned`) fits, or runs no race where not one step does (:mod:`.budget`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from selfmod.determinism import RNG, drawing_from, random_state, set_random_state
from selfmod.errors import DivergenceError, NonFiniteError
from selfmod.introspect import replay, schedule
from selfmod.introspect.budget import FORWARD
from selfmod.introspect.state import RunState

#: ``(state, t, batch) -> (state, loss)``: one base step of the race (the schedule at its
#: ``t``-th step)
Step = Callable[[RunState, int, Any], tuple[RunState, float]]
#: ``(state, split) -> guard loss`` on ``"propose"`` or ``"verify"``
Score = Callable[[RunState, str], float]
#: ``(seen, t, state, loss) -> seen``: what the run's log points see of a training after its
#: ``t``-th step of loss ``loss`` (the run's :class:`Seen`, ``None`` before the first)
Offer = Callable[[Any, int, RunState, float], Any]


@dataclass(frozen=True)
class Seen:
    """What the run's log points inside a race saw of one training: early stopping's record
    (:class:`~selfmod.introspect.best.Best`, ``None`` where none is kept) and the log rows
    ``(row, seconds on the run's clock)``, in step order; the run takes them where it adopts
    the training as its own, so its log and record are those of a run without the race."""

    best: Any = None
    rows: tuple[tuple[dict[str, Any], float], ...] = ()


@dataclass(frozen=True)
class Entry:
    """One candidate level: its factor on every rate and its guard losses after the race
    (``inf`` when it diverged; ``verify`` NaN where the verdict did not need it)."""

    factor: float
    propose: float
    verify: float


@dataclass(frozen=True)
class Trained:
    """A level's training over the race: its state after the batches, each step's loss and
    the random state at its end; ``seen``: what the run's log points inside the race saw of it
    (:class:`Seen`; ``None``: none was offered)."""

    factor: float
    state: RunState
    losses: list[float]
    rng: RNG
    seen: Seen | None = None


CPU = torch.device("cpu")


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
    rng_state: RNG,
    device: torch.device = CPU,
    offer: Offer | None = None,
) -> tuple[list[Entry], Trained | None]:
    """Each level (``1`` and every ``factors``) trained from ``state`` over ``batches`` by
    ``step``, every one from the random state ``rng_state``, and scored: ``(entries, the
    unchanged level's finished training, None if it failed)``; ``entries[0]`` is the unchanged
    level's, trained last, after each of whose steps ``offer`` is called (the only training
    the run may keep). The run's random state is left as it was."""
    out: list[Entry] = []
    kept: Trained | None = None
    lead = math.inf  # the lowest proposing guard loss of a changed level so far
    changed = sorted((f for f in factors if f != 1.0), key=lambda f: abs(math.log(f)))
    for f in [*changed, 1.0]:
        s, losses, seen = (leveled(state, f) if f != 1.0 else state), [], None
        with drawing_from(rng_state, device):
            try:
                for t, batch in enumerate(batches):
                    s, loss = step(s, t, batch)
                    losses.append(loss)
                    seen = offer(seen, t + 1, s, loss) if offer and f == 1.0 else seen
                propose = _finite_or_inf(score(s, "propose"))
                needed = propose < lead if f != 1.0 else propose > lead  # the verdict may read it
                verify = _finite_or_inf(score(s, "verify")) if needed else math.nan
            except (NonFiniteError, DivergenceError):
                propose = verify = math.inf
            end = random_state(device)
        entry = Entry(f, propose, verify)
        if f != 1.0:
            lead = min(lead, propose)
        elif math.isfinite(entry.propose):  # the others' states are dropped
            kept = Trained(f, s, losses, end, seen)
        out.append(entry)
    return [out[-1], *out[:-1]], kept


def _finite_or_inf(loss: float) -> float:
    return loss if math.isfinite(loss) else math.inf


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


def planned(h: int, batch: int, levels: int, rows: tuple[int, int]) -> float:
    """The most work, in example-equivalents, of a race of ``levels`` changed levels over
    ``h`` batches of ``batch`` examples with guard splits of ``rows`` (proposing, verifying):
    every level's training (the unchanged one's too, where a changed level wins and the run
    trains the batches again) and both splits read after each (each read at most ``h x
    batch`` rows, as :func:`run` reads them)."""
    trained = h * batch
    reads = sum(min(r, trained) for r in rows)
    return (levels + 1) * (trained + FORWARD * reads)


def base_steps(train_step: Callable, config: Any, batch_size: int, start: int = 0) -> Step:
    """The race's :data:`Step`: the schedule at the run's ``start + t``-th step's examples,
    then ``train_step(state, batch) -> (params, opt_state, buffers, loss, grads)`` (the
    run's)."""

    def step(state: RunState, t: int, batch: Any) -> tuple[RunState, float]:
        state = schedule.at(state, config, start + t, (start + t) * batch_size)
        params, opt_state, buffers, loss, _ = train_step(state, batch)
        return replace(state, params=params, opt_state=opt_state, buffers=buffers), loss

    return step


def split_scorer(guard: Callable, propose: Any, verify: Any) -> Score:
    """The race's :data:`Score`: ``guard(params, hparams, batch, buffers)`` (the run's guard
    loss) on the proposing or the verifying split."""
    splits = {"propose": propose, "verify": verify}

    def score(state: RunState, split: str) -> float:
        with torch.no_grad():
            return float(guard(state.params, state.hparams, splits[split], state.buffers))

    return score


def cost(
    entries: Sequence[Entry], batches: Sequence[Any], rows: tuple[int, int], adopted: bool
) -> float:
    """The race's work in example-equivalents (:mod:`.budget`): every level trained over the
    batches (but the ``adopted`` one's: the run's own) and evaluated on the proposing split's
    ``rows[0]`` rows, and on the verifying split's ``rows[1]`` where it was read."""
    trained = sum(len(b[1]) for b in batches)
    read = sum(rows[0] + (rows[1] if not math.isnan(e.verify) else 0) for e in entries)
    return (len(entries) - adopted) * trained + FORWARD * read


@dataclass(frozen=True)
class Outcome:
    """A race's result: every level's :class:`Entry`, ``(decision, why)``, the verifying guard
    losses ``(unchanged level, winner)``, the state with the winner's level, the training the
    run goes on with (the unchanged level's where it stays; ``None`` where a changed level
    won or the unchanged one failed: the run trains the batches itself) and the race's work in
    example-equivalents."""

    entries: list[Entry]
    decision: tuple[str, str]
    guard: tuple[float, float]
    state: RunState
    trained: Trained | None
    cost: float


def run(
    state: RunState,
    batches: Sequence[Any],
    config: Any,
    train_step: Callable,
    guard: Callable,
    split: Callable[[str], Any],
    start: int = 0,
    offer: Offer | None = None,
) -> Outcome:
    """The race of ``config.level_race`` from ``state`` (the run's step ``start``) over
    ``batches`` (the run's ``train_step``, and its ``guard`` loss on ``split("propose")`` and
    ``split("verify")``), judged by :func:`verdict`; a committed winner's training is not kept
    (the module docstring); ``offer``: the run's log points, given the unchanged level's
    steps."""
    device = next(iter(state.params.values())).device
    rows = sum(len(b[1]) for b in batches)  # a level's training examples: each read's cap
    splits = tuple(replay.first(split(part), rows) for part in ("propose", "verify"))
    rng, (propose, verify) = random_state(device), splits
    step = base_steps(train_step, config, state.batch_size, start)
    score = split_scorer(guard, *splits)
    entries, kept = race(state, batches, config.level_race, step, score, rng, device, offer)
    won, decision, why = verdict(entries)
    trained = None if decision == "commit" else kept  # none: trained again
    work = cost(entries, batches, (len(propose[1]), len(verify[1])), trained is not None)
    at = (entries[0].verify, won.verify)
    chosen = leveled(state, won.factor) if decision == "commit" else state
    return Outcome(entries, (decision, why), at, chosen, trained, work)


def settle(outcome: Outcome, batches: list[Any], counters: Any) -> tuple[RunState, list[Any]]:
    """``(state, batches still to train)`` after the race: the chosen level's training adopted
    as the run's own (``counters`` advanced by its steps in place: steps, examples, the losses'
    running average; the random state at its end set), or, where there is none, the state with
    the chosen level and every batch still to train. The race's work is added to
    ``counters.meta_examples``."""
    return adopt(outcome.state, outcome.trained, outcome.cost, batches, counters)


def adopt(
    state: RunState, trained: Trained | None, work: float, batches: list[Any], counters: Any
) -> tuple[RunState, list[Any]]:
    """:func:`settle` of a race that started from ``state``, whose ``trained`` (or ``None``)
    is the run's own over ``batches`` and whose work was ``work`` example-equivalents."""
    n = counters
    n.meta_examples += work
    if trained is None:
        return state, batches
    for loss, batch in zip(trained.losses, batches, strict=True):
        n.examples = None if n.examples is None else n.examples + len(batch[1])
        n.took(loss)
    set_random_state(trained.rng, next(iter(trained.state.params.values())).device)
    return trained.state, []
