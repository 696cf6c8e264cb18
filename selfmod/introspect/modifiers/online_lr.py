"""``online_lr`` (every base step, not in a cycle): hypergradient descent on the per-tensor log
learning rates. With ``u_{t-1} = theta_t - theta_{t-1} = -alpha d_{t-1}``,
``dL(theta_t)/d log alpha = g_t . u_{t-1}``; normalized per tensor,
``log alpha_i += online_lr_step * cos(g_t, -u_{t-1})``, so no rate moves by more than
``online_lr_step`` per step. The new rate applies from the next step. Its memory (the previous
update) is part of the run state: rollbacks restore it, checkpoints keep it.
The rule is :func:`selfmod.optim.hypergradient.online_log_lr`, as in
:class:`selfmod.optim.AdamWHD`. References: Baydin et al. 2018.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from selfmod.errors import NonFiniteError
from selfmod.introspect.modifiers.base import Modifier, Params, register
from selfmod.optim.hypergradient import online_log_lr


class OnlineSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    online_lr_step: float = Field(
        0.02, gt=0, le=1, description="online_lr: max |change of log lr| per base step"
    )


@register
class OnlineLR(Modifier):
    name = "online_lr"
    reads_meta_gradient = False
    order = 90
    Settings = OnlineSettings
    default = False
    per_step = True
    needs = ("log_lr",)
    summary = "per-step hypergradient descent on log lr since the last good state"

    def on_step(self, state: Any, grads: Params, new_params: Params) -> Any:
        prev = state.memory.get(self.name, {})
        log_lr = online_log_lr(
            state.hparams["log_lr"],
            grads,
            prev,
            self.settings.online_lr_step,  # type: ignore[attr-defined]
        )
        if not bool(torch.isfinite(log_lr).all()):
            raise NonFiniteError("online learning rate")
        update = {k: new_params[k] - state.params[k] for k in state.params}
        memory = {**state.memory, self.name: update}
        return replace(state, hparams={**state.hparams, "log_lr": log_lr}, memory=memory)
