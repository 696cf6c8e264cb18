"""``selfmod``: the command line.

selfmod train [CONFIG.toml] [--set key=value ...]   a self-modifying run (and a fixed baseline)
selfmod resume DIR [--allow-import M:F ...]         continue from the last complete checkpoint
selfmod report DIR                                  (re)write DIR/report.html
selfmod log DIR                                     the table of changes; verifies the ledger
selfmod approve DIR ID                              approve a pending change (manual approval)
selfmod rollback DIR --to CYCLE                     go back to the checkpoint of a cycle
selfmod meta-train [CONFIG.toml] [--set k=v]        meta-train a learned optimizer
selfmod bench vs-search [--set k=v]                 selfmod against search and self-tuning
selfmod bench practitioners [--set k=v]             selfmod against tuned AdamW, LR-free, TPE, PBT
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from selfmod.bench.command import bench
from selfmod.cli_errors import run as run_app
from selfmod.errors import SelfmodError
from selfmod.runs.config import fields_help, load_config

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=False,
    help="Gradient-based self-modification for PyTorch.",
)
console = Console(stderr=True)


def _resolved(run_dir: Path) -> Path:  # once, as the command takes it
    from selfmod.runs.rundir import resolved

    return resolved(run_dir)


RunDir = Annotated[Path, typer.Argument(help="a run directory", callback=_resolved)]
Config = Annotated[Path | None, typer.Argument(help="TOML config; defaults if omitted")]


def _show_version(value: bool) -> None:
    """``--version``: the running selfmod's (stale installed metadata pointed out), torch's."""
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


_VERSION = typer.Option(
    "--version", "-V", callback=_show_version, is_eager=True,
    help="Print the versions of selfmod and torch and exit.",
)  # fmt: skip


@app.callback()
def _root(version: Annotated[bool, _VERSION] = False) -> None:
    """Gradient-based self-modification for PyTorch."""


@app.command(epilog=fields_help())
def train(
    config: Config = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a field: --set steps=500")
    ] = None,
) -> None:
    """Train a model that modifies itself (default: an MNIST-1D MLP; model, data and loss may
    be "package.module:callable"), next to a fixed-configuration run."""
    from selfmod.introspect.builtin import sources_of
    from selfmod.introspect.loop import Loop
    from selfmod.runs.rundir import start_run
    from selfmod.runs.session import from_config

    cfg = load_config(config, set_)
    made = from_config(cfg)  # imports and shapes checked before a run directory
    Loop(made[0], sources_of(made[1], cfg.seed), cfg)  # and the modifiers named
    # a restarted torchrun job imports again what this command line names, nothing else
    _drive(lambda: start_run(cfg), made, allowed=[cfg.model, cfg.data, cfg.loss])


AllowImport = Annotated[
    list[str] | None,
    typer.Option(
        "--allow-import",
        metavar="MODULE[:CALLABLE]",
        help="import this model, data or loss that config.json names (repeat for each; a "
        "module or package name allows all of its callables); a run directory never runs "
        "code on its own",
    ),
]


@app.command()
def resume(run_dir: RunDir, allow_import: AllowImport = None) -> None:
    """Continue a run from its newest complete checkpoint (bitwise, in deterministic mode).
    Built-in models, data and losses are built again from config.json; a
    "package.module:callable" it names is imported only with --allow-import naming it."""
    from selfmod.runs.rundir import cli_config

    _drive(lambda: (run_dir, cli_config(run_dir), True), allowed=allow_import or [])


def _drive(
    opened: Callable[[], tuple[Path, Any, bool]], made: Any = None, allowed: Sequence[str] = ()
) -> None:
    """Open the run (``opened()`` on rank 0: run directory, config, resume?); unless it is
    complete, drive it (:func:`selfmod.runs.session.drive`) with progress bars and print its
    summary table. ``made``: a new run's problem, built from its config already; ``allowed``:
    what a resumed run may import (:class:`selfmod.runs.imports.Imports`)."""
    from selfmod.introspect.builtin import sources_of
    from selfmod.runs import distributed
    from selfmod.runs.imports import Imports
    from selfmod.runs.rundir import completed
    from selfmod.runs.session import Interrupted, drive, from_config, on_main

    with distributed.session() as coll:
        run_dir, cfg, resume = on_main(coll, opened)
        if resume and (step := on_main(coll, lambda: completed(run_dir, cfg))) is not None:
            if coll is None or coll.main:
                Console().print(f"{run_dir} is complete (step {step}); nothing to resume")
            return
        # a resumed run (a restarted torchrun job's too) is built from its saved config
        imports = Imports.of(allowed, run_dir) if resume else None
        problem, splits, baseline = from_config(cfg, imports) if resume or made is None else made
        bars: dict[str, Any] = {}
        progress = Progress(
            TextColumn("{task.description}"), BarColumn(),
            TextColumn("{task.completed}/{task.total} steps"), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(), console=console,
        )  # fmt: skip

        def start(r: Any) -> None:  # the run is built: errors before this print no bar
            progress.start()
            bars["run"] = progress.add_task(
                "self-modifying", total=cfg.steps, completed=r.step, info=""
            )

        def tick(r: Any) -> None:
            if r.step % 10 == 0 or r.step == cfg.steps:
                last = r.history["log"][-1] if r.history["log"] else {}
                acc = last.get("guard_acc", float("nan"))
                widths = problem.widths(r.params) if last else None
                info = f"width {widths} guard {problem.metric} {acc:.3f}" if last else ""
                progress.update(bars["run"], completed=r.step, info=info)

        def tick_race(r: Any, name: str, done: int, total: int) -> None:
            if name not in bars:
                bars[name] = progress.add_task(name, total=total, info="")
            if done % 10 == 0 or done == total:
                progress.update(bars[name], completed=done)

        def tick_fixed(r: Any) -> None:
            if "fixed" not in bars:
                bars["fixed"] = progress.add_task("fixed configuration", total=cfg.steps, info="")
            if r.step % 10 == 0:
                progress.update(bars["fixed"], completed=r.step)

        try:
            outcome = drive(
                problem, sources_of(splits, cfg.seed), cfg, run_dir, resume=resume,
                baseline=baseline, collective=coll, logs=console, on_start=start,
                on_step=tick, on_baseline_step=tick_fixed, on_race_step=tick_race,
            )  # fmt: skip
        except Interrupted as stop:  # Ctrl-C: the run stops where it is; resume continues it
            if stop.main:
                console.print(
                    f"interrupted at step {stop.step}; selfmod resume {run_dir} continues"
                )
            raise typer.Exit(130) from None
        finally:
            if progress.live.is_started:  # stopping one never started prints a line
                progress.stop()
    if outcome.history is not None:  # rank 0
        _summary(cfg, run_dir, outcome.history)


def _summary(cfg: Any, run_dir: Path, history: dict[str, Any]) -> None:
    """The table of the run against the fixed configuration, and where the run is."""
    from selfmod.runs.report import summary_rows

    shift = f" (data shift at step {cfg.shift_step})" if cfg.shift_step else ""
    table = Table(title=f"{cfg.data}, {cfg.model}: same steps and start{shift}")
    for col in ("", "self-modifying", "fixed configuration"):
        table.add_column(col)
    for row in summary_rows(history):
        table.add_row(*row)
    Console(width=120).print(table)
    report = run_dir / "report.html" if cfg.report else f"off (selfmod report {run_dir})"
    Console().print(f"run: {run_dir}\nreport: {report}")


@app.command()
def report(
    run_dir: RunDir,
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
def log_(run_dir: RunDir) -> None:
    """The table of changes (proposals, decisions, rollbacks); verifies the hash chain."""
    from selfmod.runs.logs import changes
    from selfmod.runs.rundir import verified_log

    log = verified_log(run_dir)
    table = Table(title=f"{run_dir}: {log.n} ledger entries, hash chain verified")
    for col in ("id", "cycle", "step", "kind", "modifier", "decision", "before -> after"):
        table.add_column(col)
    table.add_column("reason")
    for e in log.rows:
        moved = changes(e.payload.get("before", {}), e.payload.get("after", {}))
        cells = (e.seq, e.cycle, e.step, e.kind, e.payload.get("modifier", ""), e.decision, moved)
        table.add_row(*map(str, cells), e.reason)
    unkeyed = "unkeyed (anyone who can write the run directory can recompute it)"
    keyed = "keyed (HMAC-SHA256)" if log.keyed else unkeyed
    Console(width=200).print(table)
    Console(width=200).print(f"hash chain: {keyed}", soft_wrap=True)


@app.command()
def approve(
    run_dir: RunDir,
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
    run_dir: RunDir, to: Annotated[int, typer.Option("--to", help="cycle to go back to")]
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
    config: Config = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a field: --set meta_steps=50")
    ] = None,
    resume_: Annotated[bool, typer.Option("--resume", help="continue from its checkpoint")] = False,
) -> None:
    """Meta-train a learned optimizer (selfmod.meta); works under torchrun too."""
    from selfmod.meta.command import run_meta_train

    run_meta_train(config, set_, resume_)


app.add_typer(bench, name="bench")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: bad input (usage too) is one line on stderr and exit code 2, never a
    traceback (:mod:`selfmod.cli_errors`); ``argv``: the arguments (default ``sys.argv[1:]``)."""
    run_app(app, argv)


if __name__ == "__main__":
    main()
