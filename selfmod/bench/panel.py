"""The development panel: the introspective loop's defaults (:func:`selfmod.runs.fit`) against
plain optimizers on six offline workloads of different kinds (:mod:`selfmod.bench.workloads`:
an MLP on MNIST-1D, a CNN with BatchNorm, a byte-level Transformer LM with embeddings, tabular
classification, tabular regression, a GRU over sequences). Settings of the loop are chosen here,
then reported once on the practitioners benchmark.

The rule, written before any run of the panel:

1. Data: development split 1 (``--split``; the published training and validation rows
   re-split, no published test row) and seeds 10, 11, 12. Never split 0, never the published
   seeds 0-4.
2. Budget: every run trains for the workload's ``steps`` at its ``batch`` (its examples budget);
   ``--steps`` scales the steps (tests only).
3. Contenders: ``adamw-1e-3``: AdamW (torch's, weight decay 0.01) at a constant lr 1e-3;
   ``adamw-sweep``: the same AdamW with 5% warm-up and cosine decay at lr 1e-4, 3e-4, 1e-3,
   3e-3 and 1e-2, the point with the best validation metric per seed (its cost: all five runs);
   ``prodigy`` and ``schedulefree-adamw`` at their defaults; ``fit``: one
   :func:`selfmod.runs.fit` run with AdamW and the loop's defaults (only ``steps``,
   ``batch_size``, ``seed``, ``guard_size = min(2000, validation rows)`` and the switches that
   write nothing, ``report``, ``deterministic``, ``compare_fixed``, are set; where the
   workload's batch is below 32, the batch-size modifier's default floor, that floor is lowered
   to the batch, as fit refuses a batch below it: ``pylm``'s 16; amended at the first run,
   before any ``pylm`` run) plus the ``--fit-set`` overrides of its ``--tag``; the validation
   rows are its guard.
4. Measurement: each training run in its own process, one torch thread, pinned to one core;
   from building the model to the final validation and test metrics (imports and data
   excluded): wall seconds and CPU seconds (user + system; with one thread, the wall time of a
   quiet machine: the time criterion reads them, as the panel's machine is shared); peak
   memory: the peak resident size minus the resident size just before the model is built (as
   ``benchmarks/scale.py``); the examples trained on (``fit``: its summary's ``examples``).
   Per workload, medians over the seeds.
5. Criteria for a ``fit`` setting on a workload, each met or missed: its median test metric
   (a) better than ``adamw-1e-3``'s, (b) than ``prodigy``'s, (c) than ``schedulefree-adamw``'s;
   (d) not worse than ``adamw-sweep``'s by more than the workload's tolerance; and against
   ``adamw-1e-3``'s medians (e) CPU time <= 1.3x, (f) examples <= 1.3x, (g) peak memory <= 2x
   (each peak floored at 1 MB). A workload passes when all seven are met.
6. Choice between ``fit`` settings (tags): the most workloads passed; ties to the most criteria
   met over all workloads; then to the current defaults (tag ``before``).
7. Amended after the runs of split 1, and said so in its table: only settings in which the
   run changes its own hyperparameters or architecture (a modifier or the rates' race) are
   candidates; the others (``modifiers = []`` and no ``level_race``: a fixed recipe, with or
   without early stopping) are references. Among the tags run before this rule, rule 6 alone
   chose a reference (AdamW at lr 1e-2 with a cosine schedule and no self-modification, 3
   workloads of 6 passed); the table gives both choices beside each other.
8. Amended to rule 4 after the runs of split 1: the CPU ratios of the sub-second workloads
   moved by up to 0.2 between invocations minutes apart (the machine is shared), more than the
   changes they were to judge. With ``--repeat R`` the runs the time criterion reads
   (``adamw-1e-3`` and ``fit``) are made ``R`` times per seed, the repeats spread over the
   invocation (each round of every run before the next), and a seed's wall, CPU and peak are
   the medians over its repeats; its metrics are the first repeat's (the same computation).
   The criteria are unchanged.

    python benchmarks/panel.py --jobs 2 --tag before
    python benchmarks/panel.py --contenders fit --fit-set cycle=100 --tag cycle100 --jobs 2

Writes ``panel_dev.md`` and ``panel_dev.json`` (``--out``); a later invocation with the same
``--out`` merges its runs into the file's (same split and steps), so settings compare in one
table without re-running the others.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from selfmod.bench.vs_search import _finite
from selfmod.bench.workloads import WORKLOADS, Workload
from selfmod.files import atomic_write_text
from selfmod.runs.api import FIT_DEFAULTS

CONTENDERS = ("adamw-1e-3", "adamw-sweep", "prodigy", "schedulefree-adamw", "fit")
BASELINES = CONTENDERS[:-1]
SWEEP_LR = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
WEIGHT_DECAY = 0.01  # torch's AdamW default
MIN_BATCH = 32  # the batch-size modifier's default floor: fit refuses a smaller batch
FIELDS = ("seconds", "cpu_s", "peak_mb", "examples")
LIMITS = {"cpu_s": 1.3, "examples": 1.3, "peak_mb": 2.0}
CRITERIA = (
    "beats adamw-1e-3", "beats prodigy", "beats schedulefree", "within tol. of sweep",
    "time <= 1.3x", "examples <= 1.3x", "memory <= 2x",
)  # fmt: skip
DEFAULT_OUT = "benchmarks/results/panel_dev.json"
#: the contenders the time criterion reads (``fit`` rows against ``adamw-1e-3``): repeated
#: under ``--repeat`` (rule 8)
TIMED = ("adamw-1e-3", "fit")


# ----------------------------------------------------------------------------- one run


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """One training run in this process (``spec``: workload, split, steps, seed, contender,
    lr for a sweep point, fit_set, core); its measurement as a dict."""
    import torch
    import torch._dynamo  # torch.optim imports it on first use: an import, not training

    from selfmod.bench.training import adamw, lr_free, make_workload, pin_one_core, train
    from selfmod.bench.training import warmup_cosine as cosine

    pin_one_core(spec["core"])
    work = make_workload(spec["workload"], spec["steps"], spec["split"])
    contender, seed = spec["contender"], spec["seed"]
    if contender == "fit":
        from selfmod.runs import fit
    elif contender in ("prodigy", "schedulefree-adamw"):
        make = lr_free(contender)
        make([torch.nn.Parameter(torch.zeros(1))])  # its package imported
    else:
        make = adamw(spec["lr"] or 1e-3, WEIGHT_DECAY)
    gc.collect()
    start_kb, start, cpu = _rss_kb(), time.perf_counter(), _cpu_s()
    if contender == "fit":
        config = {
            "steps": work.steps, "batch_size": work.batch, "seed": seed, "report": False,
            "deterministic": False, "compare_fixed": False,
            "guard_size": min(2000, len(work.val[1])),
            **({"modifiers.batch_size.min_batch": work.batch} if work.batch < MIN_BATCH else {}),
            **spec["fit_set"],
        }  # fmt: skip
        torch.manual_seed(seed)
        with tempfile.TemporaryDirectory() as tmp:
            result = fit(
                work.model(), work.loss, work.train, work.val, optimizer="adamw",
                metric="accuracy" if work.higher_is_better else "loss",
                run_dir=Path(tmp) / "run", config=config,
            )  # fmt: skip
        val, test = work.evaluate(result.module, work.val), work.evaluate(result.module, work.test)
        examples = int(result.summary["examples"])
    else:
        factor = (lambda s: cosine(s, work.steps)) if contender == "adamw-sweep" else None
        run = train(work, seed, make, factor=factor)
        val, test, examples = run.val, run.test, run.steps * work.batch
    seconds, cpu_s = time.perf_counter() - start, _cpu_s() - cpu
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_kb) / 1024
    return {"val": val, "test": test, "seconds": seconds, "cpu_s": cpu_s, "peak_mb": peak_mb,
            "examples": examples}  # fmt: skip


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _measure(spec: dict[str, Any], limit: float) -> dict[str, Any]:
    """:func:`run_one` in a child process; a failure is recorded as ``failed``."""
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "selfmod.bench.panel", "--child", json.dumps(spec)]
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=limit, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return {"failed": f"over {limit:g} s"}
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines() or [f"exit status {out.returncode}"]
        return {"failed": lines[-1][-160:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- summaries


def key_of(contender: str, tag: str) -> str:
    """The row of a contender: baselines by name; ``fit`` settings by tag (``fit:before``)."""
    return f"fit:{tag}" if contender == "fit" and tag else contender


def _per_seed(work: Workload, runs: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """One record per seed; a sweep's five points become the one with the best validation
    metric, at the cost of all five (summed wall and examples, the largest peak)."""
    by_seed: dict[int, dict[Any, list[dict[str, Any]]]] = {}
    for r in runs:
        by_seed.setdefault(r["seed"], {}).setdefault(r.get("lr"), []).append(r)
    out = {}
    for seed, points in sorted(by_seed.items()):
        failed = [r["failed"] for p in points.values() for r in p if "failed" in r]
        if failed:
            out[seed] = {"failed": failed[0]}
            continue
        rs = [of_repeats(p) for p in points.values()]
        best = rs[0]
        for r in rs[1:]:
            if work.better(r["val"], best["val"]):
                best = r
        out[seed] = {
            "val": best["val"], "test": best["test"], "lr": best.get("lr"),
            "seconds": sum(r["seconds"] for r in rs), "cpu_s": sum(r["cpu_s"] for r in rs),
            "peak_mb": max(r["peak_mb"] for r in rs), "examples": sum(r["examples"] for r in rs),
        }  # fmt: skip
    return out


def of_repeats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's record from its repeats (rule 8): the first repeat's metrics and examples, the
    medians of the wall and CPU seconds and of the peaks."""
    first = min(runs, key=lambda r: r.get("repeat", 0))
    cost = ("seconds", "cpu_s", "peak_mb")
    return {**first, **{f: statistics.median(r[f] for r in runs) for f in cost}}


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def summarize(work: Workload, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over seeds per row, and every ``fit`` row's criteria against the baselines."""
    rows: dict[str, Any] = {}
    for key in sorted({key_of(r["contender"], r["tag"]) for r in runs}, key=_order):
        seeds = _per_seed(work, [r for r in runs if key_of(r["contender"], r["tag"]) == key])
        ok = [s for s in seeds.values() if "failed" not in s]
        rows[key] = {f: _median([s[f] for s in ok]) for f in ("test", "val", *FIELDS)}
        rows[key].update(
            tests=[s.get("test", math.nan) for s in seeds.values()], seeds=list(seeds),
            failed=[s["failed"] for s in seeds.values() if "failed" in s],
            lrs=[s["lr"] for s in ok if s.get("lr") is not None],
        )  # fmt: skip
    verdicts = {k: criteria(work, rows, k) for k in rows if k.startswith("fit")}
    return {
        "describe": work.describe, "metric": work.metric, "tolerance": work.tolerance,
        "higher_is_better": work.higher_is_better, "steps": work.steps, "batch": work.batch,
        "rows": rows, "verdicts": verdicts,
    }  # fmt: skip


def _order(key: str) -> tuple[int, str]:
    name = key.split(":")[0]
    return CONTENDERS.index(name) if name in CONTENDERS else len(CONTENDERS), key


def criteria(work: Workload, rows: dict[str, Any], key: str) -> dict[str, Any]:
    """The seven criteria of the rule for row ``key``: ``{criterion: [met, figure]}`` (a
    baseline not run: missed, figure NaN) and ``passed``."""
    me, sign = rows[key], 1.0 if work.higher_is_better else -1.0

    def base(name: str, field: str) -> float:
        return rows[name][field] if name in rows else math.nan

    out: dict[str, Any] = {}
    for crit, name in zip(CRITERIA[:3], BASELINES[:1] + BASELINES[2:], strict=True):
        diff = sign * (me["test"] - base(name, "test"))
        out[crit] = [bool(diff > 0), diff]
    diff = sign * (me["test"] - base("adamw-sweep", "test"))
    out[CRITERIA[3]] = [bool(diff >= -work.tolerance), diff]
    for crit, (field, limit) in zip(CRITERIA[4:], LIMITS.items(), strict=True):
        floor = 1.0 if field == "peak_mb" else 0.0
        ratio = max(me[field], floor) / max(base("adamw-1e-3", field), floor or 1e-12)
        out[crit] = [bool(ratio <= limit), ratio]
    out["passed"] = all(v[0] for v in out.values())
    return out


def changes_itself(fit_set: dict[str, Any], defaults: dict[str, Any]) -> bool:
    """Whether a ``fit`` setting (``fit_set`` over ``defaults``, fit's defaults when it ran)
    changes the run's own hyperparameters or architecture: a modifier or the rates' race
    (rule 7)."""
    values = {**defaults, **fit_set}
    return values.get("modifiers") != [] or bool(values.get("level_race"))


def references(runs: list[dict[str, Any]]) -> set[str]:
    """The ``fit`` rows of settings that do not change themselves (rule 7); a run recorded
    before fit's defaults were kept with it ran under defaults with every modifier on."""
    return {
        key_of("fit", r["tag"])
        for r in runs
        if r["contender"] == "fit"
        and not changes_itself(r.get("fit_set") or {}, r.get("fit_defaults", {}))
    }


def choose(summary: dict[str, Any], exclude: Collection[str] = ()) -> str | None:
    """The ``fit`` row the rule chooses: most workloads passed, then most criteria met, then
    ``fit:before``; rows in ``exclude`` (rule 7's references) are not candidates."""
    keys = sorted({k for w in summary.values() for k in w["verdicts"]} - set(exclude))
    if not keys:
        return None

    def score(k: str) -> tuple[int, int, bool]:
        vs = [w["verdicts"][k] for w in summary.values() if k in w["verdicts"]]
        met = sum(v[c][0] for v in vs for c in CRITERIA)
        return sum(v["passed"] for v in vs), met, k == "fit:before"

    return max(keys, key=score)


# ----------------------------------------------------------------------------- tables


def _fmt(work: dict[str, Any], x: float) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    return f"{100 * x:.1f}" if work["metric"] == "test_accuracy" else f"{x:.3f}"


def _repeated(runs: list[dict[str, Any]]) -> str:
    """The sentence on repeats (rule 8), where any run was repeated."""
    most = max((r.get("repeat", 0) for r in runs), default=0) + 1
    if most == 1:
        return ""
    return (
        f"Runs of {' and '.join(TIMED)} made up to {most} times per seed (rule 8): a seed's wall, "
        "CPU and peak are the medians over its repeats, its metrics the first repeat's. "
    )


def markdown(record: dict[str, Any]) -> str:
    """The panel's table: per workload every row's medians and each ``fit`` row's criteria,
    then the criteria met per workload and the rule's choice."""
    p, summary = record["protocol"], record["workloads"]
    lines = [
        "# Development panel: the loop's defaults against plain optimizers",
        "",
        f"Development split {p['split']}, seeds {sorted(p['seeds'])}, each workload's examples "
        f"budget (x{p['steps']:g} its steps); the rule is fixed in the docstring of "
        "`selfmod/bench/panel.py`. Each run in its own process, one torch thread; medians over "
        "seeds. Wall and CPU s from building the model to the final metrics; peak MB above the "
        "process's resident size before the model; the sweep's cost is its five runs. "
        + _repeated(record["runs"])
        + f"Invocations: {'; '.join(record['invocations'])}.",
        "",
    ]
    for name, w in summary.items():
        unit = {"test_accuracy": "test acc. %", "bits_per_byte": "test bits/byte"}
        lines += [
            f"## {name}: {w['describe']}",
            "",
            f"{w['steps']} steps, batch {w['batch']}; tolerance {w['tolerance']:g}"
            + (" (lower is better)" if not w["higher_is_better"] else "") + ".",
            "",
            f"| row | {unit.get(w['metric'], 'test MSE')} (min-max) | wall s | CPU s | peak MB | "
            "examples | note |",
            "|---|---|---:|---:|---:|---:|---|",
        ]  # fmt: skip
        for key, r in w["rows"].items():
            tests = [t for t in r["tests"] if t is not None and not math.isnan(t)]
            spread = f" ({_fmt(w, min(tests))}-{_fmt(w, max(tests))})" if len(tests) > 1 else ""
            note = "; ".join(
                ([f"lr chosen {', '.join(f'{lr:g}' for lr in r['lrs'])}"] if r["lrs"] else [])
                + [f"failed: {f}" for f in r["failed"]]
            )
            lines.append(
                f"| {key} | {_fmt(w, r['test'])}{spread} | {r['seconds']:.1f} | {r['cpu_s']:.1f} | "
                f"{r['peak_mb']:.0f} | {r['examples']:,.0f} | {note} |"
            )
        lines.append("")
        if w["verdicts"]:
            lines += [
                "| fit row | " + " | ".join(CRITERIA) + " | all |",
                "|---|" + "---|" * (len(CRITERIA) + 1),
            ]
            for key, v in w["verdicts"].items():
                cells = [_figure(i, v[c][1]) for i, c in enumerate(CRITERIA)]
                marks = [
                    f"{c} {'met' if v[k][0] else 'miss'}"
                    for c, k in zip(cells, CRITERIA, strict=True)
                ]
                lines.append(
                    f"| {key} | " + " | ".join(marks)
                    + f" | {'**passed**' if v['passed'] else 'failed'} |"
                )  # fmt: skip
            lines.append("")
    keys = sorted({k for w in summary.values() for k in w["verdicts"]})
    if keys:
        names = list(summary)
        lines += [
            "## Criteria met (of 7) per workload",
            "",
            "| fit row | " + " | ".join(names) + " | workloads passed |",
            "|---|" + "---:|" * (len(names) + 1),
        ]
        for k in keys:
            vs = [summary[n]["verdicts"].get(k) for n in names]
            cells = ["" if v is None else str(sum(v[c][0] for c in CRITERIA)) for v in vs]
            passed = sum(bool(v and v["passed"]) for v in vs)
            lines.append(f"| {k} | " + " | ".join(cells) + f" | {passed} of {len(names)} |")
        refs = references(record.get("runs", []))
        lines += [
            "",
            f"Chosen by the rule: `{choose(summary, refs)}` (rule 7: among settings that change "
            f"themselves); by rule 6 alone: `{choose(summary)}`. References (no self-"
            f"modification): {', '.join(f'`{k}`' for k in sorted(refs)) or 'none'}.",
            "",
        ]
    return "\n".join(lines) + "\n"


def _figure(index: int, x: float) -> str:
    """A criterion's figure: a difference of metrics (the first four) or a ratio."""
    if x is None or math.isnan(x):
        return "n/a"
    return f"{x:+.3f}" if index < 4 else f"{x:.2f}x"


# ----------------------------------------------------------------------------- the panel


def _parse_set(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values read as JSON where they parse (numbers, true, lists)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--fit-set takes key=value (got {item!r})")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def jobs_of(args: argparse.Namespace, fit_set: dict[str, Any]) -> list[dict[str, Any]]:
    """Every single training run the invocation asks for (longest workloads first)."""
    specs = []
    for repeat in range(args.repeat):  # rounds: the repeats spread over the invocation
        for name in args.workloads:
            for contender in [c for c in args.contenders if repeat == 0 or c in TIMED]:
                for seed in args.seeds:
                    for lr in SWEEP_LR if contender == "adamw-sweep" else (None,):
                        specs.append({
                            "workload": name, "split": args.split, "steps": args.steps,
                            "seed": seed, "contender": contender,
                            "tag": args.tag if contender == "fit" else "", "lr": lr,
                            "fit_set": fit_set if contender == "fit" else {}, "repeat": repeat,
                            **({"fit_defaults": FIT_DEFAULTS} if contender == "fit" else {}),
                        })  # fmt: skip
    return specs


def _same_run(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether ``b`` replaces ``a``: the same run, whichever repeat (a later invocation's runs
    replace every repeat of theirs)."""
    fields = ("workload", "contender", "tag", "seed", "lr")
    return all(a[f] == b[f] for f in fields)


def run_panel(argv: list[str] | None = None, log: Callable[[str], None] | None = None) -> str:
    """Parse ``argv``, run the asked training runs, merge them into ``--out`` and write the json
    and markdown; returns the markdown."""
    args = parser().parse_args(argv)
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if args.split == 0:
        raise SystemExit("--split 0 is the published split: the panel chooses on development "
                         "splits (1, 2, ...)")  # fmt: skip
    if args.repeat < 1:
        raise SystemExit(f"--repeat takes a count >= 1 (got {args.repeat})")
    fit_set = _parse_set(args.fit_set)
    out = Path(args.out).with_suffix(".json")
    protocol = {"split": args.split, "steps": args.steps, "seeds": list(args.seeds)}
    record: dict[str, Any] = {"protocol": protocol, "runs": [], "invocations": []}
    if out.exists():
        old = json.loads(out.read_text())
        if (old["protocol"]["split"], old["protocol"]["steps"]) != (args.split, args.steps):
            raise SystemExit(f"{out} holds split {old['protocol']['split']}, steps x"
                             f"{old['protocol']['steps']:g}: pass another --out to start a new "
                             "panel")  # fmt: skip
        record = old
        record["protocol"]["seeds"] = sorted(set(old["protocol"]["seeds"]) | set(args.seeds))
    specs = jobs_of(args, fit_set)
    log(f"panel: {len(specs)} runs, {args.jobs} at a time")
    start, done = time.perf_counter(), [0]
    free = list(range(args.jobs))

    def one(spec: dict[str, Any]) -> dict[str, Any]:
        core = free.pop()
        try:
            got = _measure({**spec, "core": core}, args.limit)
        finally:
            free.append(core)
        done[0] += 1
        what = got.get("failed") or f"test {got['test']:.4g}, {got['seconds']:.1f} s"
        lr = f" lr {spec['lr']:g}" if spec["contender"] == "adamw-sweep" else ""
        row = f"{spec['workload']} {key_of(spec['contender'], spec['tag'])}{lr} seed {spec['seed']}"
        row += f" repeat {spec['repeat']}" if spec["repeat"] else ""
        log(f"[{done[0]}/{len(specs)} {time.perf_counter() - start:.0f} s] {row}: {what}")
        return {**spec, **got}

    with ThreadPoolExecutor(args.jobs) as pool:
        new = list(pool.map(one, specs))
    minutes = (time.perf_counter() - start) / 60
    record["runs"] = [r for r in record["runs"] if not any(_same_run(r, n) for n in new)]
    record["runs"] += [{k: v for k, v in r.items() if k not in ("core", "split", "steps")}
                       for r in new]  # fmt: skip
    how = " ".join(argv if argv is not None else sys.argv[1:])
    record["invocations"].append(f"`{how}` ({len(new)} runs, {minutes:.1f} min)")
    names = [n for n in WORKLOADS if any(r["workload"] == n for r in record["runs"])]
    from selfmod.bench.training import make_workload

    record["workloads"] = {
        n: summarize(
            make_workload(n, args.steps, args.split),
            [r for r in record["runs"] if r["workload"] == n],
        )
        for n in names
    }
    record["chosen"] = choose(record["workloads"], references(record["runs"]))
    text = markdown(record)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(_finite(record), indent=1))
    atomic_write_text(out.with_suffix(".md"), text)
    log(f"panel: {minutes:.1f} min; wrote {out} and {out.with_suffix('.md').name}")
    return text


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[10, 11, 12])
    ap.add_argument("--split", type=int, default=1, help="development split (never 0)")
    ap.add_argument("--steps", type=float, default=1.0, help="x each workload's steps")
    ap.add_argument("--fit-set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="fit config overrides for this invocation's fit runs")  # fmt: skip
    ap.add_argument("--tag", default="", help="names this invocation's fit row: fit:TAG")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, one core each")
    ap.add_argument("--limit", type=float, default=1800, help="seconds per run")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of adamw-1e-3 and fit per seed; times: their medians (rule 8)",
    )
    ap.add_argument("--out", default=DEFAULT_OUT, help="the json (the .md beside it)")
    return ap


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(run_one(json.loads(sys.argv[2]))))
    else:
        run_panel()
