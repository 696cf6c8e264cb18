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


class _FaultyLosses:
    """The run's losses, with a NaN loss or gradient while the run's base step is a faulty one."""

    def __init__(self, losses, run) -> None:
        self.losses, self.run = losses, run
        self.problem, self.use_dropout = losses.problem, losses.use_dropout

    def train(self, buffers, box=None):
        f = self.losses.train(buffers, box)
        if self.run._fault == "loss":
            return lambda p, h, b: f(p, h, b) * math.nan
        if self.run._fault == "grad":
            return lambda p, h, b: f({k: _NanGrad.apply(v) for k, v in p.items()}, h, b)
        return f

    def guard(self, *args):
        return self.losses.guard(*args)


class Faults:
    """Mixin: ``loss``/``grad``: base steps with a NaN loss / gradient; ``hypergrad``: cycles
    whose meta-gradient is NaN."""

    _fault: str | None = None

    def __init__(self, *args, loss=(), grad=(), hypergrad=(), **kwargs) -> None:
        self.fault_steps = {"loss": set(loss), "grad": set(grad)}
        self.fault_cycles = set(hypergrad)
        super().__init__(*args, **kwargs)
        self.losses = _FaultyLosses(self.losses, self)

    def train_step(self, state, batch, donate=False):
        self._fault = next((k for k, s in self.fault_steps.items() if self.step in s), None)
        try:
            return super().train_step(state, batch, donate)
        finally:
            self._fault = None

    def look_ahead(self):
        look = super().look_ahead()
        if self.cycle in self.fault_cycles:

            def estimate(*args, **kwargs):
                raise NonFiniteError("hypergradient", hint="meta learning rate backed off")

            look.estimate = estimate
        return look


class FaultyIntrospector(Faults, Introspector):
    """The built-in run with faults."""


class FaultyLoop(Faults, Loop):
    """Any problem's run with faults."""
