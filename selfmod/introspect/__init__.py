"""The introspective loop: runs that evaluate, estimate, propose, verify and commit or roll
back changes to their own hyperparameters and architecture, on any ``nn.Module``.

- :func:`fit` (``selfmod.runs.api.fit``): a whole self-modifying run into a run directory;
- :class:`SelfModifier` (``selfmod.runs.api``): one call per batch, for a loop you own;
- :class:`Loop`, :class:`Problem`, :class:`RunState`: the pieces underneath;
- :mod:`selfmod.introspect.modifiers`: the modifiers, one file each, and their registry.
"""

from typing import Any

from selfmod.introspect.builtin import Introspector
from selfmod.introspect.config import TrainConfig
from selfmod.introspect.loop import Decision, Loop, Recorder, Source
from selfmod.introspect.modifiers import Context, Modifier, Proposal, register, registry
from selfmod.introspect.problem import Problem
from selfmod.introspect.state import RunState

__all__ = [
    "Context",
    "Decision",
    "Introspector",
    "Loop",
    "Modifier",
    "Problem",
    "Proposal",
    "Recorder",
    "RunState",
    "SelfModifier",
    "Source",
    "TrainConfig",
    "fit",
    "register",
    "registry",
]


def __getattr__(name: str) -> Any:
    """``fit`` and ``SelfModifier`` write run directories, so they live in ``selfmod.runs``
    (above this package); they are offered here for convenience, imported on first use."""
    if name in ("fit", "SelfModifier", "FitResult"):
        from selfmod.runs import api

        return getattr(api, name)
    raise AttributeError(f"module 'selfmod.introspect' has no attribute {name!r}")
