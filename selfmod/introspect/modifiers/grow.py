"""``grow``: add units to the hidden layers, function-preserving, verified like every change.

``grow_rule = "criterion"``: per layer, GradMax's singular values ``sigma_i`` of
``M = delta^T h_in`` on the lookahead batches (eval mode) against the existing units' mean
gradient per unit of weight norm (:func:`selfmod.arch.growth_criterion`, ``side="fan_out"``);
the directions with ``sigma_i > grow_threshold * mean_j r_j`` are added, at most
``ceil(grow_fraction * width)`` per cycle and up to ``max_width``. Growth stops when no
direction beats the existing units, not at a cap. New units get zero fan-out and fan-in along
the top right singular vectors (:func:`selfmod.arch.gradmax_fan_in_plan`).
Layers that are not ``Linear -> Linear`` (convolutions, a factored
:class:`~selfmod.arch.FactorableLinear`) fall back to the fraction rule.

``grow_rule = "fraction"`` (default; it gave the higher accuracy on validation seeds):
``ceil(grow_fraction * width)`` units every time, zero fan-out and
random fan-in (:func:`selfmod.arch.zero_plan`), up to ``max_width`` (or the lower ceiling a
verified ``prune_rule = "lowest"`` set for the layer).

The optimizer state is re-indexed; the proposal commits only if the grown network's guard
loss after the lookahead passes the invariants. ``grow_price = c > 0`` puts a price on size:
growing from ``P`` to ``P'`` parameters must lower the verifying guard loss by at least the
fraction ``c (P' - P) / P``, so growth stops when more units no longer pay for themselves
(``grow_strict``: by any amount). References: Evci et al. 2022 (GradMax).
"""

from __future__ import annotations

import math
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
from selfmod.introspect.modifiers.prune import growth_limits


class GrowSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    grow_fraction: float = Field(0.5, gt=0, le=4, description="max units added per cycle, x width")
    max_width: int = Field(384, ge=1, le=8192, description="growth never goes beyond this")
    grow_rule: Literal["fraction", "criterion"] = Field(
        "fraction",
        description="criterion: GradMax directions that beat the existing units' gradient; "
        "fraction: grow_fraction x width every time",
    )
    grow_threshold: float = Field(
        1.0, gt=0, le=100, description="criterion: sigma_i > threshold x the units' mean"
    )
    grow_strict: bool = Field(
        False,
        description="growth commits only if it lowers the verifying guard loss after the "
        "lookahead (no epsilon tolerance): it stops when more units stop helping",
    )
    grow_beats_noise: bool = Field(
        False,
        description="growth commits only if the verifying guard loss falls by more than its "
        "noise (the standard error of the paired differences over chunks of the guard data)",
    )
    grow_price: float = Field(
        0.0,
        ge=0,
        le=100,
        description="growth commits only if it lowers the verifying guard loss by at least "
        "grow_price x its relative increase in parameters (0: no price)",
    )


def fan_in(group: arch.UnitGroup, params: Params) -> int:
    """Inputs to one unit of ``group`` (``C_in k`` for a channel)."""
    s = group.producers[0]
    return params[s.key].movedim(s.dim, 0)[0].numel()


def linear_pair(group: arch.UnitGroup, params: Params) -> tuple[str, str] | None:
    """``(producer module, consumer module)`` names of a ``Linear -> Linear`` group, else
    ``None``."""
    p = group.producers[0]
    cons = [c for c in group.consumers if params[c.key].numel()]  # a dense factorable: weight
    if not params[p.key].numel() or len(cons) != 1:  # empty: a factored layer's weight
        return None
    if cons[0].repeat != 1 or p.dim != 0 or cons[0].dim != 1:
        return None
    if params[p.key].dim() != 2 or params[cons[0].key].dim() != 2:
        return None
    if not (p.key.endswith(".weight") and cons[0].key.endswith(".weight")):
        return None
    return p.key[: -len(".weight")], cons[0].key[: -len(".weight")]


#: ``log_alpha`` of a new unit's gate: ``sigmoid = 0.9``, as
#: :class:`~selfmod.arch.HardConcreteGate` initialises its own
GATE_OPEN = math.log(0.9 / 0.1)


@register
class Grow(Modifier):
    name = "grow"
    reads_meta_gradient = False
    order = 70
    Settings = GrowSettings

    @classmethod
    def check_config(cls, config: Any) -> None:
        cap = config.settings_of(cls.name).max_width
        if config.width > cap:
            raise ValueError(
                f"width must be <= modifiers.grow.max_width ({cap}) (got {config.width})"
            )

    def widest(self) -> int:
        return self.settings.max_width  # type: ignore[attr-defined]

    def applies(self, problem: Any, hparams: dict[str, Tensor], facts: RunFacts) -> str | None:
        return None if problem.groups else f"grow: {problem.groups_error}"

    def propose(self, ctx: Context, memory: Params) -> tuple[list[Proposal], Params]:
        s: Any = self.settings
        params = ctx.state.params
        widths = ctx.problem.widths(params)
        limits = growth_limits(ctx.settings, widths, ctx.state.memory.get("prune", {}))
        room = [
            max(0, min(math.ceil(s.grow_fraction * w), limit - w))
            for w, limit in zip(widths, limits, strict=True)
        ]
        if not any(room):
            return [], {}
        add, directions, info = list(room), {}, {}
        if s.grow_rule == "criterion":
            add, directions, info = self.criterion(ctx, room)
        if not any(add):
            return [], {}
        seed = int(torch.randint(0, 2**31 - 1, (), generator=ctx.rng))
        surgery = {"add": add, "seed": seed, "cycle": ctx.cycle}
        memory = {"cycle": torch.tensor(ctx.cycle), **directions}
        proposal = Proposal(
            self.name, surgery=surgery, info=info, strict=s.grow_strict,
            beat_noise=s.grow_beats_noise,
        )  # fmt: skip
        if s.grow_price > 0:  # the price of the added parameters, in guard-loss fraction
            state = replace(ctx.state, memory={**ctx.state.memory, self.name: memory})
            grown = self.apply(proposal, state, ctx.problem)
            n, n_new = (sum(v.numel() for v in p.values()) for p in (params, grown.params))
            gain = s.grow_price * (n_new - n) / n
            proposal = replace(proposal, gain=gain, info={**info, "required_gain": gain})
        return [proposal], memory

    def criterion(self, ctx: Context, room: list[int]) -> tuple[list[int], Params, dict[str, Any]]:
        """Units to add per group by :func:`selfmod.arch.growth_criterion` on the lookahead
        batches, the GradMax fan-in directions (``"fan_in.{i}"``: ``(k, n_in)``), and per group
        ``sigma_1 / mean r`` for the ledger."""
        s: Any = self.settings
        state, problem = ctx.state, ctx.problem
        x = torch.cat([b[0] for b in ctx.pending])
        y = torch.cat([b[1] for b in ctx.pending])
        signals = problem.layer_signals(state.params, state.buffers, x, y)
        add, directions, ratios = [], {}, []
        for i, (group, r) in enumerate(zip(problem.groups, room, strict=True)):
            pair = linear_pair(group, state.params)
            if pair is None or r == 0:
                add.append(r)
                ratios.append(None)
                continue
            prod, cons = signals[pair[0]], signals[pair[1]]
            d = arch.growth_criterion(
                prod,
                cons,
                state.params[f"{pair[1]}.weight"],
                threshold=s.grow_threshold,
                max_new=r,
                side="fan_out",
                producer_weight=state.params[f"{pair[0]}.weight"],
            )
            ratios.append(round(float(d.sigma[0]) / max(d.reference, 1e-30), 4))
            add.append(d.k)
            if d.k > 0:
                directions[f"fan_in.{i}"] = d.fan_in[: d.k].detach().clone()  # (k, n_in)
        return add, directions, {"sigma1_over_mean": ratios}

    def apply(self, proposal: Proposal, state: Any, problem: Any) -> Any:
        params, opt_state = state.params, state.opt_state
        g = torch.Generator().manual_seed(int(proposal.surgery["seed"]))
        memory = state.memory.get(self.name, {})
        fresh = "cycle" in memory and int(memory["cycle"]) == proposal.surgery.get("cycle")
        for i, (group, k) in enumerate(zip(problem.groups, proposal.surgery["add"], strict=True)):
            if k <= 0:
                continue
            rows = memory.get(f"fan_in.{i}") if fresh else None
            if rows is not None and len(rows) == k:
                w = params[group.producers[0].key]  # (width, n_in)
                # inputs added since (an earlier layer grew in this change) get weight 0
                rows = torch.nn.functional.pad(rows, (0, w.shape[1] - rows.shape[1]))
                plan = arch.grow_plan(group, group.width(params), {
                    group.producers[0].key: rows.to(w.device, w.dtype)
                })  # fmt: skip
            else:  # the fraction rule, or directions no longer at hand (a late approval)
                std = fan_in(group, params) ** -0.5
                plan = arch.zero_plan(group, params, k, init_std=std, generator=g)
            gate = problem.gate_keys()[i]
            if gate is not None:  # new units' gates open (zero-filled would be half-open)
                open_ = torch.full((k,), GATE_OPEN, dtype=params[gate].dtype)
                plan = plan._replace(fill={**plan.fill, gate: open_})
            opt_state = arch.apply_state(plan, opt_state, params)
            params = arch.apply_params(plan, params)
        return replace(state, params=params, opt_state=opt_state)
