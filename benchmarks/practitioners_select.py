"""How ``SELFMOD_CONFIG`` (selfmod's settings in the practitioners' benchmark) is chosen: on the
validation split with validation seeds, never on the published seeds 0-4 or on test.

    python benchmarks/practitioners_select.py            # seeds 10 11 12, every workload

For each candidate, workload and seed: one selfmod run (validation metric, wall s) and one plain
AdamW run of the same steps (its wall s: the grid costs 13 of them, so the target's 1/10 of the
grid is about 1.3 plain runs). The rule, fixed before any candidate was run: on each workload,
the candidates whose median validation metric is within the workload's tolerance of the best
candidate's are "as good"; the candidate as good on the most workloads wins, ties going to the
lowest median time (selfmod s / plain s) over the workloads. Prints one table and the choice.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from selfmod.bench import practitioners as P

CANDIDATES = {
    "cycle 25, lookahead 10 (the previous choice)": {"cycle": 25, "lookahead": 10},
    "cycle 50, lookahead 5": {"cycle": 50, "lookahead": 5},
    "cycle 100, lookahead 5": {"cycle": 100, "lookahead": 5},
    "cycle 50, lookahead 5, rates' mean rising": {"cycle": 50, "lookahead": 5, "lr_mean": "rising"},
}
BASE = {"optimizer": "adamw", "lr": 3e-3, "lr_mean": "free"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12])
    ap.add_argument("--workloads", nargs="+", default=list(P.WORKLOADS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    P.pin_one_core(0)
    rows: dict[str, dict[str, dict]] = {c: {} for c in CANDIDATES}
    works = {name: P.make_workload(name) for name in args.workloads}
    for name, work in works.items():
        P.train(work, 0, P.adamw(1e-3, 0.0), steps=5)  # warm-up, not timed
        plain = [P.train(work, s, P.adamw(1e-3, 0.0)).seconds for s in args.seeds]
        for cand, over in CANDIDATES.items():
            runs = [P.fit_selfmod(work, s, {**BASE, **over}) for s in args.seeds]
            rows[cand][name] = {
                "val": statistics.median(r.val for r in runs),
                "ratio": statistics.median(r.seconds / p for r, p in zip(runs, plain, strict=True)),
                "vals": [round(r.val, 4) for r in runs],
            }
            print(json.dumps({"candidate": cand, "workload": name, **rows[cand][name]}), flush=True)
    as_good = {c: 0 for c in CANDIDATES}
    for name, work in works.items():
        sign = 1.0 if work.higher_is_better else -1.0
        best = max(sign * rows[c][name]["val"] for c in CANDIDATES)
        for c in CANDIDATES:
            as_good[c] += sign * rows[c][name]["val"] >= best - work.tolerance
    cost = {c: statistics.median(rows[c][n]["ratio"] for n in args.workloads) for c in CANDIDATES}
    chosen = max(CANDIDATES, key=lambda c: (as_good[c], -cost[c]))
    print(f"\n| candidate | {' | '.join(args.workloads)} | as good on | median s / plain run |")
    print("|---|" + "---|" * len(args.workloads) + "---|---|")
    for c in CANDIDATES:
        vals = " | ".join(
            f"{rows[c][n]['val']:.4g} ({rows[c][n]['ratio']:.1f}x)" for n in args.workloads
        )
        print(f"| {c} | {vals} | {as_good[c]} | {cost[c]:.2f} |")
    print(f"\nchosen: {chosen}: {json.dumps({**BASE, **CANDIDATES[chosen]})}")


if __name__ == "__main__":
    main()
