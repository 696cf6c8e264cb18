"""Exceptions raised by selfmod."""

from __future__ import annotations


class SelfmodError(Exception):
    """Base class of every selfmod error."""


class NonFiniteError(SelfmodError, FloatingPointError):
    """A loss, gradient or meta-gradient became NaN or infinite.

    Attributes:
        step: index of the inner step where it was first seen (``None`` when it arose after the
            unroll, e.g. in the outer loss or the meta-gradient).
        what: which quantity was non-finite (``"inner loss"``, ``"gradient"``, ...).
    """

    def __init__(self, what: str, step: int | None = None, hint: str = "") -> None:
        self.what = what
        self.step = step
        where = f" at inner step {step}" if step is not None else ""
        msg = f"non-finite {what}{where}"
        super().__init__(f"{msg}; {hint}" if hint else msg)


class DivergenceError(SelfmodError):
    """Training diverged: a loss far above its running average (finite, but exploding)."""
