"""What a self-tuning optimizer costs per run: ``selfmod.optim.AdamWHD`` against
``torch.optim.AdamW`` (foreach), the same maths through the functional wrapper
(``Optimizer(..., adamw_hd())``), Schedule-Free AdamW and Prodigy, on the practitioners'
workloads (their models, batches and step budgets), in one process pinned to one core, 1 thread.

    python benchmarks/optimizer_step.py                 # 6 runs per optimizer and workload
    python benchmarks/optimizer_step.py --repeats 3 --workloads cancer

Prints a table of median seconds per run and the ratio to AdamW (runs interleaved round-robin,
so drifts in the machine's speed hit every optimizer alike), and writes
benchmarks/results/optimizer_step.md.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

from selfmod.bench import practitioners as P
from selfmod.files import atomic_write_text
from selfmod.optim import AdamWHD, Optimizer, adamw_hd

OPTIMIZERS: dict[str, Callable] = {
    "torch AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    "selfmod AdamWHD": lambda ps: AdamWHD(ps, lr=1e-2),
    "selfmod Optimizer(adamw_hd)": lambda ps: Optimizer(ps, adamw_hd(lr=1e-2)),
    "Schedule-Free AdamW": P.lr_free("schedulefree-adamw"),
    "Prodigy": P.lr_free("prodigy"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--workloads", nargs="+", default=list(P.PRACTITIONERS))
    parser.add_argument("--out", default="benchmarks/results/optimizer_step.md")
    args = parser.parse_args()
    P.pin_one_core(0)
    rows = []
    for name in args.workloads:
        work = P.make_workload(name)
        P.train(work, 0, P.adamw(1e-3, 0.0), steps=5)  # warm-up, not timed
        times: dict[str, list[float]] = {k: [] for k in OPTIMIZERS}
        for rep in range(args.repeats):
            for label, make in OPTIMIZERS.items():
                times[label].append(P.train(work, 10 + rep, make).seconds)
        base = statistics.median(times["torch AdamW (foreach)"])
        for label, ts in times.items():
            med = statistics.median(ts)
            rows.append(f"| {name} ({work.steps} steps) | {label} | {med:.3f} | {med / base:.2f} |")
    text = "\n".join(
        [
            "# Optimizer cost per run",
            "",
            f"Command: `python benchmarks/optimizer_step.py --repeats {args.repeats}`. Median "
            "seconds per whole run (training steps and the final evaluation) over "
            f"{args.repeats} runs, one pinned core, 1 thread; ratio to torch's AdamW.",
            "",
            "| workload | optimizer | s / run | ratio |",
            "|---|---|---:|---:|",
            *rows,
            "",
        ]
    )
    print(text)
    atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
