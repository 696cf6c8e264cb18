"""What the self-modifying loop costs at sizes users have: plain AdamW against ``fit`` with
its defaults (lr 1e-3, as plain AdamW's), from ~0.1M to ~20M parameters at the same step
budget, each measurement in its own process, on two models (``--model``):

- ``mlp``: an MLP 40-W-W-10 on MNIST-1D, batch 64; metric: test accuracy;
- ``lm``: the byte-level causal Transformer of ``selfmod.bench.workloads`` (``pylm``) scaled by
  width and depth, on 64-byte windows of the standard library's ``.py`` files (split by file),
  batch 32; metric: test bits per byte.

    python benchmarks/scale.py                      # MLP, sizes 0.1M 1M 5M 20M, 200 steps
    python benchmarks/scale.py --model lm           # the Transformer LM, same sizes
    python benchmarks/scale.py --sizes 0.1,1 --steps 50

A child process trains one configuration and prints one JSON line: wall seconds, peak memory
above the process's start (``ru_maxrss`` minus the resident size before the model is built),
training examples drawn, the test metric (``fit``'s from its summary: it reads the test set once, at
the end, as the plain run's scoring does; the module's own score is checked against it
outside the clock). A ``fit`` child that dies (out of memory, time limit)
is recorded as such, and no larger ``fit`` is tried. Writes ``benchmarks/results/scale.md``,
``scale.json`` and ``scale.png`` (``scale_lm.*`` for the LM; ratios against plain AdamW by
size). Not a timed test.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
DIMS = (40, 10)  # MNIST-1D: 40 features, 10 classes
BATCH = {"mlp": 64, "lm": 32}  # 32: the batch-size modifier's default floor
METRIC = {"mlp": "test_accuracy", "lm": "bits_per_byte"}


def width_for(millions: float) -> int:
    """The hidden width ``W`` of a 40-W-W-10 MLP with about ``millions`` M parameters."""
    n, w = millions * 1e6, 1
    while w * w + 52 * w + 10 < n:  # 40W + W + W^2 + W + 10W + 10
        w += 1
    return w


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def lm_shape(millions: float) -> tuple[int, int]:
    """``(width, layers)`` of a byte LM with about ``millions`` M parameters: 1 block below
    0.5M, 4 below 3M, else 6; the width the smallest multiple of 16 that reaches the size."""
    import torch

    from selfmod.bench.workloads import CONTEXT, ByteLM

    layers = 1 if millions < 0.5 else 4 if millions < 3 else 6
    d = 16
    while True:
        with torch.device("meta"):
            n = sum(p.numel() for p in ByteLM(d, layers, 4, CONTEXT).parameters())
        if n >= millions * 1e6:
            return d, layers
        d += 16


def _problem(model: str, millions: float) -> tuple:
    """``(build, loss, train, guard, test, score)``: ``build()`` the network; ``score(module)``
    the test metric."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    if model == "mlp":
        from selfmod.data import load_mnist1d

        data = load_mnist1d()
        x, y = data.x_train, data.y_train
        w = width_for(millions)

        def build() -> nn.Module:
            return nn.Sequential(
                nn.Linear(DIMS[0], w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(),
                nn.Linear(w, DIMS[1]),
            )  # fmt: skip

        def accuracy(module: nn.Module) -> float:
            with torch.no_grad():
                return float((module(data.x_test).argmax(1) == data.y_test).float().mean())

        train, guard = (x[:-500], y[:-500]), (x[-500:], y[-500:])
        return build, F.cross_entropy, train, guard, (data.x_test, data.y_test), accuracy

    from selfmod.bench.workloads import CONTEXT, ByteLM, _pylm_data, bits_per_byte

    train, guard, test, _ = _pylm_data(0)
    d, layers = lm_shape(millions)

    def lm_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))  # (B*T, 256)

    def bpb(module: nn.Module) -> float:
        module.eval()
        with torch.no_grad():  # (N, T, 256) in chunks
            out = torch.cat([module(test[0][i : i + 64]) for i in range(0, len(test[0]), 64)])
        return bits_per_byte(out, test[1])

    return lambda: ByteLM(d, layers, 4, CONTEXT), lm_loss, train, guard, test, bpb


def child(
    model: str, mode: str, millions: float, steps: int, limit_gb: float, autocast: str = "off"
) -> dict:
    """Train one configuration in this process (its address space capped at ``limit_gb``, so
    that a run too large fails alone instead of pushing the machine into swap); the
    measurement as a dict. ``autocast="bf16"``: the forward under ``torch.autocast`` in
    bfloat16, the loss on its output in float32 (``fit``: its ``autocast`` setting); the test
    metric of both in float32."""
    cap = int(limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import torch
    import torch._dynamo  # torch.optim imports it on first use: an import, not training

    torch.set_num_threads(1)
    torch.manual_seed(0)
    build, loss_fn, (x, y), guard, test, score = _problem(model, millions)
    batch = BATCH[model]
    if mode == "fit":
        from selfmod.runs import fit
    start_kb, start, cpu = _rss_kb(), time.perf_counter(), _cpu_s()
    net = build()
    params = sum(p.numel() for p in net.parameters())
    if mode == "plain":
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            i = torch.randint(0, len(x), (batch,), generator=g)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast == "bf16"):
                out = net(x[i])
            loss = loss_fn(out.float(), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        metric, examples = score(net), steps * batch
    else:
        with tempfile.TemporaryDirectory() as out:
            result = fit(
                net, loss_fn, (x, y), guard, test=test, optimizer="adamw",
                metric="accuracy" if model == "mlp" else "loss",
                config={"steps": steps, "lr": 1e-3, "batch_size": batch, "out": out,
                        "report": False, "autocast": autocast},
            )  # fmt: skip
        metric, examples = summary_metric(model, result.summary), result.summary["examples"]
    seconds, cpu_s = time.perf_counter() - start, _cpu_s() - cpu
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_kb) / 1024
    if mode == "fit":  # the summary's figure is the module's, to rounding (not timed)
        scored = score(result.module)
        if autocast == "off":
            assert abs(scored - metric) < 1e-4, f"summary {metric} but the module scores {scored}"
        metric = scored  # in float32, as the plain run's
    return {"model": model, "mode": mode, "millions": millions, "params": params,
            "seconds": seconds, "cpu_s": cpu_s, "peak_mb": peak_mb, "examples": examples,
            METRIC[model]: metric}  # fmt: skip


def summary_metric(model: str, summary: dict) -> float:
    """``fit``'s test metric from its summary (``fit`` reads the test set once, at the end, as
    the plain run's ``score`` does): the accuracy, or the loss in bits per byte."""
    if model == "mlp":
        return float(summary["test_accuracy"])
    return float(summary["test_loss"]) / math.log(2)


def _cpu_s() -> float:
    """User + system CPU seconds of this process so far (with one thread, its wall time on an
    otherwise idle core)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(
    model: str,
    mode: str,
    millions: float,
    steps: int,
    limit: int,
    limit_gb: float,
    autocast: str = "off",
) -> dict:
    cmd = [sys.executable, __file__, "--child", model, mode, str(millions), str(steps),
           str(limit_gb), autocast]  # fmt: skip
    failed = {"model": model, "mode": mode, "millions": millions}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired:
        return {**failed, "failed": f"over {limit} s"}
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines() or ["?"]
        why = "killed" if out.returncode < 0 else lines[-1][-120:]
        if "memory" in out.stderr:
            why = f"out of memory under {limit_gb:g} GB"
        return {**failed, "failed": why}
    return json.loads(out.stdout.strip().splitlines()[-1])


MODELS = {
    "mlp": "MLP 40-W-W-10 on MNIST-1D, batch 64",
    "lm": "byte-level causal Transformer (pylm's, scaled: width a multiple of 16, 1 block "
    "below 0.5M parameters, 4 below 3M, else 6; 4 heads, context 64) on 64-byte windows of "
    "the standard library's .py files, batch 32",
}


def table(rows: list[dict], steps: int, model: str = "mlp", autocast: str = "off") -> str:
    metric = "test acc" if model == "mlp" else "test bits/byte"
    flag = " --autocast bf16" if autocast == "bf16" else ""
    how = (
        " Every forward (both runs') under `torch.autocast` in bfloat16, the loss and the"
        " test metric in float32."
        if autocast == "bf16"
        else ""
    )
    fmt = ".3f"
    key = METRIC[model]
    lines = [
        "# Cost of the loop at model sizes users have",
        "",
        f"Command: `python benchmarks/scale.py --model {model} --steps {steps}{flag}`."
        f" {MODELS[model]}"
        ", one thread, each measurement in its own process (address space capped at"
        " `--memory` GB); peak memory is the resident size above the process's resident size"
        " before the model is built; CPU ratio: user + system seconds (one thread: the wall time on"
        " an idle core, for a shared machine). `fit` uses its defaults but for the learning rate:"
        f" 1e-3, as plain AdamW's.{how}",
        "",
        "| params | plain AdamW s | fit s | wall ratio | CPU ratio | plain MB | fit MB |"
        f" memory ratio | examples plain / fit | {metric} plain / fit |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    by = {(r["mode"], r["millions"]): r for r in rows}
    for m in sorted({r["millions"] for r in rows}):
        p, f = by.get(("plain", m), {}), by.get(("fit", m), {})
        if "failed" in p or not p:
            continue
        if "failed" in f or not f:
            why = f.get("failed", "not run (a smaller fit failed)")
            lines.append(f"| {p['params']:,} | {p['seconds']:.1f} | {why} | | | "
                         f"{p['peak_mb']:.0f} | | | {p['examples']} / - | "
                         f"{p[key]:{fmt}} / - |")  # fmt: skip
            continue
        lines.append(
            f"| {p['params']:,} | {p['seconds']:.1f} | {f['seconds']:.1f} | "
            f"{f['seconds'] / p['seconds']:.1f}x | {_ratio(f, p, 'cpu_s')} | {p['peak_mb']:.0f} | "
            f"{f['peak_mb']:.0f} | "
            f"{f['peak_mb'] / max(p['peak_mb'], 1):.1f}x | {p['examples']} / {f['examples']} | "
            f"{p[key]:{fmt}} / {f[key]:{fmt}} |"
        )
    lines += ["", "The issue's target: <= 1.3x the wall time and <= 2x the peak memory of plain "
              "AdamW at every size. Misses are misses."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _ratio(f: dict, p: dict, key: str) -> str:
    """``f[key] / p[key]`` (rows measured before a key was recorded: blank)."""
    return f"{f[key] / p[key]:.1f}x" if key in f and key in p and p[key] > 0 else ""


def plot(rows: list[dict], path: Path, model: str = "mlp") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["mode"], r["millions"]): r for r in rows if "failed" not in r}
    sizes = sorted(m for (mode, m) in by if mode == "fit" and ("plain", m) in by)
    if not sizes:  # no size measured by both: nothing to plot
        return
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
    ax.set_title(model.upper())
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("mlp", "lm"), default="mlp")
    ap.add_argument("--sizes", default="0.1,1,5,20", help="millions of parameters, comma list")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--limit", type=int, default=900, help="seconds per measurement")
    ap.add_argument("--memory", type=float, default=14.0, help="GB of address space per run")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the results")
    ap.add_argument(
        "--autocast", choices=("off", "bf16"), default="off",
        help="bf16: every forward under torch.autocast in bfloat16 (results: *_bf16.*)",
    )  # fmt: skip
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        model, mode, millions, steps, limit_gb, autocast = args.child
        print(
            json.dumps(child(model, mode, float(millions), int(steps), float(limit_gb), autocast))
        )
        return
    rows, fit_ok = [], True
    for m in (float(s) for s in args.sizes.split(",")):
        for mode in ("plain", "fit"):
            if mode == "fit" and not fit_ok:
                continue
            r = measure(args.model, mode, m, args.steps, args.limit, args.memory, args.autocast)
            fit_ok = fit_ok and "failed" not in r
            rows.append(r)
            print(json.dumps(r), flush=True)
    stem = ("scale" if args.model == "mlp" else "scale_lm") + (
        "_bf16" if args.autocast == "bf16" else ""
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    (args.out / f"{stem}.md").write_text(table(rows, args.steps, args.model, args.autocast))
    plot(rows, args.out / f"{stem}.png", args.model)
    print(table(rows, args.steps, args.model, args.autocast))


if __name__ == "__main__":
    main()
