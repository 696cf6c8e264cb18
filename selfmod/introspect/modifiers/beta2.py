"""``beta2``: Adam's second-moment decay by the meta-gradient of its logit (off by default).

The example of a modifier added in one file: the hyperparameter exists in the space of the
``adam`` and ``adamw`` optimizers, so this is all it takes.
"""

from __future__ import annotations

from selfmod.introspect.modifiers.base import register
from selfmod.introspect.modifiers.hyper import MetaGradientModifier


@register
class Beta2(MetaGradientModifier):
    name = "beta2"
    order = 50
    key = "beta2_logit"
    default = False
