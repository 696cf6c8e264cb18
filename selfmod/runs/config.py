"""The training configuration: TOML file plus ``--set key=value`` overrides, validated.

The model of the fields is :class:`selfmod.introspect.config.TrainConfig` (the run's own fields
and every modifier's settings); this module reads files and overrides into it. A bad value is
one line that names the field and what is allowed, e.g.
``steps must be an integer in [1, 1000000] (got -5)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfmod.introspect.config import TrainConfig, described
from selfmod.validation import load_values
from selfmod.validation import validate as validate_model

__all__ = ["TrainConfig", "fields_help", "load_config", "saved_config", "validate"]

#: modifiers that became defaults after runs were saved without them: a saved config that
#: lacks the first of a modifier's fields (it predates the modifier) and names no modifiers
#: ran without it, and resumes without it
LATER_DEFAULTS = {"factorize": "factorize_rank"}


def validate(values: dict[str, Any]) -> TrainConfig:  # type: ignore[valid-type]
    """Build a config, turning the first validation error into one readable line."""
    return validate_model(TrainConfig, values, described())


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:  # type: ignore[valid-type]
    return validate(load_values(path, overrides))


def saved_config(values: dict[str, Any]) -> TrainConfig:  # type: ignore[valid-type]
    """The config of a saved run (its ``config.json``, every field written out): as
    :func:`validate`, except that a run saved before a modifier became a default (its field is
    missing) and naming no modifiers keeps the defaults it ran with."""
    from selfmod.introspect.modifiers import default_names

    if values.get("modifiers") is None:
        later = {m for m, field in LATER_DEFAULTS.items() if field not in values}
        if later:
            values = {**values, "modifiers": [n for n in default_names() if n not in later]}
    return validate(values)


def fields_help() -> str:
    """The config fields with type, range and default, from the config model (cannot drift)."""
    from selfmod.introspect.config import TrainConfig, described
    from selfmod.validation import allowed

    lines = ["Config fields (--set name=value, or in CONFIG.toml): name = default: allowed"]
    words = described()
    for name, field in TrainConfig.model_fields.items():
        default = field.get_default(call_default_factory=True)
        what = allowed(TrainConfig, name, words)
        note = f"; {field.description}" if field.description and name not in words else ""
        lines.append(f"{name} = {default!r}: {what}{note}")
    return "\n\n".join(lines)
