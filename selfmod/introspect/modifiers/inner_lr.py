"""``inner_lr``: the inner learning rate of the model's test-time-training layers, by the guard
loss, verified like every change.

A TTT layer built with ``tune_lr=True`` (:class:`~selfmod.ttt.TTTLinear`,
:class:`~selfmod.ttt.TTTMLP`) holds its base inner rate as the persistent buffer
``log_inner_lr``: not trained on the training loss, but a hyperparameter of the run. The TTT
layer trains its inner model inside its forward pass, in eval mode too, so the guard loss
depends on the rate directly: the modifier takes its exact gradient at the current weights
(first order in the outer weights), ``g = d guard / d log_inner_lr`` on ``inner_rows`` rows
of the proposing guard split, and proposes the shared Rprop step
``log_inner_lr - s sign(g)``, ``s <= min(meta_lr, trust_region)``
(:func:`~selfmod.introspect.modifiers.base.rprop_step`), which must lower the guard loss
(strict). A layer in an option of an open :class:`~selfmod.arch.Choice` is measured with
that option alone (as the run would have it once committed there); one in an option the
choice did not commit to has no gradient and is left alone.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from selfmod.arch.choice import choice_sites, key
from selfmod.introspect.modifiers.base import (
    Context,
    Modifier,
    Params,
    Proposal,
    RunFacts,
    register,
    rprop_step,
)

#: the buffer name of a tunable inner rate (``tune_lr=True``)
BUFFER = "log_inner_lr"


class InnerLRSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    inner_rows: int = Field(256, ge=1, le=100_000, description="guard rows of the gradient")


def sites(buffers: Params) -> list[str]:
    """The keys of every tunable inner rate among ``buffers``."""
    return [k for k in buffers if k == BUFFER or k.endswith("." + BUFFER)]


def forcings(module: Any, buffers: Params, keys: list[str]) -> dict[tuple, list[str]]:
    """The rate keys grouped by the relaxed weights that make their layer run: a TTT layer
    inside an option of an open :class:`~selfmod.arch.Choice` is measured with that option
    alone (``{site.weights: one_hot}``), as the run would have it once committed there."""
    out: dict[tuple, list[str]] = {}
    sites = [c for c in choice_sites(module) if int(buffers[key(c, "chosen")]) < 0]
    for k in keys:
        forced = []
        for c in sites:
            head = key(c, "options.")
            if k.startswith(head):
                names = module.get_submodule(c).names
                index = names.index(k[len(head) :].split(".", 1)[0])
                one = torch.zeros(len(names), dtype=buffers[k].dtype, device=buffers[k].device)
                forced.append((key(c, "weights"), one.index_fill(0, torch.tensor(index), 1.0)))
        out.setdefault(tuple(forced), []).append(k)
    return out


@register
class InnerLR(Modifier):
    name = "inner_lr"
    order = 67
    reads_meta_gradient = False  # its own exact first-order gradient
    Settings = InnerLRSettings

    def applies(self, problem: Any, hparams: Params, facts: RunFacts) -> str | None:
        if not sites(dict(problem.module.named_buffers())):
            return "inner_lr needs TTT layers built with tune_lr=True (their inner rate)"
        return None

    def propose(self, ctx: Context, memory: Params) -> tuple[list[Proposal], Params]:
        look, problem, state = ctx.lookahead, ctx.problem, ctx.state
        keys = sites(state.buffers)
        if look is None or not keys:
            return [], memory
        rows = self.settings.inner_rows  # type: ignore[attr-defined]
        x, y = (t[:rows] for t in look.propose)
        found: dict[str, Tensor] = {}
        for forced, group in forcings(problem.module, state.buffers, keys).items():
            rates = {k: state.buffers[k].detach().clone().requires_grad_(True) for k in group}
            extra = {**dict(forced), **rates}
            with torch.enable_grad():
                out, _ = problem.model(state.params, state.buffers, x, train=False, extra=extra)
                loss = problem.loss(out, y)
                if loss.requires_grad:  # else none of these layers ran (a committed choice's)
                    grads = torch.autograd.grad(loss, list(rates.values()), allow_unused=True)
                    found |= {k: d.detach() for k, d in zip(rates, grads, strict=True)
                              if d is not None}  # fmt: skip
            look.cost.trained(len(y))
        g = torch.stack([found[k].cpu() if k in found else torch.zeros(()) for k in keys])
        if not bool(g.abs().sum() > 0) or not bool(torch.isfinite(g).all()):
            return [], memory
        step, sign = rprop_step(
            memory.get("step"), memory.get("sign"), g, ctx.meta_lr, ctx.trust_region
        )
        new = {k: float(state.buffers[k] - s * d) for k, s, d in zip(keys, step, sign, strict=True)}
        info = {"d guard / d log inner lr": g.tolist(), "inner lr": [v for v in new.values()]}
        proposal = Proposal(self.name, surgery={"inner_lr": new}, strict=True, info=info)
        return [proposal], {"step": step, "sign": sign}

    def apply(self, proposal: Proposal, state: Any, problem: Any) -> Any:
        buffers = dict(state.buffers)
        for k, v in proposal.surgery.get("inner_lr", {}).items():
            buffers[k] = torch.tensor(v, dtype=buffers[k].dtype, device=buffers[k].device)
        return replace(state, buffers=buffers)

    def reset(self, memory: Params) -> Params:
        return {}
