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
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from safetensors.torch import save
from torch import Tensor, nn

from selfmod import arch
from selfmod.data.streams import as_batches, materialize
from selfmod.errors import SelfmodError
from selfmod.introspect.config import TrainConfig
from selfmod.introspect.loop import Loop, Recorder, Source, device_of, jsonable
from selfmod.introspect.modifiers import Modifier
from selfmod.introspect.probes import against_fixed
from selfmod.introspect.problem import Problem, default_metric
from selfmod.runs import distributed
from selfmod.runs.checkpoint import list_checkpoints
from selfmod.runs.config import validate
from selfmod.runs.files import atomic_write_bytes, atomic_write_text
from selfmod.runs.lock import run_lock
from selfmod.runs.logs import Logs
from selfmod.runs.recorder import RunRecorder
from selfmod.runs.rundir import ledger_head, ledger_rows, open_run_dir


@dataclass
class FitResult:
    """What :func:`fit` returns."""

    module: nn.Module  # trained, in its final shape
    summary: dict[str, Any]
    run_dir: Path | None
    run: Loop


def make_config(config: Any = None, **defaults: Any) -> Any:
    """A validated :class:`TrainConfig` from ``None``, a dict or a config (``defaults`` first,
    then the given values)."""
    if isinstance(config, TrainConfig):
        return config
    values = {**defaults, **(config or {})}
    return validate(values)


def build_run(
    problem: Problem,
    sources: Sequence[Source],
    cfg: Any,
    run_dir: Path | None,
    *,
    modifiers: Sequence[Modifier] | None = None,
    resume: bool = False,
    logs: Console | None = None,
    collective: distributed.Collective | None = None,
) -> tuple[Loop, RunRecorder | None]:
    """The loop with a recorder on ``run_dir`` (``None``: in memory), resumed if asked; with a
    ``logs`` console, also the CSV, TensorBoard and console logs (:mod:`selfmod.runs.logs`).

    With a ``collective`` (several processes) only rank 0 records into ``run_dir`` and reads
    the checkpoint; every other rank continues from rank 0's state (:mod:`.distributed`)."""
    cuda = device_of(cfg).type == "cuda"
    if cfg.deterministic and cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    # some CUDA kernels (adaptive pooling's backward, ...) have no deterministic version:
    # there they warn and the run is reproducible only up to them
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=cuda)
    main = collective is None or collective.main
    recorder = (
        RunRecorder(run_dir, cfg.keep_checkpoints, cfg.run_id)
        if run_dir is not None and main
        else None
    )
    loop = Loop(problem, sources, cfg, modifiers=modifiers, recorder=recorder)
    if resume and main:
        if recorder is None:
            raise SelfmodError("resume needs a run directory")
        if list_checkpoints(run_dir):  # type: ignore[arg-type]
            recorder.resume(loop)
        else:  # killed before its first checkpoint: the config alone defines the run
            loop.event("resume", "resume", "no checkpoint yet: the run starts again at step 0", {})
    if collective is not None:
        loop.recorder = distributed.RankRecorder(recorder, collective)
        loop.collective = collective
        if resume:
            collective.share_run(loop)
    if recorder is not None and logs is not None:
        recorder.logs = Logs(run_dir, logs, start=loop.step)  # type: ignore[arg-type]
    return loop, recorder


def finish(run_dir: Path, run: Loop, fixed: Loop | None, cfg: Any) -> dict[str, Any]:
    """Final weights, ``history.json``, ``summary.json`` and (``cfg.report``) ``report.html``;
    returns the history written."""
    from selfmod.runs.report import write_report

    data = save(
        {k: v.detach().contiguous().cpu() for k, v in {**run.params, **run.state.buffers}.items()}
    )
    atomic_write_bytes(run_dir / "final.safetensors", data)
    final = {
        "file": "final.safetensors",
        "step": run.step,
        "sha256": hashlib.sha256(data).hexdigest(),
        "torch": torch.__version__,
        "ledger_head": list(ledger_head(run_dir)),
    }
    atomic_write_text(run_dir / "final.json", json.dumps(final, indent=1))
    tuned = tuned_summary(run, fixed)
    history = {
        "tuned": run.history,
        "tuned_summary": tuned,
        "fixed": fixed.history if fixed else None,
        "fixed_summary": fixed.summary() if fixed else None,
        "shift_cycle": run.shift_cycle,
        "config": cfg.model_dump(),
    }
    history = json.loads(json.dumps(jsonable(history)))
    atomic_write_text(run_dir / "history.json", json.dumps(history, indent=1))
    summary = summary_record(tuned, history["fixed_summary"])
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    if cfg.report:
        write_report(run_dir, history, ledger_rows(run_dir))
    return history


SUMMARY_KEYS = (
    "test_accuracy", "test_metric", "metric_name", "test_loss", "params", "flops", "seconds",
    "widths", "decisions", "steps", "examples", "diverged_at", "meta_metrics",
)  # fmt: skip


def tuned_summary(run: Loop, fixed: Loop | None) -> dict[str, Any]:
    """``run.summary()`` with the meta-metrics against the fixed baseline added to its
    ``meta_metrics`` (:func:`selfmod.introspect.probes.against_fixed`; ``None`` without one)."""
    out = run.summary()
    base = fixed.history["log"] if fixed is not None else None
    out["meta_metrics"] = {**against_fixed(run.history["log"], base), **out["meta_metrics"]}
    return out


def summary_record(tuned: dict[str, Any], fixed: dict[str, Any] | None) -> dict[str, Any]:
    """``summary.json``: the tuned run's figures and the fixed baseline's (or ``null``)."""
    pick = lambda s: {k: s.get(k) for k in SUMMARY_KEYS}  # noqa: E731
    base = {k: v for k, v in pick(fixed).items() if k != "meta_metrics"} if fixed else None
    return {**pick(tuned), "fixed": base}


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
) -> tuple[Any, Problem, tuple[Tensor, Tensor], tuple[Tensor | None, Tensor | None]]:
    """``(config, problem, guard pair, test pair)`` of the public entry points (``fit`` and
    ``SelfModifier`` train no fixed baseline unless ``compare_fixed`` is given)."""
    cfg = make_config(config, optimizer=optimizer, compare_fixed=False)
    gx, gy = materialize(guard)
    tx, ty = materialize(test) if test is not None else (None, None)
    return cfg, _problem(model, loss, gy, metric, groups), (gx, gy), (tx, ty)


def fit(
    model: nn.Module,
    loss: Callable[[Any, Tensor], Tensor],
    train: Any,
    guard: Any,
    *,
    test: Any = None,
    optimizer: str = "sgd",
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
    ``cycle``, ``modifiers``, ...; ``compare_fixed`` defaults to false here). ``modifiers``:
    modifier objects instead of the config's names (third-party ones too). ``run_dir``: where
    the ledger, checkpoints, summary and report go (default: a new folder under
    ``config.out``); ``resume=True`` continues the run in ``run_dir``.
    """
    cfg, problem, (gx, gy), (tx, ty) = _prepare(
        model, loss, guard, test, optimizer, config, metric, groups
    )
    initial = copy.deepcopy(model) if cfg.compare_fixed else None
    source = Source(as_batches(train, cfg.seed), gx, gy, tx, ty)
    with distributed.session() as coll:
        main = coll is None or coll.main
        run_dir, cfg = on_main(coll, lambda: open_run_dir(run_dir, cfg, resume))
        with run_lock(run_dir) if main else contextlib.nullcontext():
            run, recorder = build_run(
                problem, [source], cfg, run_dir, modifiers=modifiers, resume=resume,
                collective=coll,
            )  # fmt: skip
            if main:
                atomic_write_text(
                    run_dir / "status.json", json.dumps({"state": "running", "step": run.step})
                )
            run.run(on_step)
            if coll is not None:
                coll.agree(run)
            fixed = None
            if initial is not None:
                fixed_problem = _problem(initial, loss, gy, metric, groups)
                fixed_source = Source(as_batches(train, cfg.seed), gx, gy, tx, ty)
                fixed = Loop(fixed_problem, [fixed_source], cfg, tune=False)
                fixed.collective = coll
                fixed.run()
            if main:
                finish(run_dir, run, fixed, cfg)
                atomic_write_text(
                    run_dir / "status.json", json.dumps({"state": "complete", "step": run.step})
                )
            if recorder is not None:
                recorder.close()
            run.recorder = Recorder()  # the run directory is complete: nothing more goes in it
            run.collective = None  # the process group ends here; the run is whole on every rank
            if fixed is not None:
                fixed.collective = None
    module = problem.export(run.params, run.state.buffers)
    fixed_summary = fixed.summary() if fixed else None
    return FitResult(module, summary_record(tuned_summary(run, fixed), fixed_summary), run_dir, run)


def on_main(collective: distributed.Collective | None, fn: Callable[[], Any]) -> Any:
    """``fn()`` here on one process; under ``torchrun`` on rank 0 alone, its value (or its
    one-line error) on every rank."""
    return fn() if collective is None else collective.from_main(fn)


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
        optimizer: str = "sgd",
        config: dict[str, Any] | Any = None,
        modifiers: Sequence[Modifier] | None = None,
        groups: Sequence[arch.UnitGroup] | None = None,
        metric: str | None = None,
        run_dir: str | Path | None = None,
        resume: bool = False,
    ) -> None:
        cfg, self.problem, (gx, gy), (tx, ty) = _prepare(
            model, loss, guard, test, optimizer, config, metric, groups
        )
        source = Source(_NoStream(), gx, gy, tx, ty)
        self.run_dir = None
        if run_dir is not None:
            self.run_dir, cfg = open_run_dir(run_dir, cfg, resume)
        self.run, self.recorder = build_run(
            self.problem, [source], cfg, self.run_dir, modifiers=modifiers, resume=resume
        )

    @property
    def steps_done(self) -> int:
        return self.run.step

    def step(self, batch: tuple[Any, Tensor]) -> int:
        """Take one batch ``(x, y)``; returns the base steps done so far."""
        return self.run.push(batch)

    def module(self) -> nn.Module:
        """A copy of the model with the current parameters, in the current shape."""
        return self.problem.export(self.run.params, self.run.state.buffers)

    def summary(self) -> dict[str, Any]:
        return self.run.summary()

    def finish(self) -> dict[str, Any]:
        """Train the batches still queued (without a cycle) and, with a run directory, write
        its final weights, ``summary.json`` and report; returns the summary."""
        run = self.run
        run.finish_queued()
        if self.run_dir is not None:
            finish(self.run_dir, run, None, run.config)
            atomic_write_text(
                self.run_dir / "status.json", json.dumps({"state": "complete", "step": run.step})
            )
        self.close()
        return summary_record(run.summary(), None)

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()


class _NoStream:
    """The step-level API's training "stream": batches come from the caller."""

    resizable = False

    def next(self, batch_size: int) -> tuple[Any, Any]:
        raise SelfmodError("SelfModifier takes its batches from step(); none is queued")

    def position(self) -> dict[str, int]:
        return {"source": 0, "epoch": 0, "pos": 0, "n": -1}

    def seek(self, position: dict[str, int]) -> None:
        pass
