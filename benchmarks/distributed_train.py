"""``selfmod train`` on 1 and N processes (gloo, CPU): base steps per second and the cost of a
cycle split into its parts, written to ``benchmarks/results/distributed_train.md``.

    python benchmarks/distributed_train.py --procs 1 2 --steps 400

Each N runs ``torchrun --standalone --nproc-per-node N`` (N = 1: a plain process) on the
built-in MLP, with the loop's methods timed on rank 0: base steps (``base_step`` outside
cycles), and in each cycle the probes plus meta-gradient (``probe``, ``estimate``), the
proposals (``propose``), the replays and checks (``verify_and_decide``) and the checkpoint
(the recorder's ``checkpoint``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SETS = {
    "cycle": 50, "lookahead": 5, "width": 64, "modifiers.grow.max_width": 128, "batch_size": 256,
    "guard_size": 200, "replay_size": 400, "compare_fixed": "false", "checkpoint_every": 1,
    "modifiers": '["lr","weight_decay","grow"]',
}  # fmt: skip
PARTS = {
    "base step": "base_step",
    "lookahead/estimate": ("probe", "estimate"),
    "propose": "propose",
    "verify": "verify_and_decide",
    "checkpoint": "checkpoint",
}

# runs inside each rank: time the loop's methods, then run the CLI
TIMED = r"""
import json, os, sys, time
import torch
torch.set_num_threads(1)
from selfmod.introspect.loop import Loop
from selfmod.runs.recorder import RunRecorder
T = {}
def timed(cls, name, key):
    f = getattr(cls, name)
    def g(self, *a, **k):
        t = time.perf_counter()
        try:
            return f(self, *a, **k)
        finally:
            d = T.setdefault(key, [0.0, 0]); d[0] += time.perf_counter() - t; d[1] += 1
    setattr(cls, name, g)
for n in ("base_step", "probe", "estimate", "propose", "verify_and_decide", "run_cycle"):
    timed(Loop, n, n)
timed(RunRecorder, "checkpoint", "checkpoint")
from selfmod import cli
sys.argv = ["selfmod", *sys.argv[2:]]
try:
    cli.main()
except SystemExit:
    pass
if os.environ.get("RANK", "0") == "0":
    open(os.environ["BENCH_OUT"], "w").write(json.dumps(T))
"""


def measure(procs: int, steps: int, folder: Path) -> dict:
    sets = {**SETS, "steps": steps, "out": str(folder / f"runs{procs}")}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    script = folder / "timed.py"
    script.write_text(TIMED)
    out = folder / f"times{procs}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BENCH_OUT": str(out), "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable]
    if procs > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
    start = time.perf_counter()
    subprocess.run([*launcher, str(script), "x", "train", *args], env=env, check=True,
                   capture_output=True)  # fmt: skip
    wall = time.perf_counter() - start
    t = json.loads(out.read_text())
    t["wall"] = wall
    return t


def table(results: dict[int, dict], steps: int) -> str:
    head = (
        "| processes | base steps/s | "
        + " | ".join(f"{p} (ms/cycle)" for p in list(PARTS)[1:])
        + " | cycle total (ms) |"
    )
    lines = [head, "|" + "---|" * (len(PARTS) + 2)]
    for n, t in results.items():
        sec, count = t["base_step"]
        cycles = t["run_cycle"][1]
        cells = [f"{n}", f"{count / sec:.0f}"]
        for keys in list(PARTS.values())[1:]:
            keys = (keys,) if isinstance(keys, str) else keys
            cells.append(f"{1000 * sum(t.get(k, [0, 0])[0] for k in keys) / cycles:.1f}")
        cells.append(f"{1000 * (t['run_cycle'][0] + t['checkpoint'][0]) / cycles:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--out", default=str(HERE / "results" / "distributed_train.md"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {n: measure(n, a.steps, Path(tmp)) for n in a.procs}
    cmd = "python benchmarks/distributed_train.py " + " ".join(sys.argv[1:])
    text = (
        f"# `selfmod train` on several processes\n\n`{cmd.strip()}` ({os.cpu_count()} CPU "
        f"cores, gloo, float32; no GPU in this measurement). Built-in MLP, width 64 (max_width "
        f"128, growth on), global batch {SETS['batch_size']}, {a.steps} steps, a cycle every "
        f"{SETS['cycle']} steps with lookahead {SETS['lookahead']}; times on rank 0.\n\n"
        + table(results, a.steps)
        + "\n"
    )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
