"""``grow``: add ``ceil(grow_fraction * width)`` units to every hidden layer, up to
``max_width``, with zero fan-out (:func:`selfmod.arch.zero_plan`): the function is unchanged
and the optimizer state re-indexed; committed only if the grown network's guard loss after the
lookahead passes the invariants. References: Evci et al. 2022 (growth).
"""

from __future__ import annotations

import math
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


class GrowSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    grow_fraction: float = Field(0.5, gt=0, le=4, description="max units added per cycle, x width")
    max_width: int = Field(256, ge=1, le=8192, description="growth stops here")


def fan_in(group: arch.UnitGroup, params: Params) -> int:
    """Inputs to one unit of ``group`` (``C_in k`` for a channel)."""
    s = group.producers[0]
    return params[s.key].movedim(s.dim, 0)[0].numel()


@register
class Grow(Modifier):
    name = "grow"
    order = 70
    Settings = GrowSettings

    @classmethod
    def check_config(cls, config: Any) -> None:
        if config.width > config.max_width:
            raise ValueError(
                f"width must be <= max_width ({config.max_width}) (got {config.width})"
            )

    def applies(self, problem: Any, hparams: dict[str, Tensor], facts: RunFacts) -> str | None:
        return None if problem.groups else f"grow: {problem.groups_error}"

    def propose(self, ctx: Context, memory: Params) -> tuple[list[Proposal], Params]:
        s = self.settings
        widths = ctx.problem.widths(ctx.state.params)
        add = [
            max(0, min(math.ceil(s.grow_fraction * w), s.max_width - w))  # type: ignore[attr-defined]
            for w in widths
        ]
        if not any(a > 0 for a in add):
            return [], memory
        seed = int(torch.randint(0, 2**31 - 1, (), generator=ctx.rng))
        return [Proposal(self.name, surgery={"add": add, "seed": seed})], memory

    def apply(self, proposal: Proposal, state: Any, problem: Any) -> Any:
        params, opt_state = state.params, state.opt_state
        g = torch.Generator().manual_seed(int(proposal.surgery["seed"]))
        for group, k in zip(problem.groups, proposal.surgery["add"], strict=True):
            if k > 0:
                std = fan_in(group, params) ** -0.5
                plan = arch.zero_plan(group, params, k, init_std=std, generator=g)
                opt_state = arch.apply_state(plan, opt_state, params)
                params = arch.apply_params(plan, params)
        return replace(state, params=params, opt_state=opt_state)
