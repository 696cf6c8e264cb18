"""Architecture chosen inside the run: one ``fit`` run with a :class:`selfmod.arch.Choice`
against every option trained alone, same budget. The choice is made by the options' race at
the run's start (``modifiers.choice.race``, the default) or, with ``--set race=0``, by gradient.

Three workloads of different kinds (data from :mod:`selfmod.bench.workloads`):

- ``act``: MNIST-1D, an MLP 40-128-128-10 whose two activations are each a choice among
  ReLU, GELU, tanh and sigmoid (a fixed run: one activation in both layers);
- ``mixer``: 8x8 digits read as 8 tokens of 8 pixels, one pre-LN block whose token mixer is a
  choice among softmax attention, linear attention, TTT-Linear, TTT-MLP (their inner rate
  tuned: ``tune_lr``) and a convolution, all causal; mean-pooled, linear head;
- ``block``: breast cancer, an MLP 30-64-?-2 whose middle block is a choice among a two-layer
  ReLU block, one linear layer, and a skip connection (the skip guard's case).

Every run is :func:`selfmod.runs.fit` with its defaults (:data:`selfmod.runs.api.FIT_DEFAULTS`:
AdamW from lr 1e-2, the rates' level raced, early stopping, meta budget 0.3 plus, for a model
with choices, the options' race's most: :func:`selfmod.runs.api.race_share`) but
``cycle = 50`` and ``lookahead = 10`` (:data:`LOOP`), the workload's steps and batch, the
validation rows as guard; fixed runs have the option in the Choice's place.
Cost: CPU seconds (one torch thread per process) and the examples trained plus
self-modification's example-equivalents. Seeds: settings are chosen on development split 1
(``--dev``: seeds 10 and 11 unless ``--seeds``; 10-17 so far), then each published seed of
split 0 is run once (0-8 and 20-25 so far, taken together by ``--pool``). With ``--draw``
each seed also draws its own train / validation / test partition (the workloads' ``draw``,
with the seed), so that the best option is the task's, not one fixed test set's.

    python benchmarks/choice.py --dev --out /tmp/choice_dev   # choosing settings
    python benchmarks/choice.py                               # the published table

``--selection 0.1 0.2`` runs no choice: every option alone over 10% and 20% of the steps and
in full, the pick by the validation metric, scored by the test accuracy of the picked option's
full run (what a race of options with separate weights would pick; at the full share, the
ceiling of any pick made from this validation set).

``--pool A.json B.json ...`` trains nothing: the tables of saved runs of different seeds taken
together, and how sure the verdict is (the choice minus the best fixed option with a 95%
interval from resampling the seeds, the best option chosen again in each resample). A results
file's section from ``## Reading (added by hand)`` on is kept when its tables are written again.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn

from selfmod.arch import Choice
from selfmod.bench import workloads
from selfmod.runs import fit
from selfmod.ttt import make_mixer

RESULTS = Path(__file__).parent / "results"
DEV_SEEDS, SEEDS = (10, 11), (0, 1, 2)
#: the choice modifier's settings of the published run (chosen on the development seeds)
SETTINGS: dict[str, Any] = {}
#: every run's loop settings beyond fit's defaults (fixed runs too): twice the cycles, half
#: the lookahead, so the meta budget (0.3) buys a choice several cycles in these short runs
LOOP: dict[str, Any] = {"cycle": 50, "lookahead": 10}


# ----------------------------------------------------------------------------- models


def activations() -> dict[str, nn.Module]:
    return {"relu": nn.ReLU(), "gelu": nn.GELU(), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid()}


def act_model(option: str | None) -> nn.Module:
    def act() -> nn.Module:
        return Choice(activations()) if option is None else activations()[option]

    return nn.Sequential(nn.Linear(40, 128), act(), nn.Linear(128, 128), act(), nn.Linear(128, 10))


MIXERS = ("softmax_attention", "linear_attention", "ttt_linear", "ttt_mlp", "conv")


class TokenModel(nn.Module):
    """``x (B, 8, 8)`` rows as tokens: embed, ``x + mixer(LN x)``, ``x + MLP(LN x)``, mean,
    linear head. A fixed option's model builds every mixer and keeps its own, so that it
    starts from the weights the choice's model starts from (paired runs: a choice that picks
    an option is compared with that option's run from the same start, as on ``act`` and
    ``block``, whose options are built alike)."""

    def __init__(self, option: str | None, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(8, dim))
        self.ln1, self.ln2, self.ln = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

        def mixer(name: str) -> nn.Module:
            ttt = {"mini_batch": 8, "tune_lr": True} if name.startswith("ttt") else {}
            return make_mixer(name, dim, heads, causal=True, **ttt)

        mixers = {n: mixer(n) for n in MIXERS}  # every one built: the same starting weights
        self.mixer = Choice(mixers) if option is None else mixers[option]
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) + self.pos  # (B, 8, dim)
        h = h + self.mixer(self.ln1(h))
        h = h + self.mlp(self.ln2(h))
        return self.head(self.ln(h).mean(1))  # (B, 10)


def blocks() -> dict[str, nn.Module]:
    return {
        "mlp2": nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU()),
        "linear": nn.Sequential(nn.Linear(64, 64), nn.ReLU()),
        "skip": nn.Identity(),
    }


def block_model(option: str | None) -> nn.Module:
    middle = Choice(blocks()) if option is None else blocks()[option]
    return nn.Sequential(nn.Linear(30, 64), nn.ReLU(), middle, nn.Linear(64, 2))


#: workload -> (data, model(option or None), options, steps)
WORKLOADS: dict[str, tuple[Callable[..., workloads.Workload], Callable, tuple[str, ...], int]] = {
    "act": (workloads.mnist1d, act_model, tuple(activations()), 1500),
    "mixer": (workloads.seqdigits, TokenModel, MIXERS, 1200),
    "block": (workloads.cancer, block_model, tuple(blocks()), 600),
}


# ----------------------------------------------------------------------------- one run


def final_picks(result: Any) -> str:
    """Each choice's committed option from the run's state (``name?``: still open)."""
    run, out = result.run, []
    for name, m in run.problem.module.named_modules():
        if isinstance(m, Choice):
            k = int(run.state.buffers[f"{name}.chosen" if name else "chosen"])
            logits = run.state.buffers[f"{name}.logits" if name else "logits"]
            out.append(m.names[k] if k >= 0 else m.names[int(logits.argmax())] + "?")
    return "+".join(out)


def options_in(pick: str) -> set[str]:
    """The options a run's picks name (``"gelu+gelu?"`` -> ``{"gelu"}``)."""
    return {p.rstrip("?") for p in pick.split("+")}


def one(job: tuple[Any, ...]) -> dict[str, Any]:
    """Train one run in this process: ``(workload, option or None for the choice, seed, split,
    draw, choice settings[, share of the workload's steps])``; ``draw``: the seed's own
    partition of the data, else the split's fixed one."""
    name, option, seed, split, draw, settings, *more = job
    torch.set_num_threads(1)
    data, make, _, steps = WORKLOADS[name]
    w = data(steps, split, draw=seed if draw else None)
    share = more[0] if more else 1.0
    steps = max(1, round(share * steps))
    torch.manual_seed(seed)
    model = make(option)
    config = {
        "steps": steps, "batch_size": w.batch, "seed": seed, "report": False,
        "compare_fixed": False, "guard_size": min(2000, len(w.val[1])), **LOOP,
        **{f"modifiers.choice.{k}": v for k, v in settings.items()},
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        cpu, wall = time.process_time(), time.perf_counter()
        result = fit(
            model, w.loss, w.train, w.val, test=w.test, config={**config, "out": out}
        )  # fmt: skip
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    s = result.summary
    pick = option if option is not None else final_picks(result)
    history = [
        d for d in result.run.history["decisions"] if d["modifier"] in ("choice", "inner_lr")
    ]
    module = result.module.eval()
    with torch.no_grad():
        val_loss = float(w.loss(module(w.val[0]), w.val[1]))
    return {
        "workload": name, "option": option or "choice", "seed": seed, "split": split,
        "draw": draw, "share": share, "val": w.evaluate(module, w.val), "val_loss": val_loss,
        "test": w.evaluate(module, w.test), "cpu": cpu, "wall": wall,
        "examples": s["examples"], "meta_examples": s["meta_examples"], "pick": pick,
        "decisions": [(d["step"], d["modifier"], d["decision"]) for d in history],
        # this process's peak resident memory (one run per process), MiB
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "race": next((d["reason"] for d in history if d["modifier"] == "choice"
                      and "rung" in d["reason"]), None),
    }  # fmt: skip


# ----------------------------------------------------------------------------- tables


def run_all(jobs: list[tuple[Any, ...]], workers: int) -> list[dict[str, Any]]:
    """:func:`one` of every job, each in a fresh process (its own peak memory), ``workers`` at a
    time; the rows in the jobs' order, a progress bar on stderr as they finish (a line per run
    where stderr is not a terminal)."""
    rows: list[dict[str, Any]] = [{}] * len(jobs)
    with (
        ProcessPoolExecutor(workers, max_tasks_per_child=1) as pool,
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        ) as bar,
    ):
        task = bar.add_task("choice benchmark", total=len(jobs))
        index = {pool.submit(one, job): i for i, job in enumerate(jobs)}
        for n, done in enumerate(as_completed(index), 1):
            r = rows[index[done]] = done.result()
            what = f"{r['workload']} {r['option']} seed {r['seed']}: test {r['test']:.4f}"
            bar.update(task, completed=n, description=what)
            if not bar.console.is_terminal:  # a log: the bar is drawn only at the end
                bar.console.print(f"{n}/{len(jobs)} {what}")
    return rows


def table(rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """Markdown lines and a JSON summary: per workload, the fixed options' mean test accuracy
    over seeds, the choice run's, its picks, cost ratios and where it picked wrong."""
    lines, summary = [], {}
    for name in WORKLOADS:
        mine = [r for r in rows if r["workload"] == name]
        if not mine:
            continue
        seeds = sorted({r["seed"] for r in mine})
        options = WORKLOADS[name][2]

        def at(option: str, seed: int, mine: list = mine) -> dict[str, Any]:
            return next(r for r in mine if r["option"] == option and r["seed"] == seed)

        fixed = {o: statistics.mean(at(o, s)["test"] for s in seeds) for o in options}
        # what the validation (guard) rows favour: a choice reads them, never the test rows
        val = {o: statistics.mean(at(o, s)["val"] for s in seeds) for o in (*options, "choice")}
        chosen = [at("choice", s) for s in seeds]
        choice_mean = statistics.mean(r["test"] for r in chosen)
        best = max(fixed, key=lambda o: fixed[o])
        average = statistics.mean(fixed.values())
        cpu_fixed = {s: statistics.mean(at(o, s)["cpu"] for o in options) for s in seeds}
        work = {s: statistics.mean(at(o, s)["examples"] + at(o, s)["meta_examples"]
                                   for o in options) for s in seeds}  # fmt: skip
        cpu_ratio = statistics.mean(r["cpu"] / cpu_fixed[r["seed"]] for r in chosen)
        wall_fixed = {s: statistics.mean(at(o, s)["wall"] for o in options) for s in seeds}
        wall_ratio = statistics.mean(r["wall"] / wall_fixed[r["seed"]] for r in chosen)
        rss = math.nan  # peak memory against the mean fixed run's (runs that recorded it)
        if all("peak_rss_mib" in r for r in mine):
            rss_fixed = {s: statistics.mean(at(o, s)["peak_rss_mib"] for o in options)
                         for s in seeds}  # fmt: skip
            rss = statistics.mean(r["peak_rss_mib"] / rss_fixed[r["seed"]] for r in chosen)
        work_ratio = statistics.mean(
            (r["examples"] + r["meta_examples"]) / work[r["seed"]] for r in chosen
        )
        same_pick = []  # vs the fixed run of the option(s) it picked, per seed
        for r in chosen:
            if len(picked := options_in(r["pick"])) == 1:
                same_pick.append(r["cpu"] / at(next(iter(picked)), r["seed"])["cpu"])
        wrong, under = [], []  # a pick not the seed's best; the best picked, trained worse
        for r in chosen:
            best_here = max(options, key=lambda o, s=r["seed"]: at(o, s)["test"])
            gap = at(best_here, r["seed"])["test"] - r["test"]
            if gap <= 0:
                continue
            line = (f"seed {r['seed']}: {r['pick']} ({r['test']:.4f}) vs best fixed "
                    f"{best_here} ({at(best_here, r['seed'])['test']:.4f}), "
                    f"-{100 * gap:.2f} points")  # fmt: skip
            (under if options_in(r["pick"]) == {best_here} else wrong).append(line)
        summary[name] = {
            "fixed": fixed, "choice": choice_mean, "best_fixed": best, "average_fixed": average,
            "picks": [r["pick"] for r in chosen], "cpu_ratio_vs_mean_fixed": cpu_ratio,
            "work_ratio_vs_mean_fixed": work_ratio,
            "cpu_ratio_vs_picked_fixed": statistics.mean(same_pick) if same_pick else math.nan,
            "at_least_best": choice_mean >= fixed[best],
            "better_than_average": choice_mean > average,
            "wrong": wrong, "best_picked_but_under": under, "rss_ratio_vs_mean_fixed": rss,
            "val_fixed": {o: val[o] for o in options}, "val_choice": val["choice"],
            "wall_ratio_vs_mean_fixed": wall_ratio,
        }  # fmt: skip
        lines += [
            f"### {name}: {WORKLOADS[name][0].__name__} ({WORKLOADS[name][3]} steps)",
            "",
            "| run | test accuracy (mean over seeds) | validation accuracy (mean) |",
            "|---|---|---|",
            *[f"| fixed {o} | {fixed[o]:.4f} | {val[o]:.4f} |" for o in options],
            f"| average fixed option | {average:.4f} | |",
            f"| **choice** (picks: {', '.join(r['pick'] for r in chosen)}) | "
            f"**{choice_mean:.4f}** | {val['choice']:.4f} |",
            "",
            f"- at least the best fixed option ({best}, {fixed[best]:.4f}): "
            f"{'yes' if choice_mean >= fixed[best] else 'no'} "
            f"({100 * (choice_mean - fixed[best]):+.2f} points); better than the average fixed "
            f"option: {'yes' if choice_mean > average else 'no'} "
            f"({100 * (choice_mean - average):+.2f} points)",
            f"- cost vs one fixed run (mean over options): CPU seconds x{cpu_ratio:.2f}, "
            f"wall seconds x{wall_ratio:.2f}, "
            f"examples + meta example-equivalents x{work_ratio:.2f}; CPU vs the fixed run of "
            f"the picked option x{summary[name]['cpu_ratio_vs_picked_fixed']:.2f}"
            + (f"; peak resident memory x{rss:.2f}" if not math.isnan(rss) else ""),
            f"- picked wrong: {'; '.join(wrong) if wrong else 'never'}",
            f"- picked the seed's best option and ended under its fixed run: "
            f"{'; '.join(under) if under else 'never'}",
            "",
        ]
    return lines, summary


#: bootstrap resamples of the seeds for :func:`pooled`'s intervals
RESAMPLES = 10_000


def pooled(rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """Markdown lines and a JSON summary of how sure the target's verdict is, over the seeds in
    ``rows``. Per workload: the choice's mean test accuracy minus the best fixed option's
    (``d = mean_s choice_s - max_o mean_s fixed_{o,s}``), with a 95% percentile interval from
    resampling the seeds with replacement (:data:`RESAMPLES` times; the best option chosen again
    in each resample, so the interval counts the luck of which option looks best), the share of
    resamples with ``d >= 0``, and the same for the pick a validation set makes with every
    option trained in full (each seed's option of the best validation accuracy, ties to the
    lower validation loss: ``K`` runs' cost)."""
    lines = [
        "## How sure the verdict is (seeds resampled)",
        "",
        "| workload | seeds | choice minus best fixed (points) | 95% interval | resamples "
        "with choice >= best | full runs picked by validation minus best | its 95% interval |",
        "|---|---:|---:|---|---:|---:|---|",
    ]
    summary: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(0)
    for name in WORKLOADS:
        mine = [r for r in rows if r["workload"] == name and r.get("share", 1.0) == 1.0]
        if not mine:
            continue
        options, seeds = WORKLOADS[name][2], sorted({r["seed"] for r in mine})
        test = {(r["option"], r["seed"]): r for r in mine}
        fixed = torch.tensor([[test[o, s]["test"] for s in seeds] for o in options])  # (K, S)
        choice = torch.tensor([test["choice", s]["test"] for s in seeds])  # (S,)
        picked = [max(options, key=lambda o, s=s: (test[o, s]["val"], -test[o, s]["val_loss"]))
                  for s in seeds]  # fmt: skip
        by_val = torch.tensor([test[p, s]["test"] for p, s in zip(picked, seeds, strict=True)])
        idx = torch.randint(len(seeds), (RESAMPLES, len(seeds)), generator=gen)  # (R, S)
        best = fixed[:, idx].mean(-1).amax(0)  # (R,)
        gaps = {"choice": choice[idx].mean(-1) - best, "by_val": by_val[idx].mean(-1) - best}
        whole = fixed.mean(-1).amax()
        out = {}
        for key, pick in (("choice", choice), ("by_val", by_val)):
            low, high = torch.quantile(gaps[key].double(), torch.tensor([0.025, 0.975]).double())
            out[key] = {"gap": float(pick.mean() - whole), "interval": [float(low), float(high)],
                        "share_at_least": float((gaps[key] >= 0).double().mean())}  # fmt: skip
        summary[name] = {"seeds": seeds, **out}
        c, v = out["choice"], out["by_val"]
        lines.append(
            f"| {name} | {len(seeds)} | {100 * c['gap']:+.2f} | "
            f"[{100 * c['interval'][0]:+.2f}, {100 * c['interval'][1]:+.2f}] | "
            f"{c['share_at_least']:.2f} | {100 * v['gap']:+.2f} | "
            f"[{100 * v['interval'][0]:+.2f}, {100 * v['interval'][1]:+.2f}] |"
        )
    return [*lines, ""], summary


def selection(rows: list[dict[str, Any]], shares: list[float]) -> list[str]:
    """Markdown lines: every option trained alone over a share of the steps, the one with the
    best validation metric (ties: the lower validation loss) picked, and the test accuracy of
    that option's full run; at share 1 the pick of full runs (K runs' cost), the ceiling of
    any choice read from this validation set."""
    lines = ["## Picking by validation after a share of the steps", ""]
    for name in WORKLOADS:
        mine = [r for r in rows if r["workload"] == name]
        if not mine:
            continue
        options, seeds = WORKLOADS[name][2], sorted({r["seed"] for r in mine})

        def at(option: str, seed: int, share: float, mine: list = mine) -> dict[str, Any]:
            return next(
                r for r in mine if (r["option"], r["seed"], r["share"]) == (option, seed, share)
            )

        lines += [f"### {name}", "", "| share | picks | test of the picks' full runs "
                  "(mean) | minus best fixed | minus average fixed | examples x |",
                  "|---:|---|---:|---:|---:|---:|"]  # fmt: skip
        best = max(statistics.mean(at(o, s, 1.0)["test"] for s in seeds) for o in options)
        average = statistics.mean(at(o, s, 1.0)["test"] for o in options for s in seeds)
        for share in [*shares, 1.0]:

            def score(option: str, seed: int, share: float = share) -> tuple[float, float]:
                r = at(option, seed, share)
                return r["val"], -r["val_loss"]

            picks = [max(options, key=lambda o, s=s: score(o, s)) for s in seeds]
            test = statistics.mean(at(p, s, 1.0)["test"] for p, s in zip(picks, seeds, strict=True))
            cost = 1 + share * (len(options) - 1)  # the winner's share trained on, as the race's
            lines.append(
                f"| {share:g} | {', '.join(picks)} | {test:.4f} | {100 * (test - best):+.2f} | "
                f"{100 * (test - average):+.2f} | {cost:.2f} |"
            )
        lines.append("")
    return lines


def saved_runs(paths: list[Path]) -> tuple[list[dict[str, Any]], str, int, list[int], Any, float]:
    """``(rows, commands, split, seeds, settings, seconds)`` of saved runs taken together; they
    must share the split, the partitions' kind (``draw``) and the settings and name no seed
    twice (``SystemExit`` otherwise)."""
    saved = [json.loads(p.read_text()) for p in paths]
    for key in ("split", "draw", "settings"):
        if len({json.dumps(s.get(key, False)) for s in saved}) > 1:
            raise SystemExit(f"--pool: the runs differ in {key}; pool runs of one {key}")
    seeds = [seed for s in saved for seed in s["seeds"]]
    if len(set(seeds)) < len(seeds):
        raise SystemExit("--pool: a seed is in two runs; pool runs of different seeds")
    commands = "`; `".join(s["command"] for s in saved)
    rows = [r for s in saved for r in s["runs"]]
    seconds = sum(s.get("seconds", math.nan) for s in saved)
    return rows, commands, saved[0]["split"], sorted(seeds), saved[0]["settings"], seconds


#: where a results file's hand-written reading starts; a rewrite of the file keeps it
BY_HAND = "\n## Reading (added by hand)\n"


def by_hand(md: Path) -> str:
    """The hand-written section of the results file ``md`` (from :data:`BY_HAND` to its end;
    ``""`` if none), which writing the tables again carries over."""
    text = md.read_text() if md.exists() else ""
    return text[text.index(BY_HAND) :] if BY_HAND in text else ""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dev", action="store_true", help="development split 1, seeds 10 and 11")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument(
        "--draw", action="store_true",
        help="each seed on its own train / validation / test partition, drawn with the seed",
    )  # fmt: skip
    ap.add_argument("--set", nargs="*", default=[], help="choice settings, name=value (JSON)")
    ap.add_argument("--out", type=Path, default=RESULTS / "choice")
    ap.add_argument(
        "--tables-from", type=Path, default=None, metavar="JSON",
        help="write the tables of a saved run's JSON again (to --out), training nothing",
    )  # fmt: skip
    ap.add_argument(
        "--selection", type=float, nargs="+", default=None, metavar="SHARE",
        help="instead of the choice: every option alone over each SHARE of the steps and in "
        "full, picked by validation",
    )  # fmt: skip
    ap.add_argument(
        "--pool", type=Path, nargs="+", default=None, metavar="JSON",
        help="the tables of several saved runs' JSON together (one split, no seed twice) and "
        "how sure their verdict is, to --out, training nothing",
    )  # fmt: skip
    args = ap.parse_args(argv)
    split = 1 if args.dev else 0
    seeds = args.seeds or (DEV_SEEDS if args.dev else SEEDS)
    settings = {**SETTINGS, **{k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}}
    jobs = [
        (name, option, seed, split, args.draw, settings)
        for name in args.workloads
        for seed in seeds
        for option in (None, *WORKLOADS[name][2])
    ]
    if args.selection:
        jobs = [
            (name, option, seed, split, args.draw, settings, share)
            for name in args.workloads
            for seed in seeds
            for option in WORKLOADS[name][2]
            for share in sorted({*args.selection, 1.0})
        ]
    start = time.perf_counter()
    own = "python benchmarks/choice.py " + " ".join(sys.argv[1:] if argv is None else argv)
    command = own
    if args.tables_from:  # the saved run's rows, command and time
        saved = json.loads(args.tables_from.read_text())
        rows, command, split, seeds = (saved[k] for k in ("runs", "command", "split", "seeds"))
        settings, seconds = saved["settings"], saved.get("seconds", math.nan)
    elif args.pool:
        rows, command, split, seeds, settings, seconds = saved_runs(args.pool)
    else:
        rows = run_all(jobs, args.jobs)
        seconds = time.perf_counter() - start
    draw = bool(rows) and all(r.get("draw", False) for r in rows)
    if args.selection:
        lines, summary = selection(rows, args.selection), {}
    else:
        lines, summary = table(rows)
    if args.pool:
        more, summary["resampled"] = pooled(rows)
        lines += more
    head = [
        "# Architecture chosen inside the run (benchmarks/choice.py)",
        "",
        (f"Pooled by `{own.strip()}` from the runs of " if args.pool else "Command: ")
        + f"`{command.strip()}`; split {split}"
        + (", each seed on its own partition drawn with the seed" if draw else "")
        + f", seeds {list(seeds)}; choice settings "
        f"{settings or 'the defaults'}; {seconds:.0f} s{' in all' if args.pool else ''} on 2 "
        "CPU cores, one torch thread per run.",
        "",
        (__doc__ or "").split("\n\n")[1],
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    md = args.out.with_suffix(".md")
    md.write_text("\n".join(head + lines) + "\n" + by_hand(md))
    payload = {"command": command.strip(), "split": split, "draw": draw, "seeds": list(seeds),
               "settings": settings, "seconds": seconds, "summary": summary,
               "runs": rows}  # fmt: skip
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
