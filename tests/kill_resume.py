"""Crash consistency of ``selfmod train``: kill -9 at chosen points (before a base step, or
halfway through writing any of the run's files), then ``selfmod resume``; each kill ends as
*identical* (the final weights byte-for-byte those of an uninterrupted run), *refused* (one
line, exit 2, nothing changed) or *lost* (anything else: must never happen).

    python tests/kill_resume.py 60      # 60 kills at seeded random points; prints the counts

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
    "steps=120", "cycle=20", "lookahead=5", "width=8", "max_width=32", "guard_size=100",
    "replay_size=200", "compare_fixed=false", "keep_checkpoints=10",
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


def main(n: int) -> Counter:
    counts: Counter = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        expected = reference(Path(tmp) / "reference")
        for i, where in enumerate(points(n)):
            folder = Path(tmp) / f"kill{i}"
            outcome = trial(where, folder, expected)
            counts[outcome] += 1
            print(f"{i + 1:3d}/{n} {where:28s} {outcome}", flush=True)
    return counts


if __name__ == "__main__":
    c = main(int(sys.argv[1]) if len(sys.argv) > 1 else 40)
    print(f"kills tried {sum(c.values())}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
