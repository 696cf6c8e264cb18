"""Per-tensor learning rates that tune themselves during training, every change verified.

Every ``cycle`` base steps the run takes the next ``lookahead`` training batches and:

1. *estimates* ``g = d guard_loss(params after K steps) / d log_lr`` with a
   :mod:`selfmod.hypergrad` estimator, from the current params and optimizer state;
2. *proposes* ``log_lr' = log_lr - meta_lr * g / rms(g)``, clipped to the trust region
   ``|log_lr' - log_lr| <= trust_region`` (a bounded change, whatever the gradient's scale);
3. *verifies* it: the same K steps are replayed with ``log_lr'``; the change is committed only if
   the guard loss is finite and lower than with ``log_lr``, else it is rejected.

The guard split is held out of the training stream. A non-finite loss or gradient in base
training, or a loss above ``DIVERGENCE_FACTOR`` times its running average, rolls back to the last
good (params, state, learning rates) and halves the rates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from selfmod import hypergrad, optim, tree
from selfmod.data import Dataset, batches
from selfmod.errors import DivergenceError, NonFiniteError
from selfmod.models import accuracy, cross_entropy_loss, functionalize, mlp
from selfmod.runs.config import TrainConfig


@dataclass
class CycleRecord:
    step: int
    decision: str  # "commit" | "reject" | "rollback"
    reason: str
    guard_current: float  # guard loss after the lookahead with the current rates
    guard_proposed: float  # ... and with the proposed rates (nan if it diverged)
    lrs_before: list[float]
    lrs_after: list[float]


@dataclass
class History:
    """What a run measured; ``lrs[i]`` holds one rate per parameter tensor (``tensor_names``)."""

    tensor_names: list[str]
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    guard_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    lrs: list[list[float]] = field(default_factory=list)
    cycles: list[CycleRecord] = field(default_factory=list)
    seconds: float = 0.0
    final_test_accuracy: float = 0.0
    final_test_loss: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


#: a batch loss this many times its running average counts as divergence
DIVERGENCE_FACTOR = 5.0

ESTIMATOR_OPTIONS: dict[str, Callable[[int], dict]] = {
    "reverse": lambda k: {},
    "checkpointed": lambda k: {"segments": max(1, round(math.sqrt(k)))},
    "truncated": lambda k: {"window": max(1, k // 2)},
    "forward": lambda k: {},
}


def train(
    config: TrainConfig,
    data: Dataset,
    *,
    tune: bool,
    on_step: Callable[[int], None] | None = None,
    log_every: int = 50,
) -> tuple[History, dict[str, Tensor]]:
    """Train an MLP on ``data``; with ``tune`` the learning rates tune themselves.

    Returns the history and the final params. Deterministic given ``config.seed``.
    """
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    perm = torch.randperm(len(data.x_train), generator=gen)
    guard_idx, train_idx = perm[: config.guard_size], perm[config.guard_size :]
    guard = (data.x_train[guard_idx], data.y_train[guard_idx])
    stream = batches(data.x_train[train_idx], data.y_train[train_idx], config.batch_size, gen)

    sizes = [data.num_features] + [config.width] * config.depth + [data.num_classes]
    apply, params = functionalize(mlp(sizes))
    names = list(params)
    loss_fn = cross_entropy_loss(apply)
    hparams = {"log_lr": torch.full((len(names),), math.log(config.lr))}
    opt = optim.sgd(
        lr=lambda h: {k: h["log_lr"][i].exp() for i, k in enumerate(names)},
        momentum=config.momentum,
    )
    state = opt.init(params)
    estimator = hypergrad.ESTIMATORS[config.estimator]
    est_options = ESTIMATOR_OPTIONS[config.estimator](config.lookahead)

    history = History(tensor_names=names)
    good = (tree.clone(params), state, tree.clone(hparams))  # last known-good point
    pending: list = []
    average = None  # running average of the batch loss, for divergence detection
    start = time.perf_counter()
    for step in range(config.steps):
        if tune and step % config.cycle == 0:
            pending = [next(stream) for _ in range(config.lookahead)]
            record = _cycle(
                step,
                config,
                estimator,
                est_options,
                loss_fn,
                opt,
                params,
                state,
                hparams,
                pending,
                guard,
            )
            history.cycles.append(record)
            hparams = {"log_lr": torch.log(torch.tensor(record.lrs_after))}
            good = (tree.clone(params), state, tree.clone(hparams))
        batch = pending.pop(0) if pending else next(stream)
        try:
            params, state, batch_loss = _base_step(loss_fn, opt, params, state, hparams, batch)
            if average is not None and batch_loss > DIVERGENCE_FACTOR * average:
                raise DivergenceError(
                    f"diverged at step {step}: loss {batch_loss:.3g}, average {average:.3g}"
                )
            average = batch_loss if average is None else 0.9 * average + 0.1 * batch_loss
        except (NonFiniteError, DivergenceError) as err:
            params, state = tree.clone(good[0]), good[1]
            before = good[2]["log_lr"].exp().tolist()
            hparams = {"log_lr": good[2]["log_lr"] - math.log(2.0)}
            good = (good[0], good[1], tree.clone(hparams))
            history.cycles.append(
                CycleRecord(
                    step,
                    "rollback",
                    str(err),
                    math.nan,
                    math.nan,
                    before,
                    hparams["log_lr"].exp().tolist(),
                )
            )
            continue
        if step % log_every == 0 or step == config.steps - 1:
            with torch.no_grad():
                history.steps.append(step)
                history.train_loss.append(batch_loss)
                history.guard_loss.append(F.cross_entropy(apply(params, guard[0]), guard[1]).item())
                history.test_accuracy.append(accuracy(apply, params, data.x_test, data.y_test))
                history.lrs.append(hparams["log_lr"].exp().tolist())
        if on_step is not None:
            on_step(step)
    history.seconds = time.perf_counter() - start
    with torch.no_grad():
        history.final_test_accuracy = accuracy(apply, params, data.x_test, data.y_test)
        history.final_test_loss = F.cross_entropy(apply(params, data.x_test), data.y_test).item()
    return history, params


def _base_step(loss_fn, opt, params, state, hparams, batch):
    monitor = hypergrad.FiniteMonitor()
    with torch.no_grad():
        new_params, new_state = hypergrad.inner_step(
            loss_fn, opt, params, state, hparams, batch, create_graph=False, monitor=monitor
        )
    loss = monitor.losses[0].item()
    monitor.check()
    return new_params, new_state, loss


def _cycle(step, config, estimator, options, loss_fn, opt, params, state, hparams, inner, guard):
    """Estimate, propose within the trust region, verify on the guard split."""
    lrs_before = hparams["log_lr"].exp().tolist()
    try:
        res = estimator(
            loss_fn, loss_fn, opt, params, hparams, inner, guard, state=state, **options
        )
    except NonFiniteError as err:
        proposal = hparams["log_lr"] - math.log(2.0)
        return CycleRecord(
            step,
            "rollback",
            f"meta-gradient failed: {err}; rates halved",
            math.nan,
            math.nan,
            lrs_before,
            proposal.exp().tolist(),
        )
    g = res.hparams["log_lr"]
    rms = g.pow(2).mean().sqrt()
    if not rms > 0:
        return CycleRecord(
            step, "reject", "zero meta-gradient", float(res.value), math.nan, lrs_before, lrs_before
        )
    delta = (-config.meta_lr * g / rms).clamp(-config.trust_region, config.trust_region)
    proposal = {"log_lr": hparams["log_lr"] + delta}
    current = float(res.value)
    try:
        monitor = hypergrad.FiniteMonitor()
        p_new, _ = hypergrad.run(
            loss_fn, opt, params, state, proposal, inner, create_graph=False, monitor=monitor
        )
        monitor.check()
        with torch.no_grad():
            proposed = float(loss_fn(p_new, proposal, guard))
    except NonFiniteError as err:
        return CycleRecord(
            step, "reject", f"proposal diverged: {err}", current, math.nan, lrs_before, lrs_before
        )
    if math.isfinite(proposed) and proposed < current:
        return CycleRecord(
            step,
            "commit",
            "guard loss improved",
            current,
            proposed,
            lrs_before,
            proposal["log_lr"].exp().tolist(),
        )
    return CycleRecord(
        step, "reject", "guard loss not improved", current, proposed, lrs_before, lrs_before
    )
