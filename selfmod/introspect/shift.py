"""Representation shift per commit: how far each committed change moves the run's internal
representations (not how reliable the run is when its actions change its data).

For one committed change from state ``S`` to ``S'`` in a cycle with lookahead batches
``b_1..b_K`` (the ones the change was verified on), let ``theta_K`` and ``theta'_K`` be the
parameters after replaying the K steps from ``S`` and from ``S'`` (:meth:`Lookahead.replay`: same
batches, same random numbers), and ``R(theta) (n, d)`` the representations of the ``n``
examples in the replay buffer (training and guard parts): the input of the model's last
``nn.Linear``, read with a forward hook in eval mode (the model's output where it has no
``Linear``), flattened per example. The change's shift is

    shift = 1 - CKA(R(theta_K), R(theta'_K))        in [0, 1]

with linear CKA (:func:`linear_cka`). It is 0 for a change that leaves the trajectory as it was
(a no-op), and it counts what a change does through training (a learning-rate change moves
the representations the next K steps learn) as well as directly (growth adds units, and with
them dimensions, to the last hidden layer). CKA is invariant to orthogonal transforms and
isotropic scaling of either representation, so a rotation or rescaling of the features is no
shift. The loop appends ``{cycle, step, modifier, shift}`` of each commit to its
``history["self_shift"]``
(checkpointed with the history); a joint proposal counts under its group's name
(``hypergradient``, ``regularize``). References: Kornblith et al. 2019, "Similarity of neural
network representations revisited".
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from selfmod.errors import SelfmodError

Params = dict[str, Tensor]


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of representations ``x (n, p)`` and ``y (n, q)`` of the same ``n`` examples:

        CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F),   Xc = X - 1 mean(X)

    (column-centred in float64). 1 when ``y = c x Q`` for an orthogonal ``Q`` and ``c != 0``;
    0 when the centred features are orthogonal; NaN when either is constant over the examples.
    The matrix products run in float64 when either input is float64, else in float32 with
    float64 sums of their squares (3x faster; for float32 representations, as a run's are,
    the result agrees with all-float64 to about 1e-7).
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y need the same examples (got {x.shape[0]} and {y.shape[0]})")
    work = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    xc = (x.double() - x.double().mean(0, keepdim=True)).to(work)  # (n, p)
    yc = (y.double() - y.double().mean(0, keepdim=True)).to(work)  # (n, q)
    # through the (n, n) Gram matrices when they are smaller than the feature products
    if xc.shape[1] * yc.shape[1] > xc.shape[0] ** 2:
        kx, ky = (xc @ xc.T).double(), (yc @ yc.T).double()  # (n, n)
        cross, nx, ny = (kx * ky).sum(), kx.norm(), ky.norm()
    else:
        cross = (yc.T @ xc).double().pow(2).sum()
        nx, ny = (xc.T @ xc).double().norm(), (yc.T @ yc).double().norm()
    if float(nx) == 0.0 or float(ny) == 0.0:
        return math.nan
    return float(cross / (nx * ny))


def last_linear(module: nn.Module) -> nn.Linear | None:
    """The last ``nn.Linear`` in ``module.modules()`` order (the read-out of an MLP)."""
    found = None
    for m in module.modules():
        if isinstance(m, nn.Linear):
            found = m
    return found


def representations(problem: Any, params: Params, buffers: Params, x: Tensor) -> Tensor:
    """``(n, d)``: the input of ``problem.module``'s last ``nn.Linear`` on ``x (n, ...)`` in
    eval mode (the model's output where it has none), one row per example."""
    site = last_linear(problem.module)
    seen: list[Tensor] = []
    hook = None
    if site is not None:
        hook = site.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    try:
        out = problem.predict(params, buffers, x)
    finally:
        if hook is not None:
            hook.remove()
    if seen:
        return torch.cat([s.reshape(s.shape[0], -1) for s in seen])
    if not isinstance(out, Tensor):
        raise TypeError(f"representations need a tensor output (got {type(out).__name__})")
    return out.reshape(len(out), -1)


#: per lookahead (one a cycle): the last committed state and its replayed representations (the
#: next change's "before" within the cycle), held weakly so an old cycle is not kept alive
_LAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def replayed(look: Any, state: Any, x: Tensor) -> Tensor:
    """Representations of ``x`` after ``state`` is replayed over the lookahead ``look``."""
    last = _LAST.get(look)
    if last is not None and last[0] is state:
        return last[1]
    params, _ = look.replay(state)
    return representations(look.problem, params, state.buffers, x)


def commit_shift(look: Any, x: Tensor, before: Any, after: Any, rows: int = 0) -> float:
    """``1 - CKA`` between the representations of ``x`` (the replay buffer's examples; its
    first ``rows`` where ``rows > 0``) after the lookahead ``look`` from ``before`` and from
    ``after`` (module docstring); NaN where a replay is non-finite."""
    shift, x = math.nan, x[: rows or None]
    try:
        with torch.no_grad():
            r0 = replayed(look, before, x)
            p1, _ = look.replay(after)
            r1 = representations(look.problem, p1, after.buffers, x)
        _LAST[look] = (after, r1)
        if bool(torch.isfinite(r0).all()) and bool(torch.isfinite(r1).all()):
            shift = 1.0 - linear_cka(r0, r1)
    except (SelfmodError, FloatingPointError):
        pass  # safeguards off and a replay went non-finite: nothing to measure
    return shift
