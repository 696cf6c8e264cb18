"""Self-modification for any PyTorch model, into a run directory.

    result = fit(model, F.cross_entropy, (x_train, y_train), (x_guard, y_guard),
                 test=(x_test, y_test), optimizer="adamw", config={"steps": 2000})
    result.module       # the trained nn.Module, in its final shape
    result.summary      # test metric and loss, params, FLOPs, widths, decisions
    result.run_dir      # config.json, ledger.sqlite, checkpoints/, summary.json, report.html

For a training loop you own (as with Accelerate), one call per batch::

    sm = SelfModifier(model, F.cross_entropy, (x_guard, y_guard), optimizer="adamw")
    for x, y in loader:
        sm.step((x, y))    # cycles (evaluate, estimate, propose, verify, decide) happen inside
    module = sm.module()

Training data: a ``(X, Y)`` tensor pair, a map-style ``Dataset``, or any re-iterable of ``(x, y)``
batches (see :mod:`selfmod.data.streams`). Guard and test data: a pair, a ``Dataset`` or batches.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from selfmod import arch
from selfmod.data.streams import as_batches
from selfmod.determinism import set_deterministic
from selfmod.errors import SelfmodError
from selfmod.introspect.config import TrainConfig
from selfmod.introspect.loop import Loop, Source
from selfmod.introspect.modifiers import Modifier
from selfmod.introspect.problem import Problem, default_metric, write_into
from selfmod.runs import arguments, distributed
from selfmod.runs.config import validate
from selfmod.runs.lock import run_lock
from selfmod.runs.rundir import open_run_dir
from selfmod.runs.session import build_run, drive, finish, on_main, summary_record, tuned_summary


@dataclass
class FitResult:
    """What :func:`fit` returns."""

    module: nn.Module  # trained, in its final shape
    summary: dict[str, Any]
    run_dir: Path | None
    run: Loop


#: what ``fit`` and ``SelfModifier`` set beyond :class:`TrainConfig`'s defaults (which keep
#: ``selfmod train``'s demonstration run as it was): chosen on the development panel by the
#: rule written in :mod:`selfmod.bench.panel`, among settings in which the run changes itself
#: (``benchmarks/results/panel_dev.md``, tag ``down07-nomods``; the race's length then by the
#: same rule, ``panel_dev_lean.md``, tag ``lean-race04``; the schedule, ``panel_dev_wsd.md``, tag
#: ``wsd``): AdamW from lr 1e-2 (torch's weight decay 0.01) on a warm-up, stable, decay schedule
#: over the examples budget (cool-down over the last 20%); the rates' level raced against
#: x0.1 and x0.3 over the first 4% of the steps; the best verified state returned.
#: The per-cycle tuning modifiers (rates per tensor, weight decay, batch size, growth, pruning)
#: are named to be used: on the panel, at its budgets, they did not pay for their cost;
#: ``modifiers = []`` here stands for the choices the model marks (:func:`marked`).
FIT_DEFAULTS: dict[str, Any] = {
    "lr": 1e-2,
    "weight_decay": 0.01,
    "level_race": [0.1, 0.3],  # the run's first 4% decides the rates' level (.introspect.race)
    "race_share": 0.04,
    "modifiers": [],
    "estimator": "first_order",  # no graph through the lookahead: memory of one gradient
    "budget_unit": "examples",  # a grown batch buys fewer steps, never more examples
    "meta_budget": 0.3,  # self-modification's work <= 0.3 x the examples budget
    "probe_rows": 256,
    "lr_schedule": "wsd",
    "keep_best": True,
    "log_test": False,  # the test set read once, at the end (log points: the guard set)
    "log_share": 0.05,  # log points' guard passes <= 5% of the base training
    "modifiers.lr.level_step": 0.7,
    "modifiers.lr.lr_mean": "free",
    "modifiers.grow.grow_beats_noise": True,
    "compare_fixed": False,
}
#: ``SelfModifier``'s: its batches come one at a time, so there is no race before them; the
#: per-cycle modifiers do the tuning (every one that applies)
STEP_DEFAULTS: dict[str, Any] = {**FIT_DEFAULTS, "level_race": [], "modifiers": None}


def marked(model: nn.Module) -> list[str]:
    """The modifiers of the choices ``model`` marks: ``choice`` for a
    :class:`selfmod.arch.Choice`, ``inner_lr`` for a TTT layer built with ``tune_lr=True``
    (``fit`` runs these by default, the per-cycle tuning modifiers only where named)."""
    from selfmod.introspect.modifiers.choice import choice_sites
    from selfmod.introspect.modifiers.inner_lr import sites

    has = {
        "choice": bool(choice_sites(model)),
        "inner_lr": bool(sites(dict(model.named_buffers()))),
    }
    return [name for name, yes in has.items() if yes]


def race_share(model: nn.Module, config: Any, guard_rows: int) -> float:
    """The share of the examples budget that the options' race of ``model``'s choices may
    spend at most, rounded up to a hundredth: its training with a level race after it,
    ``race x (K + race_keep)`` for ``K`` candidates, and its guard reads (each at most
    ``guard_rows``; :func:`selfmod.introspect.option_race.planned`); 0 where the run has no
    such race. ``fit`` adds it to its default ``meta_budget``, so that the race runs its length
    and the cycles keep the share they have in a run without choices."""
    from selfmod.introspect.modifiers.choice import choice_sites
    from selfmod.introspect.option_race import candidates, planned, rung_steps

    if config.modifiers is not None and "choice" not in config.modifiers:  # None: every one
        return 0.0
    settings, sites = config.settings_of("choice"), choice_sites(model)
    found, _ = candidates([model.get_submodule(c).names for c in sites]) if sites else ([], "")
    if not found or not settings.race:
        return 0.0
    h, rows = rung_steps(settings.race, config.steps), (guard_rows, guard_rows)
    k, keep, reads = len(found), settings.race_keep, settings.race_reads
    most = planned(h, config.batch_size, k, keep, rows, True, reads)
    return math.ceil(100 * most / (config.steps * config.batch_size)) / 100


def make_config(config: Any = None, **defaults: Any) -> Any:
    """A validated :class:`TrainConfig` from ``None``, a dict or a config (``defaults`` first,
    then the given values)."""
    if isinstance(config, TrainConfig):
        return config
    values = {**defaults, **(config or {})}
    return validate(values)


def _problem(
    model: nn.Module,
    loss: Callable[[Any, Tensor], Tensor],
    y_guard: Tensor,
    metric: str | None,
    groups: Sequence[arch.UnitGroup] | None,
) -> Problem:
    return Problem(model, loss, metric=default_metric(y_guard, metric), groups=groups)  # type: ignore[arg-type]


def _prepare(
    model: nn.Module,
    loss: Callable[[Any, Tensor], Tensor],
    guard: Any,
    test: Any,
    optimizer: str,
    config: Any,
    metric: str | None,
    groups: Sequence[arch.UnitGroup] | None,
    modifiers: Any = None,
    *more: Any,
    train: Any = arguments.FROM_STEPS,
    defaults: dict[str, Any] = FIT_DEFAULTS,
) -> tuple[
    Any, Problem, tuple[Tensor, Tensor], tuple[Tensor | None, Tensor | None], arguments.Probe
]:
    """``(config, problem, guard pair, test pair, what the probe found)`` of the public entry
    points (``fit`` and
    ``SelfModifier`` train no fixed baseline unless ``compare_fixed`` is given), every argument
    checked first (:mod:`selfmod.runs.arguments`: one line naming the argument and the fix);
    ``train``: ``fit``'s training data, checked against the guard."""
    arguments.check_arguments(loss, optimizer, config, modifiers, groups, metric, *more)
    arguments.check_model(model)
    if defaults.get("modifiers") == []:  # fit: the choices the model marks, where it has any
        defaults = {**defaults, "modifiers": marked(model)}
    cfg = make_config(config, **defaults, optimizer=optimizer)
    gx, gy = arguments.materialized("guard", guard)
    arguments.check_pair("guard", gx, gy)
    extra = race_share(model, cfg, len(gy)) if isinstance(config, dict | None) else 0.0
    if extra and defaults.get("meta_budget") and "meta_budget" not in (config or {}):
        defaults = {**defaults, "meta_budget": round(defaults["meta_budget"] + extra, 6)}
        cfg = make_config(config, **defaults, optimizer=optimizer)
    tx, ty = arguments.materialized("test", test) if test is not None else (None, None)
    if tx is not None:
        arguments.check_pair("test", tx, ty, like=(gx, gy))
    if train is not arguments.FROM_STEPS:
        arguments.check_train(train, (gx, gy))
    problem = _problem(model, loss, gy, arguments.metric_for(metric, gy), groups)
    found = arguments.probe(problem, loss, gx, gy)
    arguments.check_labels("guard", gy, found)
    if ty is not None:
        arguments.check_labels("test", ty, found)
    if arguments.is_pair(train):
        arguments.check_labels("train", train[1], found)
    return cfg, problem, (gx, gy), (tx, ty), found


def fit(
    model: nn.Module,
    loss: Callable[[Any, Tensor], Tensor],
    train: Any,
    guard: Any,
    *,
    test: Any = None,
    optimizer: str = "adamw",
    config: dict[str, Any] | Any = None,
    modifiers: Sequence[Modifier] | None = None,
    groups: Sequence[arch.UnitGroup] | None = None,
    metric: str | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    on_step: Callable[[Loop], None] | None = None,
) -> FitResult:
    """Train ``model`` on ``train`` while it modifies itself, verified on ``guard``.

    ``loss(output, target) -> scalar``; ``metric``: ``"accuracy"`` or ``"loss"`` (default:
    accuracy for integer targets). ``config``: :class:`TrainConfig` fields (``steps``, ``lr``,
    ``cycle``, ``modifiers``, ...) over :data:`FIT_DEFAULTS` (a warm-up, stable, decay schedule
    over an examples budget, the rates' level raced at the start, early stopping; the per-cycle
    modifiers where named, ``{"modifiers": None}`` for every one that applies). ``modifiers``:
    modifier objects instead of the config's names (third-party ones too). ``run_dir``: where
    the ledger, checkpoints, summary and report go (default: a new folder under
    ``config.out``); ``resume=True`` continues the run in ``run_dir``.
    """
    cfg, problem, (gx, gy), (tx, ty), _ = _prepare(
        model, loss, guard, test, optimizer, config, metric, groups,
        modifiers, run_dir, resume, on_step, train=train,
    )  # fmt: skip
    initial = copy.deepcopy(model) if cfg.compare_fixed else None
    source = Source(as_batches(train, cfg.seed), gx, gy, tx, ty)

    def baseline() -> tuple[Problem, list[Source]]:  # the fixed run: the same start and data
        fixed_source = Source(as_batches(train, cfg.seed), gx, gy, tx, ty)
        return _problem(initial, loss, gy, metric, groups), [fixed_source]  # type: ignore[arg-type]

    with distributed.session() as coll, global_state_kept():
        run_dir, cfg = on_main(coll, lambda: open_run_dir(run_dir, cfg, resume, by="fit"))
        run, fixed, history = drive(
            problem, [source], cfg, run_dir, resume=resume, modifiers=modifiers,
            baseline=baseline if initial is not None else None, collective=coll, on_step=on_step,
        )  # fmt: skip
    arguments.check_trained(run)
    module = problem.export(run.params, run.state.buffers)
    if history is not None:  # the main process: the summaries finish() wrote, not measured twice
        summary = summary_record(history["tuned_summary"], history["fixed_summary"])
    else:
        summary = summary_record(tuned_summary(run, fixed), fixed.summary() if fixed else None)
    return FitResult(module, summary, run_dir, run)


@contextlib.contextmanager
def global_state_kept() -> Iterator[None]:
    """Leave torch's, numpy's and Python's global random states and torch's deterministic
    algorithms setting as they were: a run seeds and sets them for itself (``seed``,
    ``deterministic``), and the caller's program goes on with its own."""
    rngs = torch.get_rng_state(), np.random.get_state(), random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    mode = torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        torch.set_rng_state(rngs[0])
        np.random.set_state(rngs[1])
        random.setstate(rngs[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        set_deterministic(mode, warn_only=warn)


class SelfModifier:
    """The step-level API: ``step((x, y))`` once per batch of a loop you own.

    At every ``cycle``-th step it queues ``lookahead`` batches, runs the cycle (evaluate,
    estimate, propose, verify, commit / reject / roll back) and trains on them; checkpoints and
    the ledger go to ``run_dir`` when given. ``SelfModifier(..., run_dir=d, resume=True)``
    continues a run: feed it the batches from ``.steps_done`` on.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: Callable[[Any, Tensor], Tensor],
        guard: Any,
        *,
        test: Any = None,
        optimizer: str = "adamw",
        config: dict[str, Any] | Any = None,
        modifiers: Sequence[Modifier] | None = None,
        groups: Sequence[arch.UnitGroup] | None = None,
        metric: str | None = None,
        run_dir: str | Path | None = None,
        resume: bool = False,
    ) -> None:
        cfg, self.problem, (gx, gy), (tx, ty), self._probe = _prepare(
            model, loss, guard, test, optimizer, config, metric, groups, modifiers, run_dir,
            resume, defaults=STEP_DEFAULTS,
        )  # fmt: skip
        source = Source(_NoStream(), gx, gy, tx, ty)
        self.run_dir, self._lock = None, contextlib.ExitStack()  # the run lock, till close()
        with contextlib.ExitStack() as failed:
            failed.callback(self._lock.close)
            if run_dir is not None:
                if not resume:
                    Path(run_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
                if Path(run_dir).is_dir():
                    self._lock.enter_context(run_lock(run_dir))
                by = "SelfModifier"
                self.run_dir, cfg = open_run_dir(run_dir, cfg, resume, by=by, locked=True)
            self.run, self.recorder = build_run(
                self.problem, [source], cfg, self.run_dir, modifiers=modifiers, resume=resume
            )
            failed.pop_all()

    @property
    def steps_done(self) -> int:
        return self.run.step

    def step(self, batch: tuple[Any, Tensor]) -> int:
        """Take one batch ``(x, y)``; returns the base steps done so far. A batch unlike the
        guard's (kinds, row shapes), of unequal lengths, non-finite or with labels outside the
        model's classes is one :class:`~selfmod.runs.arguments.ArgumentError` line."""
        guard = self.run.sources[0]
        arguments.check_batch(batch, (guard.guard_x, guard.guard_y), self._probe)
        return self.run.push(batch)

    def module(self) -> nn.Module:
        """A copy of the model with the current parameters, in the current shape."""
        return self.problem.export(self.run.params, self.run.state.buffers)

    def summary(self) -> dict[str, Any]:
        return self.run.summary()

    def finish(self) -> dict[str, Any]:
        """Train the batches still queued (without a cycle), write the trained parameters into
        the model you passed (in place, in their final shapes, as an Accelerate-prepared model
        is trained) and, with a run directory, its final weights, ``summary.json`` and
        report; returns the summary."""
        run = self.run
        run.finish_queued()
        write_into(self.problem.module, run.params, run.state.buffers)
        if self.run_dir is not None:
            finish(self.run_dir, run, None, run.config)
        self.close()
        arguments.check_trained(run)
        return summary_record(run.summary(), None)

    def close(self) -> None:
        """Close the ledger and let go of the run directory's lock."""
        if self.recorder is not None:
            self.recorder.close()
        self._lock.close()


class _NoStream:
    """The step-level API's training "stream": batches come from the caller."""

    resizable = False

    def next(self, batch_size: int) -> tuple[Any, Any]:
        raise SelfmodError("SelfModifier takes its batches from step(); none is queued")

    def position(self) -> dict[str, int]:
        return {"source": 0, "epoch": 0, "pos": 0, "n": -1}

    def seek(self, position: dict[str, int]) -> None:
        pass
