"""Self-modification against black-box search and other self-tuning methods, side by side.

For every seed, every contender of :mod:`selfmod.bench.contenders` gets the same MNIST-1D
split and the same per-run budget of base steps; the table gives medians over seeds with
(min-max) of the handed-over model's test accuracy, the compute spent (base steps, wall
seconds), the wall seconds until the handed-over model first reached 95% of the best accuracy
any contender reached on that seed, and diverged trials / rolled-back changes. A second table
starts the one-run contenders from a learning rate so large that plain training diverges.

``python benchmarks/vs_search.py [--set key=value ...]`` or ``selfmod bench vs-search`` writes
``benchmarks/results/vs_search.{md,json,png}`` (``--set model=cnn``: the 1-D CNN workload,
``vs_search_cnn.{md,json,png}``); ``--set`` takes :class:`Budget`'s fields.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field

from selfmod.bench import contenders as C
from selfmod.bench.budget import BenchBudget
from selfmod.data import hold_out, load_mnist1d
from selfmod.files import atomic_write_bytes, atomic_write_text

#: the self-modifying run's settings in this benchmark beyond the defaults. Chosen on the
#: validation splits of seeds 10-13 (never the published seeds' test sets) among: cycle
#: 100/200; gap rule by sign or proportional (gain 0.5/1/2); learning rates free, at a fixed
#: geometric mean, or not tuned; momentum tuned or not. Earlier rounds (seeds 0, 1) had
#: ruled out lookahead 50/100, regularize=hypergradient, online_lr, lr every 2nd cycle and
#: trust region 0.35. Free rates collapse (the 20-step meta-gradient's short-horizon bias
#: drives them 10-30x down, tuned momentum with them) and the sign rule cannot reach strong
#: regularisation in 10 cycles.
SELFMOD_SETTINGS = {
    "cycle": 200,
    "modifiers.weight_decay.gap_gain": 1.0,
    "modifiers.dropout.gap_gain": 1.0,
    "modifiers.lr.lr_mean": "fixed",
    "modifiers": ["lr", "weight_decay", "dropout", "grow", "prune"],
}


class Budget(BenchBudget):
    """What one invocation runs (``--set key=value``): the shared fields (``seeds``, ``out``) and
    this benchmark's; the defaults are the published table's."""

    described: ClassVar[dict[str, str]] = {
        **BenchBudget.described,
        "tpe_trials": "a list of 1 to 5 integers in [1, 500]",
    }

    model: Literal["mlp", "cnn"] = Field("mlp", description="the workload's network")
    steps: int = Field(2000, ge=20, le=100_000, description="base steps per trial or run")
    tpe_trials: list[Annotated[int, Field(ge=1, le=500)]] = Field(
        default_factory=lambda: [20, 50],
        min_length=1,
        max_length=5,
        description="reported prefixes of one TPE study",
    )
    random_trials: int = Field(20, ge=1, le=500)
    grid_points: int = Field(
        len(C.grid_points()),
        ge=1,
        le=len(C.grid_points()),
        description="the first N points of the grid",
    )
    large_lr: float = Field(10.0, gt=0, le=100, description="the divergence scenario's lr")
    guard_size: int = Field(500, ge=10, le=2000, description="validation examples")
    jobs: int = Field(1, ge=1, le=64, description="seeds run in parallel processes")


def load_budget(overrides: list[str] | None = None) -> Budget:
    """A :class:`Budget` from ``key=value`` overrides; bad input is one ``ConfigError`` line."""
    return Budget.load(overrides)


def run_seed(budget: Budget, seed: int, tick: Callable[[str], None] = lambda _: None) -> dict:
    """Every contender on one seed: ``{"main": [Outcome...], "large_lr": [Outcome...]}``."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    source = hold_out(load_mnist1d(seed=42), budget.guard_size, seed)
    work = C.Workload(source, seed, budget.steps, model=budget.model)
    main: list[C.Outcome] = []

    def add(outcome: C.Outcome) -> None:
        main.append(outcome)
        tick(outcome.name)

    add(C.fixed(work))
    add(
        C.fold(
            f"grid search ({budget.grid_points})",
            C.grid_search(work, budget.grid_points),
        )
    )
    add(
        C.fold(
            f"random search ({budget.random_trials})", C.random_search(work, budget.random_trials)
        )
    )
    tpe = C.tpe_search(work, max(budget.tpe_trials))
    for n in sorted(budget.tpe_trials):
        add(C.fold(f"optuna tpe ({n})", tpe[:n]))
    for method in ("sgd-hd", "adam-hd", "stack"):
        add(C.online_hd(work, method))
    for safeguards in (True, False):
        add(C.introspective(work, safeguards, **SELFMOD_SETTINGS))
    big = C.Point(lr=(budget.large_lr,) * (C.DEPTH + 1))
    large = [C.fixed(work, big, "fixed"), C.online_hd(work, "sgd-hd", big)]
    large += [C.introspective(work, s, big, **SELFMOD_SETTINGS) for s in (True, False)]
    tick("large learning rate")
    return {"main": main, "large_lr": large}


# ----------------------------------------------------------------------------- aggregation


def _spread(values: Sequence[float], fmt: str) -> str:
    """``median (min-max)`` over seeds; ``never`` for infinite values."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return "n/a"

    def f(v: float) -> str:
        return "never" if math.isinf(v) else format(v, fmt)

    med = statistics.median(vals)
    if len(vals) == 1:
        return f(med)
    return f"{f(med)} ({f(min(vals))}-{f(max(vals))})"


def summarize(per_seed: list[dict]) -> dict[str, Any]:
    """Medians and spreads over seeds for the main and the large-learning-rate tables."""
    names = [o.name for o in per_seed[0]["main"]]
    targets = [
        0.95 * max(o.test_acc for o in s["main"] if not math.isnan(o.test_acc)) for s in per_seed
    ]
    rows = []
    for i, name in enumerate(names):
        outs = [s["main"][i] for s in per_seed]
        rows.append(
            {
                "name": name,
                "test_acc": [o.test_acc for o in outs],
                "steps": [o.steps for o in outs],
                "seconds": [o.seconds for o in outs],
                "to_95": [o.seconds_to(t) for o, t in zip(outs, targets, strict=True)],
                "trials": [o.trials for o in outs],
                "diverged": [o.diverged for o in outs],
                "rollbacks": [o.rollbacks for o in outs],
                "rejected": [o.rejected for o in outs],
            }
        )
    large = []
    for i, o0 in enumerate(per_seed[0]["large_lr"]):
        outs = [s["large_lr"][i] for s in per_seed]
        large.append(
            {
                "name": o0.name,
                "test_acc": [o.test_acc for o in outs],
                "diverged": [o.diverged for o in outs],
                "rollbacks": [o.rollbacks for o in outs],
                "seconds": [o.seconds for o in outs],
            }
        )
    return {"rows": rows, "large_lr": large}


def verdict(summary: dict[str, Any], tpe_trials: int = 20) -> list[str]:
    """The issue's two targets, judged on medians over seeds."""
    rows = {r["name"]: r for r in summary["rows"]}
    me, tpe = rows.get("selfmod introspective"), rows.get(f"optuna tpe ({tpe_trials})")
    out = []
    if me and tpe:
        acc_me, acc_tpe = statistics.median(me["test_acc"]), statistics.median(tpe["test_acc"])
        ratio = statistics.median(me["seconds"]) / statistics.median(tpe["seconds"])
        met = acc_me >= acc_tpe and ratio <= 0.2
        out.append(
            f"Target 1 ({'met' if met else 'NOT met'}): selfmod introspective {100 * acc_me:.1f}% "
            f"vs Optuna TPE best of {tpe_trials} {100 * acc_tpe:.1f}% (median test accuracy), "
            f"at {ratio:.2f}x its wall time (target: >= its accuracy at <= 0.2x)."
        )
    large = {r["name"]: r for r in summary["large_lr"]}
    guarded = large.get("selfmod introspective")
    unguarded = large.get("selfmod introspective (no safeguards)")
    if guarded and unguarded:
        n = len(guarded["diverged"])
        g, u = sum(guarded["diverged"]), sum(unguarded["diverged"])
        met = g == 0 and u > 0
        out.append(
            f"Target 2 ({'met' if met else 'NOT met'}): at the large initial learning rate the "
            f"unguarded run diverged on {u}/{n} seeds, the guarded run on {g}/{n} "
            f"(median {statistics.median(guarded['rollbacks']):g} rollbacks)."
        )
    return out


#: the workloads' networks, as the table describes them
NETWORKS = {
    "mlp": "MLP 40-w-w-10",
    "cnn": "1-D CNN (2 conv layers of w channels, kernel 5, stride 2, then linear)",
}


def stem(model: str) -> str:
    """The results' file name without extension: ``vs_search`` or ``vs_search_cnn``."""
    return "vs_search" if model == "mlp" else f"vs_search_{model}"


def markdown(summary: dict[str, Any], budget: Budget, command: str, seconds: float) -> str:
    n = len(budget.seeds)
    lo, hi = C.WIDTHS[budget.model]
    lines = [
        "# selfmod against black-box search and other self-tuning methods",
        "",
        f"Command: `{command}`",
        "",
        f"MNIST-1D (default generation: 4,000 train / 1,000 test), {NETWORKS[budget.model]}, "
        f"SGD with momentum, batch {C.BATCH}, {budget.steps} base steps per trial or run; "
        f"validation = {budget.guard_size} training examples held out (searches select on "
        f"it; nobody selects on test). Search space: a learning rate per layer in [1e-3, 1] "
        f"(log), weight decay [1e-6, 1e-2] (log), momentum [0, 0.99], dropout [0, 0.5], "
        f"width [{lo}, {hi}] (log). One-run contenders start from the fixed default "
        f"({C.DEFAULT.describe()}). Medians over {n} seeds {list(budget.seeds)} with (min-max); "
        f"1 torch thread; total {seconds / 60:.1f} min.",
        "",
        "| contender | test acc % | trials | base steps | wall s | wall s to 95% of best "
        "| diverged / rolled back / rejected |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['name']} | {_spread([100 * a for a in r['test_acc']], '.1f')} "
            f"| {_spread(r['trials'], '.0f')} | {_spread(r['steps'], '.0f')} "
            f"| {_spread(r['seconds'], '.1f')} | {_spread(r['to_95'], '.1f')} "
            f"| {sum(r['diverged'])} / {sum(r['rollbacks'])} / {sum(r['rejected'])} |"
        )
    lines += [
        "",
        "`wall s to 95% of best`: seconds of the contender's own compute until the model it "
        "would hand over first reached 95% of the best test accuracy any contender reached on "
        "that seed. Diverged / rolled back / rejected: totals over seeds of trials or runs whose "
        "loss went non-finite or jumped above 5x its running average (nothing rolls those "
        "back), safeguard rollbacks, and proposals the verification refused. TPE (20) is the "
        "first 20 trials of the 50-trial study (TPE does not depend on the total).",
        "",
        f"## From a large initial learning rate (lr = {budget.large_lr:g} for every layer)",
        "",
        "| contender | test acc % | diverged (seeds) | rollbacks | wall s |",
        "|---|---|---|---|---|",
    ]
    for r in summary["large_lr"]:
        lines.append(
            f"| {r['name']} | {_spread([100 * a for a in r['test_acc']], '.1f')} "
            f"| {sum(r['diverged'])}/{n} | {_spread(r['rollbacks'], '.0f')} "
            f"| {_spread(r['seconds'], '.1f')} |"
        )
    lines += ["", *verdict(summary, min(budget.tpe_trials)), ""]
    return "\n".join(lines)


def plot(per_seed: list[dict], path: Path, model: str = "mlp") -> None:
    """Accuracy of the handed-over model against wall seconds spent, every seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    names = [o.name for o in per_seed[0]["main"]]
    colors = plt.get_cmap("tab10")
    for i, name in enumerate(names):
        for j, s in enumerate(per_seed):
            o = s["main"][i]
            pts = [(t, a) for t, _, a in o.curve if t > 0 and not math.isnan(a)]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            # a search stopped early (TPE 20 of 50) is drawn as its end point on the longer one
            prefix = any(
                len(p.curve) > len(o.curve) and p.curve[: len(o.curve)] == o.curve
                for p in s["main"]
            )
            if prefix:
                xs, ys = xs[-1:], ys[-1:]
            ax.plot(
                xs,
                [100 * y for y in ys],
                color=colors(i % 10),
                alpha=0.6,
                drawstyle="steps-post",
                marker="o" if len(xs) == 1 else None,
                label=name if j == 0 else None,
            )
    ax.set_xscale("log")
    ax.set_xlabel("wall seconds spent (1 thread)")
    ax.set_ylabel("test accuracy of the handed-over model (%)")
    ax.set_title(f"MNIST-1D {model.upper()}: accuracy against compute, every seed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def run_benchmark(
    budget: Budget,
    command: str = "python benchmarks/vs_search.py",
    progress: Callable[[int, int, str], None] | None = None,
) -> str:
    """Run every seed, write ``vs_search.{md,json,png}`` (:func:`stem`) into ``budget.out``;
    returns the markdown table."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    total = len(budget.seeds) * (9 + len(budget.tpe_trials))  # ticks of run_seed
    done = 0

    def tick(name: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, name)

    if budget.jobs == 1:
        per_seed = [run_seed(budget, seed, tick) for seed in budget.seeds]
    else:  # one process per seed; each times its contenders one after another
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(budget.jobs, len(budget.seeds))) as pool:
            pending = [pool.apply_async(run_seed, (budget, seed)) for seed in budget.seeds]
            per_seed = []
            for job in pending:
                per_seed.append(job.get())
                for name in [o.name for o in per_seed[-1]["main"]] + ["large learning rate"]:
                    tick(name)
    seconds = time.perf_counter() - start
    summary = summarize(per_seed)
    text = markdown(summary, budget, command, seconds)
    out_dir = Path(budget.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = stem(budget.model)
    atomic_write_text(out_dir / f"{name}.md", text)
    raw = {
        "budget": budget.model_dump(),
        "seeds": [{k: [asdict(o) for o in v] for k, v in s.items()} for s in per_seed],
        "summary": summary,
    }
    atomic_write_text(out_dir / f"{name}.json", json.dumps(_finite(raw), indent=1))
    plot(per_seed, out_dir / f"{name}.png", budget.model)
    return text


def _finite(x: Any) -> Any:
    """JSON-safe: non-finite floats become ``None``."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x
