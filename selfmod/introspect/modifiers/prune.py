"""``prune``: remove hidden units, verified like every change.

``prune_rule = "l0"`` (where the model has :class:`~selfmod.arch.HardConcreteGate` modules;
the built-in networks then get one after every hidden layer): the gates' ``log_alpha``
train with the weights on ``loss + lambda E[params_gated] / params`` (Louizos et al. 2018;
:meth:`~selfmod.introspect.problem.Problem.expected_gated_params`), and the units whose
deterministic gate is exactly 0 are removed at the next cycle. Their output is 0 in eval mode,
so removing them keeps the function. ``lambda = l0_strength + mu``, where ``mu`` is the
budget controller's multiplier (:func:`selfmod.arch.budget_update`) on the expected parameter
count against ``max_params``: 0 while under the budget, rising while over it.

``prune_rule = "saliency"`` (default, and models without gates): units whose saliency
``||W_in[j]|| ||W_out[:, j]||`` is below 1e-3 of the layer's median (dead units).

``prune_rule = "lowest"``: in every layer that growth will not widen any more (at its
ceiling: ``max_width`` or a lower ceiling an earlier prune set; every layer when ``grow`` is
not among the run's modifiers), the ``prune_fraction`` of units with the lowest saliency, in
one proposal. It is strict: it commits only if the verifying guard loss after the lookahead
is lower than without it, so units go only where the run does better without them (one
proposal per layer was measured too: 69.3% median against 70.5% on validation seeds 100-102).
A committed prune lowers each pruned layer's ceiling to its new width (``memory["ceiling"]``,
which ``grow`` reads), so growth does not add back what verification just removed. The first
prune of a layer that does not commit settles the layer (``memory["settled"]``): it is not
proposed again. Retrying every cycle would let noise pass one eventually and shrink the
network step by step (measured: 256 -> 125 units and -5 points on MNIST-1D); stopping at the
first failure makes each further step need a fresh success in a row. So the width stops
where verification says, not at a cap.

At most ``prune_fraction`` of a layer goes per cycle, and at least one unit stays
(:func:`selfmod.arch.prune_plan`: the optimizer state is re-indexed). References: Louizos,
Welling & Kingma 2018; Gallego-Posada et al. 2022 (the controller).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from selfmod import arch
from selfmod.introspect.modifiers.base import (
    Context,
    Modifier,
    Params,
    Proposal,
    RunFacts,
    register,
)

#: the controller's step on the multiplier per cycle and its proportional gain
BUDGET_LR, BUDGET_KP = 0.05, 0.5


class PruneSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prune_fraction: float = Field(0.1, gt=0, lt=1, description="max units removed per cycle")
    prune_rule: Literal["saliency", "l0", "lowest"] = Field(
        "saliency",
        description="l0: hard-concrete gates trained with an L0 penalty, closed units removed; "
        "saliency: dead units (|fan-in| |fan-out| ~ 0); lowest: at a layer's growth ceiling, "
        "the prune_fraction least salient units, if that lowers the guard loss (strict)",
    )
    l0_strength: float = Field(
        0.01, ge=0, le=10, description="l0: lambda in loss + lambda E[params_gated] / params"
    )


@register
class Prune(Modifier):
    name = "prune"
    reads_meta_gradient = False
    order = 80
    Settings = PruneSettings

    def applies(self, problem: Any, hparams: dict[str, Tensor], facts: RunFacts) -> str | None:
        return None if problem.groups else f"prune: {problem.groups_error}"

    def l0(self, problem: Any) -> bool:
        return self.settings.prune_rule == "l0" and any(  # type: ignore[attr-defined]
            k is not None for k in problem.gate_keys()
        )

    def hparams_init(self, problem: Any) -> Params:
        if not self.l0(problem):
            return {}
        return {"l0_lambda": torch.tensor(float(self.settings.l0_strength))}  # type: ignore[attr-defined]

    def penalty(self, problem: Any, params: Params, hparams: Params) -> Tensor | None:
        if "l0_lambda" not in hparams:
            return None
        n = sum(v.numel() for v in params.values())
        return hparams["l0_lambda"] * problem.expected_gated_params(params) / n

    def propose(self, ctx: Context, memory: Params) -> tuple[list[Proposal], Params]:
        if self.settings.prune_rule == "lowest":  # type: ignore[attr-defined]
            return self.propose_lowest(ctx, memory)
        if not self.l0(ctx.problem):
            return self.propose_saliency(ctx, memory)
        s: Any = self.settings
        params, problem = ctx.state.params, ctx.problem
        drop = []
        for group, key in zip(problem.groups, problem.gate_keys(), strict=True):
            if key is None:
                drop.append([])
                continue
            closed = torch.nonzero(arch.hard_concrete_eval(params[key]) == 0).squeeze(1)
            w = group.width(params)
            cap = min(int(s.prune_fraction * w), w - 1)
            drop.append(closed[:cap].tolist())
        h: Params = {}
        budget = ctx.settings.max_params
        if budget and "l0_lambda" in ctx.state.hparams:
            state = arch.BudgetState(
                memory.get("multiplier", torch.tensor(0.0)),
                memory.get("integral", torch.tensor(0.0)),
            )
            with torch.no_grad():
                dense = sum(v.numel() for v in params.values())
                gated_dense = sum(
                    sum(params[sl.key].numel() for sl in g.slots())
                    for g, k in zip(problem.groups, problem.gate_keys(), strict=True)
                    if k is not None
                )
                cost = dense - gated_dense + float(problem.expected_gated_params(params))
            state = arch.budget_update(state, cost, budget, lr=BUDGET_LR, kp=BUDGET_KP)
            memory = {"multiplier": state.multiplier, "integral": state.integral}
            lam = torch.tensor(s.l0_strength + float(state.multiplier))
            if not torch.equal(
                lam.to(ctx.state.hparams["l0_lambda"]), ctx.state.hparams["l0_lambda"]
            ):
                h["l0_lambda"] = lam
        if not any(drop) and not h:
            return [], memory
        surgery = {"remove": drop} if any(drop) else {}
        return [Proposal(self.name, h, surgery=surgery)], memory

    def propose_saliency(self, ctx: Context, memory: Params) -> tuple[list[Proposal], Params]:
        drop = []
        for i in range(len(ctx.problem.groups)):
            sal = ctx.problem.saliency(ctx.state.params, i)  # (W,)
            dead = torch.nonzero(sal < 1e-3 * sal.median()).squeeze(1)
            cap = int(self.settings.prune_fraction * len(sal))  # type: ignore[attr-defined]
            drop.append(dead[:cap].tolist())
        if not any(drop):
            return [], memory
        return [Proposal(self.name, surgery={"remove": drop})], memory

    def propose_lowest(self, ctx: Context, memory: Params) -> tuple[list[Proposal], Params]:
        """``prune_rule = "lowest"`` (module docstring): the least salient units of the layers
        at their growth ceiling, as one strict proposal."""
        problem, params = ctx.problem, ctx.state.params
        widths = problem.widths(params)
        limits = growth_limits(ctx.settings, widths, memory)
        n = len(widths)
        tried = memory.get("tried", torch.zeros(n, dtype=torch.long))  # width last proposed at
        settled = memory.get("settled", torch.zeros(n, dtype=torch.bool)).clone()
        settled |= tried == torch.tensor(widths)  # that proposal did not commit
        drop = []
        for i, (w, limit) in enumerate(zip(widths, limits, strict=True)):
            k = min(int(self.settings.prune_fraction * w), w - 1)  # type: ignore[attr-defined]
            if settled[i] or w < limit or k <= 0:
                drop.append([])
                continue
            order = torch.argsort(problem.saliency(params, i), stable=True)  # (W,) ascending
            drop.append(sorted(order[:k].tolist()))
        tried = torch.tensor([w if d else 0 for w, d in zip(widths, drop, strict=True)])
        memory = {**memory, "tried": tried, "settled": settled}
        if not any(drop):
            return [], memory
        return [Proposal(self.name, surgery={"remove": drop}, strict=True)], memory

    def apply(self, proposal: Proposal, state: Any, problem: Any) -> Any:
        state = super().apply(proposal, state, problem)  # l0_lambda
        if not proposal.surgery:
            return state
        if self.settings.prune_rule == "lowest":  # type: ignore[attr-defined]
            state = self.lower_ceilings(proposal, state, problem)
        params, opt_state = state.params, state.opt_state
        for group, units in zip(problem.groups, proposal.surgery["remove"], strict=True):
            if units:
                keep = torch.ones(group.width(params), dtype=torch.bool)
                keep[torch.tensor(units)] = False
                plan = arch.prune_plan(group, keep)
                opt_state = arch.apply_state(plan, opt_state, params)
                params = arch.apply_params(plan, params)
        return replace(state, params=params, opt_state=opt_state)

    def lower_ceilings(self, proposal: Proposal, state: Any, problem: Any) -> Any:
        """``state`` whose ``memory["prune"]["ceiling"]`` (per layer; 0: none) is the width
        each pruned layer will have after ``proposal``."""
        widths = problem.widths(state.params)
        memory = dict(state.memory.get(self.name, {}))
        ceiling = memory.get("ceiling", torch.zeros(len(widths), dtype=torch.long)).clone()
        for i, units in enumerate(proposal.surgery["remove"]):
            if units:
                ceiling[i] = widths[i] - len(units)
        memory["ceiling"] = ceiling
        return replace(state, memory={**state.memory, self.name: memory})


def growth_limits(config: Any, widths: list[int], prune_memory: Params) -> list[int]:
    """Per layer, the width growth will not go beyond: ``max_width``, or the lower ceiling a
    committed ``prune_rule = "lowest"`` set; each layer's own width when ``grow`` is not among
    the run's modifiers (nothing will widen it)."""
    mods = getattr(config, "modifiers", None)
    if mods is not None and "grow" not in mods:
        return list(widths)
    cap = int(config.settings_of("grow").max_width) or max(widths)
    ceiling = prune_memory.get("ceiling")
    return [
        min(cap, int(ceiling[i])) if ceiling is not None and int(ceiling[i]) > 0 else cap
        for i in range(len(widths))
    ]
