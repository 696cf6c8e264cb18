"""``batch_size``: from the gradient noise scale ``B_noise = tr(Sigma) / |G|^2``, estimated
from per-batch gradients ``g_i`` (size B) and their mean (size BK):
``|G|^2 ~ (BK |g_mean|^2 - B E|g_i|^2) / (BK - B)``,
``tr(Sigma) ~ (E|g_i|^2 - |g_mean|^2) / (1/B - 1/(BK))``; the new ``B`` lies within
``[B/2, 2B]`` and ``[min_batch, max_batch]``. References: McCandlish et al. 2018.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from selfmod import tree
from selfmod.introspect.modifiers.base import (
    Context,
    Modifier,
    Params,
    Proposal,
    RunFacts,
    register,
)


def noise_scale(grads: list[Params], batch_size: int) -> float:
    """Simple gradient noise scale ``B_noise = tr(Sigma) / |G|^2`` from per-batch gradients
    (McCandlish et al. 2018, appendix A); ``nan`` when the estimate is not positive."""
    k = len(grads)
    if k < 2:
        return math.nan
    mean = {n: sum(g[n] for g in grads) / k for n in grads[0]}
    small = sum(float(tree.vdot(g, g)) for g in grads) / k  # E |g_B|^2
    big = float(tree.vdot(mean, mean))  # |g_BK|^2
    b, bk = batch_size, batch_size * k
    g2 = (bk * big - b * small) / (bk - b)
    s = (small - big) / (1.0 / b - 1.0 / bk)
    return s / g2 if g2 > 0 and s > 0 else math.nan


class BatchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_batch: int = Field(32, ge=1, le=4000)
    max_batch: int = Field(256, ge=1, le=4000)


@register
class BatchSize(Modifier):
    name = "batch_size"
    reads_meta_gradient = False
    order = 60
    Settings = BatchSettings

    @classmethod
    def check_config(cls, config: Any) -> None:
        s = config.settings_of(cls.name)
        lo, hi = s.min_batch, s.max_batch
        if lo > hi:
            raise ValueError(
                f"modifiers.batch_size.min_batch must be <= modifiers.batch_size.max_batch "
                f"({hi}) (got {lo})"
            )
        if config.modifiers is not None and not lo <= config.batch_size <= hi:  # named
            raise ValueError(
                f"batch_size must be in [min_batch, max_batch] of modifiers.batch_size = "
                f"[{lo}, {hi}] (got {config.batch_size})"
            )

    def applies(self, problem: Any, hparams: dict[str, Tensor], facts: RunFacts) -> str | None:
        if not facts.resizable_batches:
            return "batch_size needs indexable train data (tensors or a Dataset), not batches"
        s, b = self.settings, facts.config.batch_size
        if not s.min_batch <= b <= s.max_batch:  # type: ignore[attr-defined]
            return (
                f"batch_size {b} is outside [min_batch, max_batch] = [{s.min_batch}, "  # type: ignore[attr-defined]
                f"{s.max_batch}] (set modifiers.batch_size.min_batch / max_batch to use it)"  # type: ignore[attr-defined]
            )
        return None

    def propose(self, ctx: Context, memory: Params) -> tuple[list[Proposal], Params]:
        s, b = self.settings, ctx.state.batch_size
        bn = noise_scale(ctx.batch_grads(4), b)
        if not math.isfinite(bn):
            return [], memory
        new = int(min(max(bn, b / 2, s.min_batch), 2 * b, s.max_batch))  # type: ignore[attr-defined]
        if new == b:
            return [], memory
        return [Proposal(self.name, batch_size=new, info={"noise_scale": bn})], memory
