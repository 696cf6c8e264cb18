"""Learned optimizers against tuned Adam and SGD on held-out MNIST-1D template tasks.

1. Meta-train the LSTM (Andrychowicz et al. 2016) and the MLP (Metz et al. style) optimizers
   with ``selfmod.meta.train`` for ``--minutes`` each: 10-way tasks from 160 meta-train
   templates, inner MLP 40-32-10, truncated unrolls of 10 steps over a 100-step horizon.
2. Train held-out tasks (10 of the 40 held-out templates) for 500 steps with each optimizer:
   the meta-training architecture (40-32-10) and a wider one (40-128-10); 5 seeds.
   Adam and SGD take the best learning rate of a grid, chosen per column by the median.
3. Report the training loss (full train split) after 100 and 500 steps, medians over seeds.
   500 steps is 5x the meta-training horizon: it measures the move out of distribution.

    python benchmarks/learned_opt.py                 # ~20 minutes of meta-training
    python benchmarks/learned_opt.py --minutes 1 --seeds 2   # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from selfmod import optim, tree
from selfmod.meta.train import (
    MetaTrainConfig,
    learned_optimizer,
    meta_train,
    minibatch,
    new_task,
    task_loss,
)
from selfmod.models import init_mlp_params, mlp_forward
from selfmod.tasks import TemplateTasks

RESULTS = Path(__file__).parent / "results"
GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
CHECKPOINTS = (100, 500)


def train_curve(
    opt, hparams, width: int, task, seed: int, steps: int = 500
) -> dict[int, tuple[float, float]]:
    """``(train loss, validation accuracy)`` after each step count in ``CHECKPOINTS``; the
    loss on the whole train split (inf if it diverged)."""
    train, valid = task
    gen = torch.Generator().manual_seed(seed)
    params = init_mlp_params([40, width, 10], gen)
    state = opt.init(params)
    out = {}
    for step in range(1, steps + 1):
        p = tree.detach(params, requires_grad=True)
        grads = torch.autograd.grad(task_loss(p, None, minibatch(train, 64, gen)), list(p.values()))
        with torch.no_grad():
            updates, state = opt.update(dict(zip(p, grads, strict=True)), state, params, hparams)
            params = optim.apply_updates(params, updates)
        if step in CHECKPOINTS:
            with torch.no_grad():
                value = float(task_loss(params, None, train))
                acc = float((mlp_forward(params, valid[0]).argmax(1) == valid[1]).float().mean())
            out[step] = (value if value == value else float("inf"), acc)
    return out


def medians(curves: list[dict[int, tuple[float, float]]]) -> dict[int, tuple[float, float]]:
    return {
        c: (statistics.median(x[c][0] for x in curves), statistics.median(x[c][1] for x in curves))
        for c in CHECKPOINTS
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=9.5, help="meta-training per optimizer")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="skip meta-training; use results/learned_*.safetensors",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tasks = TemplateTasks(seed=0)
    notes: list[str] = []
    learned = {}
    for kind in ("lstm", "mlp"):
        path = RESULTS / f"learned_{kind}.safetensors"
        if args.eval_only:  # keep the meta-training notes of the run that made the weights
            learned[kind] = (learned_optimizer(kind, 0)[0], load_file(str(path)))
            old = RESULTS / "learned_opt.md"
            notes += [
                line[2:]
                for line in (old.read_text().splitlines() if old.exists() else [])
                if line.startswith("- ") and f"{kind}" in line and "meta-steps" in line
            ]
            continue
        cfg = MetaTrainConfig(
            optimizer=kind,
            meta_steps=10**7,
            time_limit=60 * args.minutes,
            out=f"/tmp/selfmod-learned-{kind}",
            checkpoint_every=500,
        )
        start, log = time.perf_counter(), []
        weights = meta_train(cfg, tasks, on_step=lambda s, v, log=log: log.append(v))
        minutes = (time.perf_counter() - start) / 60
        note = (
            f"meta-trained {kind}: {len(log)} meta-steps in {minutes:.1f} min, "
            f"meta-loss {statistics.mean(log[:50]):.3f} -> {statistics.mean(log[-50:]):.3f}"
        )
        print(note, flush=True)
        notes.append(note)
        RESULTS.mkdir(exist_ok=True)
        save_file(weights, str(path))
        learned[kind] = (learned_optimizer(kind, 0)[0], weights)

    rows = []
    for width in (32, 128):
        held_out = [new_task(tasks, "test", 10, 10**6 + s) for s in range(args.seeds)]
        results: dict[str, dict[int, tuple[float, float]]] = {}
        for kind, (opt, weights) in learned.items():
            results[f"learned {kind}"] = medians(
                [train_curve(opt, weights, width, t, s) for s, t in enumerate(held_out)]
            )
        for name, make in (("adam", optim.adam), ("sgd", optim.sgd)):
            per_lr = {
                lr: medians(
                    [train_curve(make(lr), None, width, t, s) for s, t in enumerate(held_out)]
                )
                for lr in GRID
            }
            best = {c: min(per_lr, key=lambda lr, c=c: per_lr[lr][c][0]) for c in CHECKPOINTS}
            results[f"{name} (lr {best[100]:g} / {best[500]:g})"] = {
                c: per_lr[best[c]][c] for c in CHECKPOINTS
            }
        for name, r in results.items():
            rows.append((f"40-{width}-10", name, r[100][0], r[500][0], r[100][1], r[500][1]))
            print(
                "{} {:>24s}  loss @100 {:.4f} @500 {:.4f}  val acc @100 {:.3f} @500 {:.3f}".format(
                    *rows[-1]
                ),
                flush=True,
            )

    lines = [
        "| held-out task, MLP | optimizer | train loss @100 | train loss @500 "
        "| val acc @100 | val acc @500 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {a} | {b} | {c:.4f} | {d:.4f} | {e:.3f} | {f:.3f} |" for a, b, c, d, e, f in rows]
    text = "\n".join(lines)
    print(text)
    (RESULTS / "learned_opt.md").write_text(
        f"# benchmarks/learned_opt.py ({time.strftime('%Y-%m-%d %H:%M')})\n\n"
        f"Options: {vars(args)}. Medians over {args.seeds} held-out tasks/seeds; Adam and SGD "
        f"use the grid learning rate with the lowest median train loss at each step count "
        f"(shown as @100 / @500).\n\n" + "\n".join(f"- {n}" for n in notes) + f"\n\n{text}\n"
    )


if __name__ == "__main__":
    main()
