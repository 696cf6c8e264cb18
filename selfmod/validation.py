"""Build a pydantic config from plain values, turning the first error into one readable line
that names the field and what is allowed: ``steps must be an integer in [1, 1000000] (got -5)``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from selfmod.errors import SelfmodError

M = TypeVar("M", bound=BaseModel)
_KIND = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


class ConfigError(SelfmodError, ValueError):
    """A configuration value is missing, unknown or out of range."""


def allowed(model: type[BaseModel], name: str, described: Mapping[str, str] | None = None) -> str:
    """What ``name`` accepts, in words: ``an integer in [1, 100]``, ``one of 'a', 'b'``;
    ``described`` gives the words for fields whose type says too little (lists, dicts)."""
    if described and name in described:
        return described[name]
    field = model.model_fields[name]
    if getattr(field.annotation, "__origin__", None) is Literal:
        return "one of " + ", ".join(repr(a) for a in field.annotation.__args__)
    kind = _KIND.get(field.annotation, "a valid value")
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
        return kind
    return f"{kind} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def validate(
    model: type[M], values: dict[str, Any], described: Mapping[str, str] | None = None
) -> M:
    """``model(**values)``, or a :class:`ConfigError` with one line for the first problem.

    A cross-field rule (a ``model_validator`` raising ``ValueError``) is reported with its own
    message, which should name the fields.
    """
    try:
        return model(**values)
    except ValidationError as err:
        first = err.errors()[0]
        if not first["loc"]:
            raise ConfigError(str(first["msg"]).removeprefix("Value error, ")) from None
        name = str(first["loc"][0])
        if first["type"] == "extra_forbidden":
            known = ", ".join(model.model_fields)
            raise ConfigError(f"unknown config field {name!r}; known fields: {known}") from None
        got = values.get(name, first.get("input"))
        raise ConfigError(
            f"{name} must be {allowed(model, name, described)} (got {got!r})"
        ) from None


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


def load_values(path: str | Path | None, overrides: list[str] | None) -> dict[str, Any]:
    """The values of a TOML file (if any) with ``--set key=value`` overrides applied."""
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
    return values


def load(model: type[M], path: str | Path | None = None, overrides: list[str] | None = None) -> M:
    """A validated ``model`` from a TOML file and ``--set`` overrides."""
    return validate(model, load_values(path, overrides))
