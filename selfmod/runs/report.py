"""``report.html``: plots of a run (matplotlib, embedded as PNG) and its table of changes."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from selfmod.introspect.lr_tuning import History
from selfmod.runs.files import atomic_write_text


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _curves(tuned: History, fixed: History, attr: str, ylabel: str) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(tuned.steps, getattr(tuned, attr), label="self-tuned")
    ax.plot(fixed.steps, getattr(fixed, attr), label="fixed configuration", linestyle="--")
    ax.set_xlabel("base training step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def _learning_rates(tuned: History) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, name in enumerate(tuned.tensor_names):
        ax.plot(tuned.steps, [row[i] for row in tuned.lrs], label=name)
    marks = {"commit": ("g", "^"), "reject": ("0.5", "x"), "rollback": ("r", "v")}
    lo = min(min(row) for row in tuned.lrs) if tuned.lrs else 1e-3
    for decision, (color, marker) in marks.items():
        xs = [c.step for c in tuned.cycles if c.decision == decision]
        if xs:
            ax.scatter(xs, [lo / 1.6] * len(xs), color=color, marker=marker, s=14, label=decision)
    ax.set_yscale("log")
    ax.set_xlabel("base training step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=3)
    return _png(fig)


def summary_rows(tuned: History, fixed: History) -> list[tuple[str, str, str]]:
    commits = sum(c.decision == "commit" for c in tuned.cycles)
    rejects = sum(c.decision == "reject" for c in tuned.cycles)
    rollbacks = sum(c.decision == "rollback" for c in tuned.cycles)
    return [
        ("test accuracy", f"{tuned.final_test_accuracy:.3f}", f"{fixed.final_test_accuracy:.3f}"),
        ("test loss", f"{tuned.final_test_loss:.3f}", f"{fixed.final_test_loss:.3f}"),
        ("wall time (s)", f"{tuned.seconds:.1f}", f"{fixed.seconds:.1f}"),
        ("changes committed / rejected / rolled back", f"{commits} / {rejects} / {rollbacks}",
         "-"),
        ("final learning rates", ", ".join(f"{x:.2g}" for x in tuned.lrs[-1]),
         ", ".join(f"{x:.2g}" for x in fixed.lrs[-1])),
    ]


def write_report(run_dir: Path, tuned: History, fixed: History, title: str) -> Path:
    """Write ``run_dir/report.html`` atomically and return its path."""
    rows = "".join(
        f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td>{html.escape(c)}</td></tr>"
        for a, b, c in summary_rows(tuned, fixed)
    )
    changes = "".join(
        "<tr>"
        f"<td>{c.step}</td><td class='{c.decision}'>{c.decision}</td>"
        f"<td>{html.escape(c.reason)}</td><td>{_fmt(c.guard_current)}</td>"
        f"<td>{_fmt(c.guard_proposed)}</td>"
        f"<td>{', '.join(f'{x:.2g}' for x in c.lrs_after)}</td></tr>"
        for c in tuned.cycles
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }}
td, th {{ border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }}
.commit {{ color: #1a7f37; }} .reject {{ color: #777; }} .rollback {{ color: #cf222e; }}
figure {{ display: inline-block; margin: 0.5rem; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Summary</h2>
<table><tr><th></th><th>self-tuned</th><th>fixed configuration</th></tr>{rows}</table>
<h2>Training</h2>
<figure><img alt="guard loss" src="data:image/png;base64,{_curves(tuned, fixed, "guard_loss",
                                                                     "guard loss")}"></figure>
<figure><img alt="test accuracy" src="data:image/png;base64,{_curves(tuned, fixed,
                                                                     "test_accuracy",
                                                                     "test accuracy")}"></figure>
<h2>Learning rates per tensor</h2>
<figure><img alt="learning rates" src="data:image/png;base64,{_learning_rates(tuned)}"></figure>
<h2>Changes ({len(tuned.cycles)} cycles)</h2>
<table><tr><th>step</th><th>decision</th><th>reason</th><th>guard loss, current</th>
<th>guard loss, proposed</th><th>learning rates after</th></tr>{changes}</table>
</body></html>
"""
    path = Path(run_dir) / "report.html"
    atomic_write_text(path, page)
    return path


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.4f}"
