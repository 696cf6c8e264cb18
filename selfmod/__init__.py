"""selfmod: gradient-based self-modification for PyTorch.

Layers, bottom to top: :mod:`selfmod.tree`, :mod:`selfmod.optim`, :mod:`selfmod.hypergrad`,
then :mod:`selfmod.arch`, :mod:`selfmod.ttt`, :mod:`selfmod.data` / :mod:`selfmod.tasks`,
:mod:`selfmod.meta`, :mod:`selfmod.introspect`, :mod:`selfmod.runs` and :mod:`selfmod.cli`
(imported on use, so ``import selfmod`` stays light).
"""

from selfmod import hypergrad, optim, tree
from selfmod.errors import DivergenceError, NonFiniteError, SelfmodError

__version__ = "0.2.0"
__all__ = [
    "DivergenceError",
    "NonFiniteError",
    "SelfmodError",
    "__version__",
    "hypergrad",
    "optim",
    "tree",
]
