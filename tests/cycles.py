"""A cycle's steps one at a time for tests, through the public pieces: the run's
:meth:`~selfmod.introspect.Loop.look_ahead`, the :class:`Lookahead` it returns and
:mod:`selfmod.introspect.decide`."""

from __future__ import annotations

from selfmod.introspect import decide, verifier
from selfmod.introspect.modifiers import Context


def estimate(run) -> tuple[float, dict]:
    """Queue the lookahead batches, as a cycle does, and estimate the meta-gradient:
    ``(guard loss after the lookahead, d it / d hparams)``."""
    look = run.look_ahead()
    return look.estimate(run.state, run.config.estimator, run.config.meta_horizon)


def propose(run, g, probe) -> list:
    """The due modifiers' proposals on the current lookahead (the run is not changed)."""
    look = run.lookahead or run.look_ahead()
    ctx = Context(
        run.state, run.problem, run.cycle, probe, g, look.batches, run.config,
        lambda k: look.batch_grads(run.state, k), run.rng,
    )  # fmt: skip
    proposals, _ = decide.propose([m for m in run.modifiers if run.due(m)], ctx, run.state)
    return proposals


def apply(run, proposal, state=None):
    """``state`` (default: the run's) with ``proposal`` applied, as the loop would."""
    state = run.state if state is None else state
    return decide.apply(proposal, state, run.modifiers, run.problem, run.config)


def check(run, proposed, current, tolerance):
    """The verifier's verdict on ``proposed`` over the current lookahead."""
    look = run.lookahead or run.look_ahead()
    return verifier.check(look, run.state, proposed, current, tolerance, run.config)
