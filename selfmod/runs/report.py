"""``report.html``: a self-contained page (matplotlib PNGs embedded as base64) of one run.

Sections: summary table (self-modifying vs fixed configuration), meta-metrics, training curves,
hyperparameter trajectories (learning rate per tensor, weight decay, dropout, momentum), layer
widths and batch size over time, the choices' probabilities, probes, a timeline of changes with
commits, rejections and rollbacks marked, and the table of ledger entries.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import math
from pathlib import Path
from typing import Any

from selfmod.files import atomic_write_text
from selfmod.introspect.probes import finite_number, meta_metrics
from selfmod.runs.logs import changes as value_changes
from selfmod.runs.logs import why as proposal_why

MARKS = {
    "commit": ("#1a7f37", "^"),
    "applied": ("#1a7f37", "P"),
    "reject": ("0.55", "x"),
    "pending": ("#bf8700", "o"),
    "rollback": ("#cf222e", "v"),
}


def _legend(ax, **kw) -> None:
    """``ax.legend(**kw)`` when something is labelled (an empty plot gets none, and no warning)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


@functools.cache
def _pyplot() -> Any:
    """matplotlib's ``pyplot`` on the Agg backend, imported on first use (once): the summary
    table (:func:`summary_rows`) needs none, so a run with ``report = false`` never pays it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    """``fig`` as a base64 PNG, laid out once (``bbox_inches="tight"`` would draw it twice)."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


#: matplotlib settings of the report's figures: a parameter, module or modifier name is
#: drawn as written (``$\\frac{1}$`` is not parsed as mathtext, which would raise on it)
PLAIN_TEXT = {"text.parse_math": False, "text.usetex": False}


def log_scale(ax) -> None:
    """``ax``'s y axis on a log scale, its ticks labelled as plain text (``2e-02``): the
    default labels are mathtext, which :data:`PLAIN_TEXT` would print as written."""
    from matplotlib import ticker

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False))


#: line styles cycled over series that may coincide (two layers' dropout, two widths)
STYLES = ("-", "--", ":", "-.")


def _style(i: int) -> dict:
    return {"linestyle": STYLES[i % len(STYLES)], "marker": "os^vD"[i % 5], "markersize": 3}


def _axes(ylabel: str, xlabel: str = "base training step"):
    fig, ax = _pyplot().subplots(figsize=(6.2, 3.3))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    return fig, ax


def _shift(ax, history: dict) -> None:
    step = history.get("config", {}).get("shift_step", 0)
    if step:
        ax.axvline(step, color="#8250df", linestyle=":", label="data shift")


def _compare(history: dict, key: str, ylabel: str, train: bool = False, x: str = "step") -> str:
    """``key`` of the self-modifying and fixed runs; with ``train`` also their training
    (minibatch) loss, dotted. ``x = "seconds"``: against wall-clock time."""
    fig, ax = _axes(ylabel, "wall-clock seconds" if x == "seconds" else "base training step")
    for name, label, style in (
        ("tuned", "self-modifying", "-"),
        ("fixed", "fixed configuration", "--"),
    ):
        log = (history.get(name) or {}).get("log", [])
        steps = [r["step"] for r in log]
        if x == "seconds":
            clock = dict((int(s), t) for s, t in (history.get(name) or {}).get("clock", []))
            steps = [clock.get(s, math.nan) for s in steps]
        (line,) = ax.plot(steps, [r[key] for r in log], style, label=label)
        if train and log and "train_loss" in log[0]:
            ax.plot(steps, [r["train_loss"] for r in log], ":", color=line.get_color(),
                    label=f"{label}, train batch loss")  # fmt: skip
    _shift(ax, history)
    _legend(ax, fontsize=8)
    return _png(fig)


def _hyper(history: dict) -> str:
    log = history["tuned"]["log"]
    steps = [r["step"] for r in log]
    fig, axes = _pyplot().subplots(1, 2, figsize=(12.4, 3.3))
    ax = axes[0]
    names = (
        history["tuned_summary"].get("tensor_names")
        or [f"tensor {i}" for i in range(len(log[0]["lr"]))]
        if log
        else []
    )
    for i, name in enumerate(names):
        rates = [math.nan if i in r.get("unused", ()) else r["lr"][i] for r in log]
        if any(not math.isnan(v) for v in rates):  # a gap while the tensor is empty
            ax.plot(steps, rates, label=name)
    log_scale(ax)
    ax.set_ylabel("learning rate")
    ax.set_xlabel("base training step")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, fontsize=7, ncol=2)
    ax = axes[1]
    for h in _declared(history["tuned_summary"]):  # every hyperparameter but the rates
        key, label = h["name"], h["name"].replace("_", " ")
        if key == "lr" or not log or key not in log[0]:
            continue
        if h["per"] != "scalar":
            for i in range(len(log[0][key])):
                ax.plot(steps, [r[key][i] for r in log], label=f"{label}, site {i}", **_style(i))
        elif h["shown"] == "complement":
            ax.plot(steps, [1 - r[key] for r in log], label=f"1 - {label}")
        else:
            ax.plot(steps, [r[key] for r in log], label=label)
    log_scale(ax)
    ax.set_xlabel("base training step")
    ax.set_ylabel("value (log scale)")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


def _widths(history: dict) -> str:
    log = history["tuned"]["log"]
    steps = [r["step"] for r in log]
    fig, ax = _axes("hidden units")
    if log:
        for i in range(len(log[0]["widths"])):
            ax.step(
                steps, [r["widths"][i] for r in log], where="post", label=f"layer {i}", **_style(i)
            )
    if not (log and log[0]["widths"]):
        ax.text(0.5, 0.5, "no unit groups: the architecture is fixed", ha="center",
                transform=ax.transAxes)  # fmt: skip
    ax2 = ax.twinx()
    ax2.step(
        steps,
        [r["batch_size"] for r in log],
        where="post",
        color="0.4",
        linestyle=":",
        label="batch size",
    )
    ax2.set_ylabel("batch size")
    ax2.set_ylim(bottom=0)
    ax.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.12, 1.0))
    return _png(fig)


def _probes(history: dict) -> str:
    pr = history["tuned"]["probes"]
    steps = [p["step"] for p in pr]
    fig, axes = _pyplot().subplots(1, 2, figsize=(12.4, 3.3))
    ax = axes[0]
    for key, label in (
        ("guard_acc", "guard"),
        ("train_acc", "internal train"),
        ("robust_acc", "guard + input noise"),
        ("shifted_acc", "guard, shifted"),
        ("old_guard_acc", "older data (guard)"),
        ("test_acc", "test (external)"),
    ):
        ys = [p.get(key, math.nan) for p in pr]
        if any(math.isfinite(y) for y in ys):
            ax.plot(steps, ys, label=label)
    _shift(ax, history)
    ax.set_ylabel("accuracy")
    ax.set_xlabel("base training step")
    ax.grid(alpha=0.3)
    _legend(ax, fontsize=7)
    ax = axes[1]
    ax.plot(steps, [p["params"] for p in pr], label="parameters")
    ax.plot(steps, [p["flops"] for p in pr], "--", label="FLOPs / example")
    log_scale(ax)
    ax.set_ylabel("parameters, FLOPs / example")
    ax.set_xlabel("base training step")
    ax.grid(alpha=0.3, which="both")
    ax3 = ax.twinx()
    ax3.plot(steps, [p["gap"] for p in pr], color="#cf222e", label="gap: guard - train loss")
    ax3.set_ylabel("internal generalization gap")
    _legend(ax, fontsize=7, loc="upper left")
    _legend(ax3, fontsize=7, loc="lower right")
    return _png(fig)


def _timeline(history: dict) -> str:
    decisions = history["tuned"]["decisions"]
    mods = sorted({d["modifier"] for d in decisions}) or ["-"]
    fig, ax = _pyplot().subplots(figsize=(12.4, 0.6 + 0.45 * len(mods)))
    for decision, (color, marker) in MARKS.items():
        pts = [
            (d["step"], mods.index(d["modifier"])) for d in decisions if d["decision"] == decision
        ]
        if pts:
            ax.scatter(*zip(*pts, strict=True), color=color, marker=marker, s=36, label=decision)
    _shift(ax, history)
    ax.set_yticks(range(len(mods)), mods)
    ax.set_xlabel("base training step")
    ax.set_xlim(0, history.get("config", {}).get("steps", None))
    ax.grid(alpha=0.3)
    _legend(ax, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


def choice_rows(entries: list[dict]) -> list[tuple[str, ...]]:
    """Per ledger entry of the ``choice`` modifier and per choice in it: ``(cycle, step,
    choice, decision, probabilities by option, committed option)``: the logits' history; for
    the options' race, each candidate's guard metric after the last rung it trained."""
    rows = []
    for e in entries:
        p = e.get("payload", {})
        info = p.get("info") if isinstance(p, dict) and p.get("modifier") == "choice" else None
        for site, c in (info or {}).get("choice", {}).items():
            if not isinstance(c, dict):
                continue
            pairs = zip(c.get("options", []), c.get("p", []), strict=False)
            probs = ", ".join(f"{n} {v:.3f}" for n, v in pairs)
            if isinstance(c.get("race"), dict):
                raced = ", ".join(f"{n} {_fmt(v)}" for n, v in c["race"].items())
                probs = f"race, guard metric: {raced}"
            committed = c.get("option", "") if e["decision"] == "commit" else ""
            rows.append((e["cycle"], e["step"], site or "(root)", e["decision"], probs, committed))
    return rows


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        return f"{x:.4g}"
    if isinstance(x, list):
        return ", ".join(_fmt(v) for v in x)
    return str(x)


#: what a run written before summaries listed their hyperparameters had
_OLDER = [
    {"name": n, "per": p, "shown": sh}
    for n, p, sh in (
        ("lr", "tensor", "value"), ("momentum", "scalar", "complement"),
        ("beta1", "scalar", "complement"), ("beta2", "scalar", "complement"),
        ("weight_decay", "scalar", "value"), ("dropout", "site", "value"),
    )
]  # fmt: skip


def _declared(summary: dict) -> list[dict[str, str]]:
    """The run's hyperparameters as its summary lists them (``hyperparameters``)."""
    return summary.get("hyperparameters") or _OLDER


def _fmt_hparam(h: dict[str, str]):
    if h["per"] != "scalar":
        return lambda xs: ", ".join(f"{x:.2f}" for x in xs)
    return (lambda x: f"{x:.4f}") if h["shown"] == "complement" else (lambda x: f"{x:.2g}")


def _rates(summary: dict):
    """Formats a run's final learning rates, leaving out those of tensors empty at the end
    (``unused_tensors``: a factorable layer's unused half)."""
    unused = set(summary.get("unused_tensors") or ())
    return lambda xs: ", ".join(f"{x:.2g}" for i, x in enumerate(xs) if i not in unused)


def summary_rows(history: dict) -> list[tuple[str, str, str]]:
    """``(quantity, self-modifying, fixed)`` rows for the console table and the report."""
    t, f = history["tuned_summary"], history.get("fixed_summary") or {}

    def row(label: str, key: str, fmt=_fmt, fmt_fixed=None) -> tuple[str, str, str] | None:
        if t.get(key) is None:
            return None  # a quantity this run does not have (momentum under Adam, ...)
        fixed = (fmt_fixed or fmt)(f[key]) if f.get(key) is not None else "-"
        return label, fmt(t[key]), fixed

    def pct(x):
        return f"{100 * x:.1f}%"

    metric = t.get("metric_name", "accuracy")
    rows = [
        row("test accuracy", "test_accuracy", pct)
        if metric == "accuracy"
        else row(f"test {metric}", "test_metric", lambda x: f"{x:.4f}"),
        row("test loss", "test_loss", lambda x: f"{x:.3f}"),
        row("wall time (s)", "seconds", lambda x: f"{x:.1f}"),
        row("of it self-modification (s)", "meta_seconds", lambda x: f"{x:.1f}"),
        row("self-modification / training time", "meta_overhead", lambda x: f"{x:.2f}x"),
        row("hidden widths", "widths"),
        row("parameters", "params", lambda x: f"{x:,}"),
        row("FLOPs / example", "flops", lambda x: f"{x:,}"),
        row("final learning rates", "lr", _rates(t), _rates(f)),
        *(
            row(h["name"].replace("_", " "), h["name"], _fmt_hparam(h))
            for h in _declared(t)
            if h["name"] != "lr"
        ),
        row("batch size", "batch_size"),
        row("diverged at step", "diverged_at"),
    ]
    return [r for r in rows if r is not None] + [
        (
            "changes committed / rejected / rolled back / pending",
            f"{t['n_commit']} / {t['n_reject']} / {t['n_rollback']} / {t['n_pending']}",
            "-",
        ),
    ]


def meta_rows(history: dict) -> list[tuple[str, str, str]]:
    """``(meta-metric, value, meaning)`` rows: the summary's ``meta_metrics`` (a history
    written before they were kept there: recomputed from its probes); a per-modifier table
    gives one row per modifier."""
    tuned = history["tuned"]
    mm = history["tuned_summary"].get("meta_metrics") or meta_metrics(
        tuned["probes"], history.get("shift_cycle"), tuned.get("self_shift", [])
    )
    rows = []
    for k, v in mm.items():
        label, meaning = str(k).replace("_", " "), META_MEANING.get(k, "")
        if isinstance(v, dict):
            rows += [(f"{label}: {name}", _fmt(x), meaning) for name, x in v.items()]
            if not v:
                rows.append((label, "-", meaning))
        else:
            rows.append((label, _fmt(v), meaning))
    return rows


def _e(x: Any) -> str:
    """Text for HTML: every value from the run (history, ledger, config) goes through here."""
    return html.escape(str(x), quote=True)


def _row(*cells: Any) -> str:
    return "<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>"


# the decisions the page colours; any other value gets no class (never a value from the run)
_DECISION_CLASSES = frozenset({"commit", "applied", "reject", "rollback", "pending", "expired"})

#: what each meta-metric means, shown next to its value (selfmod.introspect.probes)
META_MEANING = {
    "meta_convergence_rate": "S_fixed / S_tuned: steps the fixed configuration takes to reach its "
    "final guard loss over the steps this run takes to reach it (>1: faster; 0: never)",
    "steps_to_fixed_final": "S_tuned: the first logged step where this run's guard loss is at or "
    "below the fixed configuration's final guard loss (-: never)",
    "fixed_steps_to_final": "S_fixed: the first logged step where the fixed configuration's guard "
    "loss is at or below its own final value",
    "log_guard_decrease_per_cycle": "mean per-cycle decrease of log guard loss until it first "
    "comes within 5% of its best",
    "converged_at_cycle": "the cycle where the guard loss first came within 5% of its best",
    "adaptation_cycles": "cycles after a data shift until guard accuracy reaches 95% of its "
    "post-shift best (- : no shift, or never)",
    "guard_loss_std": "standard deviation of the guard loss over the last half of the cycles",
    "guard_loss_oscillation": "fraction of sign changes between successive guard-loss changes "
    "over the last half (0: monotone, 1: up and down every cycle)",
    "gap_final": "internal generalization gap at the end: guard loss - internal-train loss "
    "(replay buffer)",
    "gap_mean": "the internal generalization gap averaged over the cycles",
    "internal_vs_external_acc_gap": "mean |guard accuracy - test accuracy|: how well the "
    "internal check predicts data it never sees",
    "self_induced_shift_mean": "mean over commits of 1 - linear CKA between the replay buffer's "
    "last-layer representations after the lookahead with and without the change",
    "self_induced_shift_total": "the self-induced shift summed over every commit",
    "self_induced_shift_by_modifier": "the self-induced shift summed per committed change",
    "commits_measured": "commits whose self-induced shift was measured",
}

GUARD_EXPLAINED = (
    "The guard set is data held out of training (never trained on); every proposed change is "
    "replayed over the next lookahead batches and kept only if its loss on the guard set does "
    "not get worse (within epsilon) and every other invariant holds."
)


def write_report(run_dir: Path, history: dict, entries: list[dict], x: str = "step") -> Path:
    """Write ``run_dir/report.html`` atomically and return its path.

    Every string from ``history.json``, the ledger or the config is HTML-escaped (``_e``):
    a reason or modifier name such as ``<script>...`` is shown as text, never run."""
    summary = "".join(_row(a, b, c) for a, b, c in summary_rows(history))
    meta = "".join(_row(*r) for r in meta_rows(history))
    config = "".join(_row(k, _fmt(v)) for k, v in history.get("config", {}).items())

    names = history.get("tuned_summary", {}).get("tensor_names")

    def change(e: dict) -> str:
        decision, p = str(e["decision"]), e["payload"]
        moved = value_changes(p.get("before", {}), p.get("after", {}), names)
        info = p.get("info")
        cls = f' class="{decision}"' if decision in _DECISION_CLASSES else ""
        return (
            f"<tr><td>{_e(e['seq'])}</td><td>{_e(e['cycle'])}</td><td>{_e(e['step'])}</td>"
            f"<td>{_e(e['kind'])}</td><td>{_e(e['payload'].get('modifier', ''))}</td>"
            f"<td{cls}>{_e(decision)}</td>"
            f"<td>{_e(moved)}</td>"
            f"<td>{_e(proposal_why(info) if isinstance(info, dict) else '')}</td>"
            f"<td>{_e(e['reason'])}</td></tr>"
        )

    changes = "".join(change(e) for e in entries)
    choices = "".join(_row(*r) for r in choice_rows(entries))
    if choices:
        choices = (
            "<h3>Choices (selfmod.arch.Choice): probabilities softmax(logits) as proposed, or "
            "the options' race</h3>"
            "<table><tr><th>cycle</th><th>step</th><th>choice</th><th>decision</th>"
            f"<th>p by option</th><th>committed</th></tr>{choices}</table>"
        )

    def fig(alt: str, png: str, half: bool = False) -> str:
        cls = ' class="half"' if half else ""
        return f'<figure{cls}><img alt="{_e(alt)}" src="data:image/png;base64,{png}"></figure>'

    cfg = history.get("config", {})
    modifiers = cfg.get("modifiers") or history["tuned_summary"].get("modifiers", [])
    # the run's metric at its log points: on the test set, or where they left it alone
    # (log_test = false: the summary reads it once, at the end), on the guard set
    metric = history["tuned_summary"].get("metric_name") or "accuracy"
    logged = any(finite_number(r.get("test_acc")) for r in history["tuned"]["log"])
    curve = ("test_acc", f"test {metric}") if logged else ("guard_acc", f"guard {metric}")
    title = "selfmod train: a run that modifies itself"
    with _pyplot().rc_context(PLAIN_TEXT):  # names such as "$\\frac{1}$" are text, not TeX
        page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 64rem; color: #222; }}
table {{ border-collapse: collapse; margin: 0.8rem 0; font-size: 0.85rem; }}
td, th {{ border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: left; }}
.commit, .applied {{ color: #1a7f37; }} .reject {{ color: #777; }}
.rollback {{ color: #cf222e; }} .pending {{ color: #bf8700; }}
figure {{ display: inline-block; margin: 0.3rem 0; max-width: 100%; }}
figure.half {{ max-width: 49%; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>{title}</h1>
<p>{_e(run_dir)}: {_e(cfg.get("steps"))} steps, cycle every {_e(cfg.get("cycle"))} steps,
modifiers {_e(", ".join(map(str, modifiers)))}, approval {_e(cfg.get("approval"))}.
</p>
<p>{_e(GUARD_EXPLAINED)}</p>
<h2>Summary</h2>
<table><tr><th></th><th>self-modifying</th><th>fixed configuration</th></tr>{summary}</table>
<h2>Training</h2>
{fig("guard and train loss", _compare(history, "guard_loss", "loss", True, x), half=True)}
{fig(curve[1], _compare(history, *curve, x=x), half=True)}
<h2>Timeline of changes</h2>
{fig("timeline", _timeline(history))}
<h2>Hyperparameters</h2>
{fig("learning rates and regularization", _hyper(history))}
<h2>Architecture</h2>
{fig("layer widths", _widths(history), half=True)}
{choices}
<h2>Probes</h2>
{fig("probes", _probes(history))}
<h2>Meta-metrics</h2>
<table><tr><th>meta-metric</th><th>value</th><th>what it means</th></tr>{meta}</table>
<h2>Ledger ({len(entries)} entries besides per-cycle probes; hash chain verified)</h2>
<table><tr><th>id</th><th>cycle</th><th>step</th><th>kind</th><th>modifier</th>
<th>decision</th><th>before -&gt; after</th><th>why proposed</th><th>reason</th></tr>
{changes}</table>
<h2>Configuration</h2>
<table><tr><th>field</th><th>value</th></tr>{config}</table>
</body></html>
"""
    path = Path(run_dir) / "report.html"
    atomic_write_text(path, page)
    return path
