"""Self-modifying architecture on MNIST-1D: prune, grow, search.

(a) prune an MLP 40-512-512-10 to <= 25% of its parameters: train it dense, put hard-concrete
    gates on its units under the budget controller (expected parameters driven to a target),
    remove the closed units by surgery and fine-tune, distilling from the dense net throughout;
(b) grow an MLP from width 8 with GradMax and the growth criterion, against fixed widths;
(c) DARTS-style search over {conv3, conv5, dilated conv, skip, none, max pool} cells for a
    1-D CNN, discretised by surgery and trained on, against a fixed conv5 CNN.

Every row is a median over seeds; wall time includes search/growth/pruning. Usage::

    python benchmarks/arch.py --seeds 0 1 2 --parts a b c --out benchmarks/results/arch.md
    python benchmarks/arch.py --val --parts a b     # tuning: 3500 train / 500 held-out examples

The defaults of (a) and (b) are the settings chosen on the held-out split (``--val``).
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from selfmod import arch
from selfmod.data import Dataset, batches, load_mnist1d


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
    loss_fn=None,
    mode: str = "train",
):
    """Adam on cross-entropy or ``loss_fn(out, x, y)`` (+ ``extra_loss``), the model in
    ``mode`` ("eval" keeps gates deterministic); ``hook(step, opt)`` may operate on the model."""
    opt = opt or torch.optim.Adam(model.parameters(), lr)
    it = batches(data.x_train, data.y_train, batch_size, torch.Generator().manual_seed(seed))
    model.train(mode == "train")
    for step in range(steps):
        x, y = next(it)
        out = model(x)
        loss = F.cross_entropy(out, y) if loss_fn is None else loss_fn(out, x, y)
        if extra_loss is not None:
            loss = loss + extra_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if hook is not None:
            hook(step, opt)
    return opt


# ----------------------------------------------------------------------------- (a) prune


def distill_loss(teacher: nn.Module, alpha: float, temperature: float):
    """``(1 - alpha) CE(s, y) + alpha T^2 KL(softmax(t / T) || softmax(s / T))`` (Hinton et al.
    2015), ``t`` the frozen teacher's logits on the same batch."""

    def loss(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = teacher(x)  # (B, classes)
        kd = F.kl_div(
            F.log_softmax(out / temperature, -1),
            F.log_softmax(t / temperature, -1),
            log_target=True,
            reduction="batchmean",
        )
        return (1 - alpha) * F.cross_entropy(out, y) + alpha * temperature**2 * kd

    return loss


def part_prune(
    data,
    seed: int,
    steps: int,
    target: float = 0.22,
    gate_steps: int = 1000,
    fine_steps: int = 1000,
    gate_lr: float = 3e-2,
    kd_alpha: float = 0.5,
    temperature: float = 4.0,
    dual_lr: float = 0.05,
    kp: float = 20.0,
    fine_lr: float = 1e-3,
):
    """Dense for ``steps``; L0 gates from the dense weights under the budget controller
    (``gate_steps``, target ramped 1 -> ``target`` over 60% of them); surgery; fine-tune
    (``fine_steps``). Both phases distil from the dense net. Baselines: the dense net at
    ``steps`` and a dense net trained for the same total ``steps + gate_steps + fine_steps``."""
    sizes = [40, 512, 512, 10]
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    dense = arch.gated_mlp(sizes, gate=None)
    train(dense, data, steps, 1e-3, seed)
    t_dense = time.perf_counter() - t0
    base = (accuracy(dense, data.x_test, data.y_test), arch.cost(dense, (40,)), t_dense)

    total_steps = steps + gate_steps + fine_steps
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    long = arch.gated_mlp(sizes, gate=None)
    train(long, data, total_steps, 1e-3, seed)
    base_long = (
        accuracy(long, data.x_test, data.y_test),
        arch.cost(long, (40,)),
        time.perf_counter() - t0,
    )

    t0 = time.perf_counter()
    teacher = copy.deepcopy(dense).eval()
    torch.manual_seed(seed)
    model = arch.gated_mlp(sizes, init_open=0.95)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for src, dst in zip([m for m in dense if isinstance(m, nn.Linear)], linears, strict=True):
        dst.load_state_dict(src.state_dict())
    gates = [m for m in model if isinstance(m, arch.HardConcreteGate)]
    total = float(arch.expected_mlp_params(sizes))
    gate_params = [g.log_alpha for g in gates]
    weights = [p for p in model.parameters() if all(p is not q for q in gate_params)]
    opt = torch.optim.Adam([{"params": weights}, {"params": gate_params, "lr": gate_lr}], 1e-3)
    kd = distill_loss(teacher, kd_alpha, temperature)
    ctrl = {"state": arch.budget_init(), "target": 1.0}
    trace = []

    def penalty() -> torch.Tensor:
        frac = arch.gated_mlp_expected_params(model) / total
        ctrl["frac"] = frac.item()
        return arch.budget_penalty(frac, ctrl["target"], ctrl["state"])

    def hook(step, opt):
        ctrl["state"] = arch.budget_update(
            ctrl["state"], ctrl["frac"], ctrl["target"], dual_lr, kp=kp
        )
        ctrl["target"] = arch.ramp(step + 1, max(1, int(0.6 * gate_steps)), 1.0, target)
        if (step + 1) % max(1, gate_steps // 5) == 0:
            trace.append(
                (step + 1, round(ctrl["frac"], 3), round(float(ctrl["state"].multiplier), 2))
            )

    train(model, data, gate_steps, 1e-3, seed + 10, penalty, opt=opt, hook=hook, loss_fn=kd)
    # surgery: every closed gate's unit leaves the weights; Adam state follows
    model.eval()
    plans = []
    for g in arch.sequential_groups(model):
        keep = arch.hard_concrete_eval(dict(model.named_parameters())[g.producers[-1].key]) > 0
        plans.append(arch.prune_plan(g, keep))
    acc_before = accuracy(model, data.x_test, data.y_test)
    arch.operate(model, plans, [opt])
    acc_after_surgery = accuracy(model, data.x_test, data.y_test)
    # fine-tune with deterministic gates (eval mode keeps them fixed), still distilling
    for g in gates:
        g.log_alpha.requires_grad_(False)
    for group in opt.param_groups:
        group["lr"] = fine_lr  # the gates' group no longer moves (no grad)
    train(model, data, fine_steps, fine_lr, seed + 1, opt=opt, loss_fn=kd, mode="eval")
    after = arch.cost(model, (40,))
    res = (accuracy(model, data.x_test, data.y_test), after, t_dense + time.perf_counter() - t0)
    notes = dict(
        acc_gated=acc_before,
        acc_after_surgery=acc_after_surgery,
        widths=[p.index.numel() for p in plans],
        trace=trace,
        expected_frac=ctrl["frac"],
    )
    return base, base_long, res, notes


# ----------------------------------------------------------------------------- (b) grow


def part_grow(
    data,
    seed: int,
    steps: int,
    widths=(32, 64, 128, 256, 512),
    threshold: float = 1.0,
    grow_every: int = 100,
    max_new: int = 16,
    grow_until: float = 0.6,
    max_width: int | None = None,
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
        if (step + 1) % grow_every or step > grow_until * steps:
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
                sig[prod], sig[cons], params[f"{cons}.weight"], threshold, max_new, max_width
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
    ap.add_argument("--target", type=float, default=0.24, help="(a) E[params] budget fraction")
    ap.add_argument("--gate-steps", type=int, default=1000, help="(a) steps with L0 gates")
    ap.add_argument("--fine-steps", type=int, default=250, help="(a) fine-tune after surgery")
    ap.add_argument("--fine-lr", type=float, default=1e-3, help="(a) Adam lr of the fine-tune")
    ap.add_argument("--gate-lr", type=float, default=3e-2, help="(a) Adam lr of log_alpha")
    ap.add_argument("--kd-alpha", type=float, default=0.5, help="(a) weight of distillation")
    ap.add_argument("--temperature", type=float, default=4.0, help="(a) distillation T")
    ap.add_argument("--dual-lr", type=float, default=0.05, help="(a) multiplier step size")
    ap.add_argument("--kp", type=float, default=20.0, help="(a) multiplier proportional gain")
    ap.add_argument("--threshold", type=float, default=0.1, help="(b) growth threshold")
    ap.add_argument("--grow-every", type=int, default=25, help="(b) steps between decisions")
    ap.add_argument("--max-new", type=int, default=64, help="(b) most units per layer per event")
    ap.add_argument("--grow-until", type=float, default=0.5, help="(b) last growth, fraction")
    ap.add_argument("--max-width", type=int, default=512, help="(b) cap on each grown layer")
    ap.add_argument("--mode", default="darts", choices=["darts", "gdas"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--val",
        action="store_true",
        help="tuning mode: train on the first 3500 training examples, report accuracy on the "
        "other 500 (the test set is not touched)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_mnist1d()
    if args.val:
        data = Dataset(
            data.x_train[:3500], data.y_train[:3500], data.x_train[3500:], data.y_train[3500:], 10
        )
    header = (
        "| model | test acc % | params | FLOPs/example | wall s | d acc vs baseline | "
        "params vs baseline |\n|---|---|---|---|---|---|---|"
    )
    lines = [
        f"# selfmod.arch on MNIST-1D (medians over seeds {args.seeds})",
        "",
        f"Command: `python benchmarks/arch.py {shlex.join(sys.argv[1:])}`",
        "",
        "Options: " + ", ".join(f"{k}={v}" for k, v in vars(args).items() if k != "out"),
        "",
        "Timings: CPU, torch threads as above, on a shared 2-core machine (other jobs "
        "running); wall times are indicative only. Batch 100, Adam."
        + (
            " VALIDATION MODE: train on 3500, accuracy on the 500 held-out training examples."
            if args.val
            else ""
        ),
        "",
    ]

    def emit(s=""):
        print(s, flush=True)
        lines.append(s)

    for line in lines:
        print(line)
    if "a" in args.parts:
        out = [
            part_prune(
                data,
                s,
                args.steps_a,
                args.target,
                args.gate_steps,
                args.fine_steps,
                args.gate_lr,
                args.kd_alpha,
                args.temperature,
                args.dual_lr,
                args.kp,
                args.fine_lr,
            )
            for s in args.seeds
        ]
        total_a = args.steps_a + args.gate_steps + args.fine_steps
        emit(
            f"## (a) prune MLP 40-512-512-10 (dense {args.steps_a} steps, then L0 gates under "
            f"the budget controller {args.gate_steps} steps, target {args.target:.0%} of the "
            f"parameters, surgery, fine-tune {args.fine_steps} steps at lr {args.fine_lr}; both "
            f"phases distil from "
            f"the dense net; target <= 25% params, <= 1 point loss)"
        )
        emit()
        emit(header)
        bases = {args.steps_a: [o[0] for o in out], total_a: [o[1] for o in out]}
        best = max(bases, key=lambda k: med([b[0] for b in bases[k]]))
        ref = (med([b[0] for b in bases[best]]), med([b[1].params for b in bases[best]]))
        for k, b in bases.items():
            emit(
                row(
                    f"dense baseline, {k} steps" + (" (ref)" if k == best else ""),
                    [x[0] for x in b],
                    [x[1] for x in b],
                    [x[2] for x in b],
                    None if k == best else ref,
                )
            )
        res = [o[2] for o in out]
        emit(
            row(
                f"L0 + budget + distillation, pruned by surgery ({total_a} steps)",
                [r[0] for r in res],
                [r[1] for r in res],
                [r[2] for r in res],
                ref,
            )
        )
        emit()
        for s, o in zip(args.seeds, out, strict=True):
            n = o[3]
            emit(
                f"- seed {s}: widths after pruning {n['widths']}, params {o[2][1].params:,} "
                f"({o[2][1].params / o[0][1].params:.1%} of dense; E[params] at the end of the "
                f"gate phase {n['expected_frac']:.1%}); acc gated {100 * n['acc_gated']:.1f}%, "
                f"right after surgery {100 * n['acc_after_surgery']:.1f}% (same function), "
                f"after fine-tune {100 * o[2][0]:.1f}%; dense {100 * o[0][0]:.1f}% "
                f"({args.steps_a} steps), {100 * o[1][0]:.1f}% ({total_a} steps); "
                f"(step, E[params] fraction, multiplier): {n['trace']}"
            )
        emit()
    if "b" in args.parts:
        out = [
            part_grow(
                data,
                s,
                args.steps_b,
                threshold=args.threshold,
                grow_every=args.grow_every,
                max_new=args.max_new,
                grow_until=args.grow_until,
                max_width=args.max_width,
            )
            for s in args.seeds
        ]
        emit(
            f"## (b) grow MLP 40-w-w-10 from w = 8 ({args.steps_b} steps; GradMax, criterion "
            f"threshold {args.threshold}, a decision every {args.grow_every} steps until "
            f"{args.grow_until:.0%} of training, at most {args.max_new} new units per layer per "
            f"decision, width cap {args.max_width}) vs fixed widths (same steps, optimizer, batch)"
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
                f"- seed {s}: grown {100 * o[1][0]:.1f}% at {o[1][1].params:,} params, fixed "
                + ", ".join(f"{w}: {100 * o[0][w][0]:.1f}%" for w in widths)
                + f"; final widths {o[2]['widths']}; growth events (step, widths): "
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
