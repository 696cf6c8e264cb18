"""``prune``: remove units whose saliency ``||W_in[j]|| ||W_out[:, j]||`` is below 1e-3 of the
layer's median (dead units), at most ``prune_fraction`` of a layer per cycle
(:func:`selfmod.arch.prune_plan`: the optimizer state is re-indexed)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

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


class PruneSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prune_fraction: float = Field(0.1, gt=0, lt=1, description="max units removed per cycle")


@register
class Prune(Modifier):
    name = "prune"
    order = 80
    Settings = PruneSettings

    def applies(self, problem: Any, hparams: dict[str, Tensor], facts: RunFacts) -> str | None:
        return None if problem.groups else f"prune: {problem.groups_error}"

    def propose(self, ctx: Context, memory: Params) -> tuple[list[Proposal], Params]:
        drop = []
        for i in range(len(ctx.problem.groups)):
            sal = ctx.problem.saliency(ctx.state.params, i)  # (W,)
            dead = torch.nonzero(sal < 1e-3 * sal.median()).squeeze(1)
            cap = int(self.settings.prune_fraction * len(sal))  # type: ignore[attr-defined]
            drop.append(dead[:cap].tolist())
        if not any(drop):
            return [], memory
        return [Proposal(self.name, surgery={"remove": drop})], memory

    def apply(self, proposal: Proposal, state: Any, problem: Any) -> Any:
        params, opt_state = state.params, state.opt_state
        for group, units in zip(problem.groups, proposal.surgery["remove"], strict=True):
            if units:
                keep = torch.ones(group.width(params), dtype=torch.bool)
                keep[torch.tensor(units)] = False
                plan = arch.prune_plan(group, keep)
                opt_state = arch.apply_state(plan, opt_state, params)
                params = arch.apply_params(plan, params)
        return replace(state, params=params, opt_state=opt_state)
