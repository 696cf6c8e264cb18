"""Seconds per meta-step and peak memory: every selfmod estimator against higher, torchopt and
a hand-written ``torch.autograd.grad(create_graph=True)`` loop, in one run.

Workload (issue 2): MLP 40-256-256-10 on MNIST-1D, batch 128, one learnable learning rate per
parameter tensor (6, as log-learning-rates), K inner SGD steps, meta-gradient of the loss on
512 test examples with respect to the learning rates and the initial weights.

Timing: for each K one process builds every method, warms each up once, then runs the
repetitions round-robin (method after method), so that all methods see the same machine
conditions; times are medians. Memory: each (method, K) runs once more in its own subprocess,
and after a warm-up and ``malloc_trim``, its peak resident memory above the resident memory before
the meta-step (``VmHWM`` reset through ``/proc/self/clear_refs``) is its own.
``ratio`` is a meta-step's time over K plain ``torch.optim.SGD`` training steps.

    python benchmarks/metagrad.py                  # K in {10, 100, 1000}
    python benchmarks/metagrad.py --ks 10,100 --reps 3

How the peers get per-tensor learnable learning rates: higher through one param group per
tensor and ``override={"lr": [...]}``; torchopt (no per-tensor differentiable rates) through its
functional ``sgd(lr=1.0)`` fed gradients pre-scaled by each tensor's rate (``inplace=False``).
``truncated`` uses ``window = K/10``, ``checkpointed`` ``segments = sqrt(K)``; ``forward``,
``truncated`` and ``implicit`` give no gradient for the initial weights (``implicit``'s
learning-rate gradient is 0 by construction: timings only).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from selfmod import hypergrad, optim
from selfmod.data import load_mnist1d
from selfmod.models import cross_entropy_loss, functionalize, mlp

SIZES = [40, 256, 256, 10]
BATCH = 128
METHODS = [
    "plain-sgd",
    "reverse",
    "checkpointed",
    "truncated",
    "forward",
    "implicit",
    "hand-written",
    "higher",
    "torchopt",
]
RESULTS = Path(__file__).parent / "results"


def setup(K: int, seed: int = 0):
    data = load_mnist1d()
    gen = torch.Generator().manual_seed(seed)
    batches = [
        (data.x_train[i], data.y_train[i])
        for i in (torch.randint(0, len(data.x_train), (BATCH,), generator=gen) for _ in range(K))
    ]
    outer = (data.x_test[:512], data.y_test[:512])
    torch.manual_seed(seed)
    module = mlp(SIZES)
    return module, batches, outer


def make_step(method: str, K: int):
    """A zero-argument function that performs one meta-step (or K plain steps)."""
    module, batches, outer = setup(K)
    apply, params = functionalize(module)
    keys = list(params)
    loss = cross_entropy_loss(apply)
    hparams = {"log_lr": torch.full((len(keys),), math.log(0.05))}
    opt = optim.sgd(lambda h: {k: h["log_lr"][i].exp() for i, k in enumerate(keys)})
    est = {
        "reverse": (hypergrad.reverse, {}),
        "checkpointed": (hypergrad.checkpointed, {"segments": max(1, round(math.sqrt(K)))}),
        "truncated": (hypergrad.truncated, {"window": max(1, K // 10)}),
        "forward": (hypergrad.forward, {}),
        "implicit": (hypergrad.implicit, {"solver": "cg", "iters": 20}),
    }
    if method in est:
        fn, options = est[method]
        return lambda: fn(loss, loss, opt, params, hparams, batches, outer, **options)
    if method == "plain-sgd":

        def plain():
            sgd = torch.optim.SGD(module.parameters(), lr=0.05)
            for x, y in batches:
                sgd.zero_grad()
                F.cross_entropy(module(x), y).backward()
                sgd.step()

        return plain
    if method == "hand-written":

        def hand():
            p0 = [v.detach().requires_grad_() for v in params.values()]
            log_lr = hparams["log_lr"].detach().requires_grad_()
            lrs = log_lr.exp()
            ps = p0
            for x, y in batches:
                gs = torch.autograd.grad(F.cross_entropy(_mlp(ps, x), y), ps, create_graph=True)
                ps = [p - lrs[i] * g for i, (p, g) in enumerate(zip(ps, gs, strict=True))]
            value = F.cross_entropy(_mlp(ps, outer[0]), outer[1])
            return torch.autograd.grad(value, [log_lr, *p0])

        return hand
    if method == "higher":
        import higher

        def with_higher():
            log_lr = hparams["log_lr"].detach().requires_grad_()
            lrs = log_lr.exp()
            net = mlp(SIZES)
            net.load_state_dict(module.state_dict())
            sgd = torch.optim.SGD([{"params": [p]} for p in net.parameters()], lr=0.05)
            with higher.innerloop_ctx(
                net, sgd, copy_initial_weights=False, override={"lr": list(lrs)}
            ) as (fnet, diffopt):
                for x, y in batches:
                    diffopt.step(F.cross_entropy(fnet(x), y))
                value = F.cross_entropy(fnet(outer[0]), outer[1])
                return torch.autograd.grad(value, [log_lr, *net.parameters()])

        return with_higher
    if method == "torchopt":
        import torchopt

        def with_torchopt():
            p0 = tuple(v.detach().requires_grad_() for v in params.values())
            log_lr = hparams["log_lr"].detach().requires_grad_()
            lrs = log_lr.exp()
            tx = torchopt.sgd(lr=1.0)
            state = tx.init(p0)
            ps = p0
            for x, y in batches:
                gs = torch.autograd.grad(F.cross_entropy(_mlp(ps, x), y), ps, create_graph=True)
                scaled = tuple(lrs[i] * g for i, g in enumerate(gs))
                updates, state = tx.update(scaled, state, inplace=False)
                ps = torchopt.apply_updates(ps, updates, inplace=False)
            value = F.cross_entropy(_mlp(ps, outer[0]), outer[1])
            return torch.autograd.grad(value, [log_lr, *p0])

        return with_torchopt
    raise ValueError(f"method must be one of {METHODS} (got {method!r})")


def _mlp(ps, x):
    h = torch.relu(F.linear(x, ps[0], ps[1]))
    h = torch.relu(F.linear(h, ps[2], ps[3]))
    return F.linear(h, ps[4], ps[5])


def time_worker(K: int, methods: list[str], reps: int) -> list[dict]:
    """Round-robin timing of every method at one K, in this process."""
    steps = {m: make_step(m, K) for m in methods}
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(reps):
        for m, step in steps.items():
            t = time.perf_counter()
            step()
            times[m].append(time.perf_counter() - t)
    return [
        {"method": m, "K": K, "median_s": statistics.median(v), "min_s": min(v), "reps": reps}
        for m, v in times.items()
    ]


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return math.nan


def memory_worker(method: str, K: int) -> dict:
    """Peak resident memory of one meta-step above the resident memory just before it: after a
    warm-up and ``malloc_trim``, the kernel's high-water mark is reset through
    ``/proc/self/clear_refs``."""
    step = make_step(method, K)
    step()  # warm-up: one-time allocations (thread pools, kernels) do not count
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so reuse is not free
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_mb("VmRSS")
    step()
    return {"method": method, "K": K, "peak_mb": _status_mb("VmHWM") - base}


def _subprocess(*args: str) -> list[dict] | dict | None:
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        print(f"{' '.join(args)} failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_all(ks: list[int], methods: list[str], reps: int | None) -> list[dict]:
    rows = []
    for K in ks:
        n = reps if reps is not None else {10: 15, 100: 9}.get(K, 5)
        timed = _subprocess("--time-worker", str(K), ",".join(methods), str(n)) or []
        for row in timed:
            mem = _subprocess("--memory-worker", row["method"], str(K)) or {"peak_mb": math.nan}
            row["peak_mb"] = mem["peak_mb"]
            rows.append(row)
            print(
                f"  {row['method']:>14s}  K={K:<5d} {row['median_s']:.4f} s  "
                f"{row['peak_mb']:.0f} MB",
                file=sys.stderr,
            )
    return rows


def table(rows: list[dict]) -> str:
    plain = {r["K"]: r["median_s"] for r in rows if r["method"] == "plain-sgd"}
    ks = sorted({r["K"] for r in rows})
    head = "| method | " + " | ".join(f"K={k}: s/meta-step | ratio | peak MB" for k in ks) + " |"
    lines = [head, "|---|" + "---:|---:|---:|" * len(ks)]
    for method in METHODS:
        cells = []
        for k in ks:
            r = next((r for r in rows if r["method"] == method and r["K"] == k), None)
            if r is None:
                cells.append("- | - | -")
                continue
            ratio = r["median_s"] / plain[k] if k in plain else float("nan")
            cells.append(f"{r['median_s']:.4f} | {ratio:.2f} | {r['peak_mb']:.0f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", default="10,100,1000", help="comma-separated unroll lengths")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per config")
    parser.add_argument("--time-worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if args.time_worker:
        K, methods, reps = args.time_worker
        print(json.dumps(time_worker(int(K), methods.split(","), int(reps))))
        return
    if args.memory_worker:
        method, K = args.memory_worker
        print(json.dumps(memory_worker(method, int(K))))
        return
    ks = [int(k) for k in args.ks.split(",")]
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; allowed: {', '.join(METHODS)}")
    rows = run_all(ks, methods, args.reps)
    text = table(rows)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    threads = os.environ.get("BENCH_THREADS", "2")
    (RESULTS / "metagrad.md").write_text(
        f"# benchmarks/metagrad.py ({stamp}, {threads} threads)\n\n{text}\n"
        f"\n```json\n{json.dumps(rows, indent=1)}\n```\n"
    )


if __name__ == "__main__":
    main()
