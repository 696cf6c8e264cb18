"""The invariants a change must keep, and the rollback policy.

A proposal commits only if, replayed over the lookahead batches from the current state,
everything stays finite, the guard loss on the ``"verify"`` part of the guard (with
``verify_on = "held_out"``, data that neither the probes nor the meta-gradient saw) is not
worse than ``(1 + epsilon)`` times the current
one (a strict proposal, such as a meta-gradient step, must lower it), the parameter, FLOPs and
memory budgets hold (:func:`over_budget`) and the accuracy on older sources' guard data drops
by at most ``forgetting_delta``.

A non-finite loss, gradient or meta-gradient, a divergence (a second base step within
``SPIKE_WINDOW`` steps whose loss is above ``DIVERGENCE_FACTOR`` times its running average,
:func:`diverged`: one such batch alone, a few confident mistakes near a loss of 0, is counted
and trained on), or a model whose output no longer depends on its input (a step too large can
leave a ReLU network so without a loss spike) rolls back to the last good state and halves the
learning rates and the meta learning rate; the running average then starts again from the
restored state's losses.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from selfmod import hypergrad, tree
from selfmod.errors import DivergenceError, NonFiniteError
from selfmod.introspect.lookahead import Lookahead
from selfmod.introspect.state import RunState

#: a batch loss this many times its running average counts as divergence ...
DIVERGENCE_FACTOR = 5.0
#: ... unless it is below this fraction of the run's first loss times the factor (near a loss
#: of 0, a jump from 0.002 to 0.015 is noise, not divergence)
DIVERGENCE_FLOOR = 0.1
#: a spike this many base steps or fewer after the last one is a divergence (a loss that keeps
#: spiking, every step or every other); a lone one is a hard batch
SPIKE_WINDOW = 50


def diverged(loss: float, average: float | None, first: float | None) -> bool:
    """Whether a finite batch ``loss`` is a divergence: above ``DIVERGENCE_FACTOR`` times its
    running ``average``, floored at ``DIVERGENCE_FLOOR`` times the ``first`` loss."""
    if average is None:
        return False
    floor = DIVERGENCE_FLOOR * first if first is not None and math.isfinite(first) else 0.0
    return loss > DIVERGENCE_FACTOR * max(average, floor)


def spike(loss: float, counters: Any, stops: bool) -> str | None:
    """A base step's spike (:func:`diverged`), counted in ``counters.divergences`` and its step
    kept in ``counters.spiked_at``: one within ``SPIKE_WINDOW`` steps of the last raises
    ``DivergenceError`` where it ``stops`` the step (the run rolls back); else its message
    (``None``: no spike)."""
    n, last = counters, counters.spiked_at
    if not diverged(loss, n.average, n.first_loss):
        return None
    n.divergences, n.spiked_at = n.divergences + 1, n.step
    message = f"diverged at step {n.step}: loss {loss:.3g}, average {n.average:.3g}"
    if stops and last is not None and n.step - last <= SPIKE_WINDOW:
        raise DivergenceError(f"{message}, {n.step - last} step(s) after the last spike")
    return message


def check(
    look: Lookahead,
    state: RunState,
    proposed: RunState,
    current: float,
    tolerance: float,
    limits: Any,
    beat_noise: bool = False,
) -> tuple[str | None, float]:
    """``(why not, proposed guard loss)``: ``None`` when ``proposed`` keeps every invariant.

    The guard loss after the lookahead ``look`` may exceed ``current`` by the factor
    ``1 + tolerance``; with ``tolerance = 0`` it must be strictly lower, with a negative one
    lower by that fraction. ``state``: the run's state now (the forgetting check's reference);
    ``limits``: the budgets and ``forgetting_delta`` (the run's config). Nothing is changed.
    """
    why = over_budget(look.problem.cost(proposed.params, look.example), limits)
    if why is not None:
        return why, math.nan
    try:
        monitor = hypergrad.FiniteMonitor(start=look.step)
        p_new, _ = look.replay(proposed, monitor)
        monitor.check()
    except NonFiniteError as err:
        return f"proposal diverged: {err}", math.nan
    value = look.guard_loss(p_new, proposed)
    if not math.isfinite(value):
        return "proposal gives a non-finite guard loss", value
    if not tree.is_finite(p_new):
        return "proposal gives non-finite params", value
    if value > current * (1 + tolerance) or (tolerance == 0 and value >= current):
        if tolerance < 0:
            return (
                f"guard loss {value:.6g} not {-tolerance:.3g} below {current:.6g} "
                f"(needs <= x{1 + tolerance:.6g})",
                value,
            )
        return (
            f"guard loss {value:.6g} worse than {current:.6g} (tolerance x{1 + tolerance:g})",
            value,
        )
    if beat_noise:
        p_cur, _ = look.replay(state)
        look.cost.evaluated(2 * len(look.verify[1]))
        before, after = (p_cur, state.buffers), (p_new, proposed.buffers)
        gained, noise = beats_noise(look.problem, look.verify, before, after)
        if not gained > noise:
            return f"guard loss fell by {gained:.3g}, not more than its noise {noise:.3g}", value
    ox, oy = look.older
    if len(oy) and look.problem.metric == "accuracy":
        p_cur, _ = look.replay(state)
        _, old_cur = look.problem.evaluate(p_cur, state.buffers, ox, oy)
        _, old_new = look.problem.evaluate(p_new, proposed.buffers, ox, oy)
        if old_new < old_cur - limits.forgetting_delta:
            return (
                f"forgetting budget: accuracy on older data {old_new:.3f} vs "
                f"{old_cur:.3f} (delta {limits.forgetting_delta})"
            ), value
    return None, value


#: chunks of the verifying guard data whose paired loss differences give its noise
NOISE_CHUNKS = 8


def beats_noise(
    problem: Any, verify: tuple[Tensor, Tensor], before: tuple[Any, Any], after: tuple[Any, Any]
) -> tuple[float, float]:
    """``(gain, noise)``: how much lower the loss of ``after`` (params, buffers) is than
    ``before``'s on ``verify``, and that difference's standard error, from ``NOISE_CHUNKS``
    equal chunks: ``d_c = L_c(before) - L_c(after)``, ``gain = mean d``,
    ``noise = std d / sqrt(chunks)`` (``gain``: the chunks' mean weighted by their sizes, the
    whole set's difference for a mean loss)."""
    x, y = verify
    k = min(NOISE_CHUNKS, len(y))
    if k < 2:
        return 0.0, math.inf
    diffs, sizes = [], []
    for i in torch.arange(len(y)).tensor_split(k):  # sizes within one of each other
        lb, _ = problem.evaluate(*before, x[i], y[i])
        la, _ = problem.evaluate(*after, x[i], y[i])
        diffs.append(lb - la)
        sizes.append(len(i))
    d, w = torch.tensor(diffs, dtype=torch.float64), torch.tensor(sizes, dtype=torch.float64)
    return float((d * w).sum() / w.sum()), float(d.std() / math.sqrt(k))


def over_budget(cost: Any, cfg: Any) -> str | None:
    """Which budget a model of ``cost`` (:class:`selfmod.arch.Cost`) exceeds, if any:
    ``max_params``, ``max_flops`` (per example), ``max_memory`` (bytes: 4 per parameter plus
    the activations of one example, the probes' memory figure); 0 means no budget."""
    memory = cost.activation_bytes + 4 * cost.params
    for name, value, limit in (
        ("parameter", cost.params, cfg.max_params),
        ("FLOPs", cost.flops, cfg.max_flops),
        ("memory", memory, cfg.max_memory),
    ):
        if limit and value > limit:
            return f"{name} budget: {value:,} > {limit:,}"
    return None


def dead(problem: Any, state: RunState, x: Tensor) -> str | None:
    """Why the model at ``state`` no longer depends on its input (``None``: it does): the
    same output for every example of ``x`` (the verifying guard data)."""
    if len(x) < 2:
        return None
    out = problem.predict(state.params, state.buffers, x)
    if not isinstance(out, Tensor) or not out.is_floating_point():
        return None
    if bool((out == out[:1]).all()):
        return "dead: the model's output is the same for every guard example"
    return None


def rolled_back(good: RunState, reason: str) -> tuple[RunState, str]:
    """``(state, why)``: the rollback policy, the last good state with every learning rate and
    the meta learning rate halved, and the ledger's reason for it (``reason``: what happened)."""
    state = good.clone()
    h = {**state.hparams, "log_lr": state.hparams["log_lr"] - math.log(2.0)}
    state = replace(state, hparams=h, meta_lr=state.meta_lr * 0.5)
    why = f"{reason}; restored the last good state, halved learning rates and meta_lr "
    return state, why + f"(now {state.meta_lr:.3g})"
