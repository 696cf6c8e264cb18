"""The introspective loop: runs that evaluate, estimate, propose, verify and commit or roll
back changes to their own hyperparameters and architecture."""

from selfmod.introspect.controller import Decision, Faults, Introspector, Source, Stream
from selfmod.introspect.lr_tuning import CycleRecord, History, train

__all__ = [
    "CycleRecord",
    "Decision",
    "Faults",
    "History",
    "Introspector",
    "Source",
    "Stream",
    "train",
]
