"""The options of the model's choices raced at the run's start (``modifiers.choice.race``).

A choice made by gradient trains its options on shared weights: the rest of the network learns
a compromise among them, and the guard loss then ranks the options by how well each one fits
that compromise, not by how well each trains alone (on development seeds of
``benchmarks/choice.py`` the shared network ranked the mixer's best option last at every cycle,
and an activation choice that picked the best option still ended 5-7 points under it). So
before the first cycle the run trains one copy of its state per candidate, each with every
open choice committed to the candidate's option (:func:`selfmod.introspect.modifiers.choice.
commit`: its own weights from the same start), with the same batches, schedule and random
numbers, by successive halving::

    rung 1: every candidate over the first h batches        (h = race x steps)
    rung 2: the ``keep`` best on the proposing guard split over the next h batches
    winner: the finalist best on both guard splits (the mean of the two)

A rung's guard figures are the mean of ``reads`` reads over its second half, the last at its
end (``modifiers.choice.race_reads``, 3): one state's read swings by a few guard rows from one
log point to the next, and options whose runs end points apart were called by such swings.

"Best" (:func:`rank`): the higher guard accuracy, ties to the lower guard loss, for a problem
whose metric is accuracy; else the lower guard loss. Ranked by loss, development seeds
preferred the option that learns fastest early (relu over gelu, TTT-MLP over the convolution)
and lost 1.6 and 0.9 points to the best option; ranked by accuracy, they found it on both
seeds of all three workloads. One option must be taken, so the final pick reads both guard
splits (a verdict that rejected a pick the verifying split disputed, falling back to the
gradient choice, cost 11 points on one development seed of the activation choice). A race
whose every candidate diverged leaves the run at its start with the choices open (made by
gradient, as without a race).

The race's work is ``K h + keep h - 2h`` batches beyond the run's, against ``K`` runs for
every option trained alone (``2h`` more where a level race after it commits another level and
the run trains the winner's batches again). It counts against ``meta_budget``: the loop
shortens ``h`` so that the most it may spend (:func:`planned`) fits (:mod:`.budget`).

The run is, bitwise, the run that started with the winner committed:

- without a level race, the winner's ``2h`` steps are the run's own;
- with one (``level_race``, :mod:`.race`), that race runs next from the run's start with the
  winner committed, as in a run of the winner alone; where it keeps the level, the winner's
  training is the run's (the unchanged level's training is its first steps), else the run
  trains again from the start at the new level (on development seeds, racing the level after
  the options' race instead left the mixer's runs 0.35-1.4 points under the fixed run of the
  option they picked on three seeds of four);
- the run's log points inside the race see each candidate's states (:class:`.race.Seen`: the
  log rows and early stopping's record), and the winner's are kept.

Candidates: where every open choice has the same option names (an activation choice at each
layer), the option at every choice (``K`` candidates, the fixed runs' architectures); else each
combination of options, at most :data:`MAX_CANDIDATES` (more: no race).

Reference: Jamieson & Talwalkar 2016, Li et al. 2018 (successive halving, Hyperband).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from selfmod.determinism import RNG, drawing_from, random_state
from selfmod.errors import DivergenceError, NonFiniteError
from selfmod.introspect import replay
from selfmod.introspect.budget import FORWARD
from selfmod.introspect.race import Offer, Step, Trained
from selfmod.introspect.state import RunState

#: the most candidates a race trains (combinations of options of unlike choices)
MAX_CANDIDATES = 8


@dataclass(frozen=True)
class Candidate:
    """One architecture: ``picks`` (choice site -> option index), named by its options."""

    name: str
    picks: dict[str, int]


#: ``(state, split) -> (loss, metric)`` on the guard's ``"propose"`` or ``"verify"`` split
Evaluate = Callable[[RunState, str], tuple[float, float]]


@dataclass
class Entry:
    """A candidate's guard ``(loss, metric)`` on the proposing split after each rung it trained
    (``(inf, nan)``: it diverged), and on the verifying split after the last (``None``: not a
    finalist); each the mean of the rung's reads (:func:`race`'s ``reads``)."""

    name: str
    propose: list[tuple[float, float]] = field(default_factory=list)
    verify: tuple[float, float] | None = None


def read_steps(n: int, reads: int) -> set[int]:
    """The steps, counted from 1, after which a rung of ``n`` steps is read: its end, and up to
    ``reads - 1`` more at even steps over its second half (fewer where the rung is too short to
    hold them apart: ``n = 2, reads = 3`` gives ``{1, 2}``)."""
    return ({round(n * (1 - j / (2 * reads))) for j in range(1, reads)} - {0}) | {n}


def rank(loss: float, metric: float, by: str) -> tuple[float, ...]:
    """The sort key of a guard score, lowest first: ``by = "accuracy"``: the higher accuracy,
    ties to the lower loss (on a few hundred guard rows accuracy ties often); else the loss."""
    return (-metric, loss) if by == "accuracy" else (loss,)


def candidates(options: Sequence[Sequence[str]]) -> tuple[list[tuple[str, tuple[int, ...]]], str]:
    """``(candidates, why none)``: each candidate ``(name, option index per choice)`` for
    choices with the given option names, in order (module docstring); none where the
    combinations are more than :data:`MAX_CANDIDATES`."""
    if all(list(o) == list(options[0]) for o in options):
        return [(n, (i,) * len(options)) for i, n in enumerate(options[0])], ""
    combos = list(itertools.product(*(range(len(o)) for o in options)))
    if len(combos) > MAX_CANDIDATES:
        return [], (
            f"{len(combos)} combinations of the choices' options (more than {MAX_CANDIDATES}): "
            "the choices are made by gradient"
        )
    name = "+".join
    return [(name(o[i] for o, i in zip(options, c, strict=True)), c) for c in combos], ""


def race(
    start: RunState,
    candidates: Sequence[Candidate],
    commit: Callable[[RunState, dict[str, int]], RunState],
    batches: Sequence[Any],
    keep: int,
    step: Step,
    evaluate: Evaluate,
    by: str,
    rng_state: RNG,
    device: Any,
    offer: Offer | None = None,
    rows: tuple[int, int] | None = None,
    reads: int = 1,
) -> tuple[list[Entry], Trained | None, int | None, tuple[str, str]]:
    """Successive halving of ``candidates`` from ``start`` (module docstring): each
    ``commit(start, picks)`` trained over the first half of ``batches`` by ``step``, the
    ``keep`` best by :func:`rank` (``by``: the problem's metric) continued over the second
    half, the finalist best on both guard splits the winner. ``offer``: the run's log points,
    given each step of a candidate (what they saw kept in its :class:`Trained`). ``rows``: the
    guard splits' rows (proposing, verifying), for the verdict's margin in rows. ``reads``: a
    rung's guard figures are the mean of this many reads at even steps over its second half, the
    last at its end (fewer reads of one state's luck; 1: the end alone). Returns
    ``(entries, the winner's training over every batch or None, its index or None, (decision,
    reason))``."""
    h = len(batches) // 2
    entries = [Entry(c.name) for c in candidates]
    failed = (math.inf, math.nan)

    def train(
        s: RunState, t0: int, part: Sequence[Any], rng: RNG, seen: Any, splits: Sequence[str]
    ) -> tuple[Trained | None, dict[str, list[tuple[float, float]]]]:
        """The rung's training, and the guard reads of ``splits`` before its end."""
        losses, early = [], {p: [] for p in splits}
        at = read_steps(len(part), reads) - {len(part)}  # the end is read by scored()
        with drawing_from(rng, device):
            try:
                for n, (t, batch) in enumerate(enumerate(part, t0), 1):
                    s, loss = step(s, t, batch)
                    losses.append(loss)
                    seen = offer(seen, t + 1, s, loss) if offer is not None else seen
                    for p in splits if n in at else ():
                        early[p].append(evaluate(s, p))
            except (NonFiniteError, DivergenceError):
                return None, early
            return Trained(1.0, s, losses, random_state(device), seen), early

    def scored(
        i: int, done: Trained | None, split: str = "propose", early: Sequence[Any] = ()
    ) -> bool:
        got = evaluate(done.state, split) if done is not None else failed
        if early and got is not failed:  # the mean of the rung's reads
            got = tuple(sum(v) / (len(early) + 1) for v in zip(*early, got, strict=True))
        got = got if math.isfinite(got[0]) else failed
        if split == "propose":
            entries[i].propose.append(got)
        else:
            entries[i].verify = got
        return got is not failed

    # the states held at once: the start, rung 1's best ``keep`` so far and the one training
    alive: list[tuple[int, Trained]] = []  # rung 1's best ``keep``
    for i, c in enumerate(candidates):
        done, early = train(commit(start, c.picks), 0, batches[:h], rng_state, None, ["propose"])
        if scored(i, done, "propose", early["propose"]) and done is not None:
            alive.append((i, done))
            alive = sorted(alive, key=lambda a: rank(*entries[a[0]].propose[0], by))[:keep]
        del done  # not held while the next candidate trains, unless among the best
    finals: list[tuple[int, Trained]] = []
    both_splits = ["propose", "verify"]
    while alive:  # a finalist's first rung is let go once its second starts
        i, first = alive.pop(0)
        done, early = train(first.state, h, batches[h:], first.rng, first.seen, both_splits)
        if (
            scored(i, done, "propose", early["propose"])
            and done is not None
            and scored(i, done, "verify", early["verify"])
        ):
            both = Trained(1.0, done.state, first.losses + done.losses, done.rng, done.seen)
            finals.append((i, both))
    each = f", each the mean of {reads} reads," if reads > 1 else ""
    why = f"guard (loss, metric){each} proposing after each rung, verifying after the last: "
    why += "; ".join(
        f"{e.name}: " + " / ".join(f"({v[0]:.4g}, {v[1]:.4g})" for v in e.propose)
        + (f", verifying ({e.verify[0]:.4g}, {e.verify[1]:.4g})" if e.verify else "")
        for e in entries
    )  # fmt: skip
    if not finals:
        return entries, None, None, ("reject", f"every candidate diverged; {why}")

    def last(i: int) -> tuple[tuple[float, float], tuple[float, float]]:  # (propose, verify)
        return entries[i].propose[-1], entries[i].verify  # type: ignore[return-value]

    def whole(i: int) -> tuple[float, ...]:  # both splits (halves of the guard set)
        (lp, mp), (lv, mv) = last(i)
        return rank((lp + lv) / 2, (mp + mv) / 2, by)

    i, won = min(finals, key=lambda f: whole(f[0]))
    lead = min(finals, key=lambda f: rank(*entries[f[0]].propose[-1], by))[0]
    agree = "the splits agree" if lead == i else f"{entries[lead].name} led on the proposing split"
    others, margin = [f[0] for f in finals if f[0] != i], ""
    if by == "accuracy" and rows is not None and others:  # how close a call, in guard rows
        j = min(others, key=whole)
        ahead = round(
            sum((a[1] - b[1]) * r for a, b, r in zip(last(i), last(j), rows, strict=True))
        )
        n, name = sum(rows), entries[j].name
        margin = (
            f" by {ahead} of {n} rows over {name}" if ahead > 0
            else f", level with {name} on {n} rows, by the lower guard loss" if ahead == 0
            else f", {-ahead} of {n} rows behind {name} but ahead on the splits' mean accuracy"
        )  # fmt: skip
    verdict = f"{entries[i].name} won on the whole guard set{margin} ({agree}); {why}"
    return entries, won, i, ("commit", verdict)


def cost(
    entries: Sequence[Entry],
    batches: Sequence[Any],
    rows: tuple[int, int],
    adopted: bool,
    reads: int = 1,
) -> float:
    """The race's work in example-equivalents: every candidate's training over the rungs it
    ran (but the adopted winner's: the run's own) and its guard reads (``rows``: a proposing
    and a verifying read's rows; :func:`read_steps` of each a rung, as :func:`race` reads)."""
    h = len(batches) // 2
    per_rung = (sum(len(b[1]) for b in batches[:h]), sum(len(b[1]) for b in batches[h:]))
    n_reads = (len(read_steps(h, reads)), len(read_steps(len(batches) - h, reads)))
    trained = sum(per_rung[r] for e in entries for r in range(len(e.propose)))
    read = sum(
        rows[0] * sum(n_reads[: len(e.propose)]) + (rows[1] * n_reads[1] if e.verify else 0)
        for e in entries
    )
    return trained - adopted * sum(per_rung) + FORWARD * read


def rung_steps(share: float, steps: int) -> int:
    """A rung's length ``h`` in base steps: ``share`` (``modifiers.choice.race``) of a run's
    ``steps``, at least 1."""
    return max(1, round(share * steps))


def planned(
    h: int, batch: int, k: int, keep: int, rows: tuple[int, int], retrained: bool, reads: int = 1
) -> float:
    """The most work, in example-equivalents, of a race of ``k`` candidates and ``keep``
    finalists over two rungs of ``h`` batches of ``batch`` examples, with guard splits of
    ``rows`` (proposing, verifying; each read at most a rung's rows, as :func:`run` reads
    them): :func:`cost` where every candidate trains its rungs, and, where ``retrained`` (a
    level race follows, which may commit another level), the winner's ``2h`` batches too;
    ``reads`` guard reads per rung."""
    rung = h * batch
    propose, verify = (min(r, rung) for r in rows)
    trained = (k + keep - 2 * (not retrained)) * rung
    return trained + FORWARD * reads * (k * propose + keep * (propose + verify))


@dataclass(frozen=True)
class Outcome:
    """A race's result: every candidate's :class:`Entry`, ``(decision, why)``, the verifying
    guard losses ``(the best other finalist's, the winner's)``, the winner's picks (site ->
    option index; ``{}`` where none), its training over the batches (``None`` unless
    committed) and the race's work in example-equivalents."""

    entries: list[Entry]
    decision: tuple[str, str]
    guard: tuple[float, float]
    picks: dict[str, int]
    trained: Trained | None
    cost: float


def run(
    state: RunState,
    candidates: Sequence[Candidate],
    commit: Callable[[RunState, dict[str, int]], RunState],
    batches: Sequence[Any],
    keep: int,
    step: Step,
    problem: Any,
    split: Callable[[str], Any],
    offer: Offer | None = None,
    reads: int = 1,
) -> Outcome:
    """:func:`race` of ``candidates`` from ``state`` over ``batches`` (two rungs of half of
    them), scored by ``problem.evaluate`` (its loss and metric) on ``split("propose")`` and
    ``split("verify")``, each read at most a rung's training rows (as the level race's),
    ``reads`` times a rung (:func:`race`)."""
    device = next(iter(state.params.values())).device
    rows = sum(len(b[1]) for b in batches[: len(batches) // 2])
    splits = {part: replay.first(split(part), rows) for part in ("propose", "verify")}

    def evaluate(s: RunState, part: str) -> tuple[float, float]:
        return problem.evaluate(s.params, s.buffers, *splits[part])

    sizes = (len(splits["propose"][1]), len(splits["verify"][1]))
    entries, won, i, decision = race(
        state, candidates, commit, batches, keep, step, evaluate, problem.metric,
        random_state(device), device, offer, sizes, reads,
    )  # fmt: skip
    verified = [(j, e.verify[0]) for j, e in enumerate(entries) if e.verify is not None]
    mine = next((v for j, v in verified if j == i), math.nan)
    other = min((v for j, v in verified if j != i), default=math.nan)
    work = cost(entries, batches, sizes, won is not None, reads)
    picks = candidates[i].picks if won is not None and i is not None else {}
    return Outcome(entries, decision, (other, mine), picks, won, work)
