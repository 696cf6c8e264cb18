"""What the options' race costs at model sizes users have: ``fit`` on an MLP 40-W-W-10
(MNIST-1D, batch 64) whose two activations are one choice among relu, gelu, tanh and sigmoid,
against ``fit`` on the same MLP with relu fixed, both with ``fit``'s defaults, each in its own
process, at about 1M, 5M and 20M parameters.

    python benchmarks/choice_memory.py                      # sizes 1,5,20; 200 steps
    python benchmarks/choice_memory.py --sizes 1 --steps 50

The race trains the 4 candidates over the first 10% of the steps and the 2 best over 10% more,
each on its own copy of the weights and AdamW's state; it holds the run's start, the best
``race_keep`` candidates after the first rung and the one training, so where the weights and
the optimizer's state dominate a process's memory, expect its peak near ``race_keep + 2``
times theirs. Measured per run: peak resident memory above the process's start (``ru_maxrss``
minus the resident size before the model is built, as ``benchmarks/scale.py``) and CPU
seconds (one thread). Writes ``benchmarks/results/choice_memory.md`` and ``.json``. Not a
timed test.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from scale import _cpu_s, _rss_kb, width_for

RESULTS = Path(__file__).parent / "results"
OPTIONS = ("relu", "gelu", "tanh", "sigmoid")


def child(mode: str, millions: float, steps: int) -> dict:
    """Train one run in this process: ``mode`` ``"fixed"`` (relu) or ``"choice"``."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from selfmod.arch import Choice
    from selfmod.data import load_mnist1d
    from selfmod.runs import fit

    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = load_mnist1d()
    x, y, w = data.x_train, data.y_train, width_for(millions)
    acts = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}

    def act() -> nn.Module:
        return nn.ReLU() if mode == "fixed" else Choice({k: acts[k]() for k in OPTIONS})

    start_kb, cpu = _rss_kb(), _cpu_s()
    net = nn.Sequential(nn.Linear(40, w), act(), nn.Linear(w, w), act(), nn.Linear(w, 10))
    params = sum(p.numel() for p in net.parameters())
    with tempfile.TemporaryDirectory() as out:
        result = fit(
            net, F.cross_entropy, (x[:-500], y[:-500]), (x[-500:], y[-500:]),
            test=(data.x_test, data.y_test),
            config={"steps": steps, "batch_size": 64, "out": out, "report": False},
        )  # fmt: skip
    cpu_s = _cpu_s() - cpu
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_kb) / 1024
    picks = [type(m).__name__ for m in result.module if not isinstance(m, nn.Linear)]
    return {
        "mode": mode, "millions": millions, "params": params, "cpu_s": cpu_s,
        "peak_mb": peak_mb, "state_mb": 3 * 4 * params / 2**20,  # weights, AdamW's two moments
        "test_accuracy": float(result.summary["test_accuracy"]), "picks": picks,
        "meta_budget": result.run.config.meta_budget,
    }  # fmt: skip


def measure(mode: str, millions: float, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(millions), str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        return {"mode": mode, "millions": millions, "failed": out.stderr.strip()[-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict], steps: int, sizes: str) -> str:
    by = {(r["mode"], r["millions"]): r for r in rows}
    lines = [
        "# The options' race at model sizes users have (benchmarks/choice_memory.py)",
        "",
        f"Command: `python benchmarks/choice_memory.py --sizes {sizes} --steps {steps}`; "
        "`fit`'s defaults, an MLP 40-W-W-10 on MNIST-1D, batch 64, one process and one torch "
        "thread per run. Choice: both activations one choice among "
        f"{', '.join(OPTIONS)} (4 candidates, 2 finalists); fixed: relu. Peak memory: resident "
        "memory above the process's resident size before the model is built. State: the "
        "weights and AdamW's two moments (3 x 4 bytes per parameter).",
        "",
        "| params | state MiB | peak MiB fixed | peak MiB choice | peak ratio | CPU s fixed | "
        "CPU s choice | CPU ratio | test acc fixed / choice (picks) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in sorted({r["millions"] for r in rows}):
        f, c = by.get(("fixed", m), {}), by.get(("choice", m), {})
        if "peak_mb" not in f or "peak_mb" not in c:
            lines.append(f"| ~{m:g}M | failed: {f.get('failed') or c.get('failed')} |")
            continue
        lines.append(
            f"| {c['params'] / 1e6:.2f}M | {c['state_mb']:.0f} | {f['peak_mb']:.0f} | "
            f"{c['peak_mb']:.0f} | {c['peak_mb'] / f['peak_mb']:.2f}x | {f['cpu_s']:.1f} | "
            f"{c['cpu_s']:.1f} | {c['cpu_s'] / f['cpu_s']:.2f}x | {f['test_accuracy']:.4f} / "
            f"{c['test_accuracy']:.4f} ({'+'.join(c['picks']).lower()}) |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,5,20", help="millions of parameters, comma-separated")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=str(RESULTS / "choice_memory"))
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, millions, steps = args.child
        print(json.dumps(child(mode, float(millions), int(steps))))
        return
    rows = []
    for m in (float(s) for s in args.sizes.split(",")):
        for mode in ("fixed", "choice"):
            rows.append(measure(mode, m, args.steps))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress
    Path(args.out + ".json").write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=1))
    Path(args.out + ".md").write_text(table(rows, args.steps, args.sizes))
    print(Path(args.out + ".md").read_text())


if __name__ == "__main__":
    main()
