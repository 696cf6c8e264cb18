"""What the self-modifying loop costs at sizes users have: plain AdamW against ``fit`` with the
README's defaults, on an MLP from ~0.1M to ~20M parameters (MNIST-1D, batch 64, the same step
budget), each measurement in its own process.

    python benchmarks/scale.py                      # sizes 0.1M 1M 5M 20M, 200 steps
    python benchmarks/scale.py --sizes 0.1,1 --steps 50

A child process trains one configuration and prints one JSON line: wall seconds, peak memory
above the process's start (``ru_maxrss`` minus the resident size before the model is built),
training examples drawn, test accuracy. A ``fit`` child that dies (out of memory, time limit) is
recorded as such, and no larger ``fit`` is tried. Writes ``benchmarks/results/scale.md``,
``scale.json`` and ``scale.png`` (ratios against plain AdamW by size). Not a timed test.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
DIMS = (40, 10)  # MNIST-1D: 40 features, 10 classes


def width_for(millions: float) -> int:
    """The hidden width ``W`` of a 40-W-W-10 MLP with about ``millions`` M parameters."""
    n, w = millions * 1e6, 1
    while w * w + 52 * w + 10 < n:  # 40W + W + W^2 + W + 10W + 10
        w += 1
    return w


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def child(mode: str, millions: float, steps: int, limit_gb: float) -> dict:
    """Train one configuration in this process (its address space capped at ``limit_gb``, so
    that a run too large fails alone instead of pushing the machine into swap); the
    measurement as a dict."""
    cap = int(limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import torch
    import torch.nn.functional as F
    from torch import nn

    from selfmod.data import load_mnist1d

    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = load_mnist1d()
    x, y = data.x_train, data.y_train
    w = width_for(millions)
    model = nn.Sequential(
        nn.Linear(DIMS[0], w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, DIMS[1])
    )
    params = sum(p.numel() for p in model.parameters())
    start_kb, start = _rss_kb(), time.perf_counter()
    if mode == "plain":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            i = torch.randint(0, len(x) - 500, (64,), generator=g)
            loss = F.cross_entropy(model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
        examples = steps * 64
    else:
        from selfmod.runs import fit

        with tempfile.TemporaryDirectory() as out:
            result = fit(
                model, F.cross_entropy, (x[:-500], y[:-500]), (x[-500:], y[-500:]),
                test=(data.x_test, data.y_test), optimizer="adamw",
                config={"steps": steps, "lr": 1e-3, "batch_size": 64, "out": out,
                        "report": False},
            )  # fmt: skip
        acc, examples = result.summary["test_accuracy"], result.summary["examples"]
    seconds = time.perf_counter() - start
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_kb) / 1024
    return {"mode": mode, "millions": millions, "params": params, "seconds": seconds,
            "peak_mb": peak_mb, "examples": examples, "test_accuracy": acc}  # fmt: skip


def measure(mode: str, millions: float, steps: int, limit: int, limit_gb: float) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(millions), str(steps), str(limit_gb)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "millions": millions, "failed": f"over {limit} s"}
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines() or ["?"]
        why = "killed" if out.returncode < 0 else lines[-1][-120:]
        if "memory" in out.stderr:
            why = f"out of memory under {limit_gb:g} GB"
        return {"mode": mode, "millions": millions, "failed": why}
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict], steps: int) -> str:
    lines = [
        "# Cost of the loop at model sizes users have",
        "",
        f"Command: `python benchmarks/scale.py --steps {steps}`. MLP 40-W-W-10 on MNIST-1D, batch"
        " 64, one thread, each measurement in its own process (address space capped at"
        " `--memory` GB); peak memory is the resident size above the process's start. `fit` uses"
        " the README's defaults (AdamW, lr 1e-3).",
        "",
        "| params | plain AdamW s | fit s | wall ratio | plain MB | fit MB | memory ratio |"
        " examples plain / fit | test acc plain / fit |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    by = {(r["mode"], r["millions"]): r for r in rows}
    for m in sorted({r["millions"] for r in rows}):
        p, f = by.get(("plain", m), {}), by.get(("fit", m), {})
        if "failed" in p or not p:
            continue
        if "failed" in f or not f:
            why = f.get("failed", "not run (a smaller fit failed)")
            lines.append(f"| {p['params']:,} | {p['seconds']:.1f} | {why} | | "
                         f"{p['peak_mb']:.0f} | | | {p['examples']} / - | "
                         f"{p['test_accuracy']:.3f} / - |")  # fmt: skip
            continue
        lines.append(
            f"| {p['params']:,} | {p['seconds']:.1f} | {f['seconds']:.1f} | "
            f"{f['seconds'] / p['seconds']:.1f}x | {p['peak_mb']:.0f} | {f['peak_mb']:.0f} | "
            f"{f['peak_mb'] / max(p['peak_mb'], 1):.1f}x | {p['examples']} / {f['examples']} | "
            f"{p['test_accuracy']:.3f} / {f['test_accuracy']:.3f} |"
        )
    lines += ["", "The issue's target: <= 1.3x the wall time and <= 2x the peak memory of plain "
              "AdamW at every size. Misses are misses."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["mode"], r["millions"]): r for r in rows if "failed" not in r}
    sizes = sorted(m for (mode, m) in by if mode == "fit" and ("plain", m) in by)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    params = [by[("plain", m)]["params"] for m in sizes]
    for key, label in (("seconds", "wall time"), ("peak_mb", "peak memory")):
        ratio = [by[("fit", m)][key] / max(by[("plain", m)][key], 1e-9) for m in sizes]
        ax.plot(params, ratio, marker="o", label=f"fit / plain AdamW: {label}")
    ax.axhline(1.3, ls=":", c="gray", label="target: wall 1.3x")
    ax.axhline(2.0, ls="--", c="gray", label="target: memory 2x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("ratio")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0.1,1,5,20", help="millions of parameters, comma list")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--limit", type=int, default=900, help="seconds per measurement")
    ap.add_argument("--memory", type=float, default=14.0, help="GB of address space per run")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, millions, steps, limit_gb = args.child
        print(json.dumps(child(mode, float(millions), int(steps), float(limit_gb))))
        return
    rows, fit_ok = [], True
    for m in (float(s) for s in args.sizes.split(",")):
        for mode in ("plain", "fit"):
            if mode == "fit" and not fit_ok:
                continue
            r = measure(mode, m, args.steps, args.limit, args.memory)
            fit_ok = fit_ok and "failed" not in r
            rows.append(r)
            print(json.dumps(r), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / "scale.md").write_text(table(rows, args.steps))
    plot(rows, RESULTS / "scale.png")
    print(table(rows, args.steps))


if __name__ == "__main__":
    main()
