"""``dropout``: the rate of every :class:`~selfmod.arch.dropout.ConcreteDropout` site in the
model, by the gap rule (``p`` in ``[0.0025, max_dropout]``) or the meta-gradient of its logit."""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field
from torch import Tensor

from selfmod.introspect.modifiers.base import RunFacts, register
from selfmod.introspect.modifiers.hyper import GapSettings, RegularizerModifier


class DropoutSettings(GapSettings):
    max_dropout: float = Field(
        0.5, gt=0.0025, lt=1, description="regularize=gap: the largest dropout rate it sets"
    )


@register
class Dropout(RegularizerModifier):
    name = "dropout"
    order = 40
    key = "drop_logit"
    Settings = DropoutSettings

    def bounds(self) -> tuple[float, float]:
        return -6.0, math.log(self.settings.max_dropout / (1 - self.settings.max_dropout))  # type: ignore[attr-defined]

    def applies(self, problem: Any, hparams: dict[str, Tensor], facts: RunFacts) -> str | None:
        if not problem.dropout_sites:
            return (
                "dropout needs selfmod.arch.dropout.ConcreteDropout modules in the model "
                "(the rates it learns are theirs)"
            )
        return super().applies(problem, hparams, facts)
