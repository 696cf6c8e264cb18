"""The training configuration: TOML file plus ``--set key=value`` overrides, validated.

The model of the fields is :class:`selfmod.introspect.config.TrainConfig` (the run's own fields,
grouped by concern, and each modifier's settings in its own ``[modifiers.NAME]`` table); this
module reads files and overrides into it and describes it for ``selfmod train --help``. A bad
value is one line that names the field and what is allowed, e.g.
``steps must be an integer in [1, 1000000] (got -5)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from selfmod.introspect.config import (
    GROUPS,
    MAX_EVERY,
    ConfigDeprecationWarning,
    TrainConfig,
    canonical,
    deprecated,
    described,
)
from selfmod.validation import allowed, load_values, parse_override
from selfmod.validation import validate as validate_model

__all__ = ["TrainConfig", "fields_help", "load_config", "saved_config", "validate"]

#: modifiers that became defaults after runs were saved without them: a flat saved config
#: (written before the modifier tables) that lacks the first of a modifier's fields (it
#: predates the modifier) and names no modifiers ran without it, and resumes without it
LATER_DEFAULTS = {"factorize": "factorize_rank"}


def validate(values: dict[str, Any]) -> TrainConfig:
    """Build a config, turning the first validation error into one readable line."""
    return validate_model(TrainConfig, values, described())


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The config of a TOML file (if any) with ``--set key=value`` overrides applied, in any
    spelling (``epsilon``, ``verify.epsilon``, ``modifiers.grow.max_width``); an override
    replaces that one value, not its table. Flat modifier settings print one deprecation line."""
    values, flat = canonical(load_values(path, None))
    for item in overrides or []:
        key, value = parse_override(item)
        more, also = canonical({key: value})
        values, flat = _merged(values, more), flat + also
    if flat:
        deprecated(flat)
    return validate(values)


def _merged(values: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """``values`` with ``more`` (both :func:`canonical`) on top: the schedule and each
    modifier's table merged key by key (a plain ``modifiers`` list sets the table's ``use``),
    anything else replaced."""
    out = dict(values)
    for key, value in more.items():
        old = out.get(key)
        if key == "schedule" and isinstance(old, Mapping) and isinstance(value, Mapping):
            out[key] = {**old, **value}
        elif key == "modifiers" and (isinstance(old, Mapping) or isinstance(value, Mapping)):
            old = old if isinstance(old, Mapping) else {"use": old} if key in out else {}
            new = value if isinstance(value, Mapping) else {"use": value}
            merged = {n: {**old.get(n, {}), **t} if n != "use" else t for n, t in new.items()}
            out[key] = {**old, **merged}
        else:
            out[key] = value
    return out


def saved_config(values: dict[str, Any]) -> TrainConfig:
    """The config of a saved run (its ``config.json``, every field written out): as
    :func:`validate`, without a deprecation line for a flat config written before the modifier
    tables, and naming no modifiers it keeps the defaults it ran with: a default modifier
    without a table in the saved config (or, flat, without its first field) was not there."""
    from selfmod.introspect.modifiers import default_names

    if values.get("modifiers") is None:
        tables = values.get("modifier_settings")
        if isinstance(tables, Mapping):
            later = {n for n in default_names() if n not in tables}
        else:
            later = {m for m, field in LATER_DEFAULTS.items() if field not in values}
        if later:
            values = {**values, "modifiers": [n for n in default_names() if n not in later]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigDeprecationWarning)
        return validate(values)


def fields_help() -> str:
    """``selfmod train --help``'s list of config fields: by concern, each with its default and
    what it allows (from the models, so it cannot drift), then each modifier's table."""
    from selfmod.introspect.modifiers import registry

    words = described()
    paragraphs = [
        "Config fields (in CONFIG.toml at the top level or in their group's table; --set "
        "name=value or --set group.name=value): name = default: allowed"
    ]
    for group, model in GROUPS.items():
        doc = (model.__doc__ or "").split(":", 1)[-1].strip().rstrip(".")  # "[name]: doc"
        lines = [f"[{group}] {doc}"]
        lines += [_line(TrainConfig, name, words) for name in model.model_fields]
        paragraphs.append("\n\n".join(lines))
    mods = registry()
    choose = [
        "[modifiers] what the run may change (modifiers = [...] or [modifiers] use = [...]; "
        "omitted: every default one that applies)",
        "use = None: " + words["modifiers"],
    ]
    paragraphs.append("\n\n".join(choose))
    for name, cls in mods.items():
        when = (
            '"step" (runs every base step)'
            if cls.per_step
            else f'1: N in [1, {MAX_EVERY}] (every N-th cycle) or "cycle"'
        )
        state = "on by default" if cls.default else "off unless named"
        lines = [f"[modifiers.{name}] ({state}; --set modifiers.{name}.NAME=value)"]
        lines.append(f"every = {when}")
        lines += [_line(cls.Settings, key, {}) for key in cls.Settings.model_fields]
        paragraphs.append("\n\n".join(lines))
    return "\n\n".join(paragraphs)


def _line(model: type[BaseModel], name: str, words: Mapping[str, str]) -> str:
    field = model.model_fields[name]
    default = field.get_default(call_default_factory=True)
    note = f"; {field.description}" if field.description and name not in words else ""
    return f"{name} = {default!r}: {allowed(model, name, words)}{note}"
