"""selfmod: gradient-based self-modification for PyTorch.

Layers, bottom to top: :mod:`selfmod.tree`, :mod:`selfmod.optim`, :mod:`selfmod.hypergrad`.
"""

from selfmod import hypergrad, optim, tree
from selfmod.errors import DivergenceError, NonFiniteError, SelfmodError

__version__ = "0.1.0"
__all__ = [
    "DivergenceError",
    "NonFiniteError",
    "SelfmodError",
    "__version__",
    "hypergrad",
    "optim",
    "tree",
]
