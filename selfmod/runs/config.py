"""The training configuration: TOML file plus ``--set key=value`` overrides, validated.

Every field has a range; a bad value is reported in one line that names the field and what is
allowed, e.g. ``steps must be an integer in [1, 1000000] (got -5)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from selfmod.validation import load_values
from selfmod.validation import validate as validate_model

MODIFIERS = (
    "lr",
    "weight_decay",
    "momentum",
    "dropout",
    "batch_size",
    "grow",
    "prune",
    "online_lr",
)
Modifier = Literal[
    "lr", "weight_decay", "momentum", "dropout", "batch_size", "grow", "prune", "online_lr"
]
#: modifiers that run every base step rather than in a cycle
PER_STEP = ("online_lr",)
#: most cycles between two runs of a per-cycle modifier
MAX_EVERY = 1000
SCHEDULE_ALLOWED = (
    f'a table of modifier = N (every N-th cycle, N in [1, {MAX_EVERY}]) or "cycle" (= 1), '
    f'with online_lr = "step"; modifiers: ' + ", ".join(MODIFIERS)
)


class TrainConfig(BaseModel):
    """``selfmod train``: an MLP or 1-D CNN on MNIST-1D that tunes its own hyperparameters and
    width.

    The defaults start deliberately poorly (learning rate 100x too small, 8 hidden units per
    layer, no regularization) so that the run has something to fix.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, ge=0, le=2**31 - 1, description="drives torch, numpy and Python RNGs")
    steps: int = Field(6000, ge=1, le=1_000_000, description="base training steps")
    batch_size: int = Field(128, ge=1, le=4000, description="initial batch size")
    model: Literal["mlp", "cnn"] = Field(
        "mlp", description="an MLP or a 1-D CNN (kernel 5, stride 2; width = channels)"
    )
    width: int = Field(8, ge=1, le=4096, description="initial hidden units per layer")
    depth: int = Field(2, ge=1, le=8, description="hidden layers")
    lr: float = Field(1e-3, gt=0, le=10, description="initial learning rate of every tensor")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-5, ge=0, le=1, description="initial L2 coefficient")
    dropout: float = Field(0.02, ge=0, lt=1, description="initial concrete-dropout rate")
    modifiers: list[Modifier] = Field(
        default_factory=lambda: [m for m in MODIFIERS if m not in ("momentum", "online_lr")],
        description="what the run may change",
    )
    schedule: dict[str, int | str] = Field(
        default_factory=dict,
        description='when each modifier runs: N (every N-th cycle), "cycle" (= 1) or "step" '
        "(online_lr); omitted: every cycle, online_lr every step",
    )
    online_lr_step: float = Field(
        0.02, gt=0, le=1, description="online_lr: max |change of log lr| per base step"
    )
    regularize: Literal["gap", "hypergradient"] = Field(
        "gap", description="dropout/weight decay steered by the generalization gap or by d/dh"
    )
    gap_target: float = Field(0.15, gt=0, le=10, description="wanted guard - train loss")
    gap_gain: float = Field(
        0.0,
        ge=0,
        le=10,
        description="regularize=gap: log step per unit of log(gap / target); 0: steps of "
        "trust_region / 2",
    )
    lr_mean: Literal["free", "fixed"] = Field(
        "free", description="lr modifier: 'fixed' keeps the rates' geometric mean (redistributes)"
    )
    cycle: int = Field(100, ge=1, le=100_000, description="base steps between cycles")
    lookahead: int = Field(20, ge=1, le=1000, description="inner steps K of each meta-gradient")
    estimator: Literal["reverse", "checkpointed", "truncated", "forward"] = "reverse"
    meta_lr: float = Field(0.5, gt=0, le=10, description="step on log hyperparameters")
    trust_region: float = Field(0.7, gt=0, le=10, description="max |change of log h| per cycle")
    grow_fraction: float = Field(0.5, gt=0, le=4, description="max units added per cycle, x width")
    prune_fraction: float = Field(0.1, gt=0, lt=1, description="max units removed per cycle")
    max_width: int = Field(256, ge=1, le=8192, description="growth stops here")
    max_params: int = Field(1_000_000, ge=1, le=10**9, description="parameter budget")
    min_batch: int = Field(32, ge=1, le=4000)
    max_batch: int = Field(256, ge=1, le=4000)
    epsilon: float = Field(0.01, ge=0, le=1, description="relative guard-loss tolerance")
    forgetting_delta: float = Field(0.05, ge=0, le=1, description="max accuracy drop on old data")
    approval: Literal["auto", "manual"] = "auto"
    safeguards: bool = Field(
        True,
        description="verify changes and roll back on NaN/divergence; false: commit every "
        "proposal unchecked and let a non-finite loss end the run (for comparisons only)",
    )
    guard_size: int = Field(500, ge=10, le=2000, description="train examples held out as guard")
    replay_size: int = Field(1000, ge=10, le=100_000, description="replayed train examples kept")
    checkpoint_every: int = Field(1, ge=1, le=100_000, description="cycles between checkpoints")
    keep_checkpoints: int = Field(3, ge=1, le=1000)
    shift_step: int = Field(0, ge=0, le=1_000_000, description="step of a data shift (0: none)")
    shift_noise: float = Field(0.5, ge=0, le=10, description="noise scale after the shift")
    shift_translation: int = Field(60, ge=0, le=200, description="max translation after shift")
    compare_fixed: bool = Field(True, description="also train the fixed configuration")
    deterministic: bool = Field(True, description="torch deterministic algorithms")
    out: str = Field("runs", min_length=1, description="folder for run directories")
    threads: int = Field(1, ge=1, le=256, description="torch CPU threads (small models: 1)")

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule(cls, value: Any) -> dict[str, int | str]:
        """Normalize to ``{modifier: N}`` (cycles) or ``{"online_lr": "step"}``."""
        if not isinstance(value, dict):
            raise ValueError(SCHEDULE_ALLOWED)
        out: dict[str, int | str] = {}
        for name, every in value.items():
            if name not in MODIFIERS:
                raise ValueError(SCHEDULE_ALLOWED)
            if name in PER_STEP:
                ok = every == "step"
            else:
                every = 1 if every == "cycle" else every
                ok = type(every) is int and 1 <= every <= MAX_EVERY
            if not ok:
                raise ValueError(SCHEDULE_ALLOWED)
            out[name] = every
        return out

    def every(self, modifier: str) -> int:
        """Cycles between two runs of a per-cycle ``modifier`` (its ``schedule``; default 1)."""
        every = self.schedule.get(modifier, 1)
        return every if isinstance(every, int) else 1

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.lookahead > self.cycle:
            raise ValueError(f"lookahead must be <= cycle ({self.cycle}) (got {self.lookahead})")
        if self.min_batch > self.max_batch:
            raise ValueError(
                f"min_batch must be <= max_batch ({self.max_batch}) (got {self.min_batch})"
            )
        if not self.min_batch <= self.batch_size <= self.max_batch:
            raise ValueError(
                f"batch_size must be in [min_batch, max_batch] = "
                f"[{self.min_batch}, {self.max_batch}] (got {self.batch_size})"
            )
        if self.width > self.max_width:
            raise ValueError(f"width must be <= max_width ({self.max_width}) (got {self.width})")
        return self


DESCRIBED = {
    "modifiers": "a list of " + ", ".join(repr(m) for m in MODIFIERS),
    "schedule": SCHEDULE_ALLOWED,
}


def validate(values: dict[str, Any]) -> TrainConfig:
    """Build a config, turning the first validation error into one readable line."""
    return validate_model(TrainConfig, values, DESCRIBED)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    return validate(load_values(path, overrides))
