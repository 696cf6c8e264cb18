"""A run's standard logs, for the tools people already use: ``scalars.csv`` (one row per log
point: losses, metrics, every hyperparameter and width), TensorBoard event files in
``tensorboard/`` (``tensorboard --logdir RUN``), and one console line per decision (cycle,
modifier, before -> after, commit / reject / rollback and why), also when the output is not a
terminal (then a line per log point stands in for the progress bar).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from selfmod.files import FILE_MODE, atomic_write_text, open_private, private_dir

CSV_NAME, TENSORBOARD = "scalars.csv", "tensorboard"


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """A log row flattened to named numbers: lists become ``name/i`` (``lr/0``, ``widths/1``)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            out[key] = float(value)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                if isinstance(v, int | float) and not isinstance(v, bool):
                    out[f"{key}/{i}"] = float(v)
    return out


def changes(before: dict[str, Any], after: dict[str, Any], names: list[str] | None = None) -> str:
    """``name before -> after`` for every value that differs, ``; ``-separated; with the
    parameter tensors' ``names``, per-tensor learning rates by tensor (``lr[0.weight] ...``),
    the changed ones only."""
    parts = []
    for key, new in after.items():
        old = before.get(key)
        if old == new:
            continue
        per_tensor = names and isinstance(new, list) and isinstance(old, list)
        if per_tensor and len(new) == len(old) == len(names):
            parts += [
                f"{key}[{n}] {_short(a)} -> {_short(b)}"
                for n, a, b in zip(names, old, new, strict=True)
                if a != b
            ]
        else:
            parts.append(f"{key} {_short(old)} -> {_short(new)}")
    return "; ".join(parts)


def why(info: dict[str, Any]) -> str:
    """What drove a proposal (its ``info``: a meta-gradient, a noise scale, a gap), short."""
    return "; ".join(f"{k} {_short(v)}" for k, v in info.items())


def _short(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, list) and len(x) > 8:
        return "[" + ", ".join(_short(v) for v in x[:8]) + f", ... ({len(x)})]"
    if isinstance(x, list):
        return "[" + ", ".join(_short(v) for v in x) + "]"
    return str(x)


class Logs:
    """CSV, TensorBoard and console lines of the run in ``run_dir``. ``start``: the step the
    run (re)starts at; rows and events after it (from before a resume) are dropped."""

    def __init__(self, run_dir: str | Path, console: Console | None = None, start: int = 0):
        self.run_dir = Path(run_dir)
        self.console = console or Console(stderr=True)
        self.csv_path = self.run_dir / CSV_NAME
        self._columns: list[str] | None = None
        self._keep_rows_up_to(start)
        from torch.utils.tensorboard import SummaryWriter

        folder = private_dir(self.run_dir / TENSORBOARD)
        self._writer = SummaryWriter(str(folder), purge_step=start or None)
        for path in folder.iterdir():  # its event files, made with the default permissions
            if path.is_file() and not path.is_symlink():
                path.chmod(FILE_MODE)

    def _keep_rows_up_to(self, step: int) -> None:
        if not self.csv_path.is_file():
            return
        with open_private(self.csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        self._columns = list(rows[0]) if rows else None
        kept = [r for r in rows if r.get("step") and _number(r["step"]) <= step]
        text = io.StringIO(newline="")
        if self._columns:
            writer = csv.DictWriter(text, self._columns)
            writer.writeheader()
            writer.writerows(kept)
        atomic_write_text(self.csv_path, text.getvalue())  # a kill here loses no row

    def log(self, step: int, row: dict[str, Any], total: int) -> None:
        """One log point: a CSV row, TensorBoard scalars, and (not a terminal) a line."""
        values = scalars(row)
        if self._columns is None:
            self._columns = list(values)
            with open_private(self.csv_path, "w", newline="") as f:
                csv.DictWriter(f, self._columns).writeheader()
        with open_private(self.csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, self._columns, extrasaction="ignore")
            writer.writerow({k: values.get(k, math.nan) for k in self._columns})
        for key, value in values.items():
            if key != "step":
                self._writer.add_scalar(key, value, step)
        self._writer.flush()
        if not self.console.is_terminal:
            metric = row.get("guard_acc", math.nan)
            self.console.print(
                f"step {step}/{total}: guard loss {row.get('guard_loss', math.nan):.4f}, "
                f"guard metric {metric:.4f}, widths {row.get('widths')}",
                highlight=False,
            )

    def decision(self, cycle: int, step: int, decision: str, reason: str, payload: dict) -> None:
        """One line per decision: cycle, step, modifier, what changed, the decision and why."""
        what = changes(payload.get("before", {}), payload.get("after", {}))
        modifier = payload.get("modifier", "")
        line = f"cycle {cycle} step {step} {modifier}: {decision}"
        line += f" ({what})" if what else ""
        self.console.print(escape(f"{line}: {reason}"), highlight=False, soft_wrap=True)

    def close(self) -> None:
        self._writer.close()


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.inf
