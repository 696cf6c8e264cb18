"""The introspective loop: a training run that modifies itself, every change bounded, verified,
logged and reversible.

Every ``cycle`` base steps the :class:`Loop` takes the next ``lookahead`` training batches and
runs

    evaluate (probes) -> estimate (meta-gradient) -> propose (modifiers)
    -> apply to a copy and replay the K lookahead steps -> verify (invariants)
    -> commit, queue for approval, or reject

(the estimate only in a cycle where a due modifier reads the meta-gradient). The loop drives
and is the one place that changes the run; the pieces take explicit inputs: :mod:`.build`
(from the config), :mod:`.feed` (batches, guard splits), :mod:`.lookahead` (losses, replays,
the estimate), :mod:`.decide` (propose, verify), :mod:`.verifier` (invariants, rollback
policy), :mod:`.events` (what a :class:`~.events.Recorder` sees), :mod:`.state` (what a
checkpoint holds) and :mod:`.summary`. The model is any ``nn.Module`` (:class:`~.problem.Problem`).

Two ways to drive it: :meth:`Loop.run` pulls batches from the sources' streams;
:meth:`Loop.push` takes the caller's batch (a loop the caller owns, as with Accelerate). At a
cycle boundary :meth:`push` queues ``lookahead`` batches, then runs the cycle and trains on
them.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from selfmod import hypergrad
from selfmod.errors import DivergenceError, NonFiniteError
from selfmod.introspect import build, decide, probes, replay, shift, verifier
from selfmod.introspect.events import Decision, Recorder, jsonable, payload
from selfmod.introspect.feed import DTYPES, Batch, Feed, Source, device_of, guard, place
from selfmod.introspect.lookahead import Lookahead, Losses
from selfmod.introspect.modifiers import Context, Modifier, Proposal
from selfmod.introspect.modifiers.base import RunFacts
from selfmod.introspect.problem import Problem
from selfmod.introspect.state import Counters, RunState, flatten, memory_template, unflatten
from selfmod.introspect.summary import summarize, test_metric

Params = dict[str, Tensor]
__all__ = ["DTYPES", "Decision", "Loop", "Recorder", "Source", "device_of", "jsonable"]


class _GradTap(hypergrad.FiniteMonitor):
    """A finiteness monitor that also keeps the last step's gradients (per-step modifiers)."""

    grads: tuple[Tensor, ...] = ()

    def record(self, loss: Tensor, grads) -> None:
        self.grads = tuple(g.detach() for g in grads)
        super().record(loss, grads)


class Loop:
    """A self-modifying run of ``problem`` over ``sources`` (see the module docstring).

    ``config``: a :class:`~selfmod.introspect.config.TrainConfig`. ``modifiers``: modifier
    objects (default: the config's ``modifiers``, or every default one that applies).
    ``tune=False`` gives the fixed-configuration baseline: the same loop without cycles.
    ``lrs`` starts each tensor at its own learning rate instead of ``config.lr``.
    """

    #: several processes: an object with ``train_step(loop, state, batch)`` (a data-parallel
    #: base step) and ``agree(loop)`` (called as every cycle starts), as
    #: :class:`selfmod.runs.distributed.Collective`; ``None`` on one process
    collective: Any = None

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
        cfg = self.config = config
        self.problem, self.sources, self.tune = problem, list(sources), tune
        self.recorder = recorder or Recorder()
        self.device = device_of(cfg) if device is None else torch.device(device)
        self.dtype = DTYPES[cfg.dtype] if dtype is None else dtype
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.rng = torch.Generator().manual_seed(cfg.seed)
        problem.module.to(device=self.device, dtype=self.dtype)
        params, buffers = problem.init()
        self.names = list(params)
        place(self.sources, self.device, self.dtype, cfg.batch_size)
        chosen, named = build.chosen_modifiers(cfg, modifiers) if tune else ([], False)
        sites = len(problem.dropout_sites)
        wants_dropout = cfg.dropout > 0 or any(m.name == "dropout" for m in chosen)
        self.use_dropout = bool(sites) and wants_dropout
        self.space = build.space_of(cfg, self.names, sites if self.use_dropout else 0, chosen)
        hparams = self.space.init(self.space.start(cfg, lrs))
        hparams = {k: v.to(self.device, self.dtype) for k, v in hparams.items()}
        facts = RunFacts(cfg, getattr(self.sources[0].train, "resizable", True))
        self.modifiers, self.skipped = build.applicable(chosen, problem, hparams, facts, named)
        for m in self.modifiers:
            hparams.update(
                {k: v.to(self.device, self.dtype) for k, v in m.hparams_init(problem).items()}
            )
        penalties = [m for m in self.modifiers if type(m).penalty is not Modifier.penalty]
        self.losses = Losses(problem, penalties, self.use_dropout)
        self.opt = build.make_optimizer(self.space, cfg.meta_horizon)
        self.state = RunState(
            params, buffers, self.opt.init(params), hparams, cfg.batch_size, {}, cfg.meta_lr
        ).contiguous()
        self.counters = Counters()
        self.applied: set[int] = set()  # manual approval: the proposals acted on
        self.pending: list[Batch] = []  # the lookahead batches not yet trained on
        self.lookahead: Lookahead | None = None  # the current cycle's
        g = self.sources[0]
        self.buffer = replay.empty(g.guard_x[:0], g.guard_y[:0])
        self.history: dict[str, list] = {"log": [], "probes": [], "decisions": []}
        self._clock: float | None = None  # perf_counter() at which this run's clock reads 0
        width = build.noise_width(cfg, problem, params, buffers, g.guard_x[:1])
        sites = len(problem.dropout_sites) if self.use_dropout else 0
        self.feed = Feed(self.sources, self.device, self.dtype, self.rng, sites, width)
        self.good = self.state.clone()
        self._introduce_source(0)

    # ------------------------------------------------------------------ views

    step = property(lambda self: self.counters.step, doc="base steps done")
    cycle = property(lambda self: self.counters.cycle, doc="cycles done")
    seconds = property(lambda self: self.counters.seconds, doc="wall-clock seconds trained")
    examples = property(lambda self: self.counters.examples, doc="training examples drawn")
    diverged_at = property(lambda self: self.counters.diverged_at, doc="fixed baseline's NaN")
    shift_cycle = property(lambda self: self.counters.shift_cycle, doc="the data shift's cycle")
    params = property(lambda self: self.state.params)
    hparams = property(lambda self: self.state.hparams)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.sources[0].guard_x.shape[1:])

    def values(self, state: RunState | None = None) -> dict[str, Any]:
        """The hyperparameters in natural units, the batch size and widths (logs, ledger)."""
        state = self.state if state is None else state
        return {
            **self.space.values(state.hparams),
            "batch_size": state.batch_size,
            "widths": self.problem.widths(state.params),
        }

    def widths(self) -> list[int]:
        return self.problem.widths(self.state.params)

    def unused_tensors(self) -> list[int]:
        """Indices (into :attr:`names`) of tensors with no entries now: a factorable layer's
        unused half, whose learning rate means nothing."""
        return [i for i, k in enumerate(self.names) if self.state.params[k].numel() == 0]

    def guard(self, part: str = "all") -> tuple[Tensor, Tensor]:
        """Guard data: ``"propose"``, ``"verify"`` or ``"all"`` (:func:`.feed.guard`)."""
        return guard(self.buffer, part, self.config.verify_on == "shared")

    def due(self, m: Modifier) -> bool:
        """Whether per-cycle modifier ``m`` runs in this cycle (its ``schedule``)."""
        return not m.per_step and self.cycle % self.config.every(m.name) == 0

    # ------------------------------------------------------------------ driving

    def run(self, on_step: Callable[[Loop], None] | None = None) -> None:
        """Train to ``config.steps``, cycling, checkpointing and logging; resumable."""
        cfg, n = self.config, self.counters
        start = self._clock = time.perf_counter() - n.seconds
        while n.step < cfg.steps and n.diverged_at is None:
            if cfg.shift_step and n.step == cfg.shift_step and n.source_id == 0:
                self._shift()
            if self._boundary():
                n.seconds = time.perf_counter() - start
                self._cycle()
            self.base_step()
            if on_step is not None:
                on_step(self)
        n.seconds = time.perf_counter() - start

    def push(self, batch: tuple[Any, Tensor]) -> int:
        """Take the caller's batch ``(x, y)``; train as far as the queued batches allow.

        At a cycle boundary ``lookahead`` batches are queued first (the cycle needs them), then
        the cycle runs and they are trained on. Returns the number of base steps done so far.
        """
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
        n = self.counters
        return self.tune and n.step % self.config.cycle == 0 and n.cycled_at != n.step

    def _cycle(self) -> None:
        if self.collective is not None:
            self.collective.agree(self)
        if self.cycle % self.config.checkpoint_every == 0:
            self.recorder.checkpoint(self)
        self.counters.cycled_at = self.step
        self.run_cycle()

    def _introduce_source(self, s: int) -> None:
        self.counters.source_id = s
        src, cfg = self.sources[s], self.config
        loss = self._batch_loss(src.guard_x, src.guard_y)
        self.buffer = replay.add_guard(
            self.buffer, src.guard_x, src.guard_y, loss, self.step, s, cfg.guard_size,
            self.rng, halves=cfg.verify_on == "held_out",
        )  # fmt: skip

    def _batch_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """``(n,)``: the batch's mean loss for every example (the replay buffer's note)."""
        loss, _ = self.problem.evaluate(self.state.params, self.state.buffers, x, y)
        return torch.full((len(y),), loss)

    def _shift(self) -> None:
        self._introduce_source(1)
        self.counters.shift_cycle = self.cycle
        memory = self.state.memory
        reset = {
            m.name: m.reset(memory.get(m.name, {})) for m in self.modifiers if m.name in memory
        }
        self.state = replace(self.state, memory={**memory, **reset})
        self.event("event", "shift", f"data source 1 from step {self.step}", {})

    # ------------------------------------------------------------------ one base step

    def base_step(self) -> None:
        """One training step; a non-finite or diverging loss rolls back to the last good state,
        halving the learning rates and the meta learning rate. The fixed-configuration baseline
        (``tune=False``) never changes itself: a spike is counted, a non-finite loss or
        gradient ends it as diverged (``diverged_at``), at its last finite parameters."""
        n, cfg = self.counters, self.config
        batch = self.pending.pop(0) if self.pending else self._next_batch()
        if n.examples is not None:
            n.examples += len(batch[1])
        try:
            params, opt_state, buffers, loss, grads = self.train_step(self.state, batch)
            if verifier.diverged(loss, n.average, n.first_loss):
                n.divergences += 1
                message = f"diverged at step {n.step}: loss {loss:.3g}, average {n.average:.3g}"
                if cfg.safeguards and self.tune:
                    raise DivergenceError(message)
                why = "safeguards off" if self.tune else "a fixed configuration"
                self.event("event", "divergence", f"{message}; {why}: goes on", {})
            state = self.state
            for m in (m for m in self.modifiers if m.per_step):
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
        n.average = loss if n.average is None else 0.9 * n.average + 0.1 * loss
        n.first_loss = loss if n.first_loss is None else n.first_loss
        n.last_loss = loss
        n.step += 1
        if n.step % 50 == 0 or n.step == cfg.steps:
            self.log_point()

    def _next_batch(self) -> Batch:
        return self.feed.next_batch(self.state.batch_size, self.counters.source_id)

    def train_step(
        self, state: RunState, batch: Batch
    ) -> tuple[Params, Any, Params, float, tuple[Tensor, ...]]:
        """``(params, opt_state, buffers, loss, grads)`` after one optimizer step on ``batch``;
        raises :class:`NonFiniteError` on a NaN or inf loss or gradient."""
        if self.collective is not None:
            return self.collective.train_step(self, state, batch)
        box: dict[str, Params] = {}
        monitor = _GradTap(start=self.step)
        with torch.no_grad():
            params, opt_state = hypergrad.inner_step(
                self.losses.train(state.buffers, box), self.opt, state.params,
                state.opt_state, state.hparams, batch, create_graph=False, monitor=monitor,
            )  # fmt: skip
        loss = monitor.losses[0].item()
        monitor.check()
        return params, opt_state, box.get("buffers", state.buffers), loss, monitor.grads

    def _rollback(self, reason: str) -> None:
        before = self.values()
        self.state = verifier.rolled_back(self.good)
        self.good = self.state.clone()
        self.pending = []
        why = f"{reason}; restored the last good state, halved learning rates and meta_lr "
        self._record(
            Decision(
                self.cycle, self.step, "safeguard", "rollback",
                why + f"(now {self.state.meta_lr:.3g})", before, self.values(),
            )
        )  # fmt: skip

    def log_point(self) -> None:
        gl, ga = self.problem.evaluate(self.params, self.state.buffers, *self.guard())
        _, ta = test_metric(self.problem, self.state, self.sources[self.counters.source_id])
        row = {
            "step": self.step, "guard_loss": gl, "guard_acc": ga, "test_acc": ta,
            "train_loss": self.counters.last_loss, "meta_lr": self.state.meta_lr,
            **self.values(), "unused": self.unused_tensors(),
        }  # fmt: skip
        self.history["log"].append(row)
        # wall-clock seconds at this log point (kept apart: a resumed run's clock differs)
        clock = self._clock
        elapsed = time.perf_counter() - clock if clock is not None else self.counters.seconds
        self.history.setdefault("clock", []).append([self.step, elapsed])
        self.recorder.log(self, row)

    # ------------------------------------------------------------------ one cycle

    def probe(self) -> dict[str, float]:
        """This cycle's probes (:func:`.probes.cycle_probe`) with the run's counters."""
        s, n, shared = self.state, self.counters, self.config.verify_on == "shared"
        older = guard(self.buffer, "propose", shared, n.source_id)
        test = test_metric(self.problem, s, self.sources[n.source_id])
        found = probes.cycle_probe(
            self.problem, s, self.guard("propose"), replay.split(self.buffer, replay.TRAIN),
            older, test, self.config.seed + n.cycle, self.input_shape,
        )  # fmt: skip
        return {"cycle": n.cycle, "step": n.step, **found} | {
            "batch_size": s.batch_size,
            "meta_lr": s.meta_lr,
        }

    def run_cycle(self) -> None:
        """Evaluate, estimate, propose, verify, decide (the module docstring)."""
        cfg, n = self.config, self.counters
        self._apply_approved()
        for m in (m for m in self.modifiers if m.per_step and n.step > 0):
            keys = [e for e in self.space.entries if e.key in m.needs]
            self._record(
                Decision(
                    n.cycle, n.step, m.name, "applied",
                    getattr(m, "summary", f"{m.name}: per-step changes since the last cycle"),
                    {e.name: e.natural(self.good.hparams[e.key]) for e in keys},
                    {e.name: e.natural(self.hparams[e.key]) for e in keys},
                )
            )  # fmt: skip
        self.pending = [self._next_batch() for _ in range(cfg.lookahead)]
        cuda = self.device.type == "cuda"
        rng = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if cuda else None)
        probe = self.probe()
        self.history["probes"].append(probe)
        self.event("cycle", "evaluate", "probes", probe)
        dead = cfg.safeguards and verifier.dead(self.problem, self.state, self.guard("verify")[0])
        if dead:
            self._rollback(dead)
            n.cycle += 1
            return
        for x, y, _ in self.pending:  # the reservoir sees what the model is about to train on
            loss = self._batch_loss(x, y)
            self.buffer = replay.add_train(
                self.buffer, x, y, loss, n.step, n.source_id, cfg.replay_size, self.rng
            )
        shared = cfg.verify_on == "shared"
        look = self.lookahead = Lookahead(
            self.losses, self.opt, self.pending, rng, self.device, current=self.state,
            step=n.step, propose=self.guard("propose"), verify=self.guard("verify"),
            older=guard(self.buffer, "verify", shared, n.source_id), input_shape=self.input_shape,
        )  # fmt: skip
        due = [m for m in self.modifiers if self.due(m)]
        estimated = any(m.reads_meta_gradient for m in due)
        current, g = math.nan, {}
        if estimated:  # else nobody reads it: the reverse unroll is skipped
            try:
                current, g = look.estimate(self.state, cfg.estimator, cfg.meta_horizon)
            except NonFiniteError as err:
                if not cfg.safeguards:
                    raise
                self._rollback(f"meta-gradient: {err}")
                n.cycle += 1
                return
        ctx = Context(
            self.state, self.problem, n.cycle, probe, g, look.batches, cfg,
            lambda k: look.batch_grads(self.state, k), self.rng,
        )  # fmt: skip
        proposals, self.state = decide.propose(due, ctx, self.state)
        look.current = self.state
        if proposals and (not estimated or (cfg.verify_on == "held_out" and cfg.safeguards)):
            current = look.baseline(self.state)
        for proposal in proposals:
            self.verify_and_decide(proposal, current)
        self.good = self.state.clone()
        n.cycle += 1

    def verify_and_decide(self, proposal: Proposal, current: float) -> None:
        """Apply ``proposal`` to a copy, replay the lookahead, check every invariant; commit
        (auto), queue (manual) or reject (:func:`.decide.verdict`). The run changes only on
        commit."""
        look = self.lookahead
        assert look is not None, "verify_and_decide runs inside a cycle"
        proposed = decide.apply(proposal, self.state, self.modifiers, self.problem, self.config)
        decision, reason, value = decide.verdict(
            proposal, look, self.state, proposed, current, self.config
        )
        d = Decision(
            self.cycle, self.step, proposal.modifier, decision, reason,
            self.values(), self.values(proposed), current, value,
        )  # fmt: skip
        self._record(d, proposal)
        if decision == "commit":
            moved = shift.commit_shift(look, self.buffer.x, self.state, proposed)  # meta-metric
            entry = {"cycle": self.cycle, "step": self.step, "modifier": proposal.modifier}
            self.history.setdefault("self_shift", []).append({**entry, "shift": moved})
            self.state = look.current = proposed

    def _apply_approved(self) -> None:
        """Manual approval: apply every approved pending change and expire the late ones
        (:func:`.decide.approvals`), in order."""
        if self.config.approval != "manual":
            return
        pending = lambda: self.recorder.pending(self)  # noqa: E731
        expiry = self.config.approval_expiry
        for seq, made, change, late in decide.approvals(pending, self.applied, self.cycle, expiry):
            self.applied.add(seq)
            proposal = Proposal.from_json(change, self.hparams)
            before = self.values()
            if late:
                decision = "expired"
                reason = f"proposal {seq} from cycle {made} expired (approval_expiry {expiry})"
            else:
                self.state = decide.apply(
                    proposal, self.state, self.modifiers, self.problem, self.config
                )
                decision, reason = "applied", f"approved proposal {seq} applied"
            d = Decision(
                self.cycle, self.step, proposal.modifier, decision, reason, before, self.values()
            )
            self._record(d, extra={"proposal": seq})

    # ------------------------------------------------------------------ records

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

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``(tensors, meta)``: the whole run, flattened by name (see :mod:`.state`)."""
        tensors, scalars = flatten(self.state, "state")
        t2, s2 = flatten(self.good, "good")
        tensors.update(t2)
        scalars.update(s2)
        tensors.update({f"replay.{k}": v for k, v in self.buffer._asdict().items()})
        tensors["rng.controller"] = self.rng.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {
            **self.counters.saved(),
            "scalars": scalars,
            "applied": sorted(self.applied),
            "stream": self.sources[self.counters.source_id].train.position(),
            "python_random": jsonable(random.getstate()),
            "numpy_random": jsonable(np.random.get_state()),
            "history": jsonable(self.history),
        }
        return tensors, meta

    def restore(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Continue from :meth:`checkpoint`'s output (of a run of the same config)."""
        rngs = {k: tensors.pop(k) for k in ("rng.controller", "rng.torch")}
        tensors = {k: v.to(self.device) for k, v in tensors.items()}  # checkpoints are on the CPU
        self.state = self._read_state(tensors, meta["scalars"], "state")
        self.good = self._read_state(tensors, meta["scalars"], "good")
        saved = {f: tensors[f"replay.{f}"] for f in replay.Replay._fields}
        saved.update({f: saved[f].cpu() for f in replay.Replay._fields if f not in ("x", "y")})
        self.buffer = replay.Replay(**saved)
        self.rng.set_state(rngs["rng.controller"])
        torch.set_rng_state(rngs["rng.torch"])
        random.setstate(_tuples(meta["python_random"]))
        st = meta["numpy_random"]
        np.random.set_state((st[0], np.array(st[1], dtype=np.uint32), *st[2:]))
        self.counters = Counters.read(meta)
        self.applied = set(meta["applied"])
        self.sources[self.counters.source_id].train.seek(meta["stream"])
        self.history = meta["history"]
        self.pending, self.feed.inbox = [], []

    def _read_state(self, tensors: dict[str, Tensor], scalars: dict[str, Any], p: str) -> RunState:
        params = {k: tensors[f"{p}.params['{k}']"] for k in self.names}
        template = RunState(
            params, _under(tensors, f"{p}.buffers"), self.opt.init(params),
            _under(tensors, f"{p}.hparams"), 0, memory_template(tensors, p), 0.0,
        )  # fmt: skip
        return unflatten(template, tensors, scalars, prefix=p)

    def summary(self) -> dict[str, Any]:
        """Test loss and metric, cost, widths, decisions, final hyperparameters and the
        meta-metrics that need no baseline (:func:`.summary.summarize`)."""
        src = self.sources[self.counters.source_id]
        return summarize(
            self.problem, self.state, src, self.buffer, self.input_shape,
            counters=self.counters, history=self.history, names=self.names,
            modifiers=[m.name for m in self.modifiers], skipped=self.skipped,
            values=self.values(),
        )  # fmt: skip


def _under(tensors: dict[str, Tensor], head: str) -> Params:
    """``{key: tensor}`` for names ``head['key']`` (one level)."""
    out = {}
    for name, t in tensors.items():
        if name.startswith(head + "['") and name.endswith("']") and "']['" not in name[len(head) :]:
            out[name[len(head) + 2 : -2]] = t
    return out


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x
