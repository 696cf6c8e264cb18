"""Crash consistency: kill -9 at chosen points, then resume; each kill ends as *identical*
(the final weights byte-for-byte those of an uninterrupted run), *refused* (one line, exit 2,
nothing changed) or *lost* (anything else: must never happen).

- ``selfmod train``: before a random base step, or halfway through writing any of its files;
  resumed with ``selfmod resume DIR``;
- ``selfmod meta-train``: after a random wall time (wherever it is, inside a checkpoint write
  too), or halfway through any checkpoint file; resumed with ``--resume``.

    python tests/kill_resume.py 60 20   # 60 kills of train, 20 of meta-train; prints counts

Used by ``tests/test_crash_consistency.py`` with a few kills; the README quotes a larger run.
"""

from __future__ import annotations

import random
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).parent
CRASH_AT = str(HERE / "crash_at.py")
RUN = [
    "steps=120", "cycle=20", "lookahead=5", "width=8",
    "modifiers.grow.max_width=32", "guard_size=100", "replay_size=200", "compare_fixed=false",
    "keep_checkpoints=10",
]  # fmt: skip
#: the files a run writes (name fragments), each a place to die in
FILES = [
    "config.json", "ckpt-00000000.safe", "ckpt-00000000.json", "ckpt-00000040.safe",
    "ckpt-00000060.json", "ckpt-00000100.safe", "final.safe", "final.json", "history.json",
    "summary.json", "report.html", "status.json",
]  # fmt: skip


def _sets(out: Path) -> list[str]:
    return [a for s in [*RUN, f"out={out}"] for a in ("--set", s)]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, check=False, timeout=600
    )


def reference(folder: Path) -> bytes:
    """The final weights of an uninterrupted run."""
    out = _run("-m", "selfmod.cli", "train", *_sets(folder))
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    (run_dir,) = folder.iterdir()
    return (run_dir / "final.safetensors").read_bytes()


def trial(where: str, folder: Path, expected: bytes) -> str:
    """One kill at ``where`` (``step=N`` or ``write=NAME``) and a resume: the outcome."""
    killed = _run(CRASH_AT, where, "train", *_sets(folder))
    if killed.returncode != -9:
        return "lost" if killed.returncode != 0 else "not killed"
    runs = list(folder.iterdir())
    if not runs:
        return "refused"  # killed before the run directory existed: nothing to resume
    (run_dir,) = runs
    resumed = _run("-m", "selfmod.cli", "resume", str(run_dir))
    if resumed.returncode == 2 and resumed.stderr.count("\n") == 1:
        return "refused"
    final = run_dir / "final.safetensors"
    if resumed.returncode == 0 and final.is_file() and final.read_bytes() == expected:
        return "identical"
    return "lost"


def points(n: int, seed: int = 0) -> list[str]:
    """``n`` kill points: every file once, then seeded random base steps and files."""
    rng = random.Random(seed)
    out = [f"write={f}" for f in FILES]
    while len(out) < n:
        out.append(
            f"step={rng.randrange(120)}" if rng.random() < 0.7 else f"write={rng.choice(FILES)}"
        )
    return out[:n]


META = [
    "checkpoint_every=5", "meta_batch=2", "unroll=5", "horizon=20", "width=8", "n_way=3",
    "inner_batch=16", "meta_steps=15",
]  # fmt: skip
META_FILES = ["ckpt-00000005", "ckpt-00000010.safe", "ckpt-00000010.json", "ckpt-00000015"]


def _meta_sets(out: Path) -> list[str]:
    return [a for s in [*META, f"out={out}"] for a in ("--set", s)]


def meta_reference(folder: Path) -> tuple[bytes, float]:
    """The learned optimizer of an uninterrupted meta-train run, and its wall time."""
    import time

    start = time.perf_counter()
    out = _run("-m", "selfmod.cli", "meta-train", *_meta_sets(folder))
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return (folder / "weights.safetensors").read_bytes(), time.perf_counter() - start


def meta_trial(where: str, folder: Path, expected: bytes) -> str:
    """One kill of meta-train at ``where`` (``time=S`` or ``write=NAME``) and a resume."""
    killed = _run(CRASH_AT, where, "meta-train", *_meta_sets(folder))
    if killed.returncode == 0:
        return "not killed"
    if killed.returncode != -9:
        return "lost"
    resumed = _run("-m", "selfmod.cli", "meta-train", *_meta_sets(folder), "--resume")
    if resumed.returncode == 2 and resumed.stderr.count("\n") == 1:
        return "refused"
    weights = folder / "weights.safetensors"
    if resumed.returncode == 0 and weights.is_file() and weights.read_bytes() == expected:
        return "identical"
    return "lost"


def main(n: int, n_meta: int = 0, seed: int = 0) -> tuple[Counter, Counter]:
    counts: Counter = Counter()
    meta: Counter = Counter()
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        expected = reference(Path(tmp) / "reference")
        for i, where in enumerate(points(n, seed)):
            outcome = trial(where, Path(tmp) / f"kill{i}", expected)
            counts[outcome] += 1
            print(f"train {i + 1:3d}/{n} {where:28s} {outcome}", flush=True)
        if n_meta:
            weights, seconds = meta_reference(Path(tmp) / "meta-reference")
            for i in range(n_meta):
                where = (
                    f"write={META_FILES[i % len(META_FILES)]}"
                    if i < len(META_FILES)
                    else f"time={rng.uniform(0.2, 1.0) * seconds:.2f}"
                )
                outcome = meta_trial(where, Path(tmp) / f"meta{i}", weights)
                meta[outcome] += 1
                print(f"meta-train {i + 1:3d}/{n_meta} {where:22s} {outcome}", flush=True)
    return counts, meta


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    train, meta = main(*(args or [40]))
    for name, c in (("train", train), ("meta-train", meta)):
        if c:
            tried = sum(c.values())
            print(
                f"{name}: kills tried {tried}: "
                + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
            )
