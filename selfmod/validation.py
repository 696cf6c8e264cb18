"""Build a pydantic config from plain values, turning the first error into one readable line
that names the field and what is allowed: ``steps must be an integer in [1, 1000000] (got -5)``.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from selfmod.errors import SelfmodError

M = TypeVar("M", bound=BaseModel)
_KIND = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


class ConfigError(SelfmodError, ValueError):
    """A configuration value is missing, unknown or out of range."""


def allowed(model: type[BaseModel], name: str) -> str:
    """What ``name`` accepts, in words: ``an integer in [1, 100]``, ``one of 'a', 'b'``."""
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


def validate(model: type[M], values: dict[str, Any]) -> M:
    """``model(**values)``, or a :class:`ConfigError` with one line for the first problem."""
    try:
        return model(**values)
    except ValidationError as err:
        first = err.errors()[0]
        name = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            known = ", ".join(model.model_fields)
            raise ConfigError(f"unknown config field {name!r}; known fields: {known}") from None
        raise ConfigError(f"{name} must be {allowed(model, name)} (got {first.get('input')!r})"
                          ) from None
