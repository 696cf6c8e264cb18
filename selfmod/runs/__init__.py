"""Runs: validated configs, atomic files and the HTML report."""

from selfmod.files import atomic_write_bytes, atomic_write_text
from selfmod.runs.config import TrainConfig, load_config
from selfmod.validation import ConfigError

__all__ = ["ConfigError", "TrainConfig", "atomic_write_bytes", "atomic_write_text", "load_config"]
