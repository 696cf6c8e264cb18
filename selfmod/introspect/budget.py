"""The run's compute budget: what the base training may draw, and self-modification's share.

- ``budget_unit = "examples"``: ``steps x batch_size`` (the initial batch size)
  bounds the training examples the base steps draw, so a batch-size modifier that grows the
  batch trades steps for batch size inside the budget, never on top of it; ``"steps"`` (the
  default for now): ``steps`` base steps whatever the batch.
- ``meta_budget`` (default none: no cap): self-modification's own work (replays,
  estimates, probes) is counted in example-equivalents (:class:`Cost`: one training
  example's forward and backward pass is 1, a forward pass alone 1/3) and kept at most
  ``meta_budget`` times the run's examples budget: a cycle whose turn comes when the last
  cycle's cost (the first cycle's: its probes') would take the run over its share is skipped
  and counted, and its checkpoint still written; cycles are spent early, where the first
  decisions (the rates' level) matter most. The count is
  deterministic (a resumed run skips the same cycles); the wall time of both parts is
  measured too (``meta_seconds``, ``base_seconds``).
- The races at the run's start (:mod:`.option_race`, :mod:`.race`) spend the same share,
  first: each is shortened to the most steps whose work, at most, fits what is left
  (:func:`meta_room`, :func:`longest`), and does not run where not one step fits.
- ``log_share`` (default 0: off): the log points' guard passes cost at most that share of the
  base training (:func:`log_interval`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

#: a forward pass alone, in training examples' forward-and-backward passes
FORWARD = 1 / 3
#: the probes' forward passes over the replay buffer (guard, train, noise, shift, older)
PROBE_PASSES = 5


def log_interval(config: Any, guard_rows: int) -> int:
    """Base steps between log points: ``log_every``, or more where ``log_share`` caps their
    guard reads at that share of the base training, ``FORWARD x guard_rows <= log_share x
    interval x batch_size`` (deterministic: a resumed run logs at the same steps)."""
    if not config.log_share:
        return config.log_every
    need = math.ceil(FORWARD * guard_rows / (config.log_share * config.batch_size))
    return max(config.log_every, need)


def examples_budget(config: Any) -> int | None:
    """The examples the base steps may draw (``None``: bounded by steps)."""
    return config.steps * config.batch_size if config.budget_unit == "examples" else None


def spent(config: Any, step: int, examples: int | None) -> bool:
    """Whether the run's budget is spent at base step ``step`` having drawn ``examples``."""
    limit = examples_budget(config)
    if limit is None or examples is None:  # a run resumed from before the count: by steps
        return step >= config.steps
    return examples >= limit


def progress(config: Any, step: int, examples: int | None) -> float:
    """The fraction of the budget spent, in ``[0, 1]``."""
    limit = examples_budget(config)
    done = step / config.steps if limit is None or examples is None else examples / limit
    return min(max(done, 0.0), 1.0)


def meta_allowed(
    config: Any, examples: int | None, meta_examples: float, last_cycle: float
) -> bool:
    """Whether a cycle may run now: self-modification's work so far plus the last cycle's (the
    next one's estimate) within ``meta_budget`` times the run's examples budget (where the
    run's end is unknown, or its budget is in steps, the examples drawn so far). Cycles come
    as early as the share allows: the first decisions (the rates' level) matter most."""
    share = config.meta_budget
    if share is None or examples is None:
        return True
    limit = examples_budget(config) or examples
    return meta_examples + last_cycle <= share * limit


def meta_room(config: Any, meta_examples: float) -> float:
    """The example-equivalents self-modification may still spend: ``meta_budget`` times the
    examples budget (a budget in steps: ``steps x batch_size``) less ``meta_examples``, its
    work so far; ``inf`` without a cap."""
    if config.meta_budget is None:
        return math.inf
    limit = examples_budget(config) or config.steps * config.batch_size
    return config.meta_budget * limit - meta_examples


def longest(steps: int, work: Callable[[int], float], room: float) -> int:
    """The most steps ``t <= steps`` whose ``work(t)`` (non-decreasing in ``t``) is at most
    ``room``; ``0`` where not even one step's is."""
    lo, hi = 0, steps
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if work(mid) <= room else (lo, mid - 1)
    return lo


def race_steps(
    config: Any, meta_examples: float, asked: int, work: Callable[[int], float], reserved: float
) -> tuple[int, str]:
    """``(steps, why)``: the most steps, at most ``asked``, of a race whose most ``work`` fits
    what is left of ``meta_budget`` after ``reserved`` example-equivalents (:func:`longest`);
    ``why`` says so where that is fewer (0: the race does not run), else ``""``."""
    room = meta_room(config, meta_examples) - reserved
    steps = longest(asked, work, room)
    if steps == asked:
        return steps, ""
    most, left = work(asked) + reserved, max(room + reserved, 0)
    return steps, (
        f"{asked} steps would spend up to {most:.4g} example-equivalents of self-modification, "
        f"{left:.4g} are left of meta_budget; a larger meta_budget gives it its length"
    )


class Cost:
    """A cycle's self-modification work, in example-equivalents (the module docstring)."""

    def __init__(self) -> None:
        self.total = 0.0

    def trained(self, n: int, passes: float = 1.0) -> None:
        """``n`` examples through ``passes`` forward-and-backward passes."""
        self.total += n * passes

    def evaluated(self, n: int) -> None:
        """``n`` examples through a forward pass."""
        self.total += n * FORWARD
