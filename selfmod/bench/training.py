"""One training run in the loop every contender of :mod:`selfmod.bench.practitioners` trains in
(all but ``selfmod``, which runs :func:`selfmod.introspect.fit`): a fresh model, one optimizer,
the workload's steps at its batch size, validation and test metric at the end. Shared by the
benchmark's tuners and :mod:`selfmod.bench.pbt`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from inspect import signature
from typing import Any

import torch
from torch import nn

from selfmod.bench.workloads import WORKLOADS, Workload
from selfmod.data import Stream

#: TPE's and PBT's ranges (log)
LR_RANGE = (1e-4, 3e-2)
WD_RANGE = (1e-5, 3e-1)


def make_workload(name: str, scale: float = 1.0, split: int = 0) -> Workload:
    """Workload ``name`` with ``scale`` x its steps (at least 10) on ``split`` (0: the
    published one; see :mod:`selfmod.bench.workloads`)."""
    default = signature(WORKLOADS[name]).parameters["steps"].default
    steps = max(10, round(default * scale))
    return WORKLOADS[name](steps=steps, split=split)


def pin_one_core(index: int = 0) -> None:
    """One torch thread; the process on one core (the ``index``-th it may use, cyclically)
    where the OS allows it."""
    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[index % len(cores)]})


@dataclass
class Run:
    """One training: its validation and test metric, steps and wall seconds."""

    val: float
    test: float
    steps: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def warmup_cosine(step: int, steps: int) -> float:
    """The learning rate's factor at ``step``: 5% linear warm-up, then cosine decay to 0."""
    warm = max(1, steps // 20)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def linear_cooldown(step: int, steps: int, fraction: float) -> float:
    """The learning rate's factor at ``step``: 1, then linear to 0 over the last ``fraction`` of
    the ``steps`` (a warm-up-stable-decay schedule without the warm-up)."""
    return min(1.0, (steps - step) / max(1.0, fraction * steps))


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def train(
    work: Workload,
    seed: int,
    make_opt: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    *,
    factor: Callable[[int], float] | None = None,
    hparams: Callable[[int], dict[str, float] | None] | None = None,
    report: Callable[[int, float], None] | None = None,
    report_every: int = 0,
    steps: int | None = None,
    inspect: Callable[[Any], dict[str, Any]] | None = None,
) -> Run:
    """Train a fresh ``work.model()`` (torch seeded with ``seed``) for ``steps`` (default the
    workload's); ``factor(step)`` scales every group's initial lr; ``hparams(step)`` may set
    ``lr`` and ``weight_decay`` from that step on (PBT's schedule); ``report(step, val)``
    every ``report_every`` steps may raise to stop (TPE's pruner: the run is returned
    as it is, with ``extra["stopped"]``); ``inspect(optimizer)`` adds to ``extra`` at the end."""
    steps = work.steps if steps is None else steps
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = work.model()
    opt = make_opt(model.parameters())
    base = [g["lr"] for g in opt.param_groups]
    stream = Stream(seed, len(work.train[1]))
    x, y = work.train
    done, stopped = 0, False
    modes = hasattr(opt, "train") and hasattr(opt, "eval")  # schedule-free's documented use
    for step in range(steps):
        if hparams is not None and (h := hparams(step)):
            for g in opt.param_groups:
                g.update(h)
            base = [g["lr"] for g in opt.param_groups]
        if factor is not None:
            for g, b in zip(opt.param_groups, base, strict=True):
                g["lr"] = b * factor(step)
        model.train()
        if modes:
            opt.train()
        idx = stream.next(work.batch)
        loss = work.loss(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        if report is not None and report_every and done % report_every == 0 and done < steps:
            _eval_mode(work, model, opt, modes)
            try:
                report(done, work.evaluate(model, work.val))
            except Exception as err:
                if type(err).__name__ != "TrialPruned":
                    raise
                stopped = True
                break
    _eval_mode(work, model, opt, modes)
    val, test = work.evaluate(model, work.val), work.evaluate(model, work.test)
    seconds = time.perf_counter() - start
    extra = {"stopped": stopped, **(inspect(opt) if inspect is not None else {})}
    return Run(val, test, done, seconds, extra)


def _eval_mode(work: Workload, model: nn.Module, opt: Any, modes: bool) -> None:
    """Schedule-Free's ``optimizer.eval()`` (its averaged weights); with BatchNorm its README's
    recipe: recompute the running statistics at those weights on 50 training batches."""
    if not modes:
        return
    opt.eval()
    if _has_batchnorm(model):
        model.train()
        x = work.train[0]
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _ in range(50):
                model(x[torch.randint(0, len(x), (work.batch,), generator=g)])


def adamw(lr: float, weight_decay: float) -> Callable:
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def lr_free(name: str) -> Callable:
    """The learning-rate-free optimizers at their defaults."""
    if name == "schedulefree-adamw":
        import schedulefree

        return lambda params: schedulefree.AdamWScheduleFree(params)
    if name == "prodigy":
        import prodigyopt

        return lambda params: prodigyopt.Prodigy(params, lr=1.0)
    if name == "dadaptation":
        import dadaptation

        return lambda params: dadaptation.DAdaptAdam(params, lr=1.0)
    raise ValueError(f"no learning-rate-free optimizer {name!r}")
