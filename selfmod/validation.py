"""Build a pydantic config from plain values, turning the first error into one readable line
that names the field and what is allowed: ``steps must be an integer in [1, 1000000] (got -5)``.

Conversions are strict for every model: ``true`` is not an integer, ``1.0`` is not an integer,
``inf`` and ``nan`` are not numbers, a list may not repeat an entry, and ``--set`` integers are
written in decimal (``0x10`` is refused).
"""

from __future__ import annotations

import math
import os
import re
import sys
import tomllib
import typing
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
    pattern = next((m.pattern for m in field.metadata if getattr(m, "pattern", None)), None)
    if pattern is not None:
        return f"{kind} matching {pattern}"
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


def dotted(*parts: Any) -> str:
    """A nested field's name, ``modifiers.grow.max_width``; quoted (``repr``) when a part is
    not a plain word, so that a key with a newline cannot break a one-line message."""
    text = ".".join(str(p) for p in parts)
    return text if _PLAIN.fullmatch(text) else repr(text)


_PLAIN = re.compile(r"[A-Za-z0-9_.:-]+")


def lenient(name: str, value: Any, *inside: Any) -> str | None:
    """Why ``value`` of field ``name`` is refused before pydantic sees it (``None``: fine):
    a non-finite number anywhere inside it (named ``name.key`` inside a table), or a list that
    repeats an entry."""
    where = dotted(name, *inside) if inside else name
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} must be a finite number (got {value!r})"
    if isinstance(value, Mapping):
        for k, v in value.items():
            if (why := lenient(name, v, *inside, k)) is not None:
                return why
    if isinstance(value, list):
        for v in value:
            if (why := lenient(name, v, *inside)) is not None:
                return why
        seen: list[Any] = []
        for v in value:
            if any(type(v) is type(u) and v == u for u in seen):
                return f"{where} must not repeat an entry (got {v!r} twice in {value!r})"
            seen.append(v)
    return None


def validate(
    model: type[M],
    values: dict[str, Any],
    described: Mapping[str, str] | None = None,
    prefix: str = "",
) -> M:
    """``model`` validated strictly from ``values``, or a :class:`ConfigError` with one line for
    the first problem; ``prefix`` comes before each field's name in it (a nested table's
    fields: ``prefix="modifiers.grow."``).

    Strict: no conversions (``true`` or ``1.0`` is not an integer, ``"1"`` not a number), no
    ``inf``/``nan``, no repeated list entries. A cross-field rule (a ``model_validator`` raising
    ``ValueError``) or a field validator is reported with its own message, which should name
    the field.
    """
    if not isinstance(values, Mapping):
        raise ConfigError(f"a config must be a table of fields (got {type(values).__name__})")
    values = {k: _as_list(model, k, v) for k, v in values.items()}
    for name, value in values.items():
        if name in model.model_fields and (why := lenient(prefix + name, value)) is not None:
            raise ConfigError(why)
    try:
        return model.model_validate(dict(values), strict=True)
    except ValidationError as err:
        first = err.errors()[0]
        if not first["loc"]:
            raise ConfigError(str(first["msg"]).removeprefix("Value error, ")) from None
        name = str(first["loc"][0])
        if first["type"] == "extra_forbidden":
            known = ", ".join(model.model_fields)
            raise ConfigError(
                f"unknown config field {prefix + name!r}; known fields: {known}"
            ) from None
        if first["type"] == "value_error" and not (described and name in described):
            msg = str(first["msg"]).removeprefix("Value error, ")
            raise ConfigError(msg.splitlines()[0]) from None
        got = values.get(name, first.get("input"))
        raise ConfigError(
            f"{prefix}{name} must be {allowed(model, name, described)} (got {got!r:.200})"
        ) from None


_NAME_MAX = 255  # bytes in one path component (ext4, xfs, btrfs, tmpfs)
_PATH_MAX = 4096


def check_out_dir(value: str, field: str = "out") -> str:
    """``value`` if it can name an output folder, else ``ValueError`` naming ``field`` and why.

    Refused: a NUL byte, a name longer than 255 bytes (or a path over 4096), an existing file,
    and a path under a file. The folder itself need not exist. Use it as a pydantic
    ``field_validator`` (``validate`` then reports the message as one line).
    """
    if "\0" in value:
        raise ValueError(f"{field} must not contain a NUL byte (got {value!r:.80})")
    encoded = os.fsencode(value) if value else b""
    if len(encoded) > _PATH_MAX:
        raise ValueError(f"{field} must be at most {_PATH_MAX} bytes (got {len(encoded)})")
    for part in Path(value).parts:
        if len(os.fsencode(part)) > _NAME_MAX:
            raise ValueError(
                f"{field} has a name of {len(os.fsencode(part))} bytes (got {part[:40]!r}...); "
                f"a folder name may have at most {_NAME_MAX}"
            )
    path = Path(value)
    for at in (path, *path.parents):
        try:
            is_dir = at.is_dir()
            exists = is_dir or at.exists()
        except OSError:  # e.g. a path under a file on some systems: ENOTDIR
            continue
        if exists and not is_dir:
            where = "" if at == path else f"{str(path)!r} is under "
            raise ValueError(
                f"{field} must be a folder, but {where}{str(at)!r} is a file; "
                f"choose another {field}"
            )
        if exists:
            break
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with ``value`` read as a TOML value (bare words are strings)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value (got {text!r})")
    if "\n" in raw or "\r" in raw:
        raise ConfigError(f"--set {key.strip()}= must be one line (got {raw!r:.80})")
    try:
        value = toml(f"v = {raw.strip()}", f"--set {key.strip()}=")["v"]
    except tomllib.TOMLDecodeError:
        value = _plain(raw.strip())
    if _non_decimal(value, raw.strip()):
        raise ConfigError(
            f"--set {key.strip()}= integers must be written in decimal (got {raw.strip()!r})"
        )
    return key.strip(), value


#: deepest nesting of arrays and tables read from TOML (tomllib itself recurses without a limit)
MAX_DEPTH = 32


def toml(text: str, where: str) -> dict[str, Any]:
    """``tomllib.loads(text)``, with what it cannot read as one :class:`ConfigError` naming
    ``where``: nesting deeper than :data:`MAX_DEPTH` (tomllib's ``RecursionError``) and
    integers of more digits than Python converts (``ValueError``). A syntax error stays a
    ``tomllib.TOMLDecodeError``."""
    depth = _depth(text)
    if depth > MAX_DEPTH:
        raise ConfigError(
            f"{where} nests arrays or tables {depth} deep; at most {MAX_DEPTH} are read"
        )
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        raise
    except RecursionError:
        raise ConfigError(
            f"{where} nests arrays or tables too deeply; at most {MAX_DEPTH} are read"
        ) from None
    except ValueError:  # an integer of more than sys.get_int_max_str_digits() digits
        raise ConfigError(
            f"{where} holds an integer of more than {sys.get_int_max_str_digits()} digits; "
            "write a smaller number"
        ) from None


def _depth(text: str) -> int:
    """The deepest run of unclosed ``[`` / ``{`` outside strings and comments: an upper
    bound of the nesting TOML will build (table headers ``[a]`` count one)."""
    depth = deepest = 0
    quote = ""
    i = 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\" and quote[0] == '"':  # an escape in a basic string
                i += 1
            elif text.startswith(quote, i):
                i += len(quote) - 1
                quote = ""
        elif c == "#":
            while i < len(text) and text[i] != "\n":
                i += 1
        elif c in "\"'":
            quote = c * 3 if text.startswith(c * 3, i) else c
            i += len(quote) - 1
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth = max(depth - 1, 0)
        i += 1
    return deepest


def _scalar(text: str) -> Any:
    """One TOML scalar, or the text itself as a bare word."""
    try:
        return toml(f"v = {text}", "a list item")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _plain(raw: str) -> Any:
    """The plain forms TOML refuses: ``[lr, grow]`` (bare words in a list) is a list."""
    if raw.startswith("[") and raw.endswith("]") and "[" not in raw[1:-1]:
        inner = raw[1:-1].strip()
        return [_scalar(t.strip()) for t in inner.split(",")] if inner else []
    return raw


def _as_list(model: type[BaseModel], name: str, value: Any) -> Any:
    """A list field given as ``a,b`` or one bare ``a`` (no brackets, which shells glob) is the
    list of its comma-separated items."""
    if not isinstance(value, str) or name not in model.model_fields:
        return value
    annotation = model.model_fields[name].annotation
    kinds = (annotation, *typing.get_args(annotation))
    if not any(typing.get_origin(k) is list for k in kinds):
        return value
    return split(value)


def split(text: str) -> list[Any]:
    """A list given as ``a,b`` (or one bare ``a``): its comma-separated items."""
    return [_scalar(t.strip()) for t in text.split(",") if t.strip()]


_DECIMAL = re.compile(r"[+-]?(0|[1-9](_?[0-9])*)")
_INT_TOKEN = re.compile(r"[+-]?0[xob][0-9a-fA-F_]+|[+-]?[0-9][0-9_]*")


def _non_decimal(value: Any, raw: str) -> bool:
    """Whether TOML read a hexadecimal, octal or binary integer (``0x10``) out of ``raw``."""
    if isinstance(value, bool) or not isinstance(value, int | list | dict):
        return False
    if isinstance(value, int):
        return not _DECIMAL.fullmatch(raw)
    # inside a list or table: any integer token that is not decimal
    return any(t.lower().lstrip("+-")[:2] in ("0x", "0o", "0b") for t in _INT_TOKEN.findall(raw))


def load_values(path: str | Path | None, overrides: list[str] | None) -> dict[str, Any]:
    """The values of a TOML file (if any) with ``--set key=value`` overrides applied."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            values = toml(path.read_bytes().decode("utf-8"), f"config file {str(path)!r}")
        except OSError as err:
            raise ConfigError(f"config file {str(path)!r} is unreadable: {err.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {str(path)!r} is not UTF-8 text") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}") from None
    for item in overrides or []:
        key, value = parse_override(item)
        values[key] = value
    return values


def load(model: type[M], path: str | Path | None = None, overrides: list[str] | None = None) -> M:
    """A validated ``model`` from a TOML file and ``--set`` overrides."""
    return validate(model, load_values(path, overrides))
