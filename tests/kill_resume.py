"""Crash consistency: kill -9 at chosen points, then resume; each kill ends as *identical*
(the final weights byte-for-byte those of an uninterrupted run), *refused* (one line, exit 2,
nothing checkpointed; a fresh start then runs to the same end) or *lost* (anything else: must
never happen; *different* counts a resume that ended with other weights, which is lost too).

- ``selfmod train``: before a random base step, or halfway through writing any of its files;
  resumed with ``selfmod resume DIR``;
- ``selfmod meta-train``: after a random wall time (wherever it is, inside a checkpoint write
  too), or halfway through any checkpoint file; resumed with ``--resume``;
- ``fit(..., run_dir=DIR)`` and a loop of ``SelfModifier.step`` calls: before a random base
  step or halfway through writing any of their files; resumed with ``resume=True``.

    python tests/kill_resume.py 25 3 40 40  # kills of train, meta-train, fit, SelfModifier

Used by ``tests/test_crash_consistency.py`` with a few kills; the README quotes a larger run.
"""

from __future__ import annotations

import random
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import warm

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


def _run(*args: str, fresh: bool = False) -> subprocess.CompletedProcess:
    """``python ARGS``: forked from a server that has imported torch (:mod:`warm`), or with
    ``fresh`` a whole new interpreter."""
    if not fresh:
        return warm.run(args, timeout=600)
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, check=False, timeout=600
    )


def reference(folder: Path) -> bytes:
    """The final weights of an uninterrupted run, in a whole new interpreter: the killed and
    resumed runs, forked from a warm one, must end on its bytes."""
    out = _run("-m", "selfmod.cli", "train", *_sets(folder), fresh=True)
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


def points(n: int, seed: int = 0, files: list[str] = FILES, steps: int = 120) -> list[str]:
    """``n`` kill points: every one of ``files`` once, then seeded random base steps (below
    ``steps``) and files."""
    rng = random.Random(seed)
    out = [f"write={f}" for f in files]
    while len(out) < n:
        out.append(
            f"step={rng.randrange(steps)}" if rng.random() < 0.7 else f"write={rng.choice(files)}"
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


#: ``fit`` or a ``SelfModifier`` loop into ``argv[1]`` (``argv[2]``: "fit" or "step",
#: ``argv[3]``: "1" to resume); bad input is one line and exit 2, as the CLI's
API = """
import sys
import torch
import torch.nn.functional as F
from selfmod.errors import SelfmodError
from selfmod.runs import SelfModifier, fit

run_dir, api, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
g = torch.Generator().manual_seed(0)
x, y = torch.randn(400, 6, generator=g), torch.randint(0, 3, (400,), generator=g)
guard = (torch.randn(60, 6, generator=g), torch.randint(0, 3, (60,), generator=g))
config = {"steps": 40, "cycle": 10, "lookahead": 3, "replay_size": 50, "report": False,
          "keep_checkpoints": 10, "batch_size": 32,
          "meta_budget": None}  # a cycle (and a checkpoint) every 10 steps: API_FILES
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
try:
    if api == "fit":
        fit(model, F.cross_entropy, (x, y), guard, config=config, run_dir=run_dir, resume=resume)
    else:
        sm = SelfModifier(model, F.cross_entropy, guard, config=config, run_dir=run_dir,
                          resume=resume)
        batches = [(x[(32 * i) % 352 :][:32], y[(32 * i) % 352 :][:32]) for i in range(40)]
        for batch in batches[sm.steps_done :]:
            sm.step(batch)
        sm.finish()
except SelfmodError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
"""
#: the files fit and a SelfModifier loop write (name fragments), each a place to die in
API_FILES = [
    "config.json", "ckpt-00000000.safe", "ckpt-00000000.json", "ckpt-00000020.safe",
    "ckpt-00000030.json", "final.safe", "final.json", "history.json",
    "summary.json", "status.json",
]  # fmt: skip


def api_reference(folder: Path, api: str) -> bytes:
    """The final weights of an uninterrupted ``fit`` (``api="fit"``) or SelfModifier loop."""
    out = _run("-c", API, str(folder / "run"), api, "0")
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return (folder / "run" / "final.safetensors").read_bytes()


def api_trial(where: str, folder: Path, api: str, expected: bytes) -> str:
    """One kill of ``fit`` or a SelfModifier loop at ``where`` and a resume (``resume=True``);
    a refusal is followed by a fresh start in a new folder, which must end identical."""
    run_dir = folder / "run"
    killed = _run(CRASH_AT, where, "-c", API, str(run_dir), api, "0")
    if killed.returncode != -9:
        return "lost" if killed.returncode != 0 else "not killed"
    resumed = _run("-c", API, str(run_dir), api, "1")
    final = run_dir / "final.safetensors"
    if resumed.returncode == 2 and resumed.stderr.count("\n") == 1:
        if list(run_dir.glob("checkpoints/ckpt-*.json")):
            return "lost"  # refused although a checkpoint was complete
        fresh = _run("-c", API, str(folder / "fresh"), api, "0")
        ok = fresh.returncode == 0 and (folder / "fresh" / "final.safetensors").read_bytes()
        return "refused" if ok == expected else "lost"
    if resumed.returncode != 0 or not final.is_file():
        return "lost"
    return "identical" if final.read_bytes() == expected else "different"


def api_points(n: int, seed: int = 0, api: str = "step") -> list[str]:
    """``n`` kill points of fit or SelfModifier: every file once, then random steps and files.
    ``fit`` races the rates' level over its first steps instead of a cycle at step 0: its first
    checkpoint is the step-10 cycle's."""
    files = API_FILES if api == "step" else [f.replace("00000000", "00000010") for f in API_FILES]
    return points(n, seed, files, 40)


def main(
    n: int, n_meta: int = 0, n_fit: int = 0, n_step: int = 0, seed: int = 0
) -> dict[str, Counter]:
    counts: dict[str, Counter] = {k: Counter() for k in ("train", "meta-train", "fit", "step")}
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        if n:
            expected = reference(Path(tmp) / "reference")
        for i, where in enumerate(points(n, seed)):
            outcome = trial(where, Path(tmp) / f"kill{i}", expected)
            counts["train"][outcome] += 1
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
                counts["meta-train"][outcome] += 1
                print(f"meta-train {i + 1:3d}/{n_meta} {where:22s} {outcome}", flush=True)
        for api, k in (("fit", n_fit), ("step", n_step)):
            if not k:
                continue
            expected = api_reference(Path(tmp) / f"{api}-reference", api)
            for i, where in enumerate(api_points(k, seed, api)):
                outcome = api_trial(where, Path(tmp) / f"{api}{i}", api, expected)
                counts[api][outcome] += 1
                print(f"{api} {i + 1:3d}/{k} {where:28s} {outcome}", flush=True)
    return counts


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:5]]
    counts = main(*(args or [40]))
    names = {"step": "SelfModifier"}
    for name, c in counts.items():
        if c:
            shown = {k: c.get(k, 0) for k in ("identical", "different", "lost", "refused")}
            shown |= {k: v for k, v in c.items() if k not in shown}
            print(
                f"{names.get(name, name)}: kills {sum(c.values())}: "
                + ", ".join(f"{k} {v}" for k, v in shown.items())
            )
