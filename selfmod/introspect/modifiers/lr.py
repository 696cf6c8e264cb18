"""``lr``: per-tensor learning rates by the meta-gradient (Rprop on its sign).

With ``lr_mean = "fixed"`` the step on the log rates is centred (its mean removed): the
meta-gradient only redistributes the rate between tensors at a fixed geometric mean, which a
short lookahead cannot drag down (its short-horizon bias favours small rates). With
``lr_mean = "rising"`` (the default) the mean may rise but not fall: the bias is one-sided (a
short horizon favours smaller rates, Wu et al. 2018), so a step that raises the level is taken
as it is and one that lowers it only redistributes. ``"free"``: every step as it is.
The rates of empty tensors (a :class:`~selfmod.arch.FactorableLinear`'s unused half) neither
move nor count in the mean.
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


@register
class LearningRates(MetaGradientModifier):
    name = "lr"
    order = 10
    key = "log_lr"
    Settings = LRSettings

    def adjust(self, current: Tensor, new: Tensor, ctx: Context) -> Tensor:
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
