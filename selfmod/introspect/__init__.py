"""The introspective loop: runs that evaluate, estimate, propose, verify and commit or roll
back changes to their own hyperparameters and architecture, on any ``nn.Module``.

- :func:`selfmod.runs.fit`: a whole self-modifying run into a run directory, and
  :class:`selfmod.runs.SelfModifier`: one call per batch, for a loop you own (they write run
  directories, so they live in :mod:`selfmod.runs`, above this package);
- :class:`Loop`, :class:`Problem`, :class:`RunState`: the pieces underneath;
- :mod:`selfmod.introspect.modifiers`: the modifiers, one file each, and their registry.
"""

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
    "Source",
    "TrainConfig",
    "register",
    "registry",
]
