"""The built-in modifiers, one file each in this package, registered on import (every module
here is imported, so a new modifier is one file); each one's ``order`` says when its proposals
are made and verified in a cycle. See :mod:`.base` for the protocol."""

import importlib
import pkgutil

from selfmod.introspect.modifiers.base import (
    Context,
    Modifier,
    NoSettings,
    Proposal,
    default_names,
    register,
    registry,
)

for _info in pkgutil.iter_modules(__path__):  # each registers its modifier
    if _info.name not in ("base", "hyper"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "Context",
    "Modifier",
    "NoSettings",
    "Proposal",
    "default_names",
    "register",
    "registry",
]
