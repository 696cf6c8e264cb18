"""The run config's shape: run fields grouped by concern (read flat), each modifier's settings in
its own ``[modifiers.NAME]`` table validated by its ``Settings``, the flat spelling deprecated
with one line, third-party modifiers found by entry points, and old saved configs loading."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
from pydantic import BaseModel

from selfmod.introspect.config import GROUPS, ConfigDeprecationWarning, TrainConfig
from selfmod.introspect.modifiers import Modifier, base, registry
from selfmod.introspect.modifiers.grow import Grow
from selfmod.runs.config import fields_help, load_config, saved_config, validate
from selfmod.validation import ConfigError

TABLES = """
[verify]
epsilon = 0.02
[budget]
params = 60000
[modifiers]
use = ["lr", "grow"]
[modifiers.grow]
every = 2
max_width = 64
grow_fraction = 0.25
[modifiers.dropout]
regularize = "hypergradient"
"""
FLAT = """
modifiers = ["lr", "grow"]
schedule = {grow = 2}
epsilon = 0.02
max_params = 60000
max_width = 64
grow_fraction = 0.25
"""


def _toml(tmp_path, text: str, name: str = "run.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _caught(build):
    """``(result, the ConfigDeprecationWarnings it raised)``, every warning shown."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = build()
    return out, [w for w in seen if issubclass(w.category, ConfigDeprecationWarning)]


@pytest.fixture
def restore_registry():
    """Modifiers registered in a test are gone after it (and entry points read again)."""
    saved, loaded = dict(base._REGISTRY), base._entry_points_loaded
    yield
    base._REGISTRY.clear()
    base._REGISTRY.update(saved)
    base._entry_points_loaded = loaded


# ----------------------------------------------------------------------------- the table form


def test_the_table_form_sets_each_modifier_and_group_without_a_warning(tmp_path):
    cfg, deprecations = _caught(lambda: load_config(_toml(tmp_path, TABLES)))
    assert deprecations == []
    assert cfg.modifiers == ["lr", "grow"] and cfg.every("grow") == 2 and cfg.every("lr") == 1
    assert (cfg.epsilon, cfg.max_params) == (0.02, 60000)  # run fields read flat
    grow = cfg.settings_of("grow")
    assert (grow.max_width, grow.grow_fraction, grow.grow_rule) == (64, 0.25, "fraction")
    assert Grow.from_config(cfg).settings == grow  # the modifier gets its own table
    # weight decay and dropout have a table each
    assert cfg.settings_of("dropout").regularize == "hypergradient"
    assert cfg.settings_of("weight_decay").regularize == "gap"


def test_set_takes_dotted_names_and_replaces_one_value_of_a_table(tmp_path):
    path = _toml(tmp_path, TABLES)
    cfg = load_config(
        path,
        ["modifiers.grow.max_width=96", "verify.epsilon=0.03", "modifiers=lr,grow,prune"],
    )
    grow = cfg.settings_of("grow")
    assert (grow.max_width, grow.grow_fraction) == (96, 0.25)  # the file's other value kept
    assert cfg.epsilon == 0.03 and cfg.modifiers == ["lr", "grow", "prune"]
    assert cfg.every("grow") == 2
    # the same in a Python dict (fit(config=...)): dotted keys or nested tables
    nested = {"modifiers": {"use": ["lr", "grow"], "grow": {"max_width": 96}}}
    assert validate(nested) == validate(
        {"modifiers": ["lr", "grow"], "modifiers.grow.max_width": 96}
    )


def test_the_list_form_of_modifiers_still_chooses_them(tmp_path):
    path = _toml(tmp_path, 'modifiers = ["lr", "grow"]\n[verify]\nepsilon = 0.02\n')
    cfg, deprecations = _caught(lambda: load_config(path, ["modifiers.grow.max_width=64"]))
    assert deprecations == [] and cfg.modifiers == ["lr", "grow"] and cfg.epsilon == 0.02
    assert cfg.settings_of("grow").max_width == 64


def test_the_default_config_file_is_the_default_run(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cfg, deprecations = _caught(lambda: load_config(root / "configs" / "default.toml"))
    assert deprecations == []
    # choice and inner_lr act on a user's selfmod.arch.Choice and TTT layers (tune_lr), which the
    # built-in models lack: naming them would stop the demonstration run, so the file does not
    structural = {"choice", "inner_lr"}
    assert (
        cfg == TrainConfig(modifiers=cfg.modifiers)
        and set(cfg.modifiers)
        == set(cfg.model_copy(update={"modifiers": None}).chosen()) - structural
    )


# ----------------------------------------------------------------------------- flat, deprecated


def test_flat_modifier_settings_still_work_with_one_deprecation_line(tmp_path):
    table, none = _caught(lambda: load_config(_toml(tmp_path, TABLES)))
    path = _toml(tmp_path, FLAT.replace("epsilon", "regularize = 'gap'\nepsilon"), "flat.toml")
    flat, deprecations = _caught(
        lambda: load_config(path, ["modifiers.dropout.regularize=hypergradient"])
    )
    assert none == [] and flat == table
    assert len(deprecations) == 1  # one line for all of them, file and --set together
    text = str(deprecations[0].message)
    assert "\n" not in text
    for new in (
        "max_width -> modifiers.grow.max_width",
        "grow_fraction -> modifiers.grow.grow_fraction",
        "regularize -> modifiers.weight_decay.regularize and modifiers.dropout.regularize",
    ):
        assert new in text
    # --set max_width=64 alone, and a dict given to the model directly
    _, one = _caught(lambda: load_config(None, ["max_width=64"]))
    assert len(one) == 1 and "modifiers.grow.max_width" in str(one[0].message)
    cfg, one = _caught(lambda: TrainConfig(max_width=64))
    assert len(one) == 1 and cfg.settings_of("grow").max_width == 64


def test_the_deprecation_line_is_shown_once_on_stderr_by_default():
    code = (
        "from selfmod.runs.config import load_config\n"
        "for _ in range(2): load_config(None, ['max_width=64', 'grow_fraction=0.25'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "ConfigDeprecationWarning" in lines[0]
    assert "max_width -> modifiers.grow.max_width" in lines[0]


def test_a_flat_read_of_a_setting_is_deprecated_and_reads_the_table():
    cfg = validate({"modifiers.grow.max_width": 48})
    with pytest.warns(DeprecationWarning, match=r"settings_of\('grow'\).max_width"):
        assert getattr(cfg, "max_width", 0) == 48
    with pytest.raises(AttributeError):
        cfg.colour  # noqa: B018


def test_two_spellings_of_one_value_must_agree():
    with pytest.raises(ConfigError, match="disagree; set one of them"):
        validate({"max_width": 64, "modifiers": {"grow": {"max_width": 32}}})
    with pytest.raises(ConfigError, match=r"epsilon and verify\.epsilon disagree"):
        validate({"verify": {"epsilon": 0.02}, "epsilon": 0.03})
    with pytest.raises(ConfigError, match=r"modifiers\.grow\.every and schedule\.grow disagree"):
        validate({"schedule": {"grow": 3}, "modifiers": {"grow": {"every": 2}}})
    # the same value twice is fine
    assert validate({"verify": {"epsilon": 0.02}, "epsilon": 0.02}).epsilon == 0.02


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["modifiers.grow.max_width=0"],
         "modifiers.grow.max_width must be an integer in [1, 8192] (got 0)"),
        (["modifiers.grow.grow_rule=cap"],
         "modifiers.grow.grow_rule must be one of 'fraction', 'criterion'"),
        (["modifiers.grow.grow_threshold=inf"],
         "modifiers.grow.grow_threshold must be a finite number"),
        (["modifiers.grow.colour=1"],
         "unknown config field 'modifiers.grow.colour'; known fields: grow_fraction,"),
        (["modifiers.magic.x=1"], "modifiers.magic: no modifier of that name"),
        (["modifiers.grow=3"], "modifiers.grow must be a table of grow's settings (got 3)"),
        (["modifiers.grow.every=0"],
         'modifiers.grow.every must be an integer in [1, 1000] (every N-th cycle) or "cycle"'),
        (["modifiers.online_lr.every=2"], 'modifiers.online_lr.every must be "step"'),
        (["modifiers.use=lr,magic"], "modifiers must be a list of distinct names from 'lr'"),
        (["verify.lr=0.1"], "unknown config field 'verify.lr'; verify has: safeguards, epsilon"),
        (["verify=3"], "verify must be a table of its fields"),
        (["width=500"], "width must be <= modifiers.grow.max_width (384) (got 500)"),
        (["max_width=0"], "modifiers.grow.max_width must be an integer in [1, 8192] (got 0)"),
    ],
)  # fmt: skip
def test_a_bad_value_is_one_line_naming_the_nested_field(overrides, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigDeprecationWarning)
        with pytest.raises(ConfigError) as err:
            load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_bad_value_in_a_toml_table_names_the_table(tmp_path):
    path = _toml(tmp_path, "[modifiers.prune]\nprune_fraction = 1.5\n")
    with pytest.raises(
        ConfigError,
        match=r"^modifiers.prune.prune_fraction must be a number in \(0, 1\) \(got 1.5\)$",
    ):
        load_config(path)


# ----------------------------------------------------------------------------- check_config


class _Picky(Modifier):
    name = "picky"
    default = False

    @classmethod
    def check_config(cls, config):
        raise ValueError("picky refuses every run")


def test_check_config_runs_only_for_the_chosen_modifiers(restore_registry):
    base.register(_Picky)
    assert TrainConfig().modifiers is None  # not chosen, not a default: never checked
    with pytest.raises(ConfigError, match="picky refuses every run"):
        validate({"modifiers": ["lr", "picky"]})
    # a run naming none has the defaults, and they are checked
    _Picky.default = True
    try:
        with pytest.raises(ConfigError, match="picky refuses every run"):
            validate({})
        assert validate({"modifiers": ["lr"]}).modifiers == ["lr"]
    finally:
        _Picky.default = False
    # built-in: grow's width cap binds only a run that has grow
    assert validate({"width": 500, "modifiers": ["lr"]}).width == 500
    with pytest.raises(ConfigError, match=r"width must be <= modifiers\.grow\.max_width"):
        validate({"width": 500})


# ----------------------------------------------------------------------------- entry points

PLUGIN = """
from pydantic import BaseModel, ConfigDict, Field

from selfmod.introspect.modifiers import Modifier


class ClipSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float = Field(0.5, gt=0, le=1, description="the clip's threshold")
    lr: float = Field(1.0, gt=0, description="a name the run also has: no clash in a table")


class Clip(Modifier):
    name = "clip"
    default = False
    order = 95
    Settings = ClipSettings
"""


def _fake_distribution(tmp_path, monkeypatch):
    """A distribution on sys.path whose entry points name a modifier and a broken one."""
    info = tmp_path / "fake_selfmod_clip-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-selfmod-clip\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[selfmod.modifiers]\nclip = fake_selfmod_clip:Clip\nbroken = fake_selfmod_missing:Nope\n"
    )
    (tmp_path / "fake_selfmod_clip.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fake_selfmod_clip", raising=False)
    base._entry_points_loaded = False  # as in a fresh process


def test_a_third_party_modifier_is_found_by_its_entry_point_and_configurable(
    tmp_path, monkeypatch, restore_registry
):
    _fake_distribution(tmp_path, monkeypatch)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        mods = registry()  # the first read loads the entry points
        registry()  # once
    assert "clip" in mods and "broken" not in mods
    failed = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
    assert len(failed) == 1 and "\n" not in failed[0]
    assert failed[0].startswith("modifier entry point broken = 'fake_selfmod_missing:Nope'")
    assert "ModuleNotFoundError" in failed[0]
    # configurable from TOML and --set, validated by its Settings
    path = _toml(
        tmp_path, "[modifiers]\nuse = ['lr', 'clip']\n[modifiers.clip]\nthreshold = 0.25\n"
    )
    cfg = load_config(path)
    assert cfg.settings_of("clip").threshold == 0.25 and cfg.modifiers == ["lr", "clip"]
    assert mods["clip"].from_config(cfg).settings.threshold == 0.25
    cfg = load_config(path, ["modifiers.clip.threshold=0.75", "modifiers.clip.lr=2.0"])
    assert (cfg.settings_of("clip").threshold, cfg.settings_of("clip").lr, cfg.lr) == (
        0.75,
        2.0,
        1e-3,
    )
    with pytest.raises(ConfigError, match=r"modifiers.clip.threshold must be a number in \(0, 1\]"):
        load_config(path, ["modifiers.clip.threshold=2"])
    assert (
        "[modifiers.clip]" in fields_help()
        and "threshold = 0.5: a number in (0, 1]" in fields_help()
    )
    # and a saved config of it reloads
    assert saved_config(json.loads(cfg.model_dump_json())) == cfg


def test_an_entry_point_that_fails_to_load_is_one_line_on_stderr(
    tmp_path, monkeypatch, restore_registry
):
    import os
    from pathlib import Path

    _fake_distribution(tmp_path, monkeypatch)
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), root])}
    code = "from selfmod.runs.config import load_config; load_config(None, ['modifiers=lr,clip'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "modifier entry point broken = 'fake_selfmod_missing:Nope'" in line


# ----------------------------------------------------------------------------- saved configs


def _flat(dump: dict) -> dict:
    """A config.json as runs wrote it before the tables: every modifier setting at the top."""
    tables = dump.pop("modifier_settings")
    return {**dump, **{k: v for t in tables.values() for k, v in t.items()}}


def test_a_saved_config_reloads_equal_and_an_old_flat_one_loads_too(tmp_path):
    # (a flat config has one value for a setting weight decay and dropout share)
    cfg = load_config(_toml(tmp_path, TABLES.split("[modifiers.dropout]")[0]))
    saved = json.loads(cfg.model_dump_json(indent=1))
    assert saved_config(saved) == cfg
    assert saved["modifiers"] == ["lr", "grow"]  # readers of config.json see the names
    old = _flat(json.loads(cfg.model_dump_json()))
    assert "modifier_settings" not in old and old["max_width"] == 64
    loaded, deprecations = _caught(lambda: saved_config(old))
    assert loaded == cfg and deprecations == []  # no line for a run's own old file
    # an old run naming no modifiers keeps its defaults
    default = json.loads(TrainConfig().model_dump_json())
    assert saved_config(_flat(default)) == TrainConfig()


def test_a_default_modifier_without_a_table_in_a_saved_config_was_not_there(restore_registry):
    saved = json.loads(TrainConfig().model_dump_json())
    before = TrainConfig().chosen()

    class Late(Modifier):  # registered after the run was saved, on by default
        name = "late"

    base.register(Late)
    assert "late" in TrainConfig().chosen()
    resumed = saved_config(saved)
    assert resumed.chosen() == before


# ----------------------------------------------------------------------------- help


def test_fields_help_is_grouped_by_concern_with_a_table_per_modifier():
    text = " ".join(fields_help().split())
    for group, model in GROUPS.items():
        assert f"[{group}]" in text
        for name in model.model_fields:
            assert f" {name} = " in text[text.index(f"[{group}]") :], name
    for name, cls in registry().items():
        head = text.index(f"[modifiers.{name}]")
        for key in cls.Settings.model_fields:
            assert f" {key} = " in text[head:], key
    assert "epsilon = 0.01: a number in [0, 1]" in text
    assert "max_width = 384: an integer in [1, 8192]" in text
    assert text.index("[verify]") < text.index("epsilon = 0.01")


def test_every_run_field_is_in_exactly_one_group():
    grouped = [n for model in GROUPS.values() for n in model.model_fields]
    assert len(grouped) == len(set(grouped))
    own = {"modifiers", "schedule", "modifier_settings"}
    assert set(grouped) == set(TrainConfig.model_fields) - own


def test_settings_of_an_unknown_modifier_says_which_exist():
    with pytest.raises(KeyError, match="no modifier named 'magic'; modifiers: lr"):
        TrainConfig().settings_of("magic")
    assert isinstance(TrainConfig().settings_of("grow"), BaseModel)
