"""``beta1``: Adam's first-moment decay by the meta-gradient of its logit (off by default).

Like :mod:`.beta2`, one file: ``beta1_logit`` is in the space of the ``adam`` and ``adamw``
optimizers, so the modifier applies to them and is skipped (with its reason) under ``sgd``.
The step is the shared Rprop rule on ``d guard_loss / d logit(beta1)``
(:class:`~selfmod.introspect.modifiers.hyper.MetaGradientModifier`).
"""

from __future__ import annotations

from selfmod.introspect.modifiers.base import register
from selfmod.introspect.modifiers.hyper import MetaGradientModifier


@register
class Beta1(MetaGradientModifier):
    name = "beta1"
    order = 45
    key = "beta1_logit"
    default = False
