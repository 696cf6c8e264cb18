"""Self-modifying architecture on MNIST-1D: prune, grow, search.

(a) prune an MLP 40-512-512-10 with hard-concrete gates to <= 25% of its parameters;
(b) grow an MLP from width 8 with GradMax and the growth criterion, against fixed widths;
(c) DARTS-style search over {conv3, conv5, dilated conv, skip, none, max pool} cells for a
    1-D CNN, discretised by surgery and trained on, against a fixed conv5 CNN.

Every row is a median over seeds; wall time includes search/growth/pruning. Usage::

    python benchmarks/arch.py --seeds 0 1 2 --parts a b c --out benchmarks/results/arch.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from selfmod import arch
from selfmod.data import batches, load_mnist1d


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    model.train(was)
    return acc


def train(
    model: nn.Module,
    data,
    steps: int,
    lr: float,
    seed: int,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    opt: torch.optim.Optimizer | None = None,
    hook=None,
    batch_size: int = 100,
):
    """Adam on cross-entropy (+ ``extra_loss``); ``hook(step, opt)`` may operate on the model."""
    opt = opt or torch.optim.Adam(model.parameters(), lr)
    it = batches(data.x_train, data.y_train, batch_size, torch.Generator().manual_seed(seed))
    model.train()
    for step in range(steps):
        x, y = next(it)
        loss = F.cross_entropy(model(x), y)
        if extra_loss is not None:
            loss = loss + extra_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if hook is not None:
            hook(step, opt)
    return opt


# ----------------------------------------------------------------------------- (a) prune


def part_prune(data, seed: int, steps: int, lam: float, gate_lr: float = 3e-2):
    sizes = [40, 512, 512, 10]
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    dense = arch.gated_mlp(sizes, gate=None)
    train(dense, data, steps, 1e-3, seed)
    base = (
        accuracy(dense, data.x_test, data.y_test),
        arch.cost(dense, (40,)),
        time.perf_counter() - t0,
    )

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = arch.gated_mlp(sizes, init_open=0.9)
    gates = [m for m in model if isinstance(m, arch.HardConcreteGate)]
    total = base[1].params

    def expected_params() -> torch.Tensor:
        # E[#weights] with independent gates: 40 E[n1] + E[n1] E[n2] + 10 E[n2] (+ biases)
        n1, n2 = gates[0].expected_l0(), gates[1].expected_l0()
        return 40 * n1 + n1 * n2 + 10 * n2 + n1 + n2

    gate_params = [g.log_alpha for g in gates]
    weights = [p for p in model.parameters() if all(p is not q for q in gate_params)]
    opt = torch.optim.Adam([{"params": weights}, {"params": gate_params, "lr": gate_lr}], 1e-3)
    train(model, data, steps, 1e-3, seed, lambda: lam * expected_params() / total, opt=opt)
    # surgery: every closed gate's unit leaves the weights; Adam state follows
    model.eval()
    plans = []
    for g in arch.sequential_groups(model):
        keep = arch.hard_concrete_eval(dict(model.named_parameters())[g.producers[-1].key]) > 0
        plans.append(arch.prune_plan(g, keep))
    before = arch.cost(model, (40,))
    acc_before = accuracy(model, data.x_test, data.y_test)
    arch.operate(model, plans, [opt])
    acc_after_surgery = accuracy(model, data.x_test, data.y_test)
    # fine-tune with deterministic gates (eval mode keeps them fixed)
    for g in gates:
        g.log_alpha.requires_grad_(False)
    model.eval()
    train_eval_mode(model, data, steps // 4, opt, seed + 1)
    after = arch.cost(model, (40,))
    res = (accuracy(model, data.x_test, data.y_test), after, time.perf_counter() - t0)
    notes = dict(
        acc_gated=acc_before,
        acc_after_surgery=acc_after_surgery,
        params_gated=before.params,
        widths=[p.index.numel() for p in plans],
    )
    return base, res, notes


def train_eval_mode(model, data, steps, opt, seed):
    """Train with the model in eval mode (deterministic gates); Adam state carries over."""
    it = batches(data.x_train, data.y_train, 100, torch.Generator().manual_seed(seed))
    for _ in range(steps):
        x, y = next(it)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


# ----------------------------------------------------------------------------- (b) grow


def part_grow(
    data,
    seed: int,
    steps: int,
    widths=(32, 64, 128, 256, 512),
    threshold: float = 1.0,
    grow_every: int = 100,
    max_new: int = 16,
    scale: float = 0.3,
):
    fixed = {}
    for w in widths:
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        m = arch.gated_mlp([40, w, w, 10], gate=None)
        train(m, data, steps, 1e-3, seed)
        fixed[w] = (
            accuracy(m, data.x_test, data.y_test),
            arch.cost(m, (40,)),
            time.perf_counter() - t0,
        )

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = arch.gated_mlp([40, 8, 8, 10], gate=None, activation=arch.GrowReLU)
    probe = data.x_train[:1000], data.y_train[:1000]
    history = []

    def hook(step, opt):
        if (step + 1) % grow_every or step > 0.6 * steps:
            return
        params = {k: v.detach() for k, v in model.named_parameters()}
        sig = arch.linear_signals(
            model, params, lambda out: F.cross_entropy(out, probe[1]), probe[0]
        )
        plans = []
        for g in arch.sequential_groups(model):
            prod = g.producers[0].key.split(".")[0]
            cons = g.consumers[0].key.split(".")[0]
            d = arch.growth_criterion(
                sig[prod], sig[cons], params[f"{cons}.weight"], threshold, max_new
            )
            if d.k:
                plans.append(
                    arch.gradmax_plan(g, params, sig[cons].out_grad, sig[prod].inputs, d.k, scale)
                )
        if plans:
            arch.operate(model, plans, [opt])
            history.append((step + 1, [model[i].out_features for i in (0, 2)]))

    train(model, data, steps, 1e-3, seed, hook=hook)
    res = (
        accuracy(model, data.x_test, data.y_test),
        arch.cost(model, (40,)),
        time.perf_counter() - t0,
    )
    return fixed, res, dict(widths=[model[0].out_features, model[2].out_features], history=history)


# ----------------------------------------------------------------------------- (c) search


def part_search(
    data,
    seed: int,
    steps: int,
    mode: str = "darts",
    cells: int = 3,
    channels: int = 32,
    search_frac: float = 0.5,
    entropy_w: float = 0.01,
):
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    fixed = arch.SearchCNN1d(40, channels, cells, ops=("conv5",))
    train(fixed, data, steps, 3e-3, seed)
    base = (
        accuracy(fixed, data.x_test, data.y_test),
        arch.cost(fixed, (40,)),
        time.perf_counter() - t0,
    )

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = arch.SearchCNN1d(40, channels, cells, mode=mode)
    a_params = arch.architecture_params(model)
    w_params = [p for k, p in model.named_parameters() if k not in a_params]
    # first-order DARTS: weights on 3500 training examples, architecture on the other 500
    n_tr = 3500
    x_tr, y_tr = data.x_train[:n_tr], data.y_train[:n_tr]
    x_val, y_val = data.x_train[n_tr:], data.y_train[n_tr:]
    w_opt = torch.optim.Adam(w_params, 3e-3)
    a_opt = torch.optim.Adam(a_params.values(), 3e-3)
    gen = torch.Generator().manual_seed(seed)
    it = batches(x_tr, y_tr, 100, gen)
    it_val = batches(x_val, y_val, 100, torch.Generator().manual_seed(seed + 1))
    alphas = [v for k, v in a_params.items() if k.endswith("alpha")]
    search_steps = int(search_frac * steps)
    for _ in range(search_steps):
        x, y = next(it)
        w_opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        w_opt.step()
        xv, yv = next(it_val)
        a_opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xv), yv) + entropy_w * arch.entropy_penalty(alphas)
        loss.backward()
        a_opt.step()
    search_cost = arch.cost(model, (40,))
    report = arch.collapse_report(model, warn=False)
    # DARTS never derives "none"; if the guard flags a collapse, skip is excluded too
    exclude = ("none", "skip") if report.collapsed else ("none",)
    derived = [m.chosen(exclude) for m in model.cells]
    arch.discretise(model, [w_opt], exclude=exclude)
    train(model, data, steps - search_steps, 3e-3, seed + 2, opt=w_opt)
    res = (
        accuracy(model, data.x_test, data.y_test),
        arch.cost(model, (40,)),
        time.perf_counter() - t0,
    )
    conns = [m.index for m in model.modules() if isinstance(m, arch.Pick)]
    return (
        base,
        res,
        dict(
            choices=list(report.choices.values()),
            inputs=conns,
            derived=derived,
            collapse=str(report),
            search_params=search_cost.params,
        ),
    )


# ----------------------------------------------------------------------------- main


def med(xs):
    return statistics.median(xs)


def row(name, accs, costs, times, ref=None):
    acc, p, f, t = (
        med(accs),
        med([c.params for c in costs]),
        med([c.flops for c in costs]),
        med(times),
    )
    cells = [name, f"{100 * acc:.1f}", f"{p:,.0f}", f"{f:,.0f}", f"{t:.1f}"]
    if ref is not None:
        cells += [f"{100 * (acc - ref[0]):+.1f}", f"{p / ref[1]:.2f}x"]
    else:
        cells += ["", ""]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--parts", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"])
    ap.add_argument("--steps-a", type=int, default=2000)
    ap.add_argument("--steps-b", type=int, default=2000)
    ap.add_argument("--steps-c", type=int, default=3000)
    ap.add_argument("--lam", type=float, default=1.0, help="(a) weight of E[params]/params")
    ap.add_argument("--gate-lr", type=float, default=3e-2, help="(a) Adam lr of log_alpha")
    ap.add_argument("--threshold", type=float, default=0.3, help="(b) growth threshold")
    ap.add_argument("--mode", default="darts", choices=["darts", "gdas"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_mnist1d()
    header = (
        "| model | test acc % | params | FLOPs/example | wall s | d acc vs baseline | "
        "params vs baseline |\n|---|---|---|---|---|---|---|"
    )
    lines = [
        f"# selfmod.arch on MNIST-1D (medians over seeds {args.seeds})",
        "",
        f"Command: `python benchmarks/arch.py --seeds {' '.join(map(str, args.seeds))} "
        f"--parts {' '.join(args.parts)} --steps-a {args.steps_a} --steps-b {args.steps_b} "
        f"--steps-c {args.steps_c} --lam {args.lam} --gate-lr {args.gate_lr} "
             f"--threshold {args.threshold} "
        f"--mode {args.mode} --threads {args.threads}`",
        "",
        "Timings: CPU, torch threads as above, on a shared 2-core machine (other jobs "
        "running); wall times are indicative only. Batch 100, Adam.",
        "",
    ]

    def emit(s=""):
        print(s, flush=True)
        lines.append(s)

    for line in lines:
        print(line)
    if "a" in args.parts:
        out = [part_prune(data, s, args.steps_a, args.lam, args.gate_lr) for s in args.seeds]
        emit(
            f"## (a) prune MLP 40-512-512-10 ({args.steps_a} steps + {args.steps_a // 4} "
            f"fine-tune; target <= 25% params, <= 1 point loss)"
        )
        emit()
        emit(header)
        base = [o[0] for o in out]
        res = [o[1] for o in out]
        ref = (med([b[0] for b in base]), med([b[1].params for b in base]))
        emit(
            row("dense baseline", [b[0] for b in base], [b[1] for b in base], [b[2] for b in base])
        )
        emit(
            row(
                "L0-gated, pruned by surgery",
                [r[0] for r in res],
                [r[1] for r in res],
                [r[2] for r in res],
                ref,
            )
        )
        emit()
        for s, o in zip(args.seeds, out, strict=True):
            n = o[2]
            emit(
                f"- seed {s}: widths after pruning {n['widths']}, params {o[1][1].params:,} "
                f"({o[1][1].params / o[0][1].params:.1%} of dense); acc gated "
                f"{100 * n['acc_gated']:.1f}%, right after surgery "
                f"{100 * n['acc_after_surgery']:.1f}% (same function), after fine-tune "
                f"{100 * o[1][0]:.1f}%; dense {100 * o[0][0]:.1f}%"
            )
        emit()
    if "b" in args.parts:
        out = [part_grow(data, s, args.steps_b, threshold=args.threshold) for s in args.seeds]
        emit(
            f"## (b) grow MLP 40-w-w-10 from w = 8 ({args.steps_b} steps; GradMax, criterion "
            f"threshold {args.threshold}) vs fixed widths"
        )
        emit()
        emit(header)
        widths = list(out[0][0])
        best_w = max(widths, key=lambda w: med([o[0][w][0] for o in out]))
        ref = (med([o[0][best_w][0] for o in out]), med([o[0][best_w][1].params for o in out]))
        for w in widths:
            emit(
                row(
                    f"fixed width {w}" + (" (best)" if w == best_w else ""),
                    [o[0][w][0] for o in out],
                    [o[0][w][1] for o in out],
                    [o[0][w][2] for o in out],
                    None if w == best_w else ref,
                )
            )
        emit(
            row(
                "grown from 8",
                [o[1][0] for o in out],
                [o[1][1] for o in out],
                [o[1][2] for o in out],
                ref,
            )
        )
        emit()
        for s, o in zip(args.seeds, out, strict=True):
            emit(
                f"- seed {s}: final widths {o[2]['widths']}; growth events (step, widths): "
                f"{o[2]['history'][:6]}{' ...' if len(o[2]['history']) > 6 else ''}"
            )
        emit()
    if "c" in args.parts:
        out = [part_search(data, s, args.steps_c, args.mode) for s in args.seeds]
        emit(
            f"## (c) {args.mode.upper()} search, 3 cells x {{conv3, conv5, dil_conv3, skip, "
            f"none, max_pool3}} + learnable inputs ({args.steps_c} steps total: half search, "
            f"half training the discretised net) vs fixed conv5 CNN (target >= 94%)"
        )
        emit()
        emit(header)
        base = [o[0] for o in out]
        ref = (med([b[0] for b in base]), med([b[1].params for b in base]))
        emit(
            row(
                "fixed conv5 CNN (3 cells)",
                [b[0] for b in base],
                [b[1] for b in base],
                [b[2] for b in base],
            )
        )
        emit(
            row(
                "searched + discretised",
                [o[1][0] for o in out],
                [o[1][1] for o in out],
                [o[1][2] for o in out],
                ref,
            )
        )
        emit()
        for s, o in zip(args.seeds, out, strict=True):
            emit(
                f"- seed {s}: argmax ops {o[2]['choices']}, derived {o[2]['derived']}, "
                f"inputs of cells 1.. {o[2]['inputs']}; "
                f"{o[2]['collapse']}; params during search {o[2]['search_params']:,}"
            )
        emit()
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
