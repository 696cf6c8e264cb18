"""``selfmod``: the command line.

selfmod train [CONFIG.toml] [--set key=value ...]   a self-modifying run (and a fixed baseline)
selfmod resume DIR                                  continue from the last complete checkpoint
selfmod report DIR                                  (re)write DIR/report.html
selfmod log DIR                                     the table of changes; verifies the ledger
selfmod approve DIR ID                              approve a pending change (manual approval)
selfmod rollback DIR --to CYCLE                     go back to the checkpoint of a cycle
selfmod meta-train [CONFIG.toml] [--set k=v]        meta-train a learned optimizer
selfmod bench vs-search [--set k=v]                 selfmod against search and self-tuning
selfmod bench practitioners [--set k=v]             selfmod against tuned AdamW, LR-free, TPE, PBT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from selfmod.bench.command import bench
from selfmod.errors import SelfmodError
from selfmod.runs.config import TrainConfig, fields_help, load_config
from selfmod.runs.files import atomic_write_text
from selfmod.validation import ConfigError

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=False,
    help="Gradient-based self-modification for PyTorch.",
)
console = Console(stderr=True)


def _show_version(value: bool) -> None:
    """``--version``: this selfmod's version and torch's, then exit 0.

    ``selfmod.__version__`` is the one source (pyproject reads it), so it names the code that
    runs; installed metadata that says otherwise (a stale editable install) is pointed out.
    """
    if not value:
        return
    import importlib.metadata

    import torch

    import selfmod

    try:
        installed = importlib.metadata.version("selfmod")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        installed = None
    running = getattr(selfmod, "__version__", None) or installed or "unknown"
    stale = f" (installed metadata says {installed}: pip install -e . again)"
    typer.echo(f"selfmod {running}{stale if installed not in (None, running) else ''}")
    typer.echo(f"torch {torch.__version__}")
    raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            callback=_show_version,
            is_eager=True,
            help="Print the versions of selfmod and torch and exit.",
        ),
    ] = False,
) -> None:
    """Gradient-based self-modification for PyTorch."""


@app.command(epilog=fields_help())
def train(
    config: Annotated[Path | None, typer.Argument(help="TOML config; defaults if omitted")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a field: --set steps=500")
    ] = None,
) -> None:
    """Train a model that modifies itself (default: an MNIST-1D MLP; model, data and loss may
    be "package.module:callable"), next to a fixed-configuration run."""
    from selfmod.introspect.builtin import sources_of
    from selfmod.introspect.loop import Loop
    from selfmod.runs import distributed
    from selfmod.runs.api import on_main
    from selfmod.runs.imports import build_problem
    from selfmod.runs.rundir import start_run

    cfg = load_config(config, set_)
    problem, splits = build_problem(cfg)  # imports and shapes checked before a run directory
    Loop(problem, sources_of(splits, cfg.seed), cfg)  # and the modifiers named
    with distributed.session() as coll:
        run_dir, cfg, resume = on_main(coll, lambda: start_run(cfg))
        if resume and on_main(coll, lambda: _completed(run_dir, cfg)):
            return
        _drive(cfg, run_dir, resume=resume, collective=coll)


def _completed(run_dir: Path, cfg: TrainConfig) -> bool:  # type: ignore[valid-type]
    """Whether the run in ``run_dir`` is complete (then says so)."""
    from selfmod.runs.rundir import completed

    step = completed(run_dir, cfg)
    if step is not None:
        Console().print(f"{run_dir} is complete (step {step}); nothing to resume")
    return step is not None


@app.command()
def resume(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    """Continue a run from its newest complete checkpoint (bitwise, in deterministic mode);
    its model, data and loss are imported again from config.json."""
    from selfmod.runs import distributed
    from selfmod.runs.api import on_main
    from selfmod.runs.rundir import config_of

    with distributed.session() as coll:
        cfg = on_main(coll, lambda: config_of(run_dir))
        if on_main(coll, lambda: _completed(run_dir, cfg)):
            return
        _drive(cfg, run_dir, resume=True, collective=coll)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    x: Annotated[
        str, typer.Option("--x", help="training curves against 'step' or 'seconds' (wall clock)")
    ] = "step",
) -> None:
    """Write RUN_DIR/report.html from the run's history and ledger."""
    if x not in ("step", "seconds"):
        raise SelfmodError(f"--x must be 'step' or 'seconds' (got {x!r})")
    from selfmod.runs.rundir import write_run_report

    Console().print(f"report: {write_run_report(run_dir, x)}")


@app.command("log")
def log_(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    """The table of changes (proposals, decisions, rollbacks); verifies the hash chain."""
    from selfmod.runs.rundir import verified_log

    log = verified_log(run_dir)
    table = Table(title=f"{run_dir}: {log.n} ledger entries, hash chain verified")
    for col in ("id", "cycle", "step", "kind", "modifier", "decision", "reason"):
        table.add_column(col)
    for e in log.rows:
        cells = (
            e.seq,
            e.cycle,
            e.step,
            e.kind,
            e.payload.get("modifier", ""),
            e.decision,
            e.reason,
        )
        table.add_row(*map(str, cells))
    keyed = (
        "keyed (HMAC-SHA256)"
        if log.keyed
        else "unkeyed (anyone who can write the run directory can recompute it)"
    )
    Console(width=200).print(table)
    Console(width=200).print(f"hash chain: {keyed}", soft_wrap=True)


@app.command()
def approve(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    id_: Annotated[int, typer.Argument(metavar="ID", help="id of a pending change (selfmod log)")],
) -> None:
    """Approve a pending change of a manual-approval run; the run applies it at its next cycle
    (run with the run stopped; selfmod resume continues), unless it has expired by then
    (approval_expiry)."""
    from selfmod.runs import rundir

    rundir.approve(run_dir, id_)
    Console().print(
        f"approved change {id_}; it is applied at the next cycle "
        f"(selfmod resume {run_dir} if the run is not running)"
    )


@app.command()
def rollback(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    to: Annotated[int, typer.Option("--to", help="cycle to go back to")],
) -> None:
    """Go back to the checkpoint taken at the start of cycle CYCLE; `resume` continues there.

    Verifies every kept checkpoint and the ledger (against the head each checkpoint recorded)
    before it moves anything; moves only checkpoint files, within the checkpoints folder."""
    from selfmod.runs import rundir

    target = rundir.rollback(run_dir, to)
    Console().print(
        f"rolled back to cycle {to} (step {target}); continue with selfmod resume {run_dir}"
    )


@app.command("meta-train")
def meta_train(
    config: Annotated[Path | None, typer.Argument(help="TOML config; defaults if omitted")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a field: --set meta_steps=50")
    ] = None,
    resume_: Annotated[bool, typer.Option("--resume", help="continue from its checkpoint")] = False,
) -> None:
    """Meta-train a learned optimizer (selfmod.meta); works under torchrun too."""
    from selfmod.meta.command import run_meta_train

    run_meta_train(config, set_, resume_)


app.add_typer(bench, name="bench")


# ----------------------------------------------------------------------------- driving a run


def _drive(
    cfg: TrainConfig,  # type: ignore[valid-type]
    run_dir: Path,
    *,
    resume: bool,
    collective: Any = None,
) -> None:
    """Run (or resume) the run in ``run_dir``, holding its lock: one job per run (under
    ``torchrun``, rank 0 holds it and alone writes the run directory)."""
    import contextlib

    from selfmod.runs.lock import run_lock

    main = collective is None or collective.main
    with run_lock(run_dir) if main else contextlib.nullcontext():
        _drive_locked(cfg, run_dir, resume=resume, collective=collective)


def _drive_locked(
    cfg: TrainConfig,  # type: ignore[valid-type]
    run_dir: Path,
    *,
    resume: bool,
    collective: Any = None,
) -> None:
    import torch

    from selfmod.introspect.builtin import sources_of
    from selfmod.introspect.loop import Loop
    from selfmod.runs.api import build_run, finish
    from selfmod.runs.imports import build_problem
    from selfmod.runs.report import summary_rows

    torch.set_num_threads(cfg.threads)
    problem, splits = build_problem(cfg)
    main = collective is None or collective.main
    run, recorder = build_run(
        problem,
        sources_of(splits, cfg.seed),
        cfg,
        run_dir,
        resume=resume,
        logs=console if main else None,
        collective=collective,
    )
    status = run_dir / "status.json"
    if main:
        atomic_write_text(status, json.dumps({"state": "running", "step": run.step}))
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("self-modifying", total=cfg.steps, completed=run.step, info="")

        def tick(r: Loop) -> None:
            if r.step % 10 == 0 or r.step == cfg.steps:
                last = r.history["log"][-1] if r.history["log"] else {}
                info = (
                    f"width {r.widths()} guard {problem.metric} "
                    f"{last.get('guard_acc', float('nan')):.3f}"
                    if last
                    else ""
                )
                progress.update(task, completed=r.step, info=info)

        try:
            run.run(on_step=tick)
        except KeyboardInterrupt:  # Ctrl-C: the run stops where it is; resume continues it
            if main:
                state = {"state": "interrupted", "step": run.step}
                atomic_write_text(status, json.dumps(state))
                console.print(f"interrupted at step {run.step}; selfmod resume {run_dir} continues")
            raise typer.Exit(130) from None
        if collective is not None:
            collective.agree(run)
        fixed = None
        if cfg.compare_fixed:
            t2 = progress.add_task("fixed configuration", total=cfg.steps, info="")
            fixed_problem, fixed_splits = build_problem(cfg)
            fixed = Loop(fixed_problem, sources_of(fixed_splits, cfg.seed), cfg, tune=False)
            fixed.collective = collective
            fixed.run(on_step=lambda r: r.step % 10 == 0 and progress.update(t2, completed=r.step))
    if recorder is not None:
        recorder.close()
    if not main:
        return
    history = finish(run_dir, run, fixed, cfg)
    atomic_write_text(status, json.dumps({"state": "complete", "step": run.step}))
    title = f"{cfg.data}, {cfg.model}: same steps and start" + (
        f" (data shift at step {cfg.shift_step})" if cfg.shift_step else ""
    )
    table = Table(title=title)
    for col in ("", "self-modifying", "fixed configuration"):
        table.add_column(col)
    for row in summary_rows(history):
        table.add_row(*row)
    Console(width=120).print(table)
    report = run_dir / "report.html" if cfg.report else f"off (selfmod report {run_dir})"
    Console().print(f"run: {run_dir}\nreport: {report}")


def main() -> None:
    """Entry point: bad input is one line on stderr and exit code 2, never a traceback."""
    try:
        app()
    except (ConfigError, SelfmodError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # a file the run needs is unreadable or unwritable (permissions, disk)
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
