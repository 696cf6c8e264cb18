"""Shared rules of the hyperparameter modifiers.

- *meta-gradient*: ``h' = h - s * sign(g)`` with ``g = d guard_loss(params_K) / d h`` over the
  lookahead and per-entry Rprop step sizes ``s <= min(meta_lr, trust_region)``
  (:func:`~selfmod.introspect.modifiers.base.rprop_step`); every such proposal of a cycle is
  verified as one change, group ``"hypergradient"``, which must lower the guard loss.
- *gap*: weight decay and dropout steered by the internal generalization gap
  ``G = guard_loss - train_loss`` towards ``gap_target`` (:func:`gap_step`), group
  ``"regularize"``.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from selfmod.introspect.modifiers.base import Context, Modifier, Params, Proposal, rprop_step

HYPERGRADIENT, REGULARIZE = "hypergradient", "regularize"


class GapSettings(BaseModel):
    """How weight decay or dropout is steered (each modifier has its own table of these)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    regularize: Literal["gap", "hypergradient"] = Field(
        "gap", description="steered by the generalization gap or by the meta-gradient d/dh"
    )
    gap_target: float = Field(0.15, gt=0, le=10, description="wanted guard - train loss")
    regularize_strict: bool = Field(
        False,
        description="regularize=gap: a change commits only if it lowers the verifying guard "
        "loss (no epsilon tolerance, which small steps can ratchet through to the caps)",
    )
    gap_gain: float = Field(
        0.0,
        ge=0,
        le=10,
        description="regularize=gap: log step per unit of log(gap / target); 0: steps of "
        "trust_region / 2",
    )


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


class MetaGradientModifier(Modifier):
    """One hyperparameter entry ``key`` moved by the Rprop step on its meta-gradient."""

    key: ClassVar[str]

    @property
    def needs(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.key,)

    def propose(self, ctx: Context, memory: Params) -> tuple[list[Proposal], Params]:
        g = ctx.hypergrad.get(self.key)
        if g is None or not bool(g.abs().sum() > 0):
            return [], memory
        step, sign = rprop_step(
            memory.get("step"), memory.get("sign"), g, ctx.meta_lr, ctx.trust_region
        )
        current = ctx.state.hparams[self.key]
        new = self.adjust(current, current - step * sign, ctx)
        why = {f"d guard / d {self.key}": g}  # the ledger's and the report's "why"
        proposal = Proposal(self.name, {self.key: new}, strict=True, group=HYPERGRADIENT, info=why)
        return [proposal], {"step": step, "sign": sign}

    def adjust(self, current: Tensor, new: Tensor, ctx: Context) -> Tensor:
        """A last transformation of the proposed value (default: none)."""
        return new

    def reset(self, memory: Params) -> Params:
        return {}  # after a data shift the meta-steps restart at full size


class RegularizerModifier(MetaGradientModifier):
    """Weight decay or dropout: by the meta-gradient, or (``regularize = "gap"``) by the gap."""

    Settings = GapSettings

    @property
    def reads_meta_gradient(self) -> bool:  # type: ignore[override]
        return self.settings.regularize == "hypergradient"  # type: ignore[attr-defined]

    def bounds(self) -> tuple[float, float]:
        """The gap rule's range of ``h[key]`` (unconstrained)."""
        raise NotImplementedError

    def propose(self, ctx: Context, memory: Params) -> tuple[list[Proposal], Params]:
        s = self.settings
        if s.regularize == "hypergradient":  # type: ignore[attr-defined]
            return super().propose(ctx, memory)
        gap = ctx.probe.get("gap", math.nan)
        if not math.isfinite(gap):
            return [], memory
        step = gap_step(gap, s.gap_target, s.gap_gain, ctx.trust_region)  # type: ignore[attr-defined]
        new = (ctx.state.hparams[self.key] + step).clamp(*self.bounds())
        strict = s.regularize_strict  # type: ignore[attr-defined]
        proposal = Proposal(
            self.name, {self.key: new}, strict=strict, group=REGULARIZE, info={"gap": gap}
        )
        return [proposal], memory
