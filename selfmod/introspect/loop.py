"""The introspective loop: a training run that modifies itself, every change bounded, verified,
logged and reversible.

Every ``cycle`` base steps the :class:`Loop` takes the next ``lookahead`` training batches and
runs

    evaluate (probes) -> estimate (meta-gradient) -> propose (modifiers)
    -> apply to a copy and replay the K lookahead steps -> verify (invariants)
    -> commit, queue for approval, or reject

(the estimate only in a cycle where a due modifier reads the meta-gradient: ``lr``, ``momentum``,
Adam's betas, or the regularizers with ``regularize = "hypergradient"``).

Modifiers (:mod:`selfmod.introspect.modifiers`) only propose; the loop is the one place that
changes the run. The invariants and the rollback policy are :mod:`.verifier`'s; a
:class:`Recorder` (the run directory's ledger and checkpoints: :mod:`selfmod.runs.recorder`)
observes every decision. The model is any ``nn.Module`` (:class:`~.problem.Problem`).

Two ways to drive it: :meth:`Loop.run` pulls batches from the sources' streams;
:meth:`Loop.push` takes the caller's batch (a loop the caller owns, as with Accelerate). At a
cycle boundary :meth:`push` queues ``lookahead`` batches, then runs the cycle and trains on
them.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from selfmod import hypergrad, optim, tree
from selfmod.data.streams import Batches
from selfmod.errors import DivergenceError, NonFiniteError, SelfmodError
from selfmod.introspect import probes, replay, shift, verifier
from selfmod.introspect.hparams import HParamSpace
from selfmod.introspect.modifiers import Context, Modifier, Proposal, default_names, registry
from selfmod.introspect.modifiers.base import RunFacts, apply_plain, merge
from selfmod.introspect.problem import Problem
from selfmod.introspect.state import RunState, flatten, memory_template, unflatten

Params = dict[str, Tensor]
Batch = tuple[Any, Tensor, Tensor]  # x (B, ...), y (B, ...), dropout noise (S, B, W) or (0,)


# ----------------------------------------------------------------------------- records


#: replays kept per cycle: the current state's and the latest others' (a model's copies each)
REPLAYS_KEPT = 2


def _same(a: tuple, b: tuple) -> bool:
    """The same lookahead: the same batch list (by identity) and length, the same random state."""
    return a[0] is b[0] and a[1] == b[1] and a[2] is b[2]


@dataclass
class Source:
    """One data distribution: its training batches, guard set and (optional) test set."""

    train: Batches
    guard_x: Tensor  # (G, ...)
    guard_y: Tensor  # (G, ...)
    test_x: Tensor | None = None  # (M, ...)
    test_y: Tensor | None = None


@dataclass
class Decision:
    """One proposal and what became of it."""

    cycle: int
    step: int
    modifier: str
    decision: str  # commit | reject | rollback | pending | applied | expired
    reason: str
    before: dict[str, Any]
    after: dict[str, Any]
    guard_current: float = math.nan
    guard_proposed: float = math.nan
    id: int = 0  # ledger seq


class Recorder:
    """Observes the run (a callback, in the manner of Lightning's): it may write the ledger and
    checkpoints and report approvals; it cannot change the run. The base class keeps nothing."""

    def record(
        self, run: Loop, kind: str, decision: str, reason: str, payload: dict[str, Any]
    ) -> int | None:
        """One ledger entry; returns its id (or ``None``)."""
        return None

    def checkpoint(self, run: Loop) -> None:
        """Called at the start of every ``checkpoint_every``-th cycle."""

    def pending(self, run: Loop) -> list[tuple[int, int, dict[str, Any], bool]]:
        """Pending proposals ``(id, cycle, change, approved)`` (manual approval), oldest
        first."""
        return []

    def log(self, run: Loop, row: dict[str, Any]) -> None:
        """A log point's row (losses, metrics, hyperparameters), every 50 base steps."""


class _GradTap(hypergrad.FiniteMonitor):
    """A finiteness monitor that also keeps the last step's gradients (per-step modifiers)."""

    grads: tuple[Tensor, ...] = ()

    def record(self, loss: Tensor, grads) -> None:
        self.grads = tuple(g.detach() for g in grads)
        super().record(loss, grads)


# ----------------------------------------------------------------------------- the loop


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
        device = device_of(cfg) if device is None else torch.device(device)
        dtype = DTYPES[cfg.dtype] if dtype is None else dtype
        self.device, self.dtype = device, dtype
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.rng = torch.Generator().manual_seed(cfg.seed)
        problem.module.to(device=self.device, dtype=dtype)
        params, buffers = problem.init()
        self.names = list(params)
        self._place_data()
        chosen, named = self._chosen_modifiers(modifiers) if tune else ([], False)
        sites = len(problem.dropout_sites)
        wants_dropout = cfg.dropout > 0 or any(m.name == "dropout" for m in chosen)
        self.use_dropout = bool(sites) and wants_dropout
        self.space = HParamSpace(cfg.optimizer, tuple(self.names), sites if self.use_dropout else 0)
        hparams = self._initial_hparams(lrs)
        facts = RunFacts(cfg, getattr(self.sources[0].train, "resizable", True))
        self.modifiers: list[Modifier] = []
        self.skipped: dict[str, str] = {}  # default modifiers that do not apply, and why
        for m in chosen:
            why = m.applies(problem, hparams, facts)
            if why is None:
                self.modifiers.append(m)
            elif named:
                raise SelfmodError(f"modifiers: {why}; remove {m.name!r} from modifiers")
            else:
                self.skipped[m.name] = why
        for m in self.modifiers:
            hparams.update(
                {k: v.to(self.device, self.dtype) for k, v in m.hparams_init(problem).items()}
            )
        self.penalties = [m for m in self.modifiers if type(m).penalty is not Modifier.penalty]
        self.opt = self.space.make_optimizer()
        if cfg.meta_horizon:  # the first-order tangent of the params w.r.t. log lr
            self.opt = optim.chain(self.opt, optim.sum_updates(1.0 - 1.0 / cfg.meta_horizon))
        self.state = RunState(
            params, buffers, self.opt.init(params), hparams, cfg.batch_size, {}, cfg.meta_lr
        ).contiguous()
        self.step = 0
        self.cycle = 0
        self.average: float | None = None
        self.first_loss: float | None = None  # the first base step's loss (divergence floor)
        self.last_loss = 0.0
        self.seconds = 0.0
        self._clock: float | None = None  # perf_counter() at which this run's clock reads 0
        self.divergences = 0  # base steps whose loss jumped above DIVERGENCE_FACTOR x average
        self.diverged_at: int | None = None  # the fixed baseline: where a NaN ended it
        # training examples the base steps drew (a rolled-back step's too; None: resumed from a
        # checkpoint written before this counter)
        self.examples: int | None = 0
        self.applied: set[int] = set()
        self.shift_cycle: int | None = None
        self.cycled_at = -1  # the step whose cycle has run (step-level driving)
        self.source_id = 0
        self.pending: list[Batch] = []
        #: this cycle's replays, by state: ``{id(state): (state, key, (params, opt_state))}``
        self._replays: dict[int, tuple[RunState, tuple, tuple[Params, Any]]] = {}
        self._cycle_rng: tuple[Tensor, Tensor | None] | None = None  # at the cycle's start
        self.inbox: list[Any] = []  # step-level driving: the caller's batches not yet trained on
        g = self.sources[0]
        self.buffer = replay.empty(g.guard_x[:0], g.guard_y[:0])
        self.history: dict[str, list] = {"log": [], "probes": [], "decisions": []}
        self.noise_width = max(getattr(cfg, "max_width", 0), *self._site_widths(), 1)
        self.good = self.state.clone()
        self._introduce_source(0)

    # ------------------------------------------------------------------ set-up

    def _place_data(self) -> None:
        """Guard and test sets on the run's device (floats in its dtype); the training data
        is moved batch by batch. Refuses a batch size larger than the training set."""
        for src in self.sources:
            src.guard_x, src.guard_y = (
                _to(t, self.device, self.dtype) for t in (src.guard_x, src.guard_y)
            )
            src.test_x, src.test_y = (
                _to(t, self.device, self.dtype) for t in (src.test_x, src.test_y)
            )
        train, b = self.sources[0].train, self.config.batch_size
        if getattr(train, "resizable", False) and b > len(train):  # type: ignore[arg-type]
            n = len(train)  # type: ignore[arg-type]
            raise SelfmodError(f"batch_size must be <= the {n} training examples (got {b})")

    def _chosen_modifiers(self, given: Sequence[Modifier] | None) -> tuple[list[Modifier], bool]:
        """``(modifiers, named)``: the given objects, the config's names, or (not named) every
        registered default one (those that do not apply are skipped later)."""
        if given is not None:
            return list(given), True
        reg, names = registry(), self.config.modifiers
        named = names is not None
        wanted = names if named else default_names()
        return [reg[n].from_config(self.config) for n in reg if n in wanted], named

    def _initial_hparams(self, lrs: Sequence[float] | None) -> Params:
        """The config's starting values (``lrs``: one learning rate per tensor instead)."""
        cfg = self.config
        if lrs is not None and len(lrs) != len(self.names):
            raise ValueError(f"lrs needs one rate per tensor ({len(self.names)}; got {len(lrs)})")
        hparams = self.space.init(
            {
                "lr": cfg.lr if lrs is None else list(lrs),
                "momentum": max(cfg.momentum, 1e-3),
                "beta1": cfg.beta1,
                "beta2": cfg.beta2,
                "weight_decay": max(cfg.weight_decay, 1e-7),
                "dropout": min(max(cfg.dropout, 0.01), 0.95),
            }
        )
        return {k: v.to(self.device, self.dtype) for k, v in hparams.items()}

    def _site_widths(self) -> list[int]:
        """The width (dim 1) of the input of every dropout site, from one guard example."""
        widths: list[int] = []
        if not self.problem.dropout_sites:
            return widths
        hooks = [
            self.problem.module.get_submodule(s).register_forward_hook(
                lambda m, inp, out: widths.append(int(inp[0].shape[1]))
            )
            for s in self.problem.dropout_sites
        ]
        try:
            self.problem.predict(self.state.params, self.state.buffers, self.sources[0].guard_x[:1])
        finally:
            for h in hooks:
                h.remove()
        return widths

    # ------------------------------------------------------------------ views

    @property
    def params(self) -> Params:
        return self.state.params

    @property
    def hparams(self) -> Params:
        return self.state.hparams

    @property
    def batch_size(self) -> int:
        return self.state.batch_size

    @property
    def meta_lr(self) -> float:
        return self.state.meta_lr

    def apply(self, params: Params, x: Tensor) -> Tensor:
        """Eval-mode output of the model at ``params`` (the run's buffers)."""
        return self.problem.predict(params, self.state.buffers, x)

    def widths(self, params: Params | None = None) -> list[int]:
        return self.problem.widths(self.state.params if params is None else params)

    def cost(self, params: Params | None = None) -> Any:
        shape = tuple(self.sources[0].guard_x.shape[1:])
        return self.problem.cost(self.state.params if params is None else params, shape)

    def values(self, state: RunState | None = None) -> dict[str, Any]:
        """The hyperparameters in natural units, the batch size and widths (logs, ledger)."""
        state = self.state if state is None else state
        out = self.space.values(state.hparams)
        out["batch_size"] = state.batch_size
        out["widths"] = self.widths(state.params)
        return out

    def unused_tensors(self) -> list[int]:
        """Indices (into :attr:`names`, the rates' order) of tensors with no entries now: a
        factorable layer's unused half, whose learning rate means nothing."""
        return [i for i, k in enumerate(self.names) if self.state.params[k].numel() == 0]

    def guard(self, part: str = "all") -> tuple[Tensor, Tensor]:
        """Guard data: ``"propose"`` (what probes and meta-gradients see), ``"verify"`` (what
        only the verifier sees) or ``"all"``; with ``verify_on = "shared"`` they are one set."""
        return replay.split(self.buffer, self._guard_codes(part))

    def older_guard(self, part: str = "verify") -> tuple[Tensor, Tensor]:
        """The guard data of every source but the current one (the forgetting budget)."""
        return replay.split(self.buffer, self._guard_codes(part), exclude_source=self.source_id)

    def _guard_codes(self, part: str) -> tuple[int, ...]:
        if part == "all" or self.config.verify_on == "shared":
            return (replay.GUARD, replay.PROPOSE)
        return {"propose": (replay.PROPOSE,), "verify": (replay.GUARD,)}[part]

    def due(self, m: Modifier) -> bool:
        """Whether per-cycle modifier ``m`` runs in this cycle (its ``schedule``)."""
        return not m.per_step and self.cycle % self.config.every(m.name) == 0

    # ------------------------------------------------------------------ losses

    def inner_loss(self, buffers: Params, box: dict[str, Params] | None = None):
        """``loss(params, hparams, batch)`` in training mode; with ``box`` BatchNorm statistics
        advance and the new buffers land in ``box["buffers"]`` (base steps), without it they
        stay as they are (estimators and replays)."""
        problem, use_dropout, penalties = self.problem, self.use_dropout, self.penalties

        def loss(params: Params, hparams: Params, batch: Batch) -> Tensor:
            x, y, noise = batch
            rates = torch.sigmoid(hparams["drop_logit"]) if use_dropout else None
            out, new = problem.forward(
                params,
                buffers,
                x,
                train=True,
                update_buffers=box is not None,
                rates=rates,
                noise=noise,
            )
            if box is not None:
                box["buffers"] = new
            value = problem.loss(out, y)
            for m in penalties:
                term = m.penalty(problem, params, hparams)
                value = value if term is None else value + term
            return value

        return loss

    def outer_loss(
        self, params: Params, hparams: Params, batch: tuple[Tensor, Tensor], buffers: Params
    ) -> Tensor:
        """The guard loss: eval mode, the run's buffers."""
        out, _ = self.problem.forward(params, buffers, batch[0], train=False)
        return self.problem.loss(out, batch[1])

    def replay(self, state: RunState, monitor: Any) -> tuple[Params, Any]:
        """``state`` trained over the lookahead batches (no graph): ``(params, opt_state)``.

        A replay is a pure function of the (immutable) ``state``, the lookahead batches and
        the cycle's random state, so within a cycle the last ``REPLAYS_KEPT`` are kept: the
        verifier, the forgetting check and the self-shift meta-metric share the current
        state's and the proposal's. With a ``monitor`` it always runs (the monitor must see
        every loss).
        """
        key = (self.pending, len(self.pending), self._cycle_rng)  # held: no id is reused
        hit = self._replays.pop(id(state), None)
        if hit is not None and hit[0] is state and _same(hit[1], key):
            self._replays[id(state)] = hit  # the most recently used last
            if monitor is None:
                return hit[2]
        with self.cycle_randomness():
            result = hypergrad.run(
                self.inner_loss(state.buffers),
                self.opt,
                state.params,
                state.opt_state,
                state.hparams,
                self.pending,
                create_graph=False,
                monitor=monitor,
            )
        self._replays[id(state)] = (state, key, result)
        while len(self._replays) > REPLAYS_KEPT:  # a model's copies, not one per proposal
            oldest = next(k for k, v in self._replays.items() if v[0] is not self.state)
            del self._replays[oldest]
        return result

    @contextlib.contextmanager
    def cycle_randomness(self) -> Iterator[None]:
        """Every lookahead of a cycle (the estimate, each replay) draws the same random numbers
        (a model's own ``nn.Dropout``), from the generator state at the cycle's start, and leaves
        the run's generators as they were: verifying a change consumes no randomness."""
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            if self._cycle_rng is not None:
                torch.set_rng_state(self._cycle_rng[0])
                if cuda:
                    torch.cuda.set_rng_state(self._cycle_rng[1], self.device)
            yield

    # ------------------------------------------------------------------ data

    def _introduce_source(self, s: int) -> None:
        self.source_id = s
        src = self.sources[s]
        loss = self._batch_loss(src.guard_x, src.guard_y)
        self.buffer = replay.add_guard(
            self.buffer,
            src.guard_x,
            src.guard_y,
            loss,
            self.step,
            s,
            self.config.guard_size,
            self.rng,
            halves=self.config.verify_on == "held_out",
        )

    def _batch_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """``(n,)``: the batch's mean loss for every example (the replay buffer's note)."""
        loss, _ = self.problem.evaluate(self.state.params, self.state.buffers, x, y)
        return torch.full((len(y),), loss)

    def _next_batch(self) -> Batch:
        if self.inbox:
            x, y = self.inbox.pop(0)
        else:
            x, y = self.sources[self.source_id].train.next(self.state.batch_size)
        b = len(x)
        noise = (
            torch.rand((len(self.problem.dropout_sites), b, self.noise_width), generator=self.rng)
            if self.use_dropout
            else torch.zeros(0)
        )
        return _to(x, self.device, self.dtype), y.to(self.device), noise.to(self.device, self.dtype)

    # ------------------------------------------------------------------ driving

    def run(self, on_step: Callable[[Loop], None] | None = None) -> None:
        """Train to ``config.steps``, cycling, checkpointing and logging; resumable."""
        cfg = self.config
        start = self._clock = time.perf_counter() - self.seconds
        while self.step < cfg.steps and self.diverged_at is None:
            if cfg.shift_step and self.step == cfg.shift_step and self.source_id == 0:
                self._shift()
            if self.tune and self.step % cfg.cycle == 0 and self.cycled_at != self.step:
                self.seconds = time.perf_counter() - start
                self._cycle()
            self.base_step()
            if on_step is not None:
                on_step(self)
        self.seconds = time.perf_counter() - start

    def push(self, batch: tuple[Any, Tensor]) -> int:
        """Take the caller's batch ``(x, y)``; train as far as the queued batches allow.

        At a cycle boundary ``lookahead`` batches are queued first (the cycle needs them), then
        the cycle runs and they are trained on. Returns the number of base steps done so far.
        """
        start = time.perf_counter()
        self.inbox.append(batch)
        cfg = self.config
        while self.inbox or self.pending:
            boundary = self.tune and self.step % cfg.cycle == 0 and self.cycled_at != self.step
            if boundary:
                if len(self.inbox) < cfg.lookahead:
                    break
                self._cycle()
                continue
            self.base_step()
        self.seconds += time.perf_counter() - start
        return self.step

    def finish_queued(self) -> None:
        """Train the batches still queued, without a new cycle (the step-level API's end)."""
        self.cycled_at = self.step
        while self.inbox or self.pending:
            self.base_step()

    def _cycle(self) -> None:
        if self.collective is not None:
            self.collective.agree(self)
        if self.cycle % self.config.checkpoint_every == 0:
            self.recorder.checkpoint(self)
        self.cycled_at = self.step
        self.run_cycle()

    def _shift(self) -> None:
        self._introduce_source(1)
        self.shift_cycle = self.cycle
        memory = {
            m.name: m.reset(self.state.memory.get(m.name, {}))
            for m in self.modifiers
            if m.name in self.state.memory
        }
        self.state = replace(self.state, memory={**self.state.memory, **memory})
        self.event("event", "shift", f"data source 1 from step {self.step}", {})

    # ------------------------------------------------------------------ one base step

    def base_step(self) -> None:
        """One training step; a non-finite or diverging loss rolls back to the last good state,
        halving the learning rates and the meta learning rate. The fixed-configuration baseline
        (``tune=False``) never changes itself: a spike is counted, a non-finite loss or
        gradient ends it as diverged (``diverged_at``), at its last finite parameters."""
        batch = self.pending.pop(0) if self.pending else self._next_batch()
        if self.examples is not None:
            self.examples += len(batch[1])
        per_step = [m for m in self.modifiers if m.per_step]
        try:
            params, opt_state, buffers, loss, grads = self.train_step(self.state, batch)
            if verifier.diverged(loss, self.average, self.first_loss):
                self.divergences += 1
                message = (
                    f"diverged at step {self.step}: loss {loss:.3g}, average {self.average:.3g}"
                )
                if self.config.safeguards and self.tune:
                    raise DivergenceError(message)
                why = "safeguards off" if self.tune else "a fixed configuration"
                self.event("event", "divergence", f"{message}; {why}: goes on", {})
            state = self.state
            for m in per_step:
                state = m.on_step(state, dict(zip(self.names, grads, strict=True)), params)
        except (NonFiniteError, DivergenceError) as err:
            if not self.config.safeguards:
                raise
            if not self.tune:
                self.diverged_at = self.step
                self.event("event", "diverged", f"{err}; the fixed configuration stops", {})
                return
            self._rollback(str(err))
            self.step += 1
            return
        self.state = replace(state, params=params, opt_state=opt_state, buffers=buffers)
        self.average = loss if self.average is None else 0.9 * self.average + 0.1 * loss
        self.first_loss = loss if self.first_loss is None else self.first_loss
        self.last_loss = loss
        self.step += 1
        if self.step % 50 == 0 or self.step == self.config.steps:
            self.log_point()

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
                self.inner_loss(state.buffers, box),
                self.opt,
                state.params,
                state.opt_state,
                state.hparams,
                batch,
                create_graph=False,
                monitor=monitor,
            )
        loss = monitor.losses[0].item()
        monitor.check()
        return params, opt_state, box.get("buffers", state.buffers), loss, monitor.grads

    def _rollback(self, reason: str) -> None:
        before = self.values()
        self.state = verifier.rolled_back(self.good)
        self.good = self.state.clone()
        self.pending = []
        self._record(
            Decision(
                self.cycle,
                self.step,
                "safeguard",
                "rollback",
                f"{reason}; restored the last good state, halved learning rates "
                f"and meta_lr (now {self.state.meta_lr:.3g})",
                before,
                self.values(),
            )
        )

    def log_point(self) -> None:
        src = self.sources[self.source_id]
        gl, ga = self.problem.evaluate(self.params, self.state.buffers, *self.guard())
        _, ta = self._test(src)
        row = {
            "step": self.step,
            "guard_loss": gl,
            "guard_acc": ga,
            "test_acc": ta,
            "train_loss": self.last_loss,
            "meta_lr": self.meta_lr,
            **self.values(),
            "unused": self.unused_tensors(),
        }
        self.history["log"].append(row)
        # wall-clock seconds at this log point (kept apart: a resumed run's clock differs)
        elapsed = time.perf_counter() - self._clock if self._clock is not None else self.seconds
        self.history.setdefault("clock", []).append([self.step, elapsed])
        self.recorder.log(self, row)

    def _test(self, src: Source) -> tuple[float, float]:
        if src.test_x is None or src.test_y is None:
            return math.nan, math.nan
        return self.problem.evaluate(self.params, self.state.buffers, src.test_x, src.test_y)

    # ------------------------------------------------------------------ one cycle

    def probe(self) -> dict[str, float]:
        """Guard and internal-train loss and metric, the gap, older-data metric, test metric,
        robustness to input noise, a self-made shifted set, parameters, FLOPs and memory."""
        p, b, ev = self.params, self.state.buffers, self.problem.evaluate
        gx, gy = self.guard("propose")
        tx, ty = replay.split(self.buffer, replay.TRAIN)
        gl, ga = ev(p, b, gx, gy)
        tl, ta = ev(p, b, tx, ty)
        _, old = ev(p, b, *self.older_guard("propose"))
        _, test = self._test(self.sources[self.source_id])
        robust = shifted = math.nan
        if gx.is_floating_point():  # perturbations of real-valued inputs only (not tokens)

            def metric(x: Tensor, y: Tensor) -> float:
                return ev(p, b, x, y)[1]

            robust = probes.robustness(metric, gx, gy, 0.25, self.config.seed + self.cycle)
            shifted = probes.shifted(metric, gx, gy, 5)
        c = self.cost()
        return {
            "cycle": self.cycle,
            "step": self.step,
            "guard_loss": gl,
            "guard_acc": ga,
            "train_loss": tl,
            "train_acc": ta,
            "gap": gl - tl if math.isfinite(tl) else math.nan,
            "old_guard_acc": old,
            "test_acc": test,
            "robust_acc": robust,
            "shifted_acc": shifted,
            "params": c.params,
            "flops": c.flops,
            "memory_bytes": c.activation_bytes + 4 * c.params,
            "batch_size": self.batch_size,
            "meta_lr": self.meta_lr,
        }

    def run_cycle(self) -> None:
        """Evaluate, estimate, propose, verify, decide (the module docstring)."""
        cfg = self.config
        self._apply_approved()
        for m in self.modifiers:
            if m.per_step and self.step > 0:
                keys = [e for e in self.space.entries if e.key in m.needs]
                self._record(
                    Decision(
                        self.cycle,
                        self.step,
                        m.name,
                        "applied",
                        getattr(m, "summary", f"{m.name}: per-step changes since the last cycle"),
                        {e.name: e.natural(self.good.hparams[e.key]) for e in keys},
                        {e.name: e.natural(self.hparams[e.key]) for e in keys},
                    )
                )
        self.pending = [self._next_batch() for _ in range(cfg.lookahead)]
        self._replays = {}
        self._cycle_rng = (
            torch.get_rng_state(),
            torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        )
        probe = self.probe()
        self.history["probes"].append(probe)
        self.event("cycle", "evaluate", "probes", probe)
        dead = verifier.dead(self) if cfg.safeguards else None
        if dead:
            self._rollback(dead)
            self.cycle += 1
            return
        # the reservoir sees the examples the model is about to train on
        for x, y, _ in self.pending:
            self.buffer = replay.add_train(
                self.buffer,
                x,
                y,
                self._batch_loss(x, y),
                self.step,
                self.source_id,
                cfg.replay_size,
                self.rng,
            )
        estimated = any(m.reads_meta_gradient and self.due(m) for m in self.modifiers)
        current, g = math.nan, {}
        if estimated:  # else nobody reads it: the reverse unroll is skipped
            try:
                current, g = self.estimate()
            except NonFiniteError as err:
                if not cfg.safeguards:
                    raise
                self._rollback(f"meta-gradient: {err}")
                self.cycle += 1
                return
        proposals = self.propose(g, probe)
        if proposals and (not estimated or (cfg.verify_on == "held_out" and cfg.safeguards)):
            current = self.verify_baseline()
        for proposal in proposals:
            self.verify_and_decide(proposal, current)
        self.good = self.state.clone()
        self.cycle += 1

    def estimate(self) -> tuple[float, Params]:
        """``(guard loss after the lookahead, d it / d hparams)`` by ``config.estimator``."""
        est = hypergrad.ESTIMATORS[self.config.estimator]
        k = self.config.lookahead
        opts = {
            "checkpointed": {"segments": max(1, round(math.sqrt(k)))},
            "truncated": {"window": max(1, k // 2)},
        }.get(self.config.estimator, {})
        s = self.state

        def outer(params: Params, hparams: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
            return self.outer_loss(params, hparams, batch, s.buffers)

        with self.cycle_randomness(), sdpa_kernel([SDPBackend.MATH]):
            res = est(
                self.inner_loss(s.buffers),
                outer,
                self.opt,
                s.params,
                s.hparams,
                self.pending,
                self.guard("propose"),
                state=s.opt_state,
                **opts,
            )
        g = dict(res.hparams)
        if self.config.meta_horizon and "log_lr" in g:
            g["log_lr"] = g["log_lr"] + self.horizon_term(res.params, s.opt_state)
        if not tree.is_finite(g):
            raise NonFiniteError("hypergradient", hint="meta learning rate backed off")
        return float(res.value), g

    def horizon_term(self, dparams: Params | None, opt_state: Any) -> Tensor:
        """``(T,)``: ``d guard / d theta_0 [i] . z[i]`` per tensor ``i``, the past base steps'
        part of ``d guard / d log lr_i`` (:func:`selfmod.optim.sum_updates`: ``z`` is the
        first-order tangent ``d theta_0 / d log lr``, discounted over ``meta_horizon`` steps)."""
        if dparams is None:
            raise SelfmodError("meta_horizon: the estimator gave no gradient w.r.t. the params")
        z = opt_state[-1].total
        return torch.stack([(dparams[n] * z[n]).sum() for n in self.names]).to(self.dtype)

    def verify_baseline(self) -> float:
        """The verifier's reference: the guard loss on the ``"verify"`` part after the
        lookahead from the current state, without any change."""
        p_cur, _ = self.replay(self.state, None)
        with torch.no_grad():
            batch = self.guard("verify")
            return float(self.outer_loss(p_cur, self.hparams, batch, self.state.buffers))

    def batch_grads(self, n: int) -> list[Params]:
        """Gradients of the training loss on each of the first ``n`` lookahead batches."""
        out = []
        loss_fn = self.inner_loss(self.state.buffers)
        for batch in self.pending[:n]:
            p = tree.detach(self.params, True)
            with torch.enable_grad(), self.cycle_randomness():
                loss = loss_fn(p, self.hparams, batch)
                gs = torch.autograd.grad(loss, list(p.values()), materialize_grads=True)
            out.append(dict(zip(p, gs, strict=True)))
        return out

    def propose(self, g: Params, probe: dict[str, float]) -> list[Proposal]:
        """Every due modifier's proposals, in registry order; proposals that share a ``group``
        become one joint proposal at the place of the first."""
        ctx = Context(
            self.state, self.problem, self.cycle, probe, g, self.pending, self.config,
            self.batch_grads, self.rng,
        )  # fmt: skip
        slots: list[Proposal | str] = []
        groups: dict[str, list[Proposal]] = {}
        for m in self.modifiers:
            if not self.due(m):
                continue
            proposals, memory = m.propose(ctx, self.state.memory.get(m.name, {}))
            self.state = replace(self.state, memory={**self.state.memory, m.name: memory})
            for p in proposals:
                if p.group is None:
                    slots.append(p)
                    continue
                if p.group not in groups:
                    groups[p.group] = []
                    slots.append(p.group)
                groups[p.group].append(p)
        return [merge(s, groups[s]) if isinstance(s, str) else s for s in slots]

    def apply_proposal(self, proposal: Proposal, state: RunState) -> RunState:
        """``state`` with ``proposal`` applied by its modifier (pure), every tensor row-major
        whatever layout the modifier returned (:meth:`RunState.contiguous`)."""
        if proposal.parts:
            for part in proposal.parts:
                state = self.apply_proposal(part, state)
            return state
        by_name = {m.name: m for m in self.modifiers}
        m = by_name.get(proposal.modifier) or _registered(proposal.modifier, self.config)
        changed = m.apply(proposal, state, self.problem) if m else apply_plain(proposal, state)
        return changed.contiguous()

    def verify_and_decide(self, proposal: Proposal, current: float) -> None:
        """Apply ``proposal`` to a copy, replay the lookahead, check every invariant; commit
        (auto), queue (manual) or reject. The run changes only on commit."""
        cfg = self.config
        proposed = self.apply_proposal(proposal, self.state)
        before = self.values()
        tol = proposal.tolerance(cfg.epsilon)
        if cfg.safeguards:
            reason, value = verifier.check(self, proposed, current, tol)
        else:
            reason, value = None, math.nan
        after = self.values(proposed)
        if reason is None:
            decision = "pending" if cfg.approval == "manual" else "commit"
            reason = (
                f"guard loss {value:.6g} vs {current:.6g} (tolerance x{1 + tol:g}); invariants hold"
                if cfg.safeguards
                else "committed unchecked (safeguards off)"
            )
        else:
            decision = "reject"
        d = Decision(
            self.cycle,
            self.step,
            proposal.modifier,
            decision,
            reason,
            before,
            after,
            current,
            value,
        )
        self._record(d, proposal)
        if decision == "commit":
            shift.record_commit(self, self.state, proposed, proposal.modifier)  # a meta-metric
            self.state = proposed

    def _apply_approved(self) -> None:
        """Manual approval: at the start of a cycle, apply every approved pending change, in
        order, and expire the ones older than ``approval_expiry`` cycles past their next cycle
        (approved or not: a change verified against an old state is not applied late)."""
        if self.config.approval != "manual":
            return
        for seq, cycle, change, approved in self.recorder.pending(self):
            if seq in self.applied:
                continue
            late = self.cycle - cycle - 1 > self.config.approval_expiry
            if not (late or approved):
                continue
            self.applied.add(seq)
            proposal = Proposal.from_json(change, self.hparams)
            before = self.values()
            if late:
                decision = "expired"
                reason = (
                    f"proposal {seq} from cycle {cycle} expired "
                    f"(approval_expiry {self.config.approval_expiry})"
                )
            else:
                self.state = self.apply_proposal(proposal, self.state)
                decision, reason = "applied", f"approved proposal {seq} applied"
            d = Decision(
                self.cycle, self.step, proposal.modifier, decision, reason, before, self.values()
            )
            self._record(d, extra={"proposal": seq})

    # ------------------------------------------------------------------ records

    def _record(
        self, d: Decision, proposal: Proposal | None = None, extra: dict | None = None
    ) -> None:
        payload = {
            "modifier": d.modifier,
            "before": d.before,
            "after": d.after,
            "guard_current": d.guard_current,
            "guard_proposed": d.guard_proposed,
            "change": {**(proposal.to_json() if proposal else {}), **(extra or {})},
            "info": proposal.info if proposal else {},
        }
        kind = "rollback" if d.decision == "rollback" else "proposal"
        seq = self.recorder.record(self, kind, d.decision, d.reason, jsonable(payload))
        d.id = seq if seq is not None else len(self.history["decisions"]) + 1
        self.history["decisions"].append(d.__dict__.copy())

    def event(self, kind: str, decision: str, reason: str, payload: dict) -> None:
        """One ledger entry that is no decision (a shift, a resume, a divergence)."""
        self.recorder.record(self, kind, decision, reason, jsonable(payload))

    # ------------------------------------------------------------------ checkpoints

    COUNTERS = (
        "step", "cycle", "average", "first_loss", "last_loss", "seconds", "divergences",
        "diverged_at", "shift_cycle", "cycled_at", "source_id", "examples",
    )  # fmt: skip
    #: counters added after checkpoints were first written: absent from older ones (None)
    LATER_COUNTERS = ("examples",)

    def checkpoint(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``(tensors, meta)``: the whole run, flattened by name (see :mod:`.state`)."""
        tensors, scalars = flatten(self.state, "state")
        t2, s2 = flatten(self.good, "good")
        tensors.update(t2)
        scalars.update(s2)
        tensors.update({f"replay.{k}": v for k, v in self.buffer._asdict().items()})
        tensors["rng.controller"] = self.rng.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {k: getattr(self, k) for k in self.COUNTERS}
        meta.update(
            {
                "scalars": scalars,
                "applied": sorted(self.applied),
                "stream": self.sources[self.source_id].train.position(),
                "python_random": jsonable(random.getstate()),
                "numpy_random": jsonable(np.random.get_state()),
                "history": jsonable(self.history),
            }
        )
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
        tensors.update(rngs)
        self.rng.set_state(tensors["rng.controller"])
        torch.set_rng_state(tensors["rng.torch"])
        random.setstate(_tuples(meta["python_random"]))
        st = meta["numpy_random"]
        np.random.set_state((st[0], np.array(st[1], dtype=np.uint32), *st[2:]))
        for k in self.COUNTERS:
            setattr(self, k, meta.get(k) if k in self.LATER_COUNTERS else meta[k])
        self.applied = set(meta["applied"])
        self.sources[self.source_id].train.seek(meta["stream"])
        self.history = meta["history"]
        self.pending, self.inbox = [], []

    def _read_state(self, tensors: dict[str, Tensor], scalars: dict[str, Any], p: str) -> RunState:
        params = {k: tensors[f"{p}.params['{k}']"] for k in self.names}
        template = RunState(
            params,
            {k: v for k, v in _under(tensors, f"{p}.buffers").items()},
            self.opt.init(params),
            _under(tensors, f"{p}.hparams"),
            0,
            memory_template(tensors, p),
            0.0,
        )
        return unflatten(template, tensors, scalars, prefix=p)

    def summary(self) -> dict[str, Any]:
        """Test loss and metric, cost, widths, decisions, the final hyperparameters and the
        meta-metrics that need no baseline (:func:`.probes.meta_metrics`; the final internal
        gap is measured here, at the current parameters)."""
        tl, tm = self._test(self.sources[self.source_id])
        p, b = self.params, self.state.buffers
        gap = self.problem.evaluate(p, b, *self.guard())[0]
        gap -= self.problem.evaluate(p, b, *replay.split(self.buffer, replay.TRAIN))[0]
        c = self.cost()
        decisions = self.history["decisions"]
        count = {
            k: sum(d["decision"] == k for d in decisions)
            for k in ("commit", "reject", "rollback", "pending")
        }
        return {
            "test_accuracy": tm if self.problem.metric == "accuracy" else None,
            "test_metric": tm,
            "metric_name": self.problem.metric,
            "test_loss": tl,
            "seconds": self.seconds,
            "params": c.params,
            "flops": c.flops,
            "widths": self.widths(),
            "steps": self.step,
            "examples": self.examples,
            "divergences": self.divergences,
            "diverged_at": self.diverged_at,
            "tensor_names": self.names,
            "unused_tensors": self.unused_tensors(),
            "modifiers": [m.name for m in self.modifiers],
            "modifiers_skipped": dict(self.skipped),
            "decisions": {k: count[k] for k in ("commit", "reject", "rollback")},
            **{f"n_{k}": v for k, v in count.items()},
            **self.values(),
            "meta_metrics": probes.meta_metrics(
                self.history["probes"], self.shift_cycle, self.history.get("self_shift", []), gap
            ),
        }


# ----------------------------------------------------------------------------- helpers


DTYPES = {"float32": torch.float32, "float64": torch.float64}


def device_of(cfg: Any) -> torch.device:
    """``cfg.device`` (``"auto"``: CUDA when available), checked."""
    name = cfg.device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SelfmodError(
            f"device must be 'cpu' or 'auto' here: CUDA is not available (got {name!r})"
        )
    return torch.device(name)


def _registered(name: str, config: Any) -> Modifier | None:
    cls = registry().get(name)
    return cls.from_config(config) if cls else None


def _under(tensors: dict[str, Tensor], head: str) -> Params:
    """``{key: tensor}`` for names ``head['key']`` (one level)."""
    out = {}
    for name, t in tensors.items():
        if name.startswith(head + "['") and name.endswith("']") and "']['" not in name[len(head) :]:
            out[name[len(head) + 2 : -2]] = t
    return out


def _to(x: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(x, Tensor):
        return x.to(device, dtype) if x.is_floating_point() else x.to(device)
    return x


def jsonable(x: Any) -> Any:
    """Tensors, numpy values and tuples as JSON-able Python values."""
    if isinstance(x, Tensor | np.ndarray):
        return x.tolist()
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.integer | np.floating):
        return x.item()
    return x


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x
