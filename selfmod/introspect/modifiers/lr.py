"""``lr``: per-tensor learning rates by the meta-gradient (Rprop on its sign).

With ``lr_mean = "fixed"`` the step on the log rates is centred (its mean removed): the
meta-gradient only redistributes the rate between tensors at a fixed geometric mean, which a
short lookahead cannot drag down (its short-horizon bias favours small rates).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from selfmod.introspect.modifiers.base import register
from selfmod.introspect.modifiers.hyper import MetaGradientModifier


class LRSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    lr_mean: Literal["free", "fixed"] = Field(
        "free", description="lr modifier: 'fixed' keeps the rates' geometric mean (redistributes)"
    )


@register
class LearningRates(MetaGradientModifier):
    name = "lr"
    order = 10
    key = "log_lr"
    Settings = LRSettings

    def adjust(self, current: Tensor, new: Tensor) -> Tensor:
        if self.settings.lr_mean == "fixed":  # type: ignore[attr-defined]
            move = new - current
            return current + move - move.mean()
        return new
