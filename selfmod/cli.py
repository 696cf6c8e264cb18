"""``selfmod``: the command line.

selfmod train [CONFIG.toml] [--set key=value ...]
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from safetensors.torch import save_file

from selfmod.errors import SelfmodError
from selfmod.runs.config import ConfigError, TrainConfig, load_config
from selfmod.runs.files import atomic_write_text

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=False,
    help="Gradient-based self-modification for PyTorch.",
)
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Gradient-based self-modification for PyTorch."""


@app.command()
def train(
    config: Annotated[Path | None, typer.Argument(help="TOML config; defaults if omitted")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a field: --set steps=500")
    ] = None,
) -> None:
    """Train an MNIST-1D MLP whose learning rates tune themselves, next to a fixed run."""
    cfg = load_config(config, set_)
    _run_train(cfg)


def _run_train(cfg: TrainConfig) -> Path:
    import torch

    from selfmod.data import load_mnist1d
    from selfmod.introspect import train as train_run
    from selfmod.runs.report import summary_rows, write_report

    torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.out) / time.strftime("train-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.json", cfg.model_dump_json(indent=1))
    data = load_mnist1d(seed=42)
    results = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        for name, tune in (("self-tuned", True), ("fixed configuration", False)):
            task = progress.add_task(name, total=cfg.steps)
            results[name] = train_run(
                cfg, data, tune=tune, on_step=lambda s, t=task: progress.update(t, completed=s + 1)
            )
    tuned, params = results["self-tuned"]
    fixed, _ = results["fixed configuration"]
    weights = run_dir / "final.safetensors"
    save_file({k: v.contiguous() for k, v in params.items()}, str(weights))
    manifest = {
        "file": weights.name,
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "torch": torch.__version__,
    }
    atomic_write_text(run_dir / "final.json", json.dumps(manifest, indent=1))
    atomic_write_text(
        run_dir / "history.json", json.dumps({"tuned": tuned.to_dict(), "fixed": fixed.to_dict()})
    )
    report = write_report(run_dir, tuned, fixed, "selfmod train: self-tuning learning rates")

    table = Table(title="MNIST-1D, same budget and start")
    for col in ("", "self-tuned", "fixed configuration"):
        table.add_column(col)
    for row in summary_rows(tuned, fixed):
        table.add_row(*row)
    Console().print(table)
    Console().print(f"report: {report}")
    return run_dir


def main() -> None:
    """Entry point: bad input is one line on stderr and exit code 2, never a traceback."""
    try:
        app()
    except (ConfigError, SelfmodError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
