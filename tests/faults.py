"""Fault injection for tests, outside the library: loops whose base steps see a NaN loss or
gradient at chosen steps and whose meta-gradient is NaN at chosen cycles."""

from __future__ import annotations

import math

import torch

from selfmod.errors import NonFiniteError
from selfmod.introspect import Introspector, Loop


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * math.nan


class Faults:
    """Mixin: ``loss``/``grad``: base steps with a NaN loss / gradient; ``hypergrad``: cycles
    whose meta-gradient is NaN."""

    _fault: str | None = None

    def __init__(self, *args, loss=(), grad=(), hypergrad=(), **kwargs) -> None:
        self.fault_steps = {"loss": set(loss), "grad": set(grad)}
        self.fault_cycles = set(hypergrad)
        super().__init__(*args, **kwargs)

    def train_step(self, state, batch):
        self._fault = next((k for k, s in self.fault_steps.items() if self.step in s), None)
        try:
            return super().train_step(state, batch)
        finally:
            self._fault = None

    def inner_loss(self, buffers, box=None):
        f = super().inner_loss(buffers, box)
        if self._fault == "loss":
            return lambda p, h, b: f(p, h, b) * math.nan
        if self._fault == "grad":
            return lambda p, h, b: f({k: _NanGrad.apply(v) for k, v in p.items()}, h, b)
        return f

    def estimate(self):
        current, g = super().estimate()
        if self.cycle in self.fault_cycles:
            raise NonFiniteError("hypergradient", hint="meta learning rate backed off")
        return current, g


class FaultyIntrospector(Faults, Introspector):
    """The built-in run with faults."""


class FaultyLoop(Faults, Loop):
    """Any problem's run with faults."""
