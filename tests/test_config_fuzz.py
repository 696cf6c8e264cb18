"""Property test of every config loader (``train``, ``meta-train``, ``bench vs-search``): any
value of any field, given as a Python value or as ``--set field=TEXT``, is either accepted
within the field's documented range or refused with a one-line :class:`ConfigError`; never
another exception (issue 14, "What must be shown")."""

from __future__ import annotations

import math
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from selfmod.bench.vs_search import Budget, load_budget
from selfmod.meta.command import load_meta_config
from selfmod.meta.train import MetaTrainConfig
from selfmod.runs.config import TrainConfig, load_config
from selfmod.runs.config import validate as validate_train
from selfmod.validation import ConfigError
from selfmod.validation import validate as validate_model

#: the flat spelling of a modifier's setting is fuzzed too; its deprecation line is expected
pytestmark = pytest.mark.filterwarnings(
    "ignore::selfmod.introspect.config.ConfigDeprecationWarning"
)
FUZZ = settings(
    max_examples=500,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["lr", "grow", "step", "cycle", "mlp", "cnn", "lstm", "auto", "0x10"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
# --set texts: TOML-looking literals and arbitrary text
texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        ["true", "0x10", "0o7", "0b1", "1_000", "inf", "-inf", "nan", "1e400", "[1, 1]",
         '["lr", "lr"]', "{grow = 2}", "[", "'", '"\\u0000"', "3.0", "-0", "+5", "[0x1]"]
    ),
    values.map(repr),
)  # fmt: skip


def _in_range(model: type[BaseModel], cfg: BaseModel) -> None:
    """Every scalar field of an accepted ``cfg`` has its declared type and bounds."""
    for name, field in model.model_fields.items():
        value = getattr(cfg, name)
        if field.annotation is int:
            assert type(value) is int, (name, value)
        if field.annotation is float:
            assert type(value) in (int, float) and math.isfinite(value), (name, value)
        if field.annotation is bool:
            assert type(value) is bool, (name, value)
        if typing.get_origin(field.annotation) is typing.Literal:
            assert value in typing.get_args(field.annotation), (name, value)
        for m in field.metadata:
            for attr, ok in (
                ("ge", lambda a, b: a >= b),
                ("gt", lambda a, b: a > b),
                ("le", lambda a, b: a <= b),
                ("lt", lambda a, b: a < b),
            ):
                bound = getattr(m, attr, None)
                if bound is not None and isinstance(value, int | float):
                    assert ok(value, bound), (name, value, attr, bound)


def _check(model: type[BaseModel], build) -> None:
    try:
        cfg = build()
    except ConfigError as err:
        text = str(err)
        assert text and "\n" not in text and "\r" not in text, text
        return
    _in_range(model, cfg)
    for table in getattr(cfg, "modifier_settings", {}).values():  # each modifier's table
        _in_range(type(table), table)


LOADERS = {
    "train": (TrainConfig, validate_train, lambda o: load_config(None, o)),
    "meta-train": (
        MetaTrainConfig,
        lambda v: validate_model(MetaTrainConfig, v),
        lambda o: load_meta_config(None, o),
    ),
    "bench": (Budget, lambda v: validate_model(Budget, v), load_budget),
}


#: names beyond a loader's fields: the train config's group tables, modifier tables and their
#: dotted and flat (deprecated) spellings
MORE = {
    "train": [
        "verify", "verify.epsilon", "budget", "budget.params", "modifiers.use", "modifiers.grow",
        "modifiers.grow.max_width", "modifiers.grow.every", "modifiers.online_lr.every",
        "modifiers.magic.x", "modifier_settings.grow", "max_width", "regularize", "a..b",
    ],
}  # fmt: skip


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_any_value_of_any_field_is_accepted_in_range_or_one_line(loader):
    model, from_values, _ = LOADERS[loader]
    fields = st.sampled_from([*model.model_fields, "colour", *MORE.get(loader, [])])

    @FUZZ
    @given(name=fields, value=values)
    def prop(name, value):
        _check(model, lambda: from_values({name: value}))

    prop()


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_any_set_override_is_accepted_in_range_or_one_line(loader):
    model, _, from_overrides = LOADERS[loader]
    fields = st.sampled_from([*model.model_fields, "colour", *MORE.get(loader, [])])

    @FUZZ
    @given(name=fields, text=texts)
    def prop(name, text):
        _check(model, lambda: from_overrides([f"{name}={text}"]))

    prop()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("steps=true", "steps must be an integer"),
        ("steps=0x10", "decimal"),
        ("steps=1.0", "steps must be an integer"),
        ("lr=inf", "lr must be a finite number"),
        ("lr=nan", "lr must be a finite number"),
        ('modifiers=["lr", "lr"]', "must not repeat"),
        ("compare_fixed=1", "compare_fixed must be true or false"),
    ],
)
def test_lenient_conversions_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_lenient_conversions_are_refused_by_every_loader():
    with pytest.raises(ConfigError, match="time_limit must be a finite number"):
        load_meta_config(None, ["time_limit=inf"])
    with pytest.raises(ConfigError, match="meta_steps must be an integer"):
        load_meta_config(None, ["meta_steps=true"])
    with pytest.raises(ConfigError, match="seeds must not repeat"):
        load_budget(["seeds=[0, 0]"])
    with pytest.raises(ConfigError, match="decimal"):
        load_budget(["seeds=[0x1]"])


def test_config_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b"steps = 5\n# \xff\xfe latin-1 bytes\n")
    for load in (load_config, load_meta_config):
        with pytest.raises(ConfigError, match="is not UTF-8 text"):
            load(path, None)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("FILE", "is a file"),
        ("FILE/sub/dir", "is under"),
        ("a\0b", "NUL byte"),
        ("x" * 300, "at most 255"),
        ("/" + "d/" * 2100, "at most 4096 bytes"),
    ],
    ids=["file", "under-a-file", "nul", "long-name", "long-path"],
)
def test_check_out_dir_refuses_what_cannot_be_a_folder(tmp_path, value, message):
    from selfmod.validation import check_out_dir

    (tmp_path / "FILE").write_text("x")
    value = value.replace("FILE", str(tmp_path / "FILE"))
    with pytest.raises(ValueError, match=message):
        check_out_dir(value)
    assert check_out_dir(str(tmp_path / "new" / "folder")) == str(tmp_path / "new" / "folder")
    with pytest.raises(ConfigError, match=message):  # and through a loader that uses it
        load_budget([f"out={value!r}".replace("'", '"')] if "\0" not in value else ["out=a\0b"])
