"""Few-shot classification on MNIST-1D template episodes: MAML, first-order MAML and Meta-SGD
against a nearest-centroid baseline on the same test episodes.

Classes are random templates passed through MNIST-1D's generation pipeline
(:class:`selfmod.tasks.TemplateTasks`: 160 meta-train templates, 40 held out for meta-test).
Model: MLP 40-64-64-N. Inner loop: ``--inner-steps`` SGD steps (Meta-SGD: learned
per-coordinate steps) on the support set; meta-optimizer Adam on the query loss.
Accuracy is the mean over ``--eval-episodes`` held-out episodes with a 95% confidence interval
(1.96 standard errors).

    python benchmarks/fewshot.py                 # 5-way, 1 and 5 shots, all methods
    python benchmarks/fewshot.py --iterations 200 --eval-episodes 100   # quick look
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from selfmod import optim
from selfmod.meta import adapt, maml_step, meta_sgd_optimizer
from selfmod.models import init_mlp_params, mlp_forward
from selfmod.tasks import TemplateTasks

RESULTS = Path(__file__).parent / "results"
METHODS = ("maml", "fo-maml", "meta-sgd")


def loss(p, batch):
    x, y = batch
    return F.cross_entropy(mlp_forward(p, x), y)


def mean_ci(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values)
    return float(t.mean()), float(1.96 * t.std() / math.sqrt(len(values)))


def nearest_centroid(ep) -> float:
    classes = ep.y_support.unique()
    centroids = torch.stack([ep.x_support[ep.y_support == c].mean(0) for c in classes])
    pred = torch.cdist(ep.x_query, centroids).argmin(1)
    return float((classes[pred] == ep.y_query).float().mean())


def meta_train(method: str, tasks: TemplateTasks, args, shots: int):
    params = init_mlp_params([40, 64, 64, args.way], torch.Generator().manual_seed(args.seed))
    opt, hparams = (
        meta_sgd_optimizer(params) if method == "meta-sgd" else (optim.sgd(args.inner_lr), {})
    )
    meta = optim.adam(args.meta_lr)
    everything = {**params, **hparams}
    meta_state = meta.init(everything)
    for it in range(args.iterations):
        episodes = [
            tasks.sample(
                args.way,
                shots,
                args.queries,
                "train",
                seed=args.seed * 10**6 + it * args.meta_batch + j,
            )
            for j in range(args.meta_batch)
        ]
        g = maml_step(
            loss,
            params,
            episodes,
            steps=args.inner_steps,
            optimizer=opt,
            hparams=hparams,
            first_order=method == "fo-maml",
        )
        updates, meta_state = meta.update({**g.params, **g.hparams}, meta_state, everything)
        everything = optim.apply_updates(everything, updates)
        params = {k: everything[k] for k in params}
        hparams = {k: everything[k] for k in hparams}
    return params, opt, hparams


def evaluate(params, opt, hparams, tasks, args, shots) -> list[float]:
    accs = []
    for i in range(args.eval_episodes):
        ep = tasks.sample(args.way, shots, args.queries, "test", seed=10**9 + i)
        adapted = adapt(loss, opt, params, hparams, ep.support, args.inner_steps)
        with torch.no_grad():
            accs.append(
                float((mlp_forward(adapted, ep.x_query).argmax(1) == ep.y_query).float().mean())
            )
    return accs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--way", type=int, default=5)
    parser.add_argument("--shots", default="1,5")
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--iterations", type=int, default=1500, help="meta-training steps")
    parser.add_argument("--meta-batch", type=int, default=8)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--inner-lr", type=float, default=0.1)
    parser.add_argument("--meta-lr", type=float, default=1e-3)
    parser.add_argument("--eval-episodes", type=int, default=600)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        parser.error(f"--methods: unknown {bad}; allowed: {', '.join(METHODS)}")
    tasks = TemplateTasks(num_templates=200, train_fraction=0.8, examples_per_class=40, seed=0)
    rows = []
    for shots in [int(s) for s in args.shots.split(",")]:
        base = [
            nearest_centroid(tasks.sample(args.way, shots, args.queries, "test", seed=10**9 + i))
            for i in range(args.eval_episodes)
        ]
        rows.append((f"{args.way}-way {shots}-shot", "nearest centroid", *mean_ci(base), 0.0))
        for method in methods:
            start = time.perf_counter()
            params, opt, hparams = meta_train(method, tasks, args, shots)
            seconds = time.perf_counter() - start
            accs = evaluate(params, opt, hparams, tasks, args, shots)
            rows.append((f"{args.way}-way {shots}-shot", method, *mean_ci(accs), seconds))
            print(
                f"{rows[-1][0]:>14s} {method:>10s} {rows[-1][2]:.3f} +- {rows[-1][3]:.3f} "
                f"({seconds:.0f} s)",
                flush=True,
            )
    lines = ["| setting | method | accuracy (95% CI) | meta-training s |", "|---|---|---:|---:|"]
    lines += [f"| {s} | {m} | {a * 100:.1f} +- {c * 100:.1f} | {t:.0f} |" for s, m, a, c, t in rows]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fewshot.md").write_text(
        f"# benchmarks/fewshot.py ({time.strftime('%Y-%m-%d %H:%M')})\n\n"
        f"`{' '.join(['python', 'benchmarks/fewshot.py'])}` with {vars(args)}\n\n{table}\n"
    )


if __name__ == "__main__":
    main()
