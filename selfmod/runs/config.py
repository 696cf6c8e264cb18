"""The training configuration: TOML file plus ``--set key=value`` overrides, validated.

Every field has a range; a bad value is reported in one line that names the field and what is
allowed, e.g. ``steps must be an integer in [1, 1000000] (got -5)``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from selfmod.errors import SelfmodError


class ConfigError(SelfmodError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class TrainConfig(BaseModel):
    """``selfmod train``: an MLP on MNIST-1D whose per-tensor learning rates tune themselves.

    The defaults start deliberately poorly (learning rate 100x too small) so that the run has
    something to fix.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, ge=0, le=2**31 - 1, description="drives torch, numpy and Python RNGs")
    steps: int = Field(3000, ge=1, le=1_000_000, description="base training steps")
    batch_size: int = Field(128, ge=1, le=4000)
    width: int = Field(128, ge=1, le=4096, description="hidden units per layer")
    depth: int = Field(2, ge=1, le=8, description="hidden layers")
    lr: float = Field(1e-3, gt=0, le=10, description="initial learning rate of every tensor")
    momentum: float = Field(0.9, ge=0, lt=1)
    cycle: int = Field(50, ge=1, le=100_000, description="base steps between meta-steps")
    lookahead: int = Field(20, ge=1, le=1000, description="inner steps K of each meta-gradient")
    estimator: Literal["reverse", "checkpointed", "truncated", "forward"] = "reverse"
    meta_lr: float = Field(0.3, gt=0, le=10, description="step on log learning rates")
    trust_region: float = Field(0.7, gt=0, le=10, description="max |change of log lr| per cycle")
    guard_size: int = Field(500, ge=10, le=2000, description="train examples held out as guard")
    out: str = Field("runs", min_length=1, description="folder for run directories")
    threads: int = Field(1, ge=1, le=256, description="torch CPU threads (small models: 1)")


_KIND = {int: "an integer", float: "a number", str: "a string"}


def _allowed(name: str) -> str:
    field = TrainConfig.model_fields[name]
    kind = _KIND.get(field.annotation, "")
    if getattr(field.annotation, "__origin__", None) is Literal:
        return "one of " + ", ".join(repr(a) for a in field.annotation.__args__)
    lo = hi = None
    lo_open = hi_open = False
    for m in field.metadata:
        if getattr(m, "ge", None) is not None:
            lo = m.ge
        if getattr(m, "gt", None) is not None:
            lo, lo_open = m.gt, True
        if getattr(m, "le", None) is not None:
            hi = m.le
        if getattr(m, "lt", None) is not None:
            hi, hi_open = m.lt, True
    if lo is None and hi is None:
        return kind or "a valid value"
    interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return f"{kind} in {interval}"


def validate(values: dict[str, Any]) -> TrainConfig:
    """Build a config, turning the first validation error into one readable line."""
    try:
        return TrainConfig(**values)
    except ValidationError as err:
        first = err.errors()[0]
        name = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            known = ", ".join(TrainConfig.model_fields)
            raise ConfigError(f"unknown config field {name!r}; known fields: {known}") from None
        got = first.get("input")
        raise ConfigError(f"{name} must be {_allowed(name)} (got {got!r})") from None


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with ``value`` read as a TOML value (bare words are strings)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value (got {text!r})")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}") from None
    for item in overrides or []:
        key, value = parse_override(item)
        values[key] = value
    return validate(values)
