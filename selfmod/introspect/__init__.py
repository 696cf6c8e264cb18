"""The introspective loop: runs that evaluate, estimate, propose, verify and commit or roll
back changes to their own hyperparameters and architecture."""

from selfmod.introspect.controller import Decision, Faults, Introspector, Source, Stream

__all__ = [
    "Decision",
    "Faults",
    "Introspector",
    "Source",
    "Stream",
]
