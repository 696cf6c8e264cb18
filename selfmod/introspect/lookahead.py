"""What a cycle's what-ifs need: the run's losses, the ``K`` lookahead batches, the cycle's
random state and the replays of states over them.

A replay (:meth:`Lookahead.replay`) is a pure function of an immutable
:class:`~selfmod.introspect.state.RunState`, the lookahead batches and the random state at the
cycle's start, so the estimate, the verifier's baseline and checks, and the meta-metrics share
them; nothing here changes the run. The verifier (:mod:`.verifier`) and the self-shift metric
(:mod:`.shift`) take a :class:`Lookahead` instead of the loop.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from selfmod import hypergrad, optim, tree
from selfmod.determinism import drawing_from
from selfmod.errors import NonFiniteError, SelfmodError
from selfmod.introspect import replay
from selfmod.introspect.budget import Cost
from selfmod.introspect.feed import Batch, guard
from selfmod.introspect.hparams import LR_SCHEDULE
from selfmod.introspect.problem import Problem
from selfmod.introspect.state import RunState

Params = dict[str, Tensor]
#: the estimator that needs no graph through the steps (:meth:`Lookahead.first_order`)
FIRST_ORDER = "first_order"
#: an estimate through the K steps: forward, backward and the backward of the backward
REVERSE_PASSES = 3.0
#: replays kept per cycle: the current state's and the latest others' (a model's copies each)
REPLAYS_KEPT = 2


class Losses:
    """The run's training loss (the model's loss plus every modifier's penalty, with the
    learned dropout rates) and its guard loss (eval mode)."""

    def __init__(self, problem: Problem, penalties: Sequence[Any], use_dropout: bool) -> None:
        self.problem, self.penalties, self.use_dropout = problem, list(penalties), use_dropout

    def train(self, buffers: Params, box: dict[str, Params] | None = None):
        """``loss(params, hparams, batch)`` in training mode; with ``box`` BatchNorm statistics
        advance and the new buffers land in ``box["buffers"]`` (base steps), without it they
        stay as they are (estimators and replays)."""
        problem, use_dropout, penalties = self.problem, self.use_dropout, self.penalties

        def loss(params: Params, hparams: Params, batch: Batch) -> Tensor:
            x, y, noise = batch
            rates = torch.sigmoid(hparams["drop_logit"]) if use_dropout else None
            out, new = problem.forward(
                params,
                buffers,
                x,
                train=True,
                update_buffers=box is not None,
                rates=rates,
                noise=noise,
            )
            if box is not None:
                box["buffers"] = new
            value = problem.loss(out, y)
            for m in penalties:
                term = m.penalty(problem, params, hparams)
                value = value if term is None else value + term
            return value

        return loss

    def guard(
        self, params: Params, hparams: Params, batch: tuple[Tensor, Tensor], buffers: Params
    ) -> Tensor:
        """The guard loss: eval mode, the run's buffers."""
        out, _ = self.problem.forward(params, buffers, batch[0], train=False)
        return self.problem.loss(out, batch[1])


class GradTap:
    """One base step's monitor: keeps its loss and gradients (the per-step modifiers read
    them); :func:`train_step` checks them at once, with one host read each."""

    loss: Tensor
    grads: tuple[Tensor, ...] = ()

    def record(self, loss: Tensor, grads) -> None:
        self.loss, self.grads = loss.detach(), tuple(g.detach() for g in grads)


def train_step(
    losses: Losses,
    opt: optim.GradientTransformation,
    state: RunState,
    batch: Batch,
    step: int,
    donate: bool = False,
) -> tuple[Params, Any, Params, float, tuple[Tensor, ...]]:
    """``(params, opt_state, buffers, loss, grads)`` after one optimizer step from ``state``
    on ``batch`` (base step ``step``); :class:`NonFiniteError` on a NaN or inf loss or
    gradient. ``donate``: nothing else holds ``state``'s parameters and optimizer state, so
    the step may write them in place (then they hold the new values, also on an error)."""
    box: dict[str, Params] = {}
    monitor = GradTap()
    with torch.no_grad():
        params, opt_state = hypergrad.inner_step(
            losses.train(state.buffers, box), opt, state.params, state.opt_state,
            state.hparams, batch, create_graph=False, monitor=monitor, fused=True, donate=donate,
        )  # fmt: skip
        loss = monitor.loss.item()
        grads = monitor.grads or (monitor.loss,)  # a model without parameters: the loss
        finite = bool(torch.isfinite(torch.stack(torch._foreach_norm(list(grads)))).all())
    hint = "lower the learning rate or clip gradients"
    if not math.isfinite(loss) or not finite:
        raise NonFiniteError("inner loss" if not math.isfinite(loss) else "gradient", step, hint)
    return params, opt_state, box.get("buffers", state.buffers), loss, monitor.grads


class Lookahead:
    """One cycle's lookahead: ``batches`` (the ``K`` the run trains on next), the random state
    ``rng_state`` at the cycle's start, and the guard splits of the replay ``buffer``
    (``propose``, ``verify``; ``shared``: one set) with the guard data of every source but the
    current one, ``source`` (``older``, the forgetting budget's). ``current`` is the run's
    state, whose replay is kept while others come and go; ``step`` the base step now."""

    def __init__(
        self,
        losses: Losses,
        opt: optim.GradientTransformation,
        batches: list[Batch],
        rng_state: tuple[Tensor, Tensor | None],
        device: torch.device,
        *,
        current: RunState,
        step: int,
        buffer: replay.Replay,
        shared: bool,
        source: int,
        example: Tensor,
    ) -> None:
        self.losses, self.opt, self.batches = losses, opt, list(batches)
        self.rng_state, self.device, self.current, self.step = rng_state, device, current, step
        self.propose, self.verify = (
            guard(buffer, "propose", shared),
            guard(buffer, "verify", shared),
        )
        self.older = guard(buffer, "verify", shared, exclude_source=source)
        self.example = example  # (1, ...): the cost model's input
        self.problem = losses.problem
        self.cost = Cost()  # the cycle's work, in example-equivalents (.budget)
        self._replays: dict[tuple[int, ...], tuple[tuple, tuple[Params, Any]]] = {}

    @property
    def examples(self) -> int:
        """The training examples of the ``K`` lookahead batches."""
        return sum(len(b[1]) for b in self.batches)

    @contextlib.contextmanager
    def randomness(self) -> Iterator[None]:
        """Every lookahead of a cycle (the estimate, each replay) draws the same random numbers
        (a model's own ``nn.Dropout``), from the generator state at the cycle's start, and leaves
        the run's generators as they were: verifying a change consumes no randomness."""
        with drawing_from(self.rng_state, self.device):
            yield

    def replay(self, state: RunState, monitor: Any = None) -> tuple[Params, Any]:
        """``state`` trained over the lookahead batches (no graph): ``(params, opt_state)``.
        The last ``REPLAYS_KEPT`` are kept; with a ``monitor`` it always runs (the monitor must
        see every loss)."""
        parts = _replayed(state)  # what a replay reads: a new memory is the same replay
        key = tuple(map(id, parts))
        hit = self._replays.pop(key, None)
        if hit is not None and _same(hit[0], parts):
            self._replays[key] = hit  # the most recently used last
            if monitor is None:
                return hit[1]
        self.cost.trained(self.examples)
        with self.randomness():
            result = hypergrad.run(
                self.losses.train(state.buffers),
                self.opt,
                state.params,
                state.opt_state,
                state.hparams,
                self.batches,
                create_graph=False,
                monitor=monitor,
                fused=True,  # as the base steps that train these batches next
            )
        self._replays[key] = (parts, result)
        current = _replayed(self.current)
        while len(self._replays) > REPLAYS_KEPT:  # a model's copies, not one per proposal
            oldest = next(k for k, v in self._replays.items() if not _same(v[0], current))
            del self._replays[oldest]
        return result

    def release(self) -> None:
        """Drop the kept replays (a model's copies each) once the cycle has decided."""
        self._replays.clear()

    def guard_loss(self, params: Params, state: RunState, part: str = "verify") -> float:
        """The guard loss of ``params`` (with ``state``'s hyperparameters and buffers) on the
        ``"verify"`` or ``"propose"`` split."""
        batch = self.verify if part == "verify" else self.propose
        self.cost.evaluated(len(batch[1]))
        with torch.no_grad():
            return float(self.losses.guard(params, state.hparams, batch, state.buffers))

    def baseline(self, state: RunState) -> float:
        """The verifier's reference: the guard loss on the ``"verify"`` part after the
        lookahead from ``state``, without any change."""
        params, _ = self.replay(state)
        return self.guard_loss(params, state)

    def estimate(
        self, state: RunState, estimator: str, meta_horizon: int = 0
    ) -> tuple[float, Params]:
        """``(guard loss after the lookahead, d it / d hparams)`` on the ``"propose"`` split by
        ``estimator`` (:data:`selfmod.hypergrad.ESTIMATORS`); ``meta_horizon``: add the past
        base steps' part of the learning rates' (:func:`horizon_term`)."""
        if estimator == FIRST_ORDER:
            return self.first_order(state)
        est = hypergrad.ESTIMATORS[estimator]
        k = len(self.batches)
        opts = {
            "checkpointed": {"segments": max(1, round(math.sqrt(k)))},
            "truncated": {"window": max(1, k // 2)},
        }.get(estimator, {})

        self.cost.trained(self.examples + len(self.propose[1]), REVERSE_PASSES)

        def outer(params: Params, hparams: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
            return self.losses.guard(params, hparams, batch, state.buffers)

        with self.randomness(), sdpa_kernel([SDPBackend.MATH]):
            res = est(
                self.losses.train(state.buffers),
                outer,
                self.opt,
                state.params,
                state.hparams,
                self.batches,
                self.propose,
                state=state.opt_state,
                **opts,
            )
        g = dict(res.hparams)
        if meta_horizon and "log_lr" in g:
            term = horizon_term(res.params, state.opt_state, state.params)
            g["log_lr"] = g["log_lr"] + term.to(g["log_lr"].dtype)
        if not tree.is_finite(g):
            raise NonFiniteError("hypergradient", hint="meta learning rate backed off")
        return float(res.value), g

    def first_order(self, state: RunState) -> tuple[float, Params]:
        """``(guard loss after the lookahead, first-order d it / d hparams)`` on the
        ``"propose"`` split, from the lookahead's own replay (the verifier's baseline: shared,
        no graph through the steps, memory of one model's gradient).

        With ``u_t`` held fixed (its dependence on the hyperparameters through the trajectory
        dropped, as in hypergradient descent), every optimizer here steps in proportion to
        each tensor's rate, so ``d theta_K / d log lr_i = (theta_K - theta_0)_i`` and
        ``d guard / d log lr_i = <g_i, (theta_K - theta_0)_i>``, ``g = d guard / d theta_K``;
        decoupled weight decay adds ``-lr_i wd theta_t`` a step, so ``d guard / d log wd``
        ``~ -wd sum_i lr_i <g_i, sum_{t<K} theta_t,i>``, the sum taken along the straight line
        from ``theta_0`` to ``theta_K`` (exact for ``K = 1``; for L2 decay inside the
        gradient, the same first-order approximation). Hyperparameters that
        act through the loss or the moments (dropout, betas, momentum, eps) get none: their
        modifiers propose nothing under this estimator."""
        end, _ = self.replay(state)
        self.cost.trained(len(self.propose[1]))
        p = tree.detach(end, True)
        with torch.enable_grad():
            loss = self.losses.guard(p, state.hparams, self.propose, state.buffers)
            grads = torch.autograd.grad(loss, list(p.values()), materialize_grads=True)
        g = dict(zip(p, grads, strict=True))
        h, out = state.hparams, {}
        with torch.no_grad():
            moved = [(g[n] * (end[n] - state.params[n])).sum() for n in end]
            out["log_lr"] = torch.stack(moved).to(h["log_lr"].dtype)
            if "log_wd" in h:
                lr, k = (h["log_lr"] + h.get(LR_SCHEDULE, 0.0)).exp(), len(self.batches)
                # sum_t theta_t over t < K, the path taken as a straight line: K theta_mid
                w = (k - 1) / (2 * k)
                mid = [
                    (g[n] * (state.params[n] + w * (end[n] - state.params[n]))).sum() for n in end
                ]
                wd = -k * h["log_wd"].exp() * (lr * torch.stack(mid)).sum()
                out["log_wd"] = wd.to(h["log_wd"].dtype)
        if not tree.is_finite(out):
            raise NonFiniteError("hypergradient", hint="meta learning rate backed off")
        return float(loss.detach()), out

    def batch_grads(self, state: RunState, n: int) -> list[Params]:
        """Gradients of the training loss at ``state`` on each of the first ``n`` batches."""
        out = []
        loss_fn = self.losses.train(state.buffers)
        for batch in self.batches[:n]:
            self.cost.trained(len(batch[1]))
            p = tree.detach(state.params, True)
            with torch.enable_grad(), self.randomness():
                loss = loss_fn(p, state.hparams, batch)
                gs = torch.autograd.grad(loss, list(p.values()), materialize_grads=True)
            out.append(dict(zip(p, gs, strict=True)))
        return out


def _replayed(state: RunState) -> tuple:
    """What a replay of ``state`` reads (compared by identity: states are immutable)."""
    return state.params, state.opt_state, state.hparams, state.buffers


def _same(a: tuple, b: tuple) -> bool:
    return all(x is y for x, y in zip(a, b, strict=True))


def horizon_term(dparams: Params | None, opt_state: Any, params: Params) -> Tensor:
    """``(T,)``: ``d guard / d theta_0 [i] . z[i]`` per tensor ``i``, the past base steps'
    part of ``d guard / d log lr_i`` (:func:`selfmod.optim.sum_updates`: ``z`` is the
    first-order tangent ``d theta_0 / d log lr``, discounted over ``meta_horizon`` steps)."""
    if dparams is None:
        raise SelfmodError("meta_horizon: the estimator gave no gradient w.r.t. the params")
    z = opt_state[-1].total
    return torch.stack([(dparams[n] * z[n]).sum() for n in params])
