"""Few-shot episodes and short regression tasks.

An :class:`Episode` holds a support set (to adapt on) and a query set (to evaluate on):
``x_support (N*K, D)``, ``y_support (N*K,)``, ``x_query (N*Q, D)``, ``y_query (N*Q,)``.
Labels are relabelled ``0..N-1`` within each episode.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Split = Literal["train", "test"]


@dataclass(frozen=True)
class Episode:
    x_support: Tensor
    y_support: Tensor
    x_query: Tensor
    y_query: Tensor

    @property
    def support(self) -> tuple[Tensor, Tensor]:
        return self.x_support, self.y_support

    @property
    def query(self) -> tuple[Tensor, Tensor]:
        return self.x_query, self.y_query


def _check(n_way: int, k_shot: int, queries: int, max_way: int) -> None:
    if not 2 <= n_way <= max_way:
        raise ValueError(f"n_way must be in [2, {max_way}] (got {n_way})")
    if k_shot < 1:
        raise ValueError(f"k_shot must be >= 1 (got {k_shot})")
    if queries < 1:
        raise ValueError(f"queries must be >= 1 (got {queries})")


@contextmanager
def _numpy_seed(seed: int):
    """mnist1d draws from numpy's global RNG: seed it here and restore it afterwards."""
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved)


def random_templates(n: int, seed: int, length: int = 12) -> np.ndarray:
    """``n`` smooth random templates ``(n, length)``, whitened like MNIST-1D's digits and
    pinned to 0 at the start, each a sum of 3 random sinusoids."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, length)
    freq = rng.uniform(0.5, 3.0, size=(n, 3, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(n, 3, 1))
    amp = rng.normal(size=(n, 3, 1))
    x = (amp * np.sin(2 * np.pi * freq * t + phase)).sum(1)
    x -= x.mean(1, keepdims=True)
    x /= x.std(1, keepdims=True) + 1e-8
    x -= x[:, :1]
    return x / 6.0


@lru_cache(maxsize=1)
def _mnist1d_scale() -> tuple[float, float]:
    """Mean and std of raw transformed MNIST-1D signals (fixed, so episodes are comparable)."""
    from mnist1d.data import get_dataset_args, get_templates

    x = _transform(get_templates()["x"], np.repeat(np.arange(10), 50), get_dataset_args(), 0)
    return float(x.mean()), float(x.std())


def _transform(templates: np.ndarray, labels: np.ndarray, args, seed: int) -> np.ndarray:
    from mnist1d.data import get_templates
    from mnist1d.transform import transform

    t = get_templates()["t"]
    with _numpy_seed(seed):
        return np.stack([transform(templates[y], t, args)[0] for y in labels])


class TemplateTasks:
    """N-way K-shot episodes over MNIST-1D-style classes made from random templates.

    ``num_templates`` templates are drawn once from ``seed``; the first ``train_fraction`` of
    them are meta-train classes, the rest are held out for meta-test. Each class gets a bank of
    ``examples_per_class`` examples, made by passing its template through MNIST-1D's pipeline
    (padding, scaling, translation, correlated and iid noise, shear, subsampling to 40 samples)
    and standardised with MNIST-1D's own statistics; episodes draw from the banks.
    ``bank``: ``(num_templates, examples_per_class, 40)``.
    """

    def __init__(
        self,
        num_templates: int = 200,
        train_fraction: float = 0.8,
        examples_per_class: int = 40,
        seed: int = 0,
    ):
        if num_templates < 4:
            raise ValueError(f"num_templates must be >= 4 (got {num_templates})")
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1) (got {train_fraction})")
        if examples_per_class < 2:
            raise ValueError(f"examples_per_class must be >= 2 (got {examples_per_class})")
        from mnist1d.data import get_dataset_args

        self.templates = random_templates(num_templates, seed)
        self.n_train = max(2, min(num_templates - 2, round(train_fraction * num_templates)))
        mean, std = _mnist1d_scale()
        labels = np.repeat(np.arange(num_templates), examples_per_class)
        x = (_transform(self.templates, labels, get_dataset_args(), seed) - mean) / std
        self.bank = torch.as_tensor(x, dtype=torch.float32).reshape(
            num_templates, examples_per_class, -1
        )

    def classes(self, split: Split) -> np.ndarray:
        n = len(self.templates)
        return np.arange(self.n_train) if split == "train" else np.arange(self.n_train, n)

    def sample(
        self, n_way: int, k_shot: int, queries: int, split: Split = "train", seed: int = 0
    ) -> Episode:
        pool = self.classes(split)
        _check(n_way, k_shot, queries, len(pool))
        per = k_shot + queries
        if per > self.bank.shape[1]:
            raise ValueError(
                f"k_shot + queries must be <= examples_per_class ({self.bank.shape[1]}) (got {per})"
            )
        gen = torch.Generator().manual_seed(seed)
        chosen = torch.as_tensor(pool)[torch.randperm(len(pool), generator=gen)[:n_way]]
        rows = torch.stack(
            [torch.randperm(self.bank.shape[1], generator=gen)[:per] for _ in range(n_way)]
        )  # (n_way, per)
        x = self.bank[chosen[:, None], rows].reshape(n_way * per, -1)
        labels = torch.arange(n_way).repeat_interleave(per)
        return _split(x, labels, n_way, k_shot, per)

    def dataset(
        self, classes: Sequence[int], split_fraction: float = 0.5
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """A classification task over ``classes`` (relabelled 0..n-1) from their banks:
        ``(x_train, y_train, x_test, y_test)``, the first ``split_fraction`` of each bank for
        training."""
        n_tr = max(1, round(split_fraction * self.bank.shape[1]))
        xs = self.bank[list(classes)]  # (n, per_class, 40)
        labels = torch.arange(len(classes))[:, None].expand(-1, xs.shape[1])
        return (
            xs[:, :n_tr].reshape(-1, xs.shape[-1]),
            labels[:, :n_tr].reshape(-1),
            xs[:, n_tr:].reshape(-1, xs.shape[-1]),
            labels[:, n_tr:].reshape(-1),
        )


class DigitsTasks:
    """N-way K-shot episodes from scikit-learn's 8x8 digits; classes ``train_classes`` for
    meta-train and the others for meta-test. Pixels in [0, 1], shape ``(., 64)``."""

    def __init__(self, train_classes: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6)):
        from sklearn.datasets import load_digits

        bunch = load_digits()
        self.x = torch.as_tensor(bunch.data / 16.0, dtype=torch.float32)
        self.y = torch.as_tensor(bunch.target)
        self.train_classes = np.asarray(train_classes)
        self.test_classes = np.setdiff1d(np.arange(10), self.train_classes)

    def sample(
        self, n_way: int, k_shot: int, queries: int, split: Split = "train", seed: int = 0
    ) -> Episode:
        pool = self.train_classes if split == "train" else self.test_classes
        _check(n_way, k_shot, queries, len(pool))
        gen = torch.Generator().manual_seed(seed)
        chosen = pool[torch.randperm(len(pool), generator=gen)[:n_way].numpy()]
        per = k_shot + queries
        xs = []
        for c in chosen:
            idx = torch.nonzero(self.y == int(c)).squeeze(1)
            xs.append(self.x[idx[torch.randperm(len(idx), generator=gen)[:per]]])
        labels = torch.arange(n_way).repeat_interleave(per)
        return _split(torch.cat(xs), labels, n_way, k_shot, per)


def _split(x: Tensor, labels: Tensor, n_way: int, k_shot: int, per: int) -> Episode:
    """Rows are grouped by class, ``per`` each: the first ``k_shot`` of a class are support."""
    within = torch.arange(len(labels)) % per
    s, q = within < k_shot, within >= k_shot
    return Episode(x[s], labels[s].long(), x[q], labels[q].long())


class SineTasks:
    """``y = A sin(x + phase)``, ``A ~ U[0.1, 5]``, ``phase ~ U[0, pi]``, ``x ~ U[-5, 5]``
    (Finn et al. 2017). Shapes ``(K, 1)``."""

    def sample(self, k_shot: int, queries: int, seed: int = 0) -> Episode:
        if k_shot < 1 or queries < 1:
            raise ValueError(f"k_shot and queries must be >= 1 (got {k_shot}, {queries})")
        gen = torch.Generator().manual_seed(seed)
        amp = 0.1 + 4.9 * torch.rand((), generator=gen)
        phase = torch.pi * torch.rand((), generator=gen)
        x = 10 * torch.rand(k_shot + queries, 1, generator=gen) - 5
        y = amp * torch.sin(x + phase)
        return Episode(x[:k_shot], y[:k_shot], x[k_shot:], y[k_shot:])
