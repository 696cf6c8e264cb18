"""``selfmod bench vs-search|practitioners [--set key=value ...]``: the commands and one
runner for both.

Each benchmark module offers ``load_budget(overrides)`` and ``run_benchmark(budget, command,
progress)``; :func:`run_bench` reads the budget, checks the packages it needs, runs it with a
progress bar on stderr and prints its table. Importing this module imports no benchmark.
"""

from __future__ import annotations

import importlib
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from selfmod.errors import SelfmodError


def _optuna_missing(budget: Any) -> str | None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        return "optuna is"
    return None


def _practitioners_missing(budget: Any) -> str | None:
    from selfmod.bench.practitioners import missing

    return missing(budget)


#: name -> (module, the first package it needs that is missing, table width, progress prefix)
BENCHMARKS = {
    "vs-search": ("selfmod.bench.vs_search", _optuna_missing, 140, "vs-search: "),
    "practitioners": ("selfmod.bench.practitioners", _practitioners_missing, 160, ""),
}


def run_bench(name: str, overrides: list[str] | None) -> None:
    """Run benchmark ``name`` of :data:`BENCHMARKS` with ``--set`` ``overrides``; a bad value or
    a missing package is one line (:class:`~selfmod.errors.SelfmodError`, ``ConfigError``)."""
    module, missing, width, prefix = BENCHMARKS[name]
    benchmark = importlib.import_module(module)
    budget = benchmark.load_budget(overrides)
    if need := missing(budget):
        raise SelfmodError(f"{need} needed for this benchmark: pip install 'selfmod[bench]'")
    command = f"selfmod bench {name}" + "".join(f" --set {s}" for s in overrides or [])
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    ) as progress:
        task = progress.add_task(name, total=None)

        def tick(done: int, total: int, what: str) -> None:
            progress.update(task, completed=done, total=total, description=prefix + what)

        text = benchmark.run_benchmark(budget, command, tick)
    Console(width=width).print(text)


bench = typer.Typer(help="Benchmarks that compare selfmod with its peers.")


@bench.command("vs-search")
def vs_search(
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="model=mlp|cnn, seeds=[0,1], steps, tpe_trials=[20,50], random_trials, "
            "grid_points, large_lr, guard_size, out, jobs",
        ),
    ] = None,
) -> None:
    """Self-modification against grid, random and Optuna TPE search, hypergradient descent and
    a hyperoptimizer stack on MNIST-1D (an MLP, or with model=cnn a 1-D CNN); writes
    vs_search.{md,json,png} (vs_search_cnn.* for the CNN)."""
    run_bench("vs-search", set_)


@bench.command("practitioners")
def practitioners(
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="workload=mnist1d|mnist|pylm|cancer (or a list), seeds=[0,1], tuning_seed, "
            "steps (x each workload's), tpe_trials, grid_points, pbt=auto|on|off, "
            "pbt_members, contenders, out",
        ),
    ] = None,
) -> None:
    """Self-modification against what practitioners use (a tuned AdamW grid, Schedule-Free
    AdamW, Prodigy, D-Adaptation, Optuna TPE, Ray Tune PBT) on MNIST-1D, MNIST, Python bytes
    and a tabular set; writes practitioners.{md,json,png}."""
    run_bench("practitioners", set_)
