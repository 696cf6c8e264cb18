"""``eps``: Adam's epsilon by the meta-gradient of its log (off by default).

``log_eps`` is declared with the ``adam`` and ``adamw`` optimizers as an optional
hyperparameter (:data:`selfmod.introspect.hparams.DECLARED`): a run has it only when a chosen
modifier needs it, starting at the optimizer's own default (``1e-8``); under ``sgd`` this
modifier is skipped with its reason. The step is the shared Rprop rule on
``d guard_loss / d log eps`` (:class:`~selfmod.introspect.modifiers.hyper.MetaGradientModifier`).
"""

from __future__ import annotations

from selfmod.introspect.modifiers.base import register
from selfmod.introspect.modifiers.hyper import MetaGradientModifier


@register
class Eps(MetaGradientModifier):
    name = "eps"
    order = 47
    key = "log_eps"
    default = False
