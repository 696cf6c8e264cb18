"""Torch's deterministic-algorithms switch, without importing the compiler on the way.

``torch.use_deterministic_algorithms`` also sets ``torch._inductor.config.deterministic``,
and importing that config costs over a second in a fresh process (the compiler stack): more
than a small run's whole training on a CPU. A run here compiles nothing, so where the compiler
is not loaded yet the flag is set directly; once it is loaded, through torch's own function.
"""

from __future__ import annotations

import sys

import torch


def set_deterministic(mode: bool, warn_only: bool = False) -> None:
    """``torch.use_deterministic_algorithms(mode, warn_only=warn_only)``, without importing
    ``torch._inductor`` when nothing has (the module docstring)."""
    if "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        torch._C._set_deterministic_algorithms(mode, warn_only=warn_only)
