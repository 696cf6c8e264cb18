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
from safetensors.torch import save_file

from selfmod import optim, tree
from selfmod.meta.train import (
    MetaTrainConfig,
    learned_optimizer,
    meta_train,
    minibatch,
    new_task,
    task_loss,
)
from selfmod.models import init_mlp_params
from selfmod.tasks import TemplateTasks

RESULTS = Path(__file__).parent / "results"
GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
CHECKPOINTS = (100, 500)


def train_curve(opt, hparams, width: int, task, seed: int, steps: int = 500) -> dict[int, float]:
    """Full-train-set loss after each step count in ``CHECKPOINTS`` (inf if it diverged)."""
    train, _ = task
    gen = torch.Generator().manual_seed(seed)
    params = init_mlp_params([40, width, 10], gen)
    state = opt.init(params)
    out = {}
    for step in range(1, steps + 1):
        p = tree.detach(params, requires_grad=True)
        grads = torch.autograd.grad(task_loss(p, None, minibatch(train, 64, gen)),
                                    list(p.values()))
        with torch.no_grad():
            updates, state = opt.update(dict(zip(p, grads, strict=True)), state, params, hparams)
            params = optim.apply_updates(params, updates)
        if step in CHECKPOINTS:
            with torch.no_grad():
                value = float(task_loss(params, None, train))
            out[step] = value if value == value else float("inf")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=9.5, help="meta-training per optimizer")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tasks = TemplateTasks(seed=0)
    learned = {}
    for kind in ("lstm", "mlp"):
        cfg = MetaTrainConfig(optimizer=kind, meta_steps=10**7, time_limit=60 * args.minutes,
                              out=f"/tmp/selfmod-learned-{kind}", checkpoint_every=500)
        start, log = time.perf_counter(), []
        weights = meta_train(cfg, tasks, on_step=lambda s, v, log=log: log.append(v))
        minutes = (time.perf_counter() - start) / 60
        first, last = statistics.mean(log[:50]), statistics.mean(log[-50:])
        print(f"meta-trained {kind}: {len(log)} meta-steps in {minutes:.1f} min, "
              f"meta-loss {first:.3f} -> {last:.3f}", flush=True)
        RESULTS.mkdir(exist_ok=True)
        save_file(weights, str(RESULTS / f"learned_{kind}.safetensors"))
        learned[kind] = (learned_optimizer(kind, 0)[0], weights, len(log), minutes, first, last)

    rows = []
    for width in (32, 128):
        held_out = [new_task(tasks, "test", 10, 10**6 + s) for s in range(args.seeds)]
        results: dict[str, dict[int, float]] = {}
        chosen: dict[str, dict[int, float]] = {}
        for kind, (opt, weights, *_rest) in learned.items():
            curves = [train_curve(opt, weights, width, t, s) for s, t in enumerate(held_out)]
            results[f"learned {kind}"] = {c: statistics.median(x[c] for x in curves)
                                          for c in CHECKPOINTS}
        for name, make in (("adam", lambda lr: optim.adam(lr)), ("sgd", lambda lr: optim.sgd(lr))):
            per_lr = {}
            for lr in GRID:
                curves = [train_curve(make(lr), None, width, t, s)
                          for s, t in enumerate(held_out)]
                per_lr[lr] = {c: statistics.median(x[c] for x in curves) for c in CHECKPOINTS}
            results[f"{name} (best lr)"] = {c: min(v[c] for v in per_lr.values())
                                            for c in CHECKPOINTS}
            chosen[name] = {c: min(per_lr, key=lambda lr, c=c: per_lr[lr][c])
                            for c in CHECKPOINTS}
        for name, r in results.items():
            lr_note = ""
            key = name.split(" ")[0]
            if key in chosen:
                lr_note = ", ".join(f"{chosen[key][c]:g}" for c in CHECKPOINTS)
            rows.append((f"40-{width}-10", name, r[100], r[500], lr_note))
            print(f"{rows[-1][0]} {name:>16s}  @100 {r[100]:.4f}  @500 {r[500]:.4f} {lr_note}",
                  flush=True)

    lines = ["| held-out task, MLP | optimizer | train loss @100 | train loss @500 | best lr "
             "(@100, @500) |", "|---|---|---:|---:|---|"]
    lines += [f"| {a} | {b} | {c:.4f} | {d:.4f} | {e} |" for a, b, c, d, e in rows]
    meta_lines = [f"- {kind}: {n} meta-steps in {m:.1f} min, meta-loss {f:.3f} -> {last:.3f}"
                  for kind, (_, _, n, m, f, last) in learned.items()]
    text = "\n".join(lines)
    print(text)
    (RESULTS / "learned_opt.md").write_text(
        f"# benchmarks/learned_opt.py ({time.strftime('%Y-%m-%d %H:%M')})\n\n"
        f"Options: {vars(args)}. Medians over {args.seeds} held-out tasks/seeds.\n\n"
        + "\n".join(meta_lines) + f"\n\n{text}\n")


if __name__ == "__main__":
    main()
