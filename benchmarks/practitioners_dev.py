"""The practitioners' benchmark on development splits: how far its verdicts move when only the
split changes. No published seed and no published test row take part.

    python benchmarks/practitioners_dev.py                 # splits 1 2 3, seeds 10 11 12
    python benchmarks/practitioners_dev.py --splits 4 5 --seeds 20 21

Each split (the published training and validation rows re-split with its seed,
:mod:`selfmod.bench.workloads`) runs ``selfmod bench practitioners`` without TPE and PBT (tuners
that only add cost here). Writes ``benchmarks/results/practitioners_dev.md``: per workload and
split, both selfmod runs' medians beside the grid's and the best learning-rate-free optimizer's
with the target's verdict, then the medians over every split and seed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from selfmod.bench import practitioners as P
from selfmod.files import atomic_write_text

CONTENDERS = ["adamw-grid", "schedulefree-adamw", "prodigy", "dadaptation", "selfmod", "selfmod-hd"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--splits", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12])
    ap.add_argument("--workloads", nargs="+", default=list(P.PRACTITIONERS))
    ap.add_argument("--steps", type=float, default=1.0, help="x each workload's step budget")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    start = time.perf_counter()
    per_split: dict[int, tuple[dict, dict]] = {}
    for split in args.splits:
        with tempfile.TemporaryDirectory() as tmp:
            budget = P.load_budget(
                [f"split={split}", f"seeds={args.seeds}", "pbt=off", f"contenders={CONTENDERS}",
                 f"workload={args.workloads}", f"steps={args.steps}", f"jobs={args.jobs}",
                 f"out='{tmp}'"]
            )  # fmt: skip
            P.run_benchmark(budget)
            raw, _ = P.load_runs(Path(tmp) / "practitioners_runs.json")
        works = {n: P.make_workload(n, args.steps, split) for n in raw}
        summary = {n: P.summarize(works[n], raw[n]) for n in raw}
        per_split[split] = (summary, raw)
        print(f"split {split} done ({(time.perf_counter() - start) / 60:.1f} min)", flush=True)
    atomic_write_text(Path(args.out) / "practitioners_dev.md", markdown(args, per_split, start))


def markdown(args: argparse.Namespace, per_split: dict, start: float) -> str:
    first = next(iter(per_split.values()))[0]
    splits, seeds = " ".join(map(str, args.splits)), " ".join(map(str, args.seeds))
    minutes = (time.perf_counter() - start) / 60
    lines = [
        "# The practitioners' benchmark on development splits",
        "",
        f"Command: `python benchmarks/practitioners_dev.py --splits {splits} --seeds {seeds}`; "
        f"{minutes:.1f} min.",
        "",
        "Each split re-partitions the published training and validation rows (files, for the "
        "byte-level LM) in the published fractions; no published test row is loaded. Medians over "
        f"seeds {args.seeds} of each split's test metric; the tuners tune on each split's "
        "validation rows with seed 100. The verdict is the published target's, per split "
        "(`verdict`): at least the best learning-rate-free optimizer, within tolerance of the "
        "grid, at most 1/10 of its wall time (wall times here ran beside other work: read them "
        "loosely).",
        "",
    ]
    for name, entry in first.items():
        hib = entry["higher_is_better"]
        scale, fmt = (100.0, ".1f") if hib else (1.0, ".3f")
        lines += [
            f"## {name}",
            "",
            "| split | AdamW grid | best LR-free | selfmod (loop) | verdict | selfmod AdamWHD "
            "| verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        pooled: dict[str, list[float]] = {}
        for split, (summary, raw) in per_split.items():
            c = summary[name]["contenders"]
            free = (max if hib else min)(P.LR_FREE, key=lambda k: c[k]["median"])
            cells = [f"{scale * c['adamw-grid']['median']:{fmt}}",
                     f"{P.NAMES[free]} {scale * c[free]['median']:{fmt}}"]  # fmt: skip
            for run in P.SELFMOD_RUNS:
                met, why = P.verdict(summary[name], run)
                cells += [f"{scale * c[run]['median']:{fmt}}", "met" if met else _missed(why)]
            lines.append(f"| {split} | " + " | ".join(cells) + " |")
            for r in raw[name]:
                pooled.setdefault(r.name, []).extend(run.test for run in r.runs)
        n = len(next(iter(pooled.values())))
        med = {k: scale * statistics.median(v) for k, v in pooled.items()}
        lines += [
            "",
            f"Medians over all {n} runs: "
            + ", ".join(f"{P.NAMES[k]} {v:{fmt}}" for k, v in med.items())
            + ".",
            "",
        ]
    return "\n".join(lines)


def _missed(why: str) -> str:
    """The parts of a verdict that missed, short."""
    parts = why.split(": ", 1)[1].split("; ")
    return "missed: " + "; ".join(p for p in parts if "miss" in p or "target" in p)


if __name__ == "__main__":
    main()
