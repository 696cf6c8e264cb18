"""One run into a run directory, start to end: the one sequence behind ``selfmod train``,
``selfmod resume``, :func:`~selfmod.runs.fit` and (its opening and end)
:class:`~selfmod.runs.SelfModifier`.

    with distributed.session() as coll:
        run_dir, cfg = on_main(coll, lambda: open_run_dir(None, cfg, resume=False))
        outcome = drive(problem, sources, cfg, run_dir, collective=coll)

:func:`drive` holds the run directory's lock, builds the loop with its recorder (resumed from
the newest checkpoint if asked), runs it, runs the fixed baseline from the same start, writes
the final files and ``status.json``, and lets go of the directory and the process group.
Under ``torchrun`` every rank drives; rank 0 alone writes the run directory.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from rich.console import Console
from safetensors.torch import save

from selfmod.checkpoint import list_checkpoints
from selfmod.determinism import set_deterministic
from selfmod.errors import SelfmodError
from selfmod.files import atomic_write_bytes, atomic_write_text
from selfmod.introspect.loop import Loop, Recorder, Source, device_of, jsonable
from selfmod.introspect.modifiers import Modifier
from selfmod.introspect.probes import against_fixed
from selfmod.introspect.problem import Problem
from selfmod.runs import distributed
from selfmod.runs.ledger import Ledger
from selfmod.runs.lock import run_lock
from selfmod.runs.logs import Logs
from selfmod.runs.recorder import RunRecorder
from selfmod.runs.rundir import check_links, ledger_rows, write_status

#: the fixed baseline's problem and sources, made when the tuned run is done
Baseline = Callable[[], tuple[Problem, Sequence[Source]]]


class Outcome(NamedTuple):
    """What :func:`drive` returns."""

    run: Loop  # the tuned run, done
    fixed: Loop | None  # the fixed baseline, if one was asked for
    history: dict[str, Any] | None  # history.json as written (None on ranks other than 0)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run at ``step``; its ``status.json`` says so (on rank 0) and
    ``selfmod resume`` continues it."""

    def __init__(self, run_dir: Path, step: int, main: bool) -> None:
        super().__init__(f"interrupted at step {step}")
        self.run_dir, self.step, self.main = run_dir, step, main


def on_main(collective: distributed.Collective | None, fn: Callable[[], Any]) -> Any:
    """``fn()`` here on one process; under ``torchrun`` on rank 0 alone, its value (or its
    one-line error) on every rank."""
    return fn() if collective is None else collective.from_main(fn)


def from_config(cfg: Any, imports: Any = None) -> tuple[Problem, list[Any], Baseline | None]:
    """``(problem, splits, baseline)`` of a config: its model, data and loss, built-in or
    imported and checked (:func:`~selfmod.runs.imports.build_problem`, once; a resumed run's
    imports only as ``imports`` allows, an :class:`~selfmod.runs.imports.Imports`), and with
    ``compare_fixed`` the fixed baseline's: a copy of the same initial weights, the same data.
    Sets torch's CPU threads to ``cfg.threads`` first."""
    from selfmod.introspect.builtin import sources_of
    from selfmod.runs.imports import build_problem

    torch.set_num_threads(cfg.threads)
    problem, splits = build_problem(cfg, imports)
    if not cfg.compare_fixed:
        return problem, splits, None
    start = copy.deepcopy(problem.module)  # before any loop moves it to its device and dtype

    def baseline() -> tuple[Problem, Sequence[Source]]:
        fixed = Problem(start, problem.loss, metric=problem.metric)
        return fixed, sources_of(splits, cfg.seed)

    return problem, splits, baseline


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
    set_deterministic(cfg.deterministic, warn_only=cuda)
    main = collective is None or collective.main
    recorder = (
        RunRecorder(run_dir, cfg.keep_checkpoints, cfg.run_id)
        if run_dir is not None and main
        else None
    )
    loop = Loop(problem, sources, cfg, modifiers=modifiers, recorder=recorder)
    if recorder is not None:  # the data and config the run began on, or one line
        recorder.start(loop)
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


def drive(
    problem: Problem,
    sources: Sequence[Source],
    cfg: Any,
    run_dir: Path,
    *,
    resume: bool = False,
    modifiers: Sequence[Modifier] | None = None,
    baseline: Baseline | None = None,
    collective: distributed.Collective | None = None,
    logs: Console | None = None,
    on_start: Callable[[Loop], None] | None = None,
    on_step: Callable[[Loop], None] | None = None,
    on_baseline_step: Callable[[Loop], None] | None = None,
    on_race_step: Callable[[Loop, str, int, int], None] | None = None,
) -> Outcome:
    """Run (or ``resume``) the run in ``run_dir`` to ``cfg.steps``, holding its lock: one job
    per run (under ``torchrun``, rank 0 holds it and alone writes the run directory).

    Then the fixed baseline (``baseline``: its problem and sources, from the same start) and
    the final files (:func:`finish`). ``on_start(run)`` once the run is built (resumed: at its
    step), ``on_step(run)`` after each of its base steps, ``on_baseline_step(fixed)`` after
    each of the baseline's, ``on_race_step(run, race, done, total)`` after each step of a race
    at the run's start (:meth:`Loop.run`). Ctrl-C in the run leaves ``status.json``
    interrupted and raises :class:`Interrupted`. The returned loops are detached from the
    directory and the process group: nothing more goes into either."""
    main = collective is None or collective.main
    with run_lock(run_dir) if main else contextlib.nullcontext():
        if main:
            check_links(run_dir)
        run, recorder = build_run(
            problem, sources, cfg, run_dir, modifiers=modifiers, resume=resume, logs=logs,
            collective=collective,
        )  # fmt: skip
        if main:
            write_status(run_dir, "running", run.step)
        if on_start is not None:
            on_start(run)
        try:
            run.run(on_step=on_step, on_race_step=on_race_step)
        except KeyboardInterrupt:  # the run stops where it is; resume continues it
            if main:
                write_status(run_dir, "interrupted", run.step)
            raise Interrupted(run_dir, run.step, main) from None
        if collective is not None:
            collective.agree(run)
        fixed = None
        if baseline is not None:
            fixed = Loop(*baseline(), cfg, tune=False)
            fixed.collective = collective
            fixed.run(on_step=on_baseline_step)
        if recorder is not None:
            recorder.close()
        history = finish(run_dir, run, fixed, cfg) if main else None
    run.recorder = Recorder()  # the run directory is complete: nothing more goes in it
    run.collective = None  # the process group ends with the caller's session
    if fixed is not None:
        fixed.collective = None
    return Outcome(run, fixed, history)


def finish(run_dir: Path, run: Loop, fixed: Loop | None, cfg: Any) -> dict[str, Any]:
    """Final weights, ``history.json``, ``summary.json``, (``cfg.report``) ``report.html`` and
    last ``status.json`` complete; returns the history written."""
    from selfmod.runs.report import write_report

    data = save(
        {k: v.detach().contiguous().cpu() for k, v in {**run.params, **run.state.buffers}.items()}
    )
    atomic_write_bytes(run_dir / "final.safetensors", data)
    sha = hashlib.sha256(data).hexdigest()
    with Ledger(run_dir / "ledger.sqlite", create=False) as ledger:  # what completion is
        ledger.append(
            "event", cycle=run.cycle, step=run.step, decision="complete",
            reason=f"run complete at step {run.step}", payload={"final_sha256": sha},
        )  # fmt: skip
        head = ledger.head()  # the entry just appended: the final weights' place in the chain
    final = {
        "file": "final.safetensors",
        "step": run.step,
        "sha256": sha,
        "torch": torch.__version__,
        "ledger_head": list(head),
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
    write_status(run_dir, "complete", run.step)
    return history


SUMMARY_KEYS = (
    "test_accuracy", "test_metric", "metric_name", "test_loss", "params", "flops", "seconds",
    "meta_seconds", "base_seconds", "meta_overhead", "widths", "decisions", "steps", "examples",
    "meta_examples", "meta_share", "cycles_skipped", "best_verified", "diverged_at",
    "meta_metrics",
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
