"""Forward+backward time and peak memory of token mixers against sequence length.

Each (layer, N) runs in its own subprocess: one batch ``x (1, N, d)``, one forward+backward
to warm up, then the median of up to 3 timed repeats (1 when a pass takes over 5 s). Peak
memory is the growth of the process's peak resident set size (``ru_maxrss``) over the
forward+backward, measured in that fresh process; the parent also watches ``VmHWM`` and
kills a run that passes the memory cap. Once a layer passes the time or memory cap at some
N, its larger N are skipped. The runs are interleaved (for each N, every layer in turn), so
that load from other jobs on a shared machine hits the layers compared at one N alike.

    python benchmarks/ttt.py                      # N = 256 .. 32768, d = 64
    python benchmarks/ttt.py --sizes 256 1024 --out /tmp/ttt.md

Writes ``benchmarks/results/ttt.md`` and ``benchmarks/results/ttt.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

LAYERS = {
    "MTTT-Linear": "MTTTLinear(d, h, steps=1)",
    "MTTT-MLP": "MTTTMLP(d, h, steps=1)",
    "TTT-Linear (scan, b=16)": "TTTLinear(d, h, mini_batch=16)",
    "TTT-Linear (autograd loop, b=16)": "TTTLinear(d, h, mini_batch=16, impl='loop')",
    "TTT-MLP (scan, b=16)": "TTTMLP(d, h, mini_batch=16)",
    "linear attention": "LinearAttention(d, h)",
    "linear attention (causal)": "LinearAttention(d, h, causal=True)",
    "softmax attention (SDPA)": "SoftmaxAttention(d, h)",
}
RESULTS = Path(__file__).parent / "results"


def build(layer: str, d: int, heads: int = 1):
    """The layer named ``layer`` (:data:`LAYERS`) at width ``d`` with ``heads`` heads."""
    from selfmod import ttt

    return eval(LAYERS[layer], vars(ttt) | {"d": d, "h": heads})


def worker(layer: str, n: int, d: int, threads: int) -> None:
    import resource
    import statistics

    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    module = build(layer, d)
    x = torch.randn(1, n, d, requires_grad=True)

    def run() -> float:
        t = time.perf_counter()
        module(x).square().mean().backward()
        return time.perf_counter() - t

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    first = run()
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    times = [run() for _ in range(1 if first > 5 else 3)]
    print(json.dumps(dict(time_s=statistics.median(times), first_s=first, peak_mib=peak_mib)))


def interleaved(
    sizes: list[int],
    layers: list[str],
    d: int,
    threads: int,
    rounds: int,
    out: Path,
    clock: str = "wall",
    batch: int = 1,
    heads: int = 1,
) -> None:
    """Time ``layers`` in one process, one forward+backward each in turn per round.

    On a shared machine, load changes over seconds; running the compared layers back to back
    in every round and taking the median over rounds of each layer's time and of its ratio
    to the first layer, per round, lets load hit them alike. ``clock="thread"`` measures the
    calling thread's CPU time instead of wall time: with one thread, all of a layer's work,
    without the time the thread waits for a core that other jobs hold. The warm-up round
    also counts each layer's matrix-product FLOPs (``FlopCounterMode``: forward and
    backward), so that a time ratio can be read against the ratio of arithmetic.
    """
    import statistics

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(threads)
    now = time.thread_time if clock == "thread" else time.perf_counter
    ref = layers[0]
    lines = [
        "# TTT layers: interleaved timings in one process",
        "",
        f"`x ({batch}, N, {d})`, {heads} head(s) of width {d // heads}, float32, CPU, "
        f"`torch.set_num_threads({threads})`, 2-core machine shared with other jobs; "
        + ("the thread's CPU time" if clock == "thread" else "wall time")
        + ". Per round, one forward+backward "
        f"of every layer in turn (after one warm-up each); median over {rounds} rounds of "
        f"the time and of the per-round ratio to {ref}. "
        f"`python benchmarks/ttt.py {shlex.join(sys.argv[1:])}`",
        "",
        "| N | "
        + " | ".join(layers)
        + " | "
        + " | ".join(f"{x} / {ref}" for x in layers[1:])
        + " | "
        + " | ".join(f"{x} / {ref}, matmul FLOPs" for x in layers[1:])
        + " |",
        "|---|" + "---|" * (3 * len(layers) - 2),
    ]
    for n in sizes:
        torch.manual_seed(0)
        modules = {name: build(name, d, heads) for name in layers}
        x = torch.randn(batch, n, d, requires_grad=True)
        times: dict[str, list[float]] = {name: [] for name in layers}
        flops: dict[str, int] = {}
        for r in range(rounds + 1):
            for name, module in modules.items():
                if not r:  # round 0 warms up and counts the arithmetic
                    with FlopCounterMode(display=False) as counter:
                        module(x).square().mean().backward()
                    flops[name] = counter.get_total_flops()
                    continue
                t = now()
                module(x).square().mean().backward()
                times[name].append(now() - t)
        med = {name: statistics.median(v) for name, v in times.items()}
        ratios = {
            name: statistics.median(a / b for a, b in zip(times[name], times[ref], strict=True))
            for name in layers[1:]
        }
        row = (
            f"| {n} | "
            + " | ".join(f"{med[name]:.3g}" for name in layers)
            + " | "
            + " | ".join(f"{ratios[name]:.2f}" for name in layers[1:])
            + " | "
            + " | ".join(f"{flops[name] / flops[ref]:.2f}" for name in layers[1:])
            + " |"
        )
        print(row, flush=True)
        lines.append(row)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


def measure(layer: str, n: int, d: int, threads: int, time_cap: float, mem_cap_mib: float):
    """Run one configuration in a subprocess; ``(result or None, why it failed)``."""
    cmd = [sys.executable, __file__, "--worker", layer, str(n), str(d), str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start, hwm = time.monotonic(), 0.0
    # budget: warm-up + up to 3 repeats, each capped at time_cap, plus start-up
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            hwm = max(
                hwm,
                next(
                    int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")
                )
                / 1024,
            )
        except (OSError, StopIteration):
            pass
        if hwm > mem_cap_mib:
            proc.kill()
            proc.wait()
            return None, f"> {mem_cap_mib / 1024:.0f} GiB"
        if time.monotonic() - start > 2 * time_cap + 20:
            proc.kill()
            proc.wait()
            return None, f"> {time_cap:.0f} s"
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        return None, f"error: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}"
    result = json.loads(out.strip().splitlines()[-1])
    if result["time_s"] > time_cap:
        return result, f"> {time_cap:.0f} s"
    if result["peak_mib"] > mem_cap_mib:
        return result, f"> {mem_cap_mib / 1024:.0f} GiB"
    return result, ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[256 * 2**i for i in range(8)]
    )  # 256 .. 32768
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", nargs="+", default=list(LAYERS))
    parser.add_argument("--time-cap", type=float, default=60.0)
    parser.add_argument("--mem-cap-gib", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "ttt.md")
    parser.add_argument(
        "--interleaved",
        type=int,
        nargs="+",
        metavar="N",
        help="instead: time --layers in one process, interleaved, at these N "
        "(writes <out stem>_interleaved.md)",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--batch", type=int, default=1, help="with --interleaved: sequences per batch"
    )
    parser.add_argument("--heads", type=int, default=1, help="with --interleaved: heads")
    parser.add_argument(
        "--clock",
        choices=["wall", "thread"],
        default="wall",
        help="with --interleaved: wall time, or the thread's CPU time (one thread: robust to "
        "other jobs' load)",
    )
    args = parser.parse_args()
    if args.batch < 1 or args.heads < 1 or args.dim % args.heads:
        parser.error(
            f"--batch and --heads must be >= 1 and --heads must divide --dim (got --batch "
            f"{args.batch}, --heads {args.heads}, --dim {args.dim})"
        )
    if args.interleaved:
        out = args.out.with_name(args.out.stem + "_interleaved.md")
        interleaved(
            args.interleaved,
            args.layers,
            args.dim,
            args.threads,
            args.rounds,
            out,
            args.clock,
            args.batch,
            args.heads,
        )
        return

    table: dict[str, dict[int, dict]] = {layer: {} for layer in args.layers}
    crossed: dict[str, str] = {}
    for n in args.sizes:
        for layer in args.layers:
            if layer in crossed:
                continue
            result, why = measure(
                layer, n, args.dim, args.threads, args.time_cap, args.mem_cap_gib * 1024
            )
            if result is not None:
                table[layer][n] = result
            print(
                f"{layer:28s} N={n:6d} "
                + (f"{result['time_s']:8.3f} s {result['peak_mib']:8.1f} MiB" if result else "")
                + (f"  [{why}]" if why else ""),
                flush=True,
            )
            if why:
                crossed[layer] = f"N = {n} ({why})"
    write_report(args, table, crossed)


def write_report(args, table: dict[str, dict[int, dict]], crossed: dict[str, str]) -> None:
    sizes = args.sizes
    lines = [
        "# TTT layers: forward+backward cost against sequence length",
        "",
        f"One sequence `x (1, N, {args.dim})`, one head of width {args.dim}, float32, CPU, "
        f"`torch.set_num_threads({args.threads})`, on a 2-core machine **shared with other "
        "jobs running at the same time** (timings are noisy and pessimistic; the layers are "
        "interleaved, each N running every layer in turn, so compare within a column more "
        "than across runs). Time: median of up to 3 forward+backward passes after a warm-up. "
        "Memory: growth of peak RSS (`ru_maxrss`) over the first forward+backward in a fresh "
        "subprocess per configuration. TTT-Linear (scan) is the default fused causal scan, "
        "(autograd loop) the reference it is tested against. `python benchmarks/ttt.py "
        f"--threads {args.threads}"
        + (f" --out {args.out}`" if args.out != RESULTS / "ttt.md" else "`"),
        "",
        "## Time (s)",
        "",
        "| layer | " + " | ".join(str(n) for n in sizes) + " | crosses 60 s / 8 GiB at |",
        "|---|" + "---|" * len(sizes) + "---|",
    ]
    for layer, row in table.items():
        cells = [f"{row[n]['time_s']:.3g}" if n in row else "-" for n in sizes]
        where = crossed.get(layer, "not reached")
        lines.append(f"| {layer} | " + " | ".join(cells) + f" | {where} |")
    lines += [
        "",
        "## Peak memory growth (MiB)",
        "",
        "| layer | " + " | ".join(str(n) for n in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for layer, row in table.items():
        cells = [f"{row[n]['peak_mib']:.0f}" if n in row else "-" for n in sizes]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    # growth exponent between the two largest measured sizes >= 4096
    lines += [
        "",
        "## Growth",
        "",
        "Slope of log(time) against log(N) from N = 4096 to the largest N measured "
        "(1 = linear, 2 = quadratic), and time relative to non-causal / causal linear "
        "attention at the largest common N. Causal linear attention is the like-for-like "
        "reference for the causal TTT layers (the issue's \"within 3x of linear "
        'attention" is judged against it).',
        "",
        "| layer | slope | x linear attn | x causal linear attn |",
        "|---|---|---|---|",
    ]
    import math

    def ratio(layer: str, ref: str) -> str:
        common = [n for n in sizes if n in table[layer] and n in table.get(ref, {})]
        if not common:
            return "-"
        n = common[-1]
        return f"{table[layer][n]['time_s'] / table[ref][n]['time_s']:.1f} (N={n})"

    for layer, row in table.items():
        ns = [n for n in sizes if n in row and n >= 4096]
        slope = (
            math.log(row[ns[-1]]["time_s"] / row[ns[0]]["time_s"]) / math.log(ns[-1] / ns[0])
            if len(ns) >= 2
            else float("nan")
        )
        lines.append(
            f"| {layer} | {slope:.2f} | {ratio(layer, 'linear attention')} | "
            f"{ratio(layer, 'linear attention (causal)')} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for layer, row in table.items():
        ns = [n for n in sizes if n in row]
        axes[0].loglog(ns, [row[n]["time_s"] for n in ns], "o-", label=layer)
        axes[1].loglog(ns, [max(row[n]["peak_mib"], 0.1) for n in ns], "o-", label=layer)
    axes[0].set(xlabel="N (tokens)", ylabel="forward+backward time (s)", title="time")
    axes[1].set(xlabel="N (tokens)", ylabel="peak RSS growth (MiB)", title="memory")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        os.environ.setdefault("OMP_NUM_THREADS", sys.argv[5])
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
