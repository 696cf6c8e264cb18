"""The introspective loop: a run that modifies itself, every change bounded, verified, logged
and reversible. Every ``cycle`` base steps it takes the next ``lookahead`` batches and runs

    evaluate (probes) -> estimate (meta-gradient) -> propose (modifiers)
    -> apply to a copy and replay the K lookahead steps -> verify (invariants)
    -> commit, queue for approval, or reject

(the estimate only where a due modifier reads the meta-gradient), after :mod:`.race` where set.
The loop is the one place that changes the run; its pieces take explicit inputs (:mod:`.build`,
:mod:`.feed`, :mod:`.lookahead`, :mod:`.decide`, :mod:`.verifier`, :mod:`.events`, ...).
:meth:`Loop.run` pulls batches from the sources' streams; :meth:`Loop.push` takes the caller's.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from selfmod.arch.choice import choice_sites, key
from selfmod.determinism import random_state
from selfmod.errors import DivergenceError, NonFiniteError
from selfmod.introspect import (
    best,
    budget,
    build,
    decide,
    option_race,
    race,
    replay,
    schedule,
    shift,
    verifier,
)
from selfmod.introspect.events import Decision, Recorder, jsonable, payload
from selfmod.introspect.feed import DTYPES, Batch, Source, add_source, device_of, guard
from selfmod.introspect.lookahead import Lookahead, train_step
from selfmod.introspect.modifiers import Context, Modifier, Proposal
from selfmod.introspect.problem import Problem
from selfmod.introspect.state import Counters, RunState, load_run, save_run
from selfmod.introspect.summary import guard_scores, log_row, run_probe, summarize, unused

Params = dict[str, Tensor]
__all__ = ["DTYPES", "Decision", "Loop", "Recorder", "Source", "device_of", "jsonable"]


class Loop:
    """A self-modifying run of ``problem`` over ``sources`` under ``config`` (a
    :class:`~selfmod.introspect.config.TrainConfig`). ``modifiers``: modifier objects (default:
    the config's, or every default one that applies). ``tune=False``: the fixed-configuration
    baseline, without cycles. ``lrs``: each tensor's own starting learning rate."""

    #: several processes: ``train_step(loop, state, batch)`` (data-parallel) and ``agree(loop)``
    #: (as every cycle starts), as :class:`selfmod.runs.distributed.Collective`; else ``None``
    collective: Any = None
    #: base steps write the state's tensors in place where the last step made them and nothing
    #: held them since (copy-on-write): ``on_step`` clones what it keeps. ``False``: out of place
    donate: bool = True

    def __init__(
        self,
        problem: Problem,
        sources: Sequence[Source],
        config: Any,
        *,
        modifiers: Sequence[Modifier] | None = None,
        recorder: Recorder | None = None,
        tune: bool = True,
        lrs: Sequence[float] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.config, self.problem, self.sources, self.tune = config, problem, list(sources), tune
        self.recorder = recorder or Recorder()
        b = build.pieces(problem, self.sources, config, modifiers, tune, lrs, device, dtype)
        self.device, self.dtype, self.rng, self.names = b.device, b.dtype, b.rng, b.names
        self.space, self.modifiers, self.skipped = b.space, b.modifiers, b.skipped
        self.losses, self.opt, self.state, self.feed = b.losses, b.opt, b.state, b.feed
        self.counters = Counters()
        self.applied: set[int] = set()  # manual approval: the proposals acted on
        self.pending: list[Batch] = []  # the lookahead batches not yet trained on
        self.lookahead: Lookahead | None = None  # the current cycle's
        g = self.sources[0]  # the cost model's input: one example (1, ...)
        self.example, self.buffer = g.guard_x[:1], replay.empty(g.guard_x[:0], g.guard_y[:0])
        self.history: dict[str, list] = {"log": [], "probes": [], "decisions": []}
        self._clock: float | None = None  # perf_counter() at which this run's clock reads 0
        self.good, self.best, self.scheduled = self.state.snapshot(), best.Best(), False
        self._owned = False  # whether only the state holds its tensors (``donate``)
        self._scored: tuple | None = None  # the last log point's (state, held weakly, scores)
        self._on_race: Callable[[Loop, str, int, int], None] | None = None  # run()'s
        self._introduce_source(0)
        self.log_interval = budget.log_interval(config, len(self.guard()[1]))  # steps apart

    step = property(lambda self: self.counters.step, doc="base steps done")
    cycle = property(lambda self: self.counters.cycle, doc="cycles done")
    seconds = property(lambda self: self.counters.seconds, doc="wall-clock seconds trained")
    diverged_at = property(lambda self: self.counters.diverged_at, doc="fixed baseline's NaN")
    shift_cycle = property(lambda self: self.counters.shift_cycle, doc="the data shift's cycle")
    params = property(lambda self: self.state.params)
    hparams = property(lambda self: self.state.hparams)

    def values(self, state: RunState | None = None) -> dict[str, Any]:
        """The hyperparameters in natural units, the batch size and widths (logs, ledger)."""
        state = self.state if state is None else state
        shape = {"batch_size": state.batch_size, "widths": self.problem.widths(state.params)}
        return self.space.values(state.hparams) | shape

    def widths(self) -> list[int]:
        return self.problem.widths(self.state.params)

    def guard(self, part: str = "all") -> tuple[Tensor, Tensor]:
        """Guard data: ``"propose"``, ``"verify"`` or ``"all"`` (:func:`.feed.guard`)."""
        return guard(self.buffer, part, self.config.verify_on == "shared")

    def due(self, m: Modifier) -> bool:
        """Whether per-cycle modifier ``m`` runs in this cycle (its ``schedule``)."""
        return not m.per_step and self.cycle % self.config.every(m.name) == 0

    def run(
        self,
        on_step: Callable[[Loop], None] | None = None,
        on_race_step: Callable[[Loop, str, int, int], None] | None = None,
    ) -> None:
        """Train to ``config.steps``, cycling, checkpointing and logging; resumable.
        ``on_step(loop)`` after each base step; ``on_race_step(loop, race, done, total)``
        after each of a race's steps (``race``: ``"options' race"`` or ``"level race"``;
        ``total``: its steps if no candidate diverges)."""
        cfg, n = self.config, self.counters
        self._on_race = on_race_step
        start = self._clock = time.perf_counter() - n.seconds
        self.scheduled = True  # a known end: the rates follow cfg.lr_schedule, logs end there
        winner = self._option_race() if self.tune and not n.options_raced else None
        if self.tune and cfg.level_race and not n.raced:
            self._race(winner)
        elif winner is not None:
            self._adopt(winner)
        while not budget.spent(cfg, n.step, n.examples) and n.diverged_at is None:
            if cfg.shift_step and n.step == cfg.shift_step and n.source_id == 0:
                self._shift()
            if self._boundary():
                self._cycle()
            self.base_step()
            if on_step is not None:
                on_step(self)
        if cfg.keep_best and n.diverged_at is None:  # early stopping (.best)
            at, verify = self._scores_now(), self.guard("verify")
            k, why = self.best.returned(self.problem, verify, self.state, cfg.epsilon, at and at[1])
            if k is not None:
                self.state, self._owned = k, False
                self.event("event", "best state returned", why, {"step": self.best.step})
                self.log_point()  # the returned state's row
        n.seconds = time.perf_counter() - start

    def _race(self, winner: race.Trained | None = None) -> None:  # the rates' level (.race)
        """The rates' level raced before the first cycle; ``winner``: the options' race's
        training, not yet the run's (:meth:`_option_race`)."""
        start, n, cfg = time.perf_counter(), self.counters, self.config
        queued = self.pending  # the options' race's batches
        # the winner's examples, trained again where the level race commits another level
        redone = sum(len(b[1]) for b in queued[: len(winner.losses)]) if winner else 0
        h = self._race_length("level race", race.steps(cfg), self._level_race_work(), redone)
        n.raced, guard = True, self.losses.guard
        if not h:
            if winner is not None:
                self._adopt(winner)
            return
        batches = queued[:h] + [self._next_batch() for _ in range(h - len(queued[:h]))]
        levels = len(cfg.level_race) + 1
        train = self._race_steps("level race", levels * h)
        r = race.run(self.state, batches, cfg, train, guard, self.guard, n.step,
                     self._log_points(n.step))  # fmt: skip
        d = Decision(0, n.step, "level_race", *r.decision, self.values(), self.values(r.state),
                     *r.guard)  # fmt: skip
        self._record(d, extra={"race": [e.__dict__ for e in r.entries]})
        if winner is not None and r.trained is not None and len(winner.losses) >= len(batches):
            # the level stays: the unchanged level's training is the first steps of the
            # winner's (same state, batches and random numbers); the winner's, longer, is kept
            n.meta_examples += r.cost + sum(len(b[1]) for b in batches)
            self._adopt(winner)
        else:
            n.meta_examples += redone  # the winner's training, trained again at the new level
            self.state, rest = race.settle(r, batches, n)  # the unchanged level's training, kept
            self.pending = rest + queued[h:]
            if r.trained is not None:
                self._take(r.trained.seen)
        self._owned = False
        n.meta_seconds += time.perf_counter() - start

    def _option_race(self) -> race.Trained | None:  # the choices' options (.option_race)
        """The options of the model's open choices raced before the level race and the first
        cycle. Returns the winner's training, to be adopted (:meth:`_adopt`) or trained again
        at another level (:meth:`_race`); meanwhile the state is the start with the winner
        committed and the race's batches are pending. ``None``: no race or no winner."""
        start, n, cfg, module = time.perf_counter(), self.counters, self.config, self.problem.module
        n.options_raced = True
        chooser = next((m for m in self.modifiers if m.name == "choice"), None)
        sites = [c for c in choice_sites(module) if int(self.state.buffers[key(c, "chosen")]) < 0]
        share = getattr(getattr(chooser, "settings", None), "race", 0)
        if not sites or not share:
            return None
        names = [module.get_submodule(c).names for c in sites]
        found, why = option_race.candidates(names)
        if not found:
            self.event("event", "no option race", why, {"choices": sites})
            return None
        candidates = [option_race.Candidate(name, dict(zip(sites, ks, strict=True)))
                      for name, ks in found]  # fmt: skip

        def commit(state: RunState, picks: dict[str, int]) -> RunState:
            return chooser.apply(Proposal("choice", surgery={"commit": picks}), state, self.problem)

        keep, asked = chooser.settings.race_keep, option_race.rung_steps(share, cfg.steps)
        reads = chooser.settings.race_reads
        h = self._race_length(
            "options' race", asked, self._option_race_work(len(found), keep, reads)
        )
        if not h:
            return None
        batches = [self._next_batch() for _ in range(2 * h)]
        train = self._race_steps("options' race", (len(found) + keep) * h)
        step = race.base_steps(train, cfg, self.state.batch_size, n.step)
        r = option_race.run(self.state, candidates, commit, batches, keep, step, self.problem,
                            self.guard, self._log_points(n.step), reads)  # fmt: skip
        after = r.trained.state if r.trained is not None else self.state
        metric = {e.name: e.propose[-1][1] for e in r.entries}  # after its last rung
        info = {c: {"options": names[j], "option": names[j][k], "race": metric}
                for j, (c, k) in enumerate(r.picks.items())}  # fmt: skip
        proposal = Proposal("choice", surgery={"commit": r.picks}, info={"choice": info})
        d = Decision(0, n.step, "choice", *r.decision, self.values(), self.values(after), *r.guard)
        self._record(d, proposal, extra={"race": [e.__dict__ for e in r.entries]})
        self.pending, self._owned = batches, False
        n.meta_examples += r.cost  # the winner's training not counted: the run's own, or below
        if r.trained is not None:
            self.state = commit(self.state, r.picks)
        n.meta_seconds += time.perf_counter() - start
        return r.trained

    def _race_steps(self, name: str, total: int) -> Callable[..., Any]:
        """:meth:`train_step`, telling ``run``'s ``on_race_step`` of each step of race
        ``name`` (``total`` steps)."""
        report = self._on_race
        if report is None:
            return self.train_step
        done = 0

        def step(state: RunState, batch: Batch) -> Any:
            nonlocal done
            out = self.train_step(state, batch)
            done += 1
            report(self, name, done, total)
            return out

        return step

    def _guard_rows(self) -> tuple[int, int]:
        return len(self.guard("propose")[1]), len(self.guard("verify")[1])

    def _level_race_work(self) -> Callable[[int], float]:
        """The level race's most work over ``t`` steps (:func:`.race.planned`)."""
        levels, batch, rows = len(self.config.level_race), self.state.batch_size, self._guard_rows()
        return lambda t: race.planned(t, batch, levels, rows)

    def _option_race_work(self, k: int, keep: int, reads: int) -> Callable[[int], float]:
        """The options' race's most work over rungs of ``t`` steps (``k`` candidates, ``keep``
        finalists, ``reads`` guard reads a rung), with the level race after it at its full
        length where there is one."""
        cfg, rows, level = self.config, self._guard_rows(), bool(self.config.level_race)
        after = self._level_race_work()(race.steps(cfg)) if level else 0.0
        batch = self.state.batch_size
        return lambda t: option_race.planned(t, batch, k, keep, rows, level, reads) + after

    def _race_length(
        self, name: str, asked: int, work: Callable[[int], float], reserved: float = 0.0
    ) -> int:
        """The most steps, at most ``asked``, of race ``name`` whose ``work`` fits what is left
        of ``meta_budget`` after ``reserved`` example-equivalents (:func:`.budget.longest`); a
        ledger event where that is fewer (0: the race does not run)."""
        h, why = budget.race_steps(self.config, self.counters.meta_examples, asked, work, reserved)
        if why:
            said = f"shortened to {h} steps" if h else "not run"
            self.event("event", f"{name} {said}", why, {"asked": asked, "steps": h})
        return h

    def _adopt(self, winner: race.Trained) -> None:
        """The options' race winner's training as the run's own over the pending batches, with
        what the run's log points saw of it."""
        n = self.counters
        self.state, self.pending = race.adopt(self.state, winner, 0.0, self.pending, n)
        self._take(winner.seen)
        self._owned = False

    def _log_points(self, start: int) -> race.Offer:
        """A race's log points: after ``t`` steps from step ``start``, where the run would take
        one, a training's state gives a log row and is offered to early stopping's record
        (``keep_best``), as :meth:`log_point` does; the run takes them where it adopts the
        training (:meth:`_take`)."""
        verify, every, keep = self.guard("verify"), self.log_interval, self.config.keep_best

        def offer(seen: race.Seen | None, t: int, state: RunState, loss: float) -> race.Seen:
            seen = seen or race.Seen()
            if (start + t) % every:
                return seen
            row, _, verified, elapsed = self._row(state, start + t, loss)
            at = (self.problem, verify, start + t, state, verified)
            record = (seen.best or best.Best()).offer(*at) if keep else None
            return race.Seen(record, (*seen.rows, (row, elapsed)))

        return offer

    def _take(self, seen: race.Seen | None) -> None:
        """What a race's log points saw of the training the run adopted: its rows logged (the
        history, the recorder) and its early-stopping record kept."""
        if seen is None:
            return
        for row, elapsed in seen.rows:
            self._write(row, elapsed)
        self.best = seen.best or self.best

    def push(self, batch: tuple[Any, Tensor]) -> int:
        """Take the caller's batch ``(x, y)``; train as far as the queued batches allow (a cycle
        waits for its ``lookahead`` batches); returns the base steps done so far."""
        start = time.perf_counter()
        self.feed.inbox.append(batch)
        while self.feed.inbox or self.pending:
            if self._boundary():
                if len(self.feed.inbox) < self.config.lookahead:
                    break
                self._cycle()
                continue
            self.base_step()
        self.counters.seconds += time.perf_counter() - start
        return self.step

    def finish_queued(self) -> None:
        """Train the batches still queued, without a new cycle (the step-level API's end)."""
        self.counters.cycled_at = self.step
        while self.feed.inbox or self.pending:
            self.base_step()

    def _boundary(self) -> bool:
        """Whether a cycle runs now: its turn, unless the next cycle's work (the last one's, at
        least its probes') would take the run over ``meta_budget``. A cycle skipped so still
        writes the checkpoint of its turn: a run over its meta budget stays resumable."""
        n, cfg = self.counters, self.config
        due = self.tune and n.step % cfg.cycle == 0 and n.cycled_at != n.step and not self.pending
        if not due:
            return False
        if self._clock is not None:  # the run's time so far, for the checkpoint of this turn
            n.seconds = time.perf_counter() - self._clock
        probes = budget.FORWARD * budget.PROBE_PASSES * self._probe_rows()
        next_cycle = max(n.last_cycle, probes)  # the first cycle: its probes at least
        if budget.meta_allowed(cfg, n.examples, n.meta_examples, next_cycle):
            return True
        n.cycled_at, n.cycles_skipped = n.step, n.cycles_skipped + 1
        if n.cycles_skipped % cfg.checkpoint_every == 0:
            self.recorder.checkpoint(self)
        return False

    def _cycle(self) -> None:
        start, n = time.perf_counter(), self.counters  # a cycle's time is self-modification's
        if self.collective is not None:
            self.collective.agree(self)
        if n.cycle % self.config.checkpoint_every == 0:
            self.recorder.checkpoint(self)
        n.cycled_at = n.step
        self.run_cycle()
        n.meta_seconds += time.perf_counter() - start
        n.last_cycle = self.lookahead.cost.total if self.lookahead else 0.0
        n.meta_examples += n.last_cycle

    def _introduce_source(self, s: int) -> None:
        self.counters.source_id, at = s, (self.step, s, self.config, self.rng)
        self.buffer = add_source(self.buffer, self.sources[s], *at)

    def _shift(self) -> None:
        self._introduce_source(1)
        self.counters.shift_cycle = self.cycle
        self.state = decide.memory_reset(self.modifiers, self.state)
        self.event("event", "shift", f"data source 1 from step {self.step}", {})

    def base_step(self) -> None:
        """One training step; a non-finite loss or a divergence (a second spiking loss within
        ``SPIKE_WINDOW`` steps, :func:`.verifier.spike`) rolls back to the last good state,
        halving the learning rates and the meta learning rate. The fixed-configuration baseline
        (``tune=False``) never changes itself: a spike is counted, a non-finite loss or
        gradient ends it as diverged (``diverged_at``), at its last finite parameters."""
        n, cfg = self.counters, self.config
        batch = self.pending.pop(0) if self.pending else self._next_batch()
        if self.scheduled:
            self.state = schedule.at(self.state, cfg, n.step, n.examples)
        n.examples = None if n.examples is None else n.examples + len(batch[1])
        per_step = [m for m in self.modifiers if m.per_step]  # they read the old parameters
        donate = self.donate and self._owned and self.tune and cfg.safeguards and not per_step
        try:
            params, opt_state, buffers, loss, grads = self.train_step(self.state, batch, donate)
            if spike := verifier.spike(loss, n, stops=cfg.safeguards and self.tune):
                why = "a second one soon after rolls back" if cfg.safeguards else "safeguards off"
                why = why if self.tune else "a fixed configuration"
                self.event("event", "divergence", f"{spike}; {why}: goes on", {})
            state = self.state
            for m in per_step:
                state = m.on_step(state, dict(zip(self.names, grads, strict=True)), params)
        except (NonFiniteError, DivergenceError) as err:
            if not cfg.safeguards:
                raise
            if not self.tune:
                n.diverged_at = n.step
                self.event("event", "diverged", f"{err}; the fixed configuration stops", {})
                return
            self._rollback(str(err))
            n.step += 1
            return
        self.state = replace(state, params=params, opt_state=opt_state, buffers=buffers)
        self._owned = True
        n.took(loss)
        ended = self.scheduled and budget.spent(cfg, n.step, n.examples)  # run(): its last
        if n.step % self.log_interval == 0 or n.step == cfg.steps or ended:
            self.log_point()

    def _next_batch(self) -> Batch:
        return self.feed.next_batch(self.state.batch_size, self.counters.source_id)

    def train_step(
        self, state: RunState, batch: Batch, donate: bool = False
    ) -> tuple[Params, Any, Params, float, tuple[Tensor, ...]]:
        """One optimizer step (:func:`.lookahead.train_step`; else the collective's)."""
        if self.collective is not None:
            return self.collective.train_step(self, state, batch)
        return train_step(self.losses, self.opt, state, batch, self.step, donate)

    def _rollback(self, reason: str, ends_cycle: bool = False) -> None:
        before, n, self.pending = self.values(), self.counters, []
        self.state, why = verifier.rolled_back(self.good, reason)
        n.average, n.spiked_at = None, None  # the divergence check starts again from here
        self.good, self._owned = self.state.snapshot(), False
        self._record(Decision(n.cycle, n.step, "safeguard", "rollback", why, before, self.values()))
        n.cycle += ends_cycle  # recorded in the cycle it ends

    def log_point(self) -> None:
        """A log point's row (:func:`.summary.log_row`); its time counts as ``meta_seconds``."""
        start, n, cfg, s = time.perf_counter(), self.counters, self.config, self.state
        row, whole, verified, elapsed = self._row(s, n.step, n.last_loss)
        self._scored = weakref.ref(s), whole, verified  # of this state object only
        if cfg.keep_best:  # early stopping's candidates: every log point's state
            self.best = self.best.offer(self.problem, self.guard("verify"), n.step, s, verified)
            self._owned = False
        self._write(row, elapsed)
        n.meta_seconds += time.perf_counter() - start if self.tune else 0.0  # a fixed run: none

    def _write(self, row: dict[str, Any], elapsed: float) -> None:
        """A log row into the history (with its time on the run's clock) and the recorder."""
        self.history["log"].append(row)
        self.history.setdefault("clock", []).append([row["step"], elapsed])
        self.recorder.log(self, row)

    def _row(
        self, s: RunState, step: int, loss: float
    ) -> tuple[dict[str, Any], tuple[float, float], tuple[float, float], float]:
        """``(log row, (loss, metric) on the whole guard set, on its verifying split, seconds on
        the run's clock)`` of state ``s`` after ``step`` steps, the last of loss ``loss``."""
        n, cfg = self.counters, self.config
        src, shared = self.sources[n.source_id] if cfg.log_test else None, cfg.verify_on == "shared"
        whole, verified = guard_scores(self.problem, s, self.buffer, shared)
        row = log_row(self.problem, s, whole, src, step, loss, cfg.probe_rows)
        row |= self.values(s) | {"unused": unused(self.names, s.params)}  # tensors with no entries
        elapsed = n.seconds if self._clock is None else time.perf_counter() - self._clock
        return row, whole, verified, elapsed

    def _scores_now(self) -> tuple[Any, Any] | None:  # the last log point's, if of this state
        at = self._scored
        return at[1:] if at is not None and at[0]() is self.state else None

    def _probe_rows(self) -> int:  # the replay rows a cycle's probes read
        return len(self.buffer.y[: self.config.probe_rows or None])

    def probe(self) -> dict[str, float]:
        """This cycle's probes (:func:`.summary.run_probe`) with the run's counters."""
        n, cfg, src = self.counters, self.config, self.sources[self.counters.source_id]
        at = (n, cfg.seed, cfg.probe_rows)
        return run_probe(self.problem, self.state, self.buffer, src, cfg.verify_on == "shared", *at)

    def run_cycle(self) -> None:
        """Evaluate, estimate, propose, verify, decide (the module docstring)."""
        cfg, n = self.config, self.counters
        self._apply_approved()
        mods, at = self.modifiers if n.step > 0 else [], (n.cycle, n.step)
        for change in decide.per_step_changes(mods, self.space.entries, self.good, self.state):
            self._record(Decision(*at, change[0], "applied", *change[1:]))
        look = self.look_ahead()
        probe = self.probe()
        look.cost.evaluated(budget.PROBE_PASSES * self._probe_rows())
        self.history["probes"].append(probe)
        self.event("cycle", "evaluate", "probes", probe)
        dead = cfg.safeguards and verifier.dead(self.problem, self.state, self.guard("verify")[0])
        if dead:
            return self._rollback(dead, ends_cycle=True)
        if self.pending:  # the reservoir sees what the model trains on next, in one offer
            x, y = (torch.cat([b[i] for b in self.pending]) for i in (0, 1))
            at = (n.step, n.source_id, cfg.replay_size, self.rng)
            self.buffer = replay.add_train(self.buffer, x, y, *at)
        due = [m for m in self.modifiers if self.due(m)]
        estimated = any(m.reads_meta_gradient for m in due)
        current, g = math.nan, {}
        if estimated:  # else nobody reads it: the reverse unroll is skipped
            try:
                current, g = look.estimate(self.state, cfg.estimator, cfg.meta_horizon)
            except NonFiniteError as err:
                if not cfg.safeguards:
                    raise
                return self._rollback(f"meta-gradient: {err}", ends_cycle=True)
        ctx = Context(
            self.state, self.problem, n.cycle, probe, g, look.batches, cfg,
            lambda k: look.batch_grads(self.state, k), self.rng, look, n,
        )  # fmt: skip
        proposals, self.state = decide.propose(due, ctx, self.state)
        look.current = self.state
        if proposals and (not estimated or (cfg.verify_on == "held_out" and cfg.safeguards)):
            current = look.baseline(self.state)
        for proposal in proposals:  # each judged against the state the ones before it left
            current = self.verify_and_decide(proposal, current)
        look.release()
        self.good, self._owned = self.state.snapshot(), False
        n.cycle += 1

    def look_ahead(self) -> Lookahead:
        """Queue the next ``lookahead`` batches (trained on next) and make the cycle's
        :class:`~.lookahead.Lookahead` over them from the random state now."""
        self.pending = [self._next_batch() for _ in range(self.config.lookahead)]
        self.lookahead = Lookahead(
            self.losses, self.opt, self.pending, random_state(self.device), self.device,
            current=self.state, step=self.step, buffer=self.buffer, example=self.example,
            shared=self.config.verify_on == "shared", source=self.counters.source_id,
        )  # fmt: skip
        return self.lookahead

    def verify_and_decide(self, proposal: Proposal, current: float) -> float:
        """Apply ``proposal`` to a copy, replay, verify (:func:`.decide.verdict`); the run changes
        only on commit. Returns the guard loss the next one must keep (a commit's, else current)."""
        look, cfg, state = self.lookahead, self.config, self.state
        assert look is not None, "verify_and_decide runs inside a cycle"
        proposed = self._apply(proposal, state)
        decision, reason, value = decide.verdict(proposal, look, state, proposed, current, cfg)
        at, before, after = (self.cycle, self.step), self.values(), self.values(proposed)
        d = Decision(*at, proposal.modifier, decision, reason, before, after, current, value)
        self._record(d, proposal)
        if decision == "commit":
            moved = shift.commit_shift(look, self.buffer.x, self.state, proposed, cfg.probe_rows)
            entry = {"cycle": at[0], "step": at[1], "modifier": proposal.modifier, "shift": moved}
            self.history.setdefault("self_shift", []).append(entry)
            self.state = look.current = proposed
        return value if decision == "commit" else current

    def _apply_approved(self) -> None:
        """Manual approval: apply every approved pending change, expire the late ones
        (:func:`.decide.approvals`), in order."""
        if self.config.approval != "manual":
            return
        pending, n = self.recorder.pending(self), self.counters
        for seq, change, decision, why in decide.approvals(
            pending, self.applied, n.cycle, self.config.approval_expiry
        ):
            self.applied.add(seq)
            proposal, before = Proposal.from_json(change, self.hparams), self.values()
            if decision == "applied":
                self.state = self._apply(proposal, self.state)
            d = Decision(n.cycle, n.step, proposal.modifier, decision, why, before, self.values())
            self._record(d, extra={"proposal": seq})

    def _apply(self, proposal: Proposal, state: RunState) -> RunState:
        return decide.apply(proposal, state, self.modifiers, self.problem, self.config)

    def _record(
        self, d: Decision, proposal: Proposal | None = None, extra: dict | None = None
    ) -> None:
        change = {**(proposal.to_json() if proposal else {}), **(extra or {})}
        body = payload(d, change, proposal.info if proposal else {})
        kind = "rollback" if d.decision == "rollback" else "proposal"
        seq = self.recorder.record(self, kind, d.decision, d.reason, body)
        d.id = seq if seq is not None else len(self.history["decisions"]) + 1
        self.history["decisions"].append(d.__dict__.copy())

    def event(self, kind: str, decision: str, reason: str, payload: dict) -> None:
        """One ledger entry that is no decision (a shift, a resume, a divergence)."""
        self.recorder.record(self, kind, decision, reason, jsonable(payload))

    def checkpoint(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``(tensors, meta)``: the whole run, flattened by name (:func:`.state.save_run`)."""
        stream = self.sources[self.counters.source_id].train.position()
        s, n, b = self.state, self.counters, self.buffer
        tensors, meta = save_run(s, self.good, b, self.rng, n, self.applied, stream, self.history)
        best.save(self.best, tensors, meta)
        return tensors, meta

    def restore(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Continue from :meth:`checkpoint`'s output (of a run of the same config)."""
        self.best, tensors = best.load(tensors, meta)
        saved = load_run(tensors, meta, self.names, self.opt.init, self.rng, self.device)
        self.state, self.good, buffer, self.counters, self.applied = saved
        self.buffer = replay.Replay(**buffer)
        self.sources[self.counters.source_id].train.seek(meta["stream"])
        self.history, self.pending, self.feed.inbox, self._owned = meta["history"], [], [], False

    def summary(self) -> dict[str, Any]:
        """Test loss and metric, cost, decisions, meta-metrics (:func:`.summary.summarize`)."""
        src, n = self.sources[self.counters.source_id], self.counters
        return summarize(
            self.problem, self.state, src, self.buffer, self.example, counters=n,
            history=self.history, names=self.names, modifiers=[m.name for m in self.modifiers],
            skipped=self.skipped, values=self.values(), space=self.space,
            best=self.best.summary(), rows=self.config.probe_rows, scored=self._scores_now(),
        )  # fmt: skip
