"""The introspective loop: a training run that modifies itself, every change bounded, verified,
logged and reversible.

Every ``cycle`` base steps the :class:`Introspector` takes the next ``lookahead`` training
batches and runs

    evaluate (probes) -> estimate (meta-gradient) -> propose (modifiers, trust region)
    -> apply tentatively (replay the K lookahead steps on a copy) -> verify (invariants)
    -> commit, queue for approval, or reject

Modifiers:

- ``lr``, ``weight_decay``, ``momentum`` (and ``dropout`` with ``regularize="hypergradient"``):
  one reverse-mode meta-gradient ``g = d guard_loss(params_K) / d h`` over
  ``h = (log lr per tensor, log wd, logit mu, logit p)``; the proposal is the Rprop step
  ``h' = h - s * sign(g)`` with per-entry step sizes ``s <= min(meta_lr, trust_region)``
  (:func:`rprop_step`: per-tensor hypergradients differ by orders of magnitude).
  With ``lr_mean="fixed"`` the step on the log learning rates is centred (its mean removed):
  the meta-gradient only redistributes the rate between tensors at a fixed geometric mean,
  which a short lookahead cannot drag down (its short-horizon bias favours small rates);
  rollbacks still halve every rate.
- ``dropout`` and ``weight_decay`` with ``regularize="gap"``: steered by the internal
  generalization gap ``G = guard_loss - train_loss``: ``logit p`` and ``log wd`` move by
  ``+-trust_region / 2`` towards ``G = gap_target`` or, with ``gap_gain > 0``, by the
  proportional ``gap_gain * log(G / gap_target)`` within ``+-trust_region`` (:func:`gap_step`).
- ``batch_size``: from the gradient noise scale ``B_noise = tr(Sigma) / |G|^2``, estimated from
  per-batch gradients ``g_i`` (size B) and their mean (size BK):
  ``|G|^2 ~ (BK |g_mean|^2 - B E|g_i|^2) / (BK - B)``,
  ``tr(Sigma) ~ (E|g_i|^2 - |g_mean|^2) / (1/B - 1/(BK))``; new ``B`` within ``[B/2, 2B]``.
- ``grow``: every cycle until ``max_width`` (and the parameter budget), propose adding
  ``ceil(grow_fraction * width)`` units to every hidden layer with zero fan-out
  (:func:`selfmod.arch.zero_plan`: the function is unchanged, the optimizer state re-indexed);
  committed only if the grown network's guard loss after the lookahead passes the invariants.
- ``prune``: remove units whose saliency ``||W_in[j]|| ||W_out[:, j]||`` is below 1e-3 of the
  median (dead units), at most ``prune_fraction`` per cycle (:func:`selfmod.arch.prune_plan`).
- ``online_lr`` (every base step, not in a cycle): hypergradient descent on the per-tensor log
  learning rates. With ``u_{t-1} = theta_t - theta_{t-1} = -alpha d_{t-1}``,
  ``dL(theta_t)/d log alpha = g_t . u_{t-1} = -alpha g_t . d_{t-1}``; normalized per tensor,
  ``log alpha_i += online_lr_step * cos(g_t, -u_{t-1})``, so no rate moves by more than
  ``online_lr_step`` per step. The new rate applies from the next step. Its state (the
  previous update) is part of the last good state, the checkpoints and the resume.

``schedule`` decouples when modifiers run from the base training: a per-cycle modifier with
``N`` runs on cycles ``0, N, 2N, ...``; ``online_lr`` runs every step. The cycle's tentative
replay (verification) holds the hyperparameters fixed.

Safeguards: each change is bounded (trust region, fractions of units); before commit the
proposed run over the lookahead must be finite, its guard loss not worse than
``(1 + epsilon)`` times the current one, params and FLOPs within budget, and the accuracy on
older sources' guard data not lower by more than ``forgetting_delta``. A non-finite loss,
gradient or meta-gradient, or a loss above ``DIVERGENCE_FACTOR`` times its running average,
rolls back to the last good state, halves the learning rates and the meta learning rate; so
does a cycle that finds a hidden layer dead (no unit active on any guard example: a step too
large can leave the network so without a loss spike).
``approval="manual"``: verified changes wait in the ledger until ``selfmod approve``.
``safeguards=False`` (for comparisons only) commits every proposal unchecked, counts a
diverging loss without acting on it, and lets a non-finite loss, gradient or meta-gradient end
the run with the error instead of a rollback.

References: Baydin et al. 2018 (hypergradient descent); Gal, Hron & Kendall 2017 (concrete
dropout); McCandlish et al. 2018 (gradient noise scale); Evci et al. 2022 (growth).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import _pytree as pytree

from selfmod import arch, hypergrad, optim, tree
from selfmod.data import Dataset, load_mnist1d
from selfmod.errors import DivergenceError, NonFiniteError
from selfmod.introspect import probes, replay
from selfmod.introspect.network import Network
from selfmod.runs.checkpoint import load_latest, save_checkpoint
from selfmod.runs.config import TrainConfig
from selfmod.runs.ledger import Ledger

#: a batch loss this many times its running average counts as divergence
DIVERGENCE_FACTOR = 5.0
#: online_lr keeps every learning rate in [1e-6, 10]
LOG_LR_RANGE = (math.log(1e-6), math.log(10.0))
LOG_WD_RANGE = (math.log(1e-7), math.log(1e-3))  # the gap rule's weight decay range

Params = dict[str, Tensor]
Batch = tuple[Tensor, Tensor, Tensor]  # x (B, D), y (B,), dropout noise (depth, B, max_width)


# ----------------------------------------------------------------------------- pure pieces


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN backward: injects a non-finite gradient (fault tests)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * math.nan


class _GradTap(hypergrad.FiniteMonitor):
    """A finiteness monitor that also keeps the last step's gradients (for ``online_lr``)."""

    grads: tuple[Tensor, ...] = ()

    def record(self, loss: Tensor, grads) -> None:
        self.grads = tuple(g.detach() for g in grads)
        super().record(loss, grads)


def online_lr_update(log_lr: Tensor, grads: Params, prev: Params, max_step: float) -> Tensor:
    """Normalized hypergradient descent on per-tensor log learning rates ``(T,)``:
    ``log alpha_i + max_step * cos(g_i, -u_i)`` with ``g`` this step's gradient and ``u`` the
    previous update (``theta_t - theta_{t-1}``), clamped to ``LOG_LR_RANGE``.

    ``g . u < 0`` (the last step went downhill and the slope goes on) raises the rate;
    ``g . u > 0`` (overshoot) lowers it. References: Baydin et al. 2018.
    """
    if not prev:
        return log_lr
    cos = torch.stack(
        [-torch.sum(g * prev[k]) / (g.norm() * prev[k].norm() + 1e-30) for k, g in grads.items()]
    )  # (T,)
    return (log_lr + max_step * cos.clamp(-1.0, 1.0)).clamp(*LOG_LR_RANGE)


def gap_step(gap: float, target: float, gain: float, trust_region: float) -> float:
    """The gap rule's step on ``log wd`` and ``logit p`` towards the gap ``G* = target``.

    ``gain > 0``: proportional control, ``gain * log(G / G*)`` clipped to ``+-trust_region``
    (a gap at or below 0 takes the full step down): far from the target it moves at the trust
    region's rate, near it in proportion. ``gain = 0``: a fixed ``+-trust_region / 2`` by the
    sign of ``G - G*``, which in a long run hovers around the target but in a short one
    cannot reach strong regularisation in time.
    """
    if gain == 0:
        return trust_region / 2 if gap > target else -trust_region / 2
    ratio = math.log(gap / target) if gap > 0 else -math.inf
    return max(-trust_region, min(trust_region, gain * ratio))


def noise_scale(grads: list[Params], batch_size: int) -> float:
    """Simple gradient noise scale ``B_noise = tr(Sigma) / |G|^2`` from per-batch gradients
    (McCandlish et al. 2018, appendix A); ``nan`` when the estimate is not positive."""
    k = len(grads)
    if k < 2:
        return math.nan
    mean = {n: sum(g[n] for g in grads) / k for n in grads[0]}
    small = sum(float(tree.vdot(g, g)) for g in grads) / k  # E |g_B|^2
    big = float(tree.vdot(mean, mean))  # |g_BK|^2
    b, bk = batch_size, batch_size * k
    g2 = (bk * big - b * small) / (bk - b)
    s = (small - big) / (1.0 / b - 1.0 / bk)
    return s / g2 if g2 > 0 and s > 0 else math.nan


def rprop_step(
    step: Tensor | None, prev: Tensor | None, g: Tensor, meta_lr: float, trust_region: float
) -> tuple[Tensor, Tensor]:
    """Per-entry step sizes on the sign of the meta-gradient (Rprop): ``x1.2`` while the sign
    repeats, ``x0.5`` when it flips, within ``[1e-3 meta_lr, min(meta_lr, trust_region)]``.

    Each hyperparameter moves by a bounded amount whatever its gradient's scale (per-tensor
    hypergradients differ by orders of magnitude), and oscillation damps itself.
    Returns ``(step, sign)``, both shaped like ``g``. References: Riedmiller & Braun 1993.
    """
    hi = min(meta_lr, trust_region)
    sign = torch.sign(g)
    if step is None or prev is None:
        return torch.full_like(g, hi), sign
    factor = torch.where(sign * prev > 0, 1.2, torch.where(sign * prev < 0, 0.5, 1.0))
    return (step * factor).clamp(1e-3 * hi, hi), sign


# ----------------------------------------------------------------------------- data stream


class Stream:
    """Deterministic minibatches: epoch ``e`` of source ``s`` is the permutation seeded by
    ``(seed, s, e)``; the position ``(source, epoch, pos)`` is all a checkpoint needs."""

    def __init__(self, seed: int, n: int, source: int = 0, epoch: int = 0, pos: int = 0) -> None:
        self.seed, self.n, self.source, self.epoch, self.pos = seed, n, source, epoch, pos
        self._perm = self._make()

    def _make(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.source * 10_007 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def next(self, batch_size: int) -> Tensor:
        if self.pos + batch_size > self.n:
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._make()
        idx = self._perm[self.pos : self.pos + batch_size]
        self.pos += batch_size
        return idx

    def position(self) -> dict[str, int]:
        return {"source": self.source, "epoch": self.epoch, "pos": self.pos, "n": self.n}


@dataclass
class Source:
    """One data distribution: its training pool (without its guard pool) and test set."""

    x: Tensor  # (N, D)
    y: Tensor  # (N,)
    guard_x: Tensor  # (G, D)
    guard_y: Tensor  # (G,)
    x_test: Tensor
    y_test: Tensor


def make_source(data: Dataset, guard_size: int, seed: int) -> Source:
    perm = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed))
    g, t = perm[:guard_size], perm[guard_size:]
    return Source(
        data.x_train[t], data.y_train[t], data.x_train[g], data.y_train[g], data.x_test, data.y_test
    )


def default_sources(cfg: TrainConfig) -> list[Source]:
    """MNIST-1D; with ``shift_step`` a second source with more noise and translation."""
    out = [make_source(load_mnist1d(seed=42), cfg.guard_size, cfg.seed)]
    if cfg.shift_step:
        shifted = load_mnist1d(
            seed=43, noise_scale=cfg.shift_noise, max_translation=cfg.shift_translation
        )
        out.append(make_source(shifted, cfg.guard_size, cfg.seed + 1))
    return out


# ----------------------------------------------------------------------------- records


@dataclass
class Decision:
    """One proposal and what became of it."""

    cycle: int
    step: int
    modifier: str
    decision: str  # commit | reject | rollback | pending | applied
    reason: str
    before: dict[str, Any]
    after: dict[str, Any]
    guard_current: float = math.nan
    guard_proposed: float = math.nan
    id: int = 0  # ledger seq


@dataclass
class Faults:
    """Injected faults for tests: non-finite loss or gradient at base steps, non-finite
    meta-gradient at cycles."""

    loss: set[int] = field(default_factory=set)
    grad: set[int] = field(default_factory=set)
    hypergrad: set[int] = field(default_factory=set)


# ----------------------------------------------------------------------------- controller


class Introspector:
    """A run that trains a :class:`~selfmod.introspect.network.Network` (``cfg.model``: an MLP
    or a 1-D CNN) and modifies it every cycle (see the module docstring).

    ``run_dir`` holds the ledger and checkpoints; ``None`` runs in memory (no resume).
    ``tune=False`` gives the fixed-configuration baseline: the same loop without cycles.
    ``lrs`` starts each tensor (in the network's order: ``0.weight``, ``0.bias``, ...) at its
    own learning rate instead of ``cfg.lr``.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: str | Path | None = None,
        *,
        sources: list[Source] | None = None,
        tune: bool = True,
        faults: Faults | None = None,
        lrs: list[float] | None = None,
    ) -> None:
        self.cfg, self.tune, self.faults = cfg, tune, faults or Faults()
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.ledger = None if self.run_dir is None else Ledger(self.run_dir / "ledger.sqlite")
        self.sources = sources if sources is not None else default_sources(cfg)
        self.depth = cfg.depth
        self.num_features = self.sources[0].x.shape[1]
        self.num_classes = 10
        self.net = Network(cfg.model, cfg.depth, self.num_features, self.num_classes)
        self.max_width = max(cfg.max_width, cfg.width)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.rng = torch.Generator().manual_seed(cfg.seed)
        self.params: Params = self.net.init(cfg.width)
        self.names = list(self.params)
        self.active = set(cfg.modifiers) if tune else set()
        self.use_dropout = cfg.dropout > 0 or "dropout" in self.active
        if lrs is not None and len(lrs) != len(self.names):
            raise ValueError(f"lrs needs one rate per tensor ({len(self.names)}; got {len(lrs)})")
        h = {
            "log_lr": torch.full((len(self.names),), math.log(cfg.lr))
            if lrs is None
            else torch.tensor(lrs).log(),
            "mom_logit": torch.tensor(math.log(max(cfg.momentum, 1e-3) / (1 - cfg.momentum))),
            "log_wd": torch.tensor(math.log(max(cfg.weight_decay, 1e-7))),
        }
        if self.use_dropout:
            p = min(max(cfg.dropout, 0.01), 0.95)
            h["drop_logit"] = torch.full((cfg.depth,), math.log(p / (1 - p)))
        self.hparams: Params = h
        self.opt = self._optimizer()
        self.state = self.opt.init(self.params)
        self.batch_size = cfg.batch_size
        self.meta_lr = cfg.meta_lr
        self.hstep: Params = {}  # Rprop step sizes per hyperparameter entry
        self.hsign: Params = {}  # and the meta-gradient signs of the last cycle
        self.online_prev: Params = {}  # online_lr: the last update theta_t - theta_{t-1}
        self.step = 0
        self.cycle = 0
        self.average: float | None = None
        self.stream = Stream(cfg.seed, len(self.sources[0].y))
        self.buffer = replay.empty(self.num_features)
        self.good = self._snapshot()
        self.pending: list[Batch] = []
        self.applied: set[int] = set()
        self.history: dict[str, list] = {"log": [], "probes": [], "decisions": []}
        self.shift_cycle: int | None = None
        self.seconds = 0.0
        self.divergences = 0  # base steps whose loss jumped above DIVERGENCE_FACTOR x average
        self._introduce_source(0)

    # ------------------------------------------------------------------ model and optimizer

    def _optimizer(self) -> optim.GradientTransformation:
        names = self.names
        return optim.sgd(
            lr=lambda h: {k: h["log_lr"][i].exp() for i, k in enumerate(names)},
            momentum=lambda h: torch.sigmoid(h["mom_logit"]),
            weight_decay=lambda h: h["log_wd"].exp(),
        )

    def apply(self, params: Params, x: Tensor) -> Tensor:
        """Logits without dropout (evaluation)."""
        return self.net.apply(params, x)

    def _inner_loss(self, params: Params, hparams: Params, batch: Batch) -> Tensor:
        x, y, noise = batch
        p = torch.sigmoid(hparams["drop_logit"]) if self.use_dropout else None
        return F.cross_entropy(self.net.apply(params, x, p, noise), y)

    def _outer_loss(self, params: Params, hparams: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(self.apply(params, batch[0]), batch[1])

    def widths(self, params: Params | None = None) -> list[int]:
        return self.net.widths(self.params if params is None else params)

    def cost(self, params: Params | None = None) -> arch.Cost:
        return self.net.cost(self.params if params is None else params)

    def values(self, h: Params | None = None) -> dict[str, Any]:
        """The hyperparameters in natural units, for logs and the ledger."""
        h = self.hparams if h is None else h
        out = {
            "lr": [round(v, 8) for v in h["log_lr"].exp().tolist()],
            "momentum": float(torch.sigmoid(h["mom_logit"])),
            "weight_decay": float(h["log_wd"].exp()),
            "batch_size": self.batch_size,
            "widths": self.widths(),
        }
        if "drop_logit" in h:
            out["dropout"] = torch.sigmoid(h["drop_logit"]).tolist()
        return out

    # ------------------------------------------------------------------ data

    @property
    def source_id(self) -> int:
        return self.stream.source

    def _introduce_source(self, s: int) -> None:
        src = self.sources[s]
        loss = self._per_example_loss(src.guard_x, src.guard_y)
        cap = self.cfg.guard_size
        self.buffer = replay.add_guard(
            self.buffer, src.guard_x, src.guard_y, loss, self.step, s, cap, self.rng
        )

    def _per_example_loss(self, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            return F.cross_entropy(self.apply(self.params, x), y, reduction="none")

    def _next_batch(self) -> Batch:
        src = self.sources[self.source_id]
        idx = self.stream.next(self.batch_size)
        b = len(idx)
        noise = (
            torch.rand((self.depth, b, self.max_width), generator=self.rng)
            if self.use_dropout
            else torch.zeros(0)
        )
        return src.x[idx], src.y[idx], noise

    def guard(self) -> tuple[Tensor, Tensor]:
        return replay.split(self.buffer, replay.GUARD)

    # ------------------------------------------------------------------ snapshots

    def _snapshot(self) -> tuple[Params, Any, Params, Params]:
        """``(params, optimizer state, hparams, online_lr's previous update)``."""
        return (
            tree.clone(self.params),
            _clone_state(self.state),
            tree.clone(self.hparams),
            tree.clone(self.online_prev),
        )

    def _restore(self, snap) -> None:
        self.params, self.state, self.hparams, self.online_prev = (
            tree.clone(snap[0]),
            _clone_state(snap[1]),
            tree.clone(snap[2]),
            tree.clone(snap[3]),
        )

    def _due(self, modifier: str) -> bool:
        """Whether a per-cycle ``modifier`` runs in this cycle (``active`` and ``schedule``)."""
        return modifier in self.active and self.cycle % self.cfg.every(modifier) == 0

    # ------------------------------------------------------------------ the loop

    def run(self, on_step: Callable[[Introspector], None] | None = None) -> None:
        """Train to ``cfg.steps``, cycling, checkpointing and logging; resumable."""
        cfg = self.cfg
        crash_at = int(os.environ.get("SELFMOD_CRASH_AT_STEP", "-1"))
        start = time.perf_counter() - self.seconds
        while self.step < cfg.steps:
            if self.step == crash_at and self.tune:
                os.kill(os.getpid(), signal.SIGKILL)
            if cfg.shift_step and self.step == cfg.shift_step and self.source_id == 0:
                self._shift()
            if self.tune and self.step % cfg.cycle == 0:
                if self.run_dir is not None and self.cycle % cfg.checkpoint_every == 0:
                    self.seconds = time.perf_counter() - start
                    self.save()
                self.run_cycle()
            self.base_step()
            if on_step is not None:
                on_step(self)
        self.seconds = time.perf_counter() - start

    def _shift(self) -> None:
        self.stream = Stream(self.cfg.seed, len(self.sources[1].y), source=1)
        self._introduce_source(1)
        self.shift_cycle = self.cycle
        self.hstep, self.hsign = {}, {}  # meta-steps restart at full size: adapt again
        self._ledger("event", "shift", f"data source 1 from step {self.step}", {})

    def base_step(self) -> None:
        """One training step; a non-finite or diverging loss rolls back to the last good state,
        halving the learning rates and the meta learning rate."""
        batch = self.pending.pop(0) if self.pending else self._next_batch()
        loss_fn = self._inner_loss
        if self.step in self.faults.loss:

            def loss_fn(p, h, b, f=self._inner_loss):
                return f(p, h, b) * math.nan
        elif self.step in self.faults.grad:

            def loss_fn(p, h, b, f=self._inner_loss):
                return f({k: _NanGrad.apply(v) for k, v in p.items()}, h, b)

        online = "online_lr" in self.active
        try:
            monitor = _GradTap(start=self.step)
            with torch.no_grad():
                params, state = hypergrad.inner_step(
                    loss_fn,
                    self.opt,
                    self.params,
                    self.state,
                    self.hparams,
                    batch,
                    create_graph=False,
                    monitor=monitor,
                )
            loss = monitor.losses[0].item()
            monitor.check()
            if self.average is not None and loss > DIVERGENCE_FACTOR * self.average:
                self.divergences += 1
                message = (
                    f"diverged at step {self.step}: loss {loss:.3g}, average {self.average:.3g}"
                )
                if self.cfg.safeguards:
                    raise DivergenceError(message)
                self._ledger("event", "divergence", f"{message}; safeguards off: goes on", {})
            if online:
                grads = dict(zip(self.names, monitor.grads, strict=True))
                log_lr = online_lr_update(
                    self.hparams["log_lr"], grads, self.online_prev, self.cfg.online_lr_step
                )
                if not bool(torch.isfinite(log_lr).all()):
                    raise NonFiniteError("online learning rate", step=self.step)
        except (NonFiniteError, DivergenceError) as err:
            if not self.cfg.safeguards:
                raise
            self._rollback(str(err))
            self.step += 1
            return
        if online:
            self.hparams = {**self.hparams, "log_lr": log_lr}
            self.online_prev = {k: params[k] - self.params[k] for k in self.names}
        self.params, self.state = params, state
        self.average = loss if self.average is None else 0.9 * self.average + 0.1 * loss
        self.last_loss = loss
        self.step += 1
        if self.step % 50 == 0 or self.step == self.cfg.steps:
            self.log_point()

    def _rollback(self, reason: str) -> None:
        before = self.values()
        self._restore(self.good)
        self.hparams["log_lr"] = self.hparams["log_lr"] - math.log(2.0)
        self.good = self._snapshot()
        self.meta_lr *= 0.5
        self.pending = []
        self._record(
            Decision(
                self.cycle,
                self.step,
                "safeguard",
                "rollback",
                f"{reason}; restored the last good state, halved learning rates "
                f"and meta_lr (now {self.meta_lr:.3g})",
                before,
                self.values(),
            )
        )

    def log_point(self) -> None:
        src = self.sources[self.source_id]
        gl, ga = probes.loss_and_accuracy(self.apply, self.params, *self.guard())
        _, ta = probes.loss_and_accuracy(self.apply, self.params, src.x_test, src.y_test)
        self.history["log"].append(
            {
                "step": self.step,
                "guard_loss": gl,
                "guard_acc": ga,
                "test_acc": ta,
                "train_loss": getattr(self, "last_loss", 0.0),
                "meta_lr": self.meta_lr,
                **self.values(),
            }
        )

    # ------------------------------------------------------------------ one cycle

    def probe(self) -> dict[str, float]:
        """Every probe of the module :mod:`selfmod.introspect.probes`, on the current params."""
        gx, gy = self.guard()
        tx, ty = replay.split(self.buffer, replay.TRAIN)
        src = self.sources[self.source_id]
        gl, ga = probes.loss_and_accuracy(self.apply, self.params, gx, gy)
        tl, ta = probes.loss_and_accuracy(self.apply, self.params, tx, ty)
        ox, oy = replay.split(self.buffer, replay.GUARD, exclude_source=self.source_id)
        _, old = probes.loss_and_accuracy(self.apply, self.params, ox, oy)
        _, test = probes.loss_and_accuracy(self.apply, self.params, src.x_test, src.y_test)
        c = self.cost()
        return {
            "cycle": self.cycle,
            "step": self.step,
            "guard_loss": gl,
            "guard_acc": ga,
            "train_loss": tl,
            "train_acc": ta,
            "gap": gl - tl if math.isfinite(tl) else math.nan,
            "old_guard_acc": old,
            "test_acc": test,
            "robust_acc": probes.robustness(
                self.apply, self.params, gx, gy, 0.25, self.cfg.seed + self.cycle
            ),
            "shifted_acc": probes.shifted(self.apply, self.params, gx, gy, 5),
            "params": c.params,
            "flops": c.flops,
            "memory_bytes": c.activation_bytes + 4 * c.params,
            "batch_size": self.batch_size,
            "meta_lr": self.meta_lr,
        }

    def run_cycle(self) -> None:
        cfg = self.cfg
        self._apply_approved()
        if "online_lr" in self.active and self.step > 0:
            self._record(
                Decision(
                    self.cycle,
                    self.step,
                    "online_lr",
                    "applied",
                    "per-step hypergradient descent on log lr since the last good state",
                    {"lr": self.good[2]["log_lr"].exp().tolist()},
                    {"lr": self.hparams["log_lr"].exp().tolist()},
                )
            )
        self.pending = [self._next_batch() for _ in range(cfg.lookahead)]
        probe = self.probe()
        self.history["probes"].append(probe)
        self._ledger("cycle", "evaluate", "probes", probe)
        dead = self._dead() if cfg.safeguards else None
        if dead:
            self._rollback(dead)
            self.cycle += 1
            return
        # the reservoir sees the examples the model is about to train on, with current losses
        for x, y, _ in self.pending:
            self.buffer = replay.add_train(
                self.buffer,
                x,
                y,
                self._per_example_loss(x, y),
                self.step,
                self.source_id,
                cfg.replay_size,
                self.rng,
            )
        guard = self.guard()
        try:
            current, g = self._estimate(guard)
        except NonFiniteError as err:
            if not cfg.safeguards:
                raise
            self._rollback(f"meta-gradient: {err}")
            self.cycle += 1
            return
        proposals = self._propose(g, probe)
        for modifier, change in proposals:
            self._verify_and_decide(modifier, change, current, guard, probe)
        self.good = self._snapshot()
        self.cycle += 1

    def _dead(self) -> str | None:
        """Why the model no longer depends on its input (``None``: it does): a hidden layer
        with no unit active on any guard example. A step too large can leave a ReLU network
        so without a loss spike (no divergence to catch), and no learning rate revives it."""
        active = self.net.active_units(self.params, self.guard()[0])
        dead = [i for i, a in enumerate(active) if a == 0]
        if not dead:
            return None
        return f"dead: hidden layer {dead[0] + 1} has no unit active on the guard set"

    def _estimate(self, guard) -> tuple[float, Params]:
        est = hypergrad.ESTIMATORS[self.cfg.estimator]
        k = self.cfg.lookahead
        opts = {
            "checkpointed": {"segments": max(1, round(math.sqrt(k)))},
            "truncated": {"window": max(1, k // 2)},
        }.get(self.cfg.estimator, {})
        res = est(
            self._inner_loss,
            self._outer_loss,
            self.opt,
            self.params,
            self.hparams,
            self.pending,
            guard,
            state=self.state,
            **opts,
        )
        g = dict(res.hparams)
        if self.cycle in self.faults.hypergrad:
            g = {k2: v * math.nan for k2, v in g.items()}
        if not tree.is_finite(g):
            raise NonFiniteError("hypergradient", hint="meta learning rate backed off")
        return float(res.value), g

    def _propose(self, g: Params, probe: dict[str, float]) -> list[tuple[str, dict]]:
        cfg, tr, out = self.cfg, self.cfg.trust_region, []
        hyper = [
            k
            for k, m in (
                ("log_lr", "lr"),
                ("mom_logit", "momentum"),
                ("log_wd", "weight_decay"),
                ("drop_logit", "dropout"),
            )
            if self._due(m)
            and k in self.hparams
            and not (cfg.regularize == "gap" and m in ("weight_decay", "dropout"))
        ]
        if hyper and any(bool(g[k].abs().sum() > 0) for k in hyper):
            new = {}
            for k in hyper:
                step, sign = rprop_step(
                    self.hstep.get(k), self.hsign.get(k), g[k], self.meta_lr, tr
                )
                self.hstep[k], self.hsign[k] = step, sign
                new[k] = self.hparams[k] - step * sign
            if "log_lr" in new and cfg.lr_mean == "fixed":  # redistribute, keep the mean
                move = new["log_lr"] - self.hparams["log_lr"]
                new["log_lr"] = self.hparams["log_lr"] + move - move.mean()
            out.append(("hypergradient", {"hparams": new}))
        gap = probe["gap"]
        if cfg.regularize == "gap" and math.isfinite(gap):
            step = gap_step(gap, cfg.gap_target, cfg.gap_gain, tr)
            new = {}
            if self._due("dropout") and "drop_logit" in self.hparams:
                new["drop_logit"] = (self.hparams["drop_logit"] + step).clamp(
                    -6.0, 0.0
                )  # p in [0.0025, 0.5]
            if self._due("weight_decay"):
                new["log_wd"] = (self.hparams["log_wd"] + step).clamp(*LOG_WD_RANGE)
            if new:
                out.append(("regularize", {"hparams": new, "gap": gap}))
        if self._due("batch_size"):
            bn = self._noise_scale()
            if math.isfinite(bn):
                b = int(
                    min(
                        max(bn, self.batch_size / 2, cfg.min_batch),
                        2 * self.batch_size,
                        cfg.max_batch,
                    )
                )
                if b != self.batch_size:
                    out.append(("batch_size", {"batch_size": b, "noise_scale": bn}))
        if self._due("grow"):
            widths = self.widths()
            add = [min(math.ceil(cfg.grow_fraction * w), self.max_width - w) for w in widths]
            if any(a > 0 for a in add):
                out.append(("grow", {"add": add}))
        if self._due("prune"):
            drop = self._dead_units()
            if any(len(d) for d in drop):
                out.append(("prune", {"remove": drop}))
        return out

    def _noise_scale(self) -> float:
        grads = []
        for x, y, noise in self.pending[:4]:
            p = tree.detach(self.params, True)
            with torch.enable_grad():
                loss = self._inner_loss(p, self.hparams, (x, y, noise))
                gs = torch.autograd.grad(loss, list(p.values()))
            grads.append(dict(zip(p, gs, strict=True)))
        return noise_scale(grads, self.batch_size)

    def _dead_units(self) -> list[list[int]]:
        out = []
        for i in range(self.depth):
            sal = self.net.saliency(self.params, i)  # (W,)
            dead = torch.nonzero(sal < 1e-3 * sal.median()).squeeze(1)
            cap = int(self.cfg.prune_fraction * len(sal))
            out.append(dead[:cap].tolist())
        return out

    # ------------------------------------------------------------------ changes

    def changed(self, change: dict) -> tuple[Params, Any, Params, int]:
        """``(params, state, hparams, batch_size)`` with ``change`` applied (pure)."""
        params, state, h, b = self.params, self.state, dict(self.hparams), self.batch_size
        for k, v in change.get("hparams", {}).items():
            h[k] = torch.as_tensor(v, dtype=self.hparams[k].dtype).reshape(self.hparams[k].shape)
        if "batch_size" in change:
            b = int(change["batch_size"])
        if "add" in change:
            params, state = self._grow(params, state, change["add"], change.get("seed", 0))
        if "remove" in change:
            for i, units in enumerate(change["remove"]):
                if units:
                    group = self.net.group(i)
                    keep = torch.ones(group.width(params), dtype=torch.bool)
                    keep[torch.tensor(units)] = False
                    plan = arch.prune_plan(group, keep)
                    state = arch.apply_state(plan, state, params)
                    params = arch.apply_params(plan, params)
        return params, state, h, b

    def _grow(self, params, state, add, seed):
        g = torch.Generator().manual_seed(seed)
        for i, k in enumerate(add):
            if k > 0:
                group = self.net.group(i)
                fan_in = self.net.fan_in(params, i)
                plan = arch.zero_plan(group, params, k, init_std=fan_in**-0.5, generator=g)
                state = arch.apply_state(plan, state, params)
                params = arch.apply_params(plan, params)
        return params, state

    def _verify_and_decide(
        self, modifier: str, change: dict, current: float, guard, probe: dict[str, float]
    ) -> None:
        """Apply ``change`` tentatively on a copy over the lookahead batches and check every
        invariant; commit (auto), queue (manual) or reject."""
        cfg = self.cfg
        if "add" in change:
            change = {**change, "seed": int(torch.randint(0, 2**31 - 1, (), generator=self.rng))}
        params, state, h, b = self.changed(change)
        before = self.values()
        # a meta-gradient step must lower the guard loss; other changes may cost up to epsilon
        tol = 0.0 if modifier == "hypergradient" else cfg.epsilon
        if cfg.safeguards:
            reason, proposed = self._check(params, state, h, current, guard, tol)
        else:
            reason, proposed = None, math.nan
        after = self._values_after(params, h, b)
        if reason is None:
            decision = "pending" if cfg.approval == "manual" else "commit"
            reason = (
                f"guard loss {proposed:.4f} vs {current:.4f} "
                f"(tolerance x{1 + tol:g}); invariants hold"
                if cfg.safeguards
                else "committed unchecked (safeguards off)"
            )
        else:
            decision = "reject"
        d = Decision(
            self.cycle, self.step, modifier, decision, reason, before, after, current, proposed
        )
        self._record(d, change)
        if decision == "commit":
            self._commit(params, state, h, b)

    def _check(self, params, state, h, current, guard, tol) -> tuple[str | None, float]:
        cfg = self.cfg
        c = self.cost(params)
        if c.params > cfg.max_params:
            return f"parameter budget: {c.params} > {cfg.max_params}", math.nan
        try:
            monitor = hypergrad.FiniteMonitor(start=self.step)
            p_new, _ = hypergrad.run(
                self._inner_loss,
                self.opt,
                params,
                state,
                h,
                self.pending,
                create_graph=False,
                monitor=monitor,
            )
            monitor.check()
        except NonFiniteError as err:
            return f"proposal diverged: {err}", math.nan
        with torch.no_grad():
            proposed = float(self._outer_loss(p_new, h, guard))
        if not math.isfinite(proposed):
            return "proposal gives a non-finite guard loss", proposed
        if not tree.is_finite(p_new):
            return "proposal gives non-finite params", proposed
        if proposed > current * (1 + tol) or (tol == 0 and proposed >= current):
            return f"guard loss {proposed:.4f} worse than {current:.4f}", proposed
        ox, oy = replay.split(self.buffer, replay.GUARD, exclude_source=self.source_id)
        if len(oy):
            p_cur, _ = hypergrad.run(
                self._inner_loss,
                self.opt,
                self.params,
                self.state,
                self.hparams,
                self.pending,
                create_graph=False,
            )
            _, old_cur = probes.loss_and_accuracy(self.apply, p_cur, ox, oy)
            _, old_new = probes.loss_and_accuracy(self.apply, p_new, ox, oy)
            if old_new < old_cur - cfg.forgetting_delta:
                return (
                    f"forgetting budget: accuracy on older data {old_new:.3f} vs "
                    f"{old_cur:.3f} (delta {cfg.forgetting_delta})"
                ), proposed
        return None, proposed

    def _values_after(self, params, h, b) -> dict[str, Any]:
        saved = self.params, self.batch_size
        self.params, self.batch_size = params, b
        try:
            return self.values(h)
        finally:
            self.params, self.batch_size = saved

    def _commit(self, params, state, h, b) -> None:
        if any(params[k].shape != self.params[k].shape for k in self.names):
            self.online_prev = {}  # the last update no longer matches the architecture
        self.params, self.state, self.hparams, self.batch_size = params, state, h, b

    def _apply_approved(self) -> None:
        """Manual approval: apply every approved, not yet applied proposal, in order."""
        if self.ledger is None or self.cfg.approval != "manual":
            return
        approved = {e.payload.get("proposal") for e in self.ledger.entries("approval")}
        for e in self.ledger.entries("proposal"):
            if e.decision == "pending" and e.seq in approved and e.seq not in self.applied:
                change = e.payload["change"]
                if "hparams" in change:
                    change = {
                        **change,
                        "hparams": {k: torch.tensor(v) for k, v in change["hparams"].items()},
                    }
                before = self.values()
                self._commit(*self.changed(change))
                self.applied.add(e.seq)
                self._record(
                    Decision(
                        self.cycle,
                        self.step,
                        e.payload["modifier"],
                        "applied",
                        f"approved proposal {e.seq} applied",
                        before,
                        self.values(),
                    ),
                    {"proposal": e.seq},
                )

    # ------------------------------------------------------------------ ledger

    def _record(self, d: Decision, change: dict | None = None) -> None:
        payload = {
            "modifier": d.modifier,
            "before": d.before,
            "after": d.after,
            "guard_current": d.guard_current,
            "guard_proposed": d.guard_proposed,
            "change": _jsonable(change or {}),
        }
        kind = "rollback" if d.decision == "rollback" else "proposal"
        e = self._ledger(kind, d.decision, d.reason, payload)
        d.id = e.seq if e is not None else len(self.history["decisions"]) + 1
        self.history["decisions"].append(d.__dict__.copy())

    def _ledger(self, kind: str, decision: str, reason: str, payload: dict):
        if self.ledger is None:
            return None
        return self.ledger.append(
            kind,
            cycle=self.cycle,
            step=self.step,
            decision=decision,
            reason=reason,
            payload=_jsonable(payload),
        )

    # ------------------------------------------------------------------ checkpoints

    def state_tensors(self) -> dict[str, Tensor]:
        out = {f"params/{k}": v for k, v in self.params.items()}
        out.update({f"hparams/{k}": v for k, v in self.hparams.items()})
        out.update(
            {f"opt/{i}": torch.as_tensor(x) for i, x in enumerate(pytree.tree_leaves(self.state))}
        )
        out.update({f"good/params/{k}": v for k, v in self.good[0].items()})
        out.update(
            {
                f"good/opt/{i}": torch.as_tensor(x)
                for i, x in enumerate(pytree.tree_leaves(self.good[1]))
            }
        )
        out.update({f"good/hparams/{k}": v for k, v in self.good[2].items()})
        out.update({f"good/online/{k}": v for k, v in self.good[3].items()})
        out.update({f"online/prev/{k}": v for k, v in self.online_prev.items()})
        out.update({f"replay/{k}": v for k, v in self.buffer._asdict().items()})
        out.update({f"rprop/step/{k}": v for k, v in self.hstep.items()})
        out.update({f"rprop/sign/{k}": v for k, v in self.hsign.items()})
        out["rng/controller"] = self.rng.get_state()
        out["rng/torch"] = torch.get_rng_state()
        return out

    def save(self) -> Path:
        """Checkpoint the whole run state (atomic; keeps the last ``keep_checkpoints``)."""
        seq, head = self.ledger.head()
        meta = {
            "step": self.step,
            "cycle": self.cycle,
            "batch_size": self.batch_size,
            "meta_lr": self.meta_lr,
            "average": self.average,
            "stream": self.stream.position(),
            "applied": sorted(self.applied),
            "shift_cycle": self.shift_cycle,
            "seconds": self.seconds,
            "divergences": self.divergences,
            "ledger_head": [seq, head],
            "last_loss": getattr(self, "last_loss", 0.0),
            "python_random": _jsonable(random.getstate()),
            "numpy_random": _jsonable(np.random.get_state()),
            "history": _jsonable(self.history),
        }
        return save_checkpoint(
            self.run_dir, self.step, self.state_tensors(), meta, keep=self.cfg.keep_checkpoints
        )

    @classmethod
    def resume(
        cls, cfg: TrainConfig, run_dir: str | Path, *, sources=None, at_most: int | None = None
    ) -> Introspector:
        """Rebuild a run from its newest complete checkpoint; the ledger chain is verified."""
        self = cls(cfg, run_dir, sources=sources)
        tensors, manifest = load_latest(run_dir, at_most)
        meta = manifest["meta"]
        self.ledger.verify(tuple(meta["ledger_head"]))

        def sub(prefix: str) -> Params:
            return {
                k[len(prefix) :]: v
                for k, v in tensors.items()
                if k.startswith(prefix) and "/" not in k[len(prefix) :]
            }

        self.params = {k: sub("params/")[k] for k in self.names}
        self.hparams = {k: sub("hparams/")[k] for k in self.hparams}
        self.state = _unflatten_state(self.opt.init(self.params), sub("opt/"))
        good_params = {k: sub("good/params/")[k] for k in self.names}
        self.good = (
            good_params,
            _unflatten_state(self.opt.init(good_params), sub("good/opt/")),
            {k: sub("good/hparams/")[k] for k in self.hparams},
            sub("good/online/"),
        )
        self.online_prev = sub("online/prev/")
        self.buffer = replay.Replay(**{f: tensors[f"replay/{f}"] for f in replay.Replay._fields})
        self.hstep, self.hsign = sub("rprop/step/"), sub("rprop/sign/")
        self.rng.set_state(tensors["rng/controller"])
        torch.set_rng_state(tensors["rng/torch"])
        random.setstate(_tuples(meta["python_random"]))
        st = meta["numpy_random"]
        np.random.set_state((st[0], np.array(st[1], dtype=np.uint32), *st[2:]))
        self.step, self.cycle = meta["step"], meta["cycle"]
        self.batch_size, self.meta_lr, self.average = (
            meta["batch_size"],
            meta["meta_lr"],
            meta["average"],
        )
        s = meta["stream"]
        self.stream = Stream(cfg.seed, s["n"], s["source"], s["epoch"], s["pos"])
        self.applied = set(meta["applied"])
        self.shift_cycle = meta["shift_cycle"]
        self.seconds = meta["seconds"]
        self.divergences = meta.get("divergences", 0)
        self.last_loss = meta["last_loss"]
        self.history = meta["history"]
        superseded = self.ledger.head()[0] - meta["ledger_head"][0]
        self._ledger(
            "resume",
            "resume",
            f"resumed from checkpoint at step {self.step}; the {superseded} entries "
            f"after entry {meta['ledger_head'][0]} are superseded",
            {"from_seq": meta["ledger_head"][0] + 1},
        )
        return self

    def summary(self) -> dict[str, Any]:
        src = self.sources[self.source_id]
        tl, ta = probes.loss_and_accuracy(self.apply, self.params, src.x_test, src.y_test)
        c = self.cost()
        decisions = self.history["decisions"]
        count = {
            k: sum(d["decision"] == k for d in decisions)
            for k in ("commit", "reject", "rollback", "pending")
        }
        return {
            "test_accuracy": ta,
            "test_loss": tl,
            "seconds": self.seconds,
            "params": c.params,
            "flops": c.flops,
            "widths": self.widths(),
            "steps": self.step,
            "divergences": self.divergences,
            "tensor_names": self.names,
            **{f"n_{k}": v for k, v in count.items()},
            **self.values(),
        }


# ----------------------------------------------------------------------------- helpers


def _clone_state(state: Any) -> Any:
    return pytree.tree_map(lambda x: x.detach().clone() if isinstance(x, Tensor) else x, state)


def _unflatten_state(template: Any, leaves: dict[str, Tensor]) -> Any:
    flat, spec = pytree.tree_flatten(template)
    out = []
    for i, x in enumerate(flat):
        v = leaves[str(i)]
        out.append(v if isinstance(x, Tensor) else type(x)(v.item()))
    return pytree.tree_unflatten(out, spec)


def _jsonable(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.tolist()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.integer | np.floating):
        return x.item()
    return x


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def write_json(path: Path, obj: Any) -> None:
    from selfmod.runs.files import atomic_write_text

    atomic_write_text(path, json.dumps(_jsonable(obj), indent=1))
