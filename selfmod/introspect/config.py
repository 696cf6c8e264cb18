"""The self-modifying run's configuration: the run's own fields (:class:`RunConfig`) plus every
registered modifier's settings (each modifier's ``Settings`` model, declared in its own file),
composed into one validated :class:`TrainConfig`.

Every field has a range; a bad value is reported in one line that names the field and what is
allowed, e.g. ``steps must be an integer in [1, 1000000] (got -5)``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from selfmod.introspect.hparams import OPTIMIZERS, OptimizerName
from selfmod.introspect.modifiers import registry
from selfmod.validation import check_out_dir

#: most cycles between two runs of a per-cycle modifier
MAX_EVERY = 1000
#: built-in names; anything else must be "package.module:callable"
MODELS = ("mlp", "cnn")
DATA = ("mnist1d", "digits")
LOSSES = ("cross_entropy", "mse")
IMPORT_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


def modifier_names() -> tuple[str, ...]:
    return tuple(registry())


def schedule_allowed() -> str:
    per_step = " and ".join(f'{n} = "step"' for n, c in registry().items() if c.per_step)
    return (
        f'a table of modifier = N (every N-th cycle, N in [1, {MAX_EVERY}]) or "cycle" (= 1), '
        f"with {per_step}; modifiers: " + ", ".join(modifier_names())
    )


def _named(builtins: tuple[str, ...], what: str) -> str:
    return " | ".join(f'"{b}"' for b in builtins) + f' | "package.module:callable" ({what})'


class RunConfig(BaseModel):
    """``selfmod train``: a model that tunes its own hyperparameters and architecture.

    The defaults train an MLP on MNIST-1D from a deliberately poor start (learning rate 100x too
    small, 8 hidden units per layer, no regularization) so that the run has something to fix.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, ge=0, le=2**31 - 1, description="drives torch, numpy and Python RNGs")
    steps: int = Field(6000, ge=1, le=1_000_000, description="base training steps")
    batch_size: int = Field(128, ge=1, le=4000, description="initial batch size")
    model: str = Field(
        "mlp",
        pattern=f"^(mlp|cnn)$|{IMPORT_PATTERN}",
        description=_named(MODELS, "returns an nn.Module"),
    )
    data: str = Field(
        "mnist1d",
        pattern=f"^(mnist1d|digits)$|{IMPORT_PATTERN}",
        description=_named(DATA, "returns (x_train, y_train, x_test, y_test) or a Dataset"),
    )
    loss: str = Field(
        "cross_entropy",
        pattern=f"^(cross_entropy|mse)$|{IMPORT_PATTERN}",
        description=_named(LOSSES, "(output, target) -> scalar"),
    )
    metric: Literal["auto", "accuracy", "loss"] = Field(
        "auto", description="auto: accuracy for integer targets, else the loss"
    )
    optimizer: OptimizerName = Field("sgd", description=", ".join(OPTIMIZERS))
    width: int = Field(8, ge=1, le=4096, description="built-in models: initial units per layer")
    depth: int = Field(2, ge=1, le=8, description="built-in models: hidden layers")
    lr: float = Field(1e-3, gt=0, le=10, description="initial learning rate of every tensor")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd")
    beta1: float = Field(0.9, gt=0, lt=1, description="adam, adamw")
    beta2: float = Field(0.999, gt=0, lt=1, description="adam, adamw")
    weight_decay: float = Field(1e-5, ge=0, le=1, description="initial L2 coefficient")
    dropout: float = Field(0.02, ge=0, lt=1, description="initial concrete-dropout rate")
    modifiers: list[str] | None = Field(
        None, description="what the run may change; omitted: every default one that applies"
    )
    schedule: dict[str, int | str] = Field(
        default_factory=dict,
        description='when each modifier runs: N (every N-th cycle), "cycle" (= 1) or "step" '
        "(per-step modifiers); omitted: every cycle, per-step ones every step",
    )
    cycle: int = Field(100, ge=1, le=100_000, description="base steps between cycles")
    lookahead: int = Field(20, ge=1, le=1000, description="inner steps K of each meta-gradient")
    estimator: Literal["reverse", "checkpointed", "truncated", "forward"] = "reverse"
    meta_horizon: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="learning rates' meta-gradient: also through the past ~N base steps "
        "(first-order tangent discounted by 1 - 1/N; reverse or checkpointed); 0: the lookahead",
    )
    meta_lr: float = Field(0.5, gt=0, le=10, description="step on log hyperparameters")
    trust_region: float = Field(0.7, gt=0, le=10, description="max |change of log h| per cycle")
    max_params: int = Field(1_000_000, ge=1, le=10**9, description="parameter budget")
    max_flops: int = Field(0, ge=0, le=10**15, description="FLOPs-per-example budget (0: none)")
    max_memory: int = Field(
        0,
        ge=0,
        le=10**13,
        description="memory budget in bytes: parameters + activations per example (0: none)",
    )
    epsilon: float = Field(0.01, ge=0, le=1, description="relative guard-loss tolerance")
    forgetting_delta: float = Field(0.05, ge=0, le=1, description="max accuracy drop on old data")
    approval: Literal["auto", "manual"] = Field(
        "auto", description="manual: verified changes wait for selfmod approve"
    )
    approval_expiry: int = Field(
        1,
        ge=0,
        le=1000,
        description="manual approval: a change proposed at cycle c is applied only at a cycle "
        "<= c + 1 + approval_expiry; later it expires (the run has moved on)",
    )
    safeguards: bool = Field(
        True,
        description="verify changes and roll back on NaN/divergence; false: commit every "
        "proposal unchecked and let a non-finite loss end the run (for comparisons only)",
    )
    guard_size: int = Field(500, ge=10, le=2000, description="train examples held out as guard")
    verify_on: Literal["held_out", "shared"] = Field(
        "held_out",
        description="held_out: half the guard proposes (probes, meta-gradients), the other half "
        "verifies; shared: one guard set does both",
    )
    replay_size: int = Field(1000, ge=10, le=100_000, description="replayed train examples kept")
    checkpoint_every: int = Field(1, ge=1, le=100_000, description="cycles between checkpoints")
    keep_checkpoints: int = Field(3, ge=1, le=1000)
    shift_step: int = Field(0, ge=0, le=1_000_000, description="step of a data shift (0: none)")
    shift_noise: float = Field(0.5, ge=0, le=10, description="noise scale after the shift")
    shift_translation: int = Field(60, ge=0, le=200, description="max translation after shift")
    compare_fixed: bool = Field(True, description="also train the fixed configuration")
    report: bool = Field(
        True,
        description="write report.html when the run ends (matplotlib plots, about 1 s); false "
        "for sweeps: selfmod report DIR writes it later from the run's history and ledger",
    )
    deterministic: bool = Field(True, description="torch deterministic algorithms")
    device: str = Field(
        "cpu", pattern=r"^(cpu|cuda|auto|cuda:\d+)$", description='"cpu", "cuda", "cuda:N", "auto"'
    )
    dtype: Literal["float32", "float64"] = "float32"
    out: str = Field("runs", min_length=1, description="folder for run directories")
    run_id: str = Field(
        "",
        pattern=r"^[0-9a-f]{0,32}$",
        description="set when the run directory is made; binds its checkpoints to it",
    )
    threads: int = Field(1, ge=1, le=256, description="torch CPU threads (small models: 1)")

    @field_validator("out")
    @classmethod
    def _out(cls, value: str) -> str:
        return check_out_dir(value)

    @field_validator("modifiers", mode="before")
    @classmethod
    def _modifiers(cls, value: Any) -> list[str] | None:
        if value is None:
            return None
        names = modifier_names()
        if not isinstance(value, list) or any(v not in names for v in value):
            raise ValueError("modifiers")
        if len(set(value)) != len(value):
            raise ValueError("modifiers")
        return value

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule(cls, value: Any) -> dict[str, int | str]:
        """Normalize to ``{modifier: N}`` (cycles) or ``{per-step modifier: "step"}``."""
        if not isinstance(value, dict):
            raise ValueError(schedule_allowed())
        mods = registry()
        out: dict[str, int | str] = {}
        for name, every in value.items():
            if name not in mods:
                raise ValueError(schedule_allowed())
            if mods[name].per_step:
                ok = every == "step"
            else:
                every = 1 if every == "cycle" else every
                ok = type(every) is int and 1 <= every <= MAX_EVERY
            if not ok:
                raise ValueError(schedule_allowed())
            out[name] = every
        return out

    def every(self, modifier: str) -> int:
        """Cycles between two runs of a per-cycle ``modifier`` (its ``schedule``; default 1)."""
        every = self.schedule.get(modifier, 1)
        return every if isinstance(every, int) else 1

    @model_validator(mode="before")
    @classmethod
    def _budget(cls, values: Any) -> Any:
        """``budget = {params = N, flops = N, memory = N}`` sets ``max_params``,
        ``max_flops`` and ``max_memory`` (one table for the three invariants)."""
        if not isinstance(values, dict) or "budget" not in values:
            return values
        table = values["budget"]
        keys = {"params": "max_params", "flops": "max_flops", "memory": "max_memory"}
        if not isinstance(table, dict) or any(k not in keys for k in table):
            raise ValueError(
                "budget must be a table with keys params, flops, memory "
                "(e.g. budget = {params = 60000})"
            )
        out = {k: v for k, v in values.items() if k != "budget"}
        for k, v in table.items():
            if keys[k] in out and out[keys[k]] != v:
                raise ValueError(f"budget.{k} and {keys[k]} disagree; set one of them")
            out[keys[k]] = v
        return out

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.lookahead > self.cycle:
            raise ValueError(f"lookahead must be <= cycle ({self.cycle}) (got {self.lookahead})")
        if self.meta_horizon and self.estimator not in ("reverse", "checkpointed"):
            raise ValueError(
                f'meta_horizon needs estimator = "reverse" or "checkpointed" (got '
                f"{self.estimator!r}); set meta_horizon = 0 for the others"
            )
        for cls in registry().values():  # each modifier checks its settings against the run's
            cls.check_config(self)
        return self


def _compose() -> type[RunConfig]:
    """``RunConfig`` plus every registered modifier's settings fields (names must be unique,
    or the same field shared by several modifiers)."""
    fields: dict[str, Any] = {}
    owners: dict[str, str] = {}
    for name, cls in registry().items():
        for field_name, info in cls.Settings.model_fields.items():
            if field_name in RunConfig.model_fields:
                raise ValueError(f"modifier {name}: setting {field_name!r} is a run field")
            if field_name in fields and fields[field_name][1] is not info:
                raise ValueError(
                    f"modifier {name}: setting {field_name!r} is also {owners[field_name]}'s"
                )
            fields[field_name] = (info.annotation, info)
            owners[field_name] = name
    return create_model("TrainConfig", __base__=RunConfig, **fields)  # type: ignore[call-overload]


TrainConfig = _compose()
TrainConfig.__doc__ = RunConfig.__doc__


def described() -> dict[str, str]:
    """Words for the fields whose type says too little (for one-line errors)."""
    return {
        "modifiers": "a list of distinct names from "
        + ", ".join(repr(m) for m in modifier_names()),
        "schedule": schedule_allowed(),
        "model": RunConfig.model_fields["model"].description or "",
        "data": RunConfig.model_fields["data"].description or "",
        "loss": RunConfig.model_fields["loss"].description or "",
        "device": RunConfig.model_fields["device"].description or "",
    }
