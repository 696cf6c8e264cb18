"""Runs: validated configs, atomic files, run directories, and :func:`fit` /
:class:`SelfModifier` (any ``nn.Module``, into a run directory; imported on first use)."""

from typing import Any

from selfmod.files import atomic_write_bytes, atomic_write_text
from selfmod.runs.config import TrainConfig, load_config
from selfmod.validation import ConfigError

__all__ = [
    "ConfigError",
    "FitResult",
    "SelfModifier",
    "TrainConfig",
    "atomic_write_bytes",
    "atomic_write_text",
    "fit",
    "load_config",
]


def __getattr__(name: str) -> Any:
    """``fit``, ``SelfModifier`` and ``FitResult`` import the loop and torch: on first use."""
    if name in ("fit", "SelfModifier", "FitResult"):
        from selfmod.runs import api

        return getattr(api, name)
    raise AttributeError(f"module 'selfmod.runs' has no attribute {name!r}")
