"""``weight_decay``: the L2 (SGD, Adam) or decoupled (AdamW) coefficient, by the gap rule or
the meta-gradient of its log."""

from __future__ import annotations

import math

from pydantic import Field

from selfmod.introspect.modifiers.base import register
from selfmod.introspect.modifiers.hyper import GapSettings, RegularizerModifier


class WeightDecaySettings(GapSettings):
    max_weight_decay: float = Field(
        1e-3, gt=1e-7, le=1, description="regularize=gap: the largest weight decay it sets"
    )


@register
class WeightDecay(RegularizerModifier):
    name = "weight_decay"
    order = 30
    key = "log_wd"
    Settings = WeightDecaySettings

    def bounds(self) -> tuple[float, float]:
        return math.log(1e-7), math.log(self.settings.max_weight_decay)  # type: ignore[attr-defined]
