"""The built-in modifiers, one file each, registered on import; each one's ``order`` says when
its proposals are made and verified in a cycle. See :mod:`.base` for the protocol."""

from selfmod.introspect.modifiers import (  # noqa: F401 - registers each
    batch_size,
    beta1,
    beta2,
    dropout,
    factorize,
    grow,
    lr,
    momentum,
    online_lr,
    prune,
    weight_decay,
)
from selfmod.introspect.modifiers.base import (
    Context,
    Modifier,
    NoSettings,
    Proposal,
    default_names,
    register,
    registry,
)

__all__ = [
    "Context",
    "Modifier",
    "NoSettings",
    "Proposal",
    "default_names",
    "register",
    "registry",
]
