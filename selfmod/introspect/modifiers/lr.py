"""``lr``: per-tensor learning rates by the meta-gradient (Rprop on its sign).

With ``lr_mean = "fixed"`` the step on the log rates is centred (its mean removed): the
meta-gradient only redistributes the rate between tensors at a fixed geometric mean, which a
short lookahead cannot drag down (its short-horizon bias favours small rates). With
``lr_mean = "rising"`` (the default) the mean may rise but not fall: the bias is one-sided (a
short horizon favours smaller rates, Wu et al. 2018), so a step that raises the level is taken
as it is and one that lowers it only redistributes. ``"free"``: every step as it is.
The rates of empty tensors (a :class:`~selfmod.arch.FactorableLinear`'s unused half) neither
move nor count in the mean. ``level_step > 0`` also moves every rate together by
``exp(+-level_step)`` on the sign of the level's meta-gradient (their sum): the level, which a
sweep tunes, in larger steps than the per-tensor ones; verified like the rest.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from selfmod.introspect.modifiers.base import Context, register
from selfmod.introspect.modifiers.hyper import MetaGradientModifier


class LRSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    lr_mean: Literal["free", "fixed", "rising"] = Field(
        "rising",
        description="lr modifier: 'fixed' keeps the rates' geometric mean (redistributes); "
        "'rising' lets it rise but not fall",
    )
    level_step: float = Field(
        0.0,
        ge=0,
        le=10,
        description="also move every rate together by exp(-level_step sign(dL/d log level)), "
        "dL/d log level the sum of the per-tensor meta-gradients (the whole move within the "
        "trust region); 0: off",
    )


@register
class LearningRates(MetaGradientModifier):
    name = "lr"
    order = 10
    key = "log_lr"
    Settings = LRSettings

    def adjust(self, current: Tensor, new: Tensor, ctx: Context) -> Tensor:
        rates = self.rates(current, new, ctx)
        level = self.settings.level_step  # type: ignore[attr-defined]
        if not level:
            return rates
        active = torch.tensor([v.numel() > 0 for v in ctx.state.params.values()])
        up = -torch.sign(ctx.hypergrad[self.key][active].sum())  # d guard / d log level
        tr = ctx.trust_region
        moved = (rates - current + torch.where(active, up * level, 0.0)).clamp(-tr, tr)
        return current + moved

    def rates(self, current: Tensor, new: Tensor, ctx: Context) -> Tensor:
        """The per-tensor step under ``lr_mean`` (the module docstring)."""
        mode = self.settings.lr_mean  # type: ignore[attr-defined]
        # the rates of empty tensors (a factorable layer's unused half) are not the run's rates
        active = torch.tensor([v.numel() > 0 for v in ctx.state.params.values()])
        if not bool(active.all()):
            move = torch.where(active, new - current, 0.0)
            mean = move.sum() / active.sum()
            if mode == "fixed" or (mode == "rising" and bool(mean < 0)):
                return current + torch.where(active, move - mean, 0.0)
            return current + move
        move = new - current
        if mode == "fixed" or (mode == "rising" and bool(move.mean() < 0)):
            return current + move - move.mean()
        return new
