"""The self-modifying run's configuration, grouped by concern.

The run's own fields are declared in small groups (``[run]``, ``[problem]``, ``[start]``,
``[meta]``, ``[verify]``, ``[budget]``, ``[approve]``, ``[shift]``, ``[output]``) and read flat
(``cfg.lr``, ``cfg.cycle``); a TOML file may set them at the top level or in their group's
table. Each modifier's settings live in their own table, validated by that modifier's
``Settings`` model and read with :meth:`TrainConfig.settings_of`::

    steps = 6000                       # a run field at the top level ...
    [verify]                           # ... or in its group's table
    epsilon = 0.01
    [modifiers]
    use = ["lr", "grow"]               # the chosen ones (no tables: modifiers = ["lr", "grow"])
    [modifiers.grow]
    every = 2                          # every 2nd cycle (per-step modifiers: "step")
    max_width = 384

``--set`` takes the same dotted names: ``--set modifiers.grow.max_width=384``. A modifier's
setting written flat (``max_width = 384``, the spelling before the tables) still works and
prints one :class:`ConfigDeprecationWarning` naming the new spelling.

Every field has a range; a bad value is reported in one line that names the field and what is
allowed, e.g. ``modifiers.grow.max_width must be an integer in [1, 8192] (got 0)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from selfmod.introspect.hparams import OPTIMIZERS, OptimizerName
from selfmod.introspect.modifiers import default_names, registry
from selfmod.validation import ConfigError, check_out_dir, dotted, lenient, split, validate

#: most cycles between two runs of a per-cycle modifier
MAX_EVERY = 1000
#: built-in names; anything else must be "package.module:callable"
MODELS = ("mlp", "cnn")
DATA = ("mnist1d", "digits")
LOSSES = ("cross_entropy", "mse")
IMPORT_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


class ConfigDeprecationWarning(FutureWarning):
    """A config spelling that still works but will go (shown by default, once per spelling)."""


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


_FIELDS = ConfigDict(extra="forbid", frozen=True)


class RunFields(BaseModel):
    """[run]: what is run, where and how reproducibly."""

    model_config = _FIELDS

    seed: int = Field(0, ge=0, le=2**31 - 1, description="drives torch, numpy and Python RNGs")
    steps: int = Field(
        6000,
        ge=1,
        le=1_000_000,
        description="the training budget: base steps at the initial batch size (budget_unit)",
    )
    budget_unit: Literal["examples", "steps"] = Field(
        "steps",
        description="examples: steps x batch_size examples, however the batch size changes (a "
        "larger batch spends it sooner); steps: that many base steps whatever the batch",
    )
    compare_fixed: bool = Field(True, description="also train the fixed configuration")
    deterministic: bool = Field(True, description="torch deterministic algorithms")
    device: str = Field(
        "cpu", pattern=r"^(cpu|cuda|auto|cuda:\d+)$", description='"cpu", "cuda", "cuda:N", "auto"'
    )
    dtype: Literal["float32", "float64"] = "float32"
    autocast: Literal["off", "bf16"] = Field(
        "off",
        description="bf16: the model's forward under torch.autocast in bfloat16 (CPU or CUDA), "
        "its output, the loss, the parameters and the optimizer in float32",
    )
    threads: int = Field(1, ge=1, le=256, description="torch CPU threads (small models: 1)")


class ProblemFields(BaseModel):
    """[problem]: the model, its data and loss, and the initial shape."""

    model_config = _FIELDS

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
    width: int = Field(8, ge=1, le=4096, description="built-in models: initial units per layer")
    depth: int = Field(2, ge=1, le=8, description="built-in models: hidden layers")
    batch_size: int = Field(128, ge=1, le=4000, description="initial batch size")


class StartFields(BaseModel):
    """[start]: the optimizer and the hyperparameters' starting values."""

    model_config = _FIELDS

    optimizer: OptimizerName = Field("sgd", description=", ".join(OPTIMIZERS))
    lr: float = Field(1e-3, gt=0, le=10, description="initial learning rate of every tensor")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd")
    beta1: float = Field(0.9, gt=0, lt=1, description="adam, adamw")
    beta2: float = Field(0.999, gt=0, lt=1, description="adam, adamw")
    weight_decay: float = Field(1e-5, ge=0, le=1, description="initial L2 coefficient")
    dropout: float = Field(0.02, ge=0, lt=1, description="initial concrete-dropout rate")
    lr_schedule: Literal["cosine", "wsd", "constant"] = Field(
        "constant",
        description="the rates' factor over the budget: cosine (5% warm-up, then decay to 0), "
        "wsd (5% warm-up, constant, linear decay to 0 over the last 20%) or constant; the "
        "modifiers tune the level",
    )


class MetaFields(BaseModel):
    """[meta]: the cycle and its meta-gradient."""

    model_config = _FIELDS

    cycle: int = Field(100, ge=1, le=100_000, description="base steps between cycles")
    lookahead: int = Field(20, ge=1, le=1000, description="inner steps K of each meta-gradient")
    estimator: Literal["first_order", "reverse", "checkpointed", "truncated", "forward"] = Field(
        "reverse",
        description="first_order: from the verifier's own replay, no graph through the steps "
        "(learning rates and weight decay only); the others: through the K steps",
    )
    probe_rows: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="the cycle's probes, its and the log points' test metric and the self-shift "
        "metric read at most this many rows of each set (0: all); the verifier always reads its "
        "whole split, the final summary the whole test set",
    )
    meta_budget: float | None = Field(
        None,
        gt=0,
        le=1000,
        description="self-modification's work at most this many times the base training's "
        "examples (example-equivalents); a cycle due while over it is skipped, a race at the "
        "start shortened to fit it; none: no cap",
    )
    meta_horizon: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="learning rates' meta-gradient: also through the past ~N base steps "
        "(first-order tangent discounted by 1 - 1/N; reverse or checkpointed); 0: the lookahead",
    )
    level_race: list[Annotated[float, Field(gt=0, le=1000)]] = Field(
        [],
        max_length=8,
        description="factors of every learning rate raced against the unchanged level over "
        "the first race_share of the steps, before the first cycle; the lowest guard loss wins "
        "if the verifying split agrees; []: no race",
    )
    race_share: float = Field(
        0.1, gt=0, le=0.5, description="level_race: each level trains this share of the steps"
    )
    meta_lr: float = Field(0.5, gt=0, le=10, description="step on log hyperparameters")
    trust_region: float = Field(0.7, gt=0, le=10, description="max |change of log h| per cycle")


class VerifyFields(BaseModel):
    """[verify]: what a change must keep to be committed."""

    model_config = _FIELDS

    safeguards: bool = Field(
        True,
        description="verify changes and roll back on NaN/divergence; false: commit every "
        "proposal unchecked and let a non-finite loss end the run (for comparisons only)",
    )
    epsilon: float = Field(0.01, ge=0, le=1, description="relative guard-loss tolerance")
    forgetting_delta: float = Field(0.05, ge=0, le=1, description="max accuracy drop on old data")
    guard_size: int = Field(500, ge=10, le=2000, description="train examples held out as guard")
    verify_on: Literal["held_out", "shared"] = Field(
        "held_out",
        description="held_out: half the guard proposes (probes, meta-gradients), the other half "
        "verifies; shared: one guard set does both",
    )
    replay_size: int = Field(1000, ge=10, le=100_000, description="replayed train examples kept")
    keep_best: bool = Field(
        False,
        description="early stopping: end with the params of the cycle start whose verify guard "
        "loss was lowest, if the final one is worse by more than epsilon (said in the ledger)",
    )


class BudgetFields(BaseModel):
    """[budget]: invariants on the model's size and cost (also as params, flops, memory)."""

    model_config = _FIELDS

    max_params: int = Field(1_000_000, ge=1, le=10**9, description="parameter budget")
    max_flops: int = Field(0, ge=0, le=10**15, description="FLOPs-per-example budget (0: none)")
    max_memory: int = Field(
        0,
        ge=0,
        le=10**13,
        description="memory budget in bytes: parameters + activations per example (0: none)",
    )


class ApproveFields(BaseModel):
    """[approve]: who commits a verified change."""

    model_config = _FIELDS

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


class ShiftFields(BaseModel):
    """[shift]: a change of data distribution mid-run (built-in MNIST-1D)."""

    model_config = _FIELDS

    shift_step: int = Field(0, ge=0, le=1_000_000, description="step of a data shift (0: none)")
    shift_noise: float = Field(0.5, ge=0, le=10, description="noise scale after the shift")
    shift_translation: int = Field(60, ge=0, le=200, description="max translation after shift")


class OutputFields(BaseModel):
    """[output]: the run directory and what is written to it."""

    model_config = _FIELDS

    out: str = Field("runs", min_length=1, description="folder for run directories")
    run_id: str = Field(
        "",
        pattern=r"^[0-9a-f]{0,32}$",
        description="set when the run directory is made; binds its checkpoints to it",
    )
    checkpoint_every: int = Field(1, ge=1, le=100_000, description="cycles between checkpoints")
    log_every: int = Field(
        50,
        ge=1,
        le=1_000_000,
        description="base steps between log points (and the last step): each reads the guard "
        "set and probe_rows test rows and offers early stopping a candidate; on a long run of a "
        "model whose forward is costly, a longer interval saves that evaluation",
    )
    log_share: float = Field(
        0.0,
        ge=0,
        le=1,
        description="cap on the log points' guard reads, as a share of the base training's "
        "examples (a guard row's forward pass counts a third of a training example): the "
        "interval grows past log_every where the guard set is large against the batch; 0: "
        "every log_every steps",
    )
    log_test: bool = Field(
        True,
        description="log points also read the test set (its first probe_rows rows): the "
        "report's test curve; false: only the summary reads it, whole, at the end (fit's "
        "default: the test set is for the final figure, and each log point's read costs a pass)",
    )
    keep_checkpoints: int = Field(3, ge=1, le=1000)
    report: bool = Field(
        True,
        description="write report.html when the run ends (matplotlib plots, about 1 s); false "
        "for sweeps: selfmod report DIR writes it later from the run's history and ledger",
    )

    @field_validator("out")
    @classmethod
    def _out(cls, value: str) -> str:
        return check_out_dir(value)


#: the run's fields by concern: a TOML table of the group's name may set them
GROUPS: dict[str, type[BaseModel]] = {
    "run": RunFields,
    "problem": ProblemFields,
    "start": StartFields,
    "meta": MetaFields,
    "verify": VerifyFields,
    "budget": BudgetFields,
    "approve": ApproveFields,
    "shift": ShiftFields,
    "output": OutputFields,
}
#: ``budget = {params = N, flops = N, memory = N}``: the budget table's short names
BUDGET_KEYS = {"params": "max_params", "flops": "max_flops", "memory": "max_memory"}


class TrainConfig(
    OutputFields,
    ShiftFields,
    ApproveFields,
    BudgetFields,
    VerifyFields,
    MetaFields,
    StartFields,
    ProblemFields,
    RunFields,
):
    """``selfmod train``: a model that tunes its own hyperparameters and architecture.

    The defaults train an MLP on MNIST-1D from a deliberately poor start (learning rate 100x too
    small, 8 hidden units per layer, no regularization) so that the run has something to fix.
    """

    model_config = _FIELDS

    modifiers: list[str] | None = Field(
        None, description="what the run may change; omitted: every default one that applies"
    )
    schedule: dict[str, int | str] = Field(
        default_factory=dict,
        description='when each modifier runs: N (every N-th cycle), "cycle" (= 1) or "step" '
        "(per-step modifiers); omitted: every cycle, per-step ones every step; in TOML: "
        "every = N in the modifier's table",
    )
    modifier_settings: dict[str, Any] = Field(
        default_factory=dict,
        description="each registered modifier's validated Settings by name (its [modifiers.NAME] "
        "table); read with settings_of(name)",
    )

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
            if name not in mods or (ok := _every(mods[name].per_step, every)) is None:
                raise ValueError(schedule_allowed())
            out[name] = ok
        return out

    @model_validator(mode="before")
    @classmethod
    def _tables(cls, values: Any) -> Any:
        """Any spelling (:func:`canonical`) to the fields: the ``modifiers`` table's ``use`` to
        ``modifiers``, its tables' ``every`` to ``schedule``, the rest of each table to
        ``modifier_settings``, validated by that modifier's ``Settings``."""
        if not isinstance(values, Mapping):
            return values
        out, flat = canonical(values)
        tables = out.pop("modifiers", {})
        if not isinstance(tables, Mapping):
            out["modifiers"], tables = tables, {}
        elif "use" in tables:
            use = tables["use"]
            out["modifiers"] = split(use) if isinstance(use, str) else use
        settings, every = {}, {}
        for name, table in tables.items():
            if name != "use":
                settings[name] = {k: v for k, v in table.items() if k != "every"}
                if "every" in table:
                    every[name] = _checked_every(name, table["every"])
        if every:
            given = out.get("schedule", {})
            for name, n in every.items():
                if isinstance(given, Mapping) and name in given and given[name] != n:
                    raise ConfigError(
                        f"modifiers.{name}.every and schedule.{name} disagree; set one of them"
                    )
            out["schedule"] = {**given, **every} if isinstance(given, Mapping) else given
        for name, value in out.items():
            if name in cls.model_fields and (why := lenient(name, value)) is not None:
                raise ValueError(why)
        out["modifier_settings"] = _validated(settings)
        if flat:
            deprecated(flat)
        return out

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.lookahead > self.cycle:
            raise ValueError(f"lookahead must be <= cycle ({self.cycle}) (got {self.lookahead})")
        if self.autocast != "off" and self.dtype != "float32":
            raise ValueError(
                f'autocast = "{self.autocast}" needs dtype = "float32" (got {self.dtype!r}): '
                'autocast lowers float32 operations; set autocast = "off" for float64'
            )
        if self.autocast != "off" and self.estimator == "forward":
            raise ValueError(
                f'autocast = "{self.autocast}" does not combine with estimator = "forward" '
                "(forward-mode derivatives through an autocast step mix dtypes in torch): use "
                '"first_order", "reverse", "checkpointed" or "truncated"'
            )
        if self.meta_horizon and self.estimator not in ("reverse", "checkpointed"):
            raise ValueError(
                f'meta_horizon needs estimator = "reverse" or "checkpointed" (got '
                f"{self.estimator!r}); set meta_horizon = 0 for the others"
            )
        mods = registry()
        for name in self.chosen():  # each chosen modifier checks its settings against the run's
            mods[name].check_config(self)
        return self

    def chosen(self) -> list[str]:
        """The modifiers the run may have: ``modifiers``, or (naming none) every registered
        default one (those that do not apply to the problem are skipped when the run starts)."""
        return list(self.modifiers) if self.modifiers is not None else default_names()

    def every(self, modifier: str) -> int:
        """Cycles between two runs of a per-cycle ``modifier`` (its ``every``; default 1)."""
        every = self.schedule.get(modifier, 1)
        return every if isinstance(every, int) else 1

    def settings_of(self, modifier: str) -> BaseModel:
        """``modifier``'s validated ``Settings`` (its ``[modifiers.NAME]`` table); a modifier
        registered after this config was made has its defaults."""
        if modifier in self.modifier_settings:
            return self.modifier_settings[modifier]
        cls = registry().get(modifier)
        if cls is None:
            raise KeyError(f"no modifier named {modifier!r}; modifiers: {', '.join(registry())}")
        return cls.Settings()

    def __getattr__(self, name: str) -> Any:
        """A modifier's setting read flat (``cfg.max_width``): deprecated, use
        :meth:`settings_of`."""
        settings = self.__dict__.get("modifier_settings") if not name.startswith("_") else None
        for modifier, values in (settings or {}).items():
            if name in type(values).model_fields:
                warnings.warn(
                    f"cfg.{name} is deprecated; read cfg.settings_of({modifier!r}).{name}",
                    DeprecationWarning,
                    stacklevel=2,
                )
                return getattr(values, name)
        return super().__getattr__(name)  # type: ignore[misc]


def _every(per_step: bool, every: Any) -> int | str | None:
    """A modifier's ``every`` normalized (``"cycle"`` is 1), or ``None`` if not allowed."""
    if per_step:
        return every if every == "step" else None
    every = 1 if every == "cycle" else every
    return every if type(every) is int and 1 <= every <= MAX_EVERY else None


def owners() -> dict[str, list[str]]:
    """Each modifier setting's name -> the modifiers whose ``Settings`` have it (the flat,
    deprecated spelling sets it in each); names of run fields and groups are never flat
    settings."""
    out: dict[str, list[str]] = {}
    for name, cls in registry().items():
        for field in cls.Settings.model_fields:
            if field not in TrainConfig.model_fields and field not in GROUPS:
                out.setdefault(field, []).append(name)
    return out


def canonical(values: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``values`` in one spelling, the TOML one, and the flat modifier settings found (in
    order).

    Dotted keys (``verify.epsilon``, ``modifiers.grow.max_width``) are nested; group tables
    (``[verify]``) flattened to the run's fields; each modifier's settings gathered in the
    ``modifiers`` table (``{"use": [...], "grow": {"every": 2, "max_width": 384}}``), from there,
    from ``modifier_settings`` (a saved config) or given flat (``max_width``, deprecated). The
    ``modifiers`` value stays a plain list where no table is given. A value given twice in two
    spellings must agree. Idempotent.
    """
    reg, flat_owners = registry(), owners()
    out: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {}
    flat: list[str] = []
    use: list[Any] = []  # [the chosen names], when given

    origin: dict[str, str] = {}  # where each field was given

    def put(field: str, value: Any, where: str) -> None:
        if field in out and out[field] != value:
            raise ConfigError(f"{where} and {origin[field]} disagree; set one of them")
        out[field], origin[field] = value, where

    def put_setting(modifier: str, key: str, value: Any, where: str) -> None:
        table = tables.setdefault(modifier, {})
        if key in table and table[key] != value:
            raise ConfigError(
                f"{where} and {dotted('modifiers', modifier, key)} disagree; set one of them"
            )
        table[key] = value

    def put_table(prefix: str, name: str, table: Any) -> None:
        if name not in reg:
            raise ConfigError(
                f"{dotted(prefix, name)}: no modifier of that name ({prefix}.use names the chosen "
                f"ones, {prefix}.NAME holds one's settings); modifiers: {', '.join(reg)}"
            )
        table = table.model_dump() if isinstance(table, BaseModel) else table
        if not isinstance(table, Mapping):
            raise ConfigError(
                f"{dotted(prefix, name)} must be a table of {name}'s settings (got {table!r:.80})"
            )
        for k, v in table.items():
            put_setting(name, k, v, dotted(prefix, name, k))

    for key, value in _nest(values).items():
        if key in GROUPS:
            for field, v in _group(key, value).items():
                put(field, v, f"{key}.{field}")
        elif key == "modifiers" and isinstance(value, Mapping):
            for name, table in value.items():
                if name == "use":
                    use.append(table)
                else:
                    put_table("modifiers", name, table)
        elif key == "modifiers":
            use.append(value)
        elif key == "modifier_settings":
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"modifier_settings must be a table of modifier = its settings table "
                    f"(got {value!r:.80})"
                )
            for name, table in value.items():
                put_table("modifier_settings", name, table)
        elif key in TrainConfig.model_fields or key not in flat_owners:
            put(key, value, key)  # a field, or unknown (the model refuses it by name)
        else:
            flat.append(key)
            for name in flat_owners[key]:
                put_setting(name, key, value, key)
    if len(use) > 1 and use[0] != use[1]:
        raise ConfigError("modifiers and modifiers.use disagree; set one of them")
    if tables or (use and isinstance(use[0], Mapping)):
        out["modifiers"] = {**({"use": use[0]} if use else {}), **tables}
    elif use:
        out["modifiers"] = use[0]
    return out, flat


def _nest(values: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys as nested tables: ``{"a.b": 1}`` -> ``{"a": {"b": 1}}``; a ``modifiers``
    list given beside ``modifiers.NAME.KEY`` becomes the table's ``use``."""
    out = {k: v for k, v in values.items() if "." not in k}
    for key, value in values.items():
        if "." not in key:
            continue
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"config key {key!r} has an empty part")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part, {})
            if i == 0 and part == "modifiers" and not isinstance(child, Mapping):
                child = {"use": child}
            if not isinstance(child, Mapping):
                raise ConfigError(f"{dotted(*parts[: i + 1])} is not a table (in {key!r})")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return out


def _group(name: str, table: Any) -> dict[str, Any]:
    """A group's table as fields (``[budget]`` also takes ``params``, ``flops``, ``memory``)."""
    fields = GROUPS[name].model_fields
    aliases = BUDGET_KEYS if name == "budget" else {}
    known = ", ".join([*fields, *aliases])
    if not isinstance(table, Mapping):
        raise ConfigError(f"{name} must be a table of its fields: {known} (got {table!r:.80})")
    out: dict[str, Any] = {}
    for key, value in table.items():
        field = aliases.get(key, key)
        if field not in fields:
            raise ConfigError(f"unknown config field {dotted(name, key)!r}; {name} has: {known}")
        if field in out and out[field] != value:
            raise ConfigError(f"{name}.{key} and {name}.{field} disagree; set one of them")
        out[field] = value
    return out


def _checked_every(modifier: str, value: Any) -> int | str:
    """A table's ``every``, normalized, or one line saying what is allowed."""
    ok = _every(registry()[modifier].per_step, value)
    if ok is None:
        allowed = (
            '"step" (a per-step modifier)'
            if registry()[modifier].per_step
            else f'an integer in [1, {MAX_EVERY}] (every N-th cycle) or "cycle" (= 1)'
        )
        raise ConfigError(f"modifiers.{modifier}.every must be {allowed} (got {value!r:.80})")
    return ok


def _validated(tables: Mapping[str, Any]) -> dict[str, BaseModel]:
    """Every registered modifier's ``Settings`` from its table (defaults where it has none)."""
    reg = registry()
    if not isinstance(tables, Mapping):
        raise ConfigError("modifier_settings must be a table of modifier = its settings")
    for name in tables:
        if name not in reg:
            raise ConfigError(
                f"modifiers.{name}: no modifier of that name is registered; modifiers: "
                + ", ".join(reg)
            )
    out: dict[str, BaseModel] = {}
    for name, cls in reg.items():
        table = tables.get(name, {})
        if isinstance(table, cls.Settings):
            out[name] = table
        else:
            table = table.model_dump() if isinstance(table, BaseModel) else dict(table)
            out[name] = validate(cls.Settings, table, prefix=f"modifiers.{name}.")
    return out


_SHOWN: dict[Any, Any] = {}  # the deprecation lines already shown (warnings' registry)


def deprecated(flat: list[str]) -> None:
    """One :class:`ConfigDeprecationWarning` line naming the new spelling of ``flat`` keys."""
    who = owners()
    moves = "; ".join(
        f"{key} -> " + " and ".join(f"modifiers.{m}.{key}" for m in who.get(key, []))
        for key in dict.fromkeys(flat)
    )
    warnings.warn_explicit(
        f"a modifier's setting given flat is deprecated, set it in the modifier's table "
        f"([modifiers.NAME] in TOML, --set modifiers.NAME.KEY=value): {moves}",
        ConfigDeprecationWarning,
        "selfmod config",
        0,
        module="selfmod.config",
        registry=_SHOWN,
    )


def described() -> dict[str, str]:
    """Words for the fields whose type says too little (for one-line errors)."""
    return {
        "modifiers": "a list of distinct names from "
        + ", ".join(repr(m) for m in modifier_names()),
        "schedule": schedule_allowed(),
        "level_race": "a list of at most 8 numbers in (0, 1000] (factors of every rate; [] for "
        "no race)",
        "model": ProblemFields.model_fields["model"].description or "",
        "data": ProblemFields.model_fields["data"].description or "",
        "loss": ProblemFields.model_fields["loss"].description or "",
        "device": RunFields.model_fields["device"].description or "",
    }
