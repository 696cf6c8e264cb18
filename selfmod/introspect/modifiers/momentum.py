"""``momentum``: SGD's momentum by the meta-gradient of its logit (off by default)."""

from __future__ import annotations

from selfmod.introspect.modifiers.base import register
from selfmod.introspect.modifiers.hyper import MetaGradientModifier


@register
class Momentum(MetaGradientModifier):
    name = "momentum"
    order = 20
    key = "mom_logit"
    default = False
