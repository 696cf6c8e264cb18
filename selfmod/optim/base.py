"""The optimizer contract: a pair of pure functions over trees, as in optax.

    state = opt.init(params)
    updates, state = opt.update(grads, state, params, hparams)
    params = apply_updates(params, updates)

Every hyperparameter is a :data:`HParam`: a float, a tensor, or a callable ``hparams -> value``
whose value is a scalar tensor or a dict keyed like the params (per-tensor values). Callables are
how hyperparameters become learnable, in any parameterisation::

    sgd(lr=lambda h: h["log_lr"].exp())
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

Params = dict[str, Tensor]
HParams = Mapping[str, Tensor]
Scalar = float | Tensor
HParam = float | Tensor | Callable[[HParams], "Tensor | Mapping[str, Tensor]"]


class InitFn(Protocol):
    def __call__(self, params: Params) -> Any: ...


class UpdateFn(Protocol):
    def __call__(
        self,
        updates: Params,
        state: Any,
        params: Params | None = None,
        hparams: HParams | None = None,
    ) -> tuple[Params, Any]: ...


class StepFn(Protocol):
    def __call__(
        self,
        grads: Params,
        state: Any,
        params: Params,
        hparams: HParams | None = None,
        *,
        donate: bool = False,
    ) -> tuple[Params, Any] | None: ...


class GradientTransformation(NamedTuple):
    """A pure ``(init, update)`` pair. ``update`` never mutates its inputs.

    ``step``, where an optimizer has one, is its fused whole step outside autograd:
    ``(params, state)`` as :func:`apply_updates` after ``update`` would give them (to rounding),
    or ``None`` where it does not apply; it too leaves its inputs as they were (:func:`step`),
    unless the caller donates them (``donate=True``: it may write ``params`` and ``state`` in
    place and return them, as JAX's buffer donation).
    """

    init: InitFn
    update: UpdateFn
    step: StepFn | None = None


class EmptyState(NamedTuple):
    """State of a stateless transformation."""


class FrozenHParams(dict):
    """Hyperparameters that stay fixed for one unroll, so each callable is evaluated once.

    Estimators wrap ``hparams`` in this before unrolling K steps: ``lr=lambda h: h["log_lr"].exp()``
    then costs one ``exp`` per unroll instead of one per step, and its backward node is shared.
    """

    def __init__(self, hparams: Mapping[str, Tensor]) -> None:
        super().__init__(hparams)
        self.resolved: dict[tuple[int, Any], Any] = {}


def resolve(
    value: HParam,
    hparams: HParams | None,
    name: str,
    then: Callable[[Any], Any] | None = None,
) -> Scalar | Mapping[str, Scalar]:
    """Evaluate a hyperparameter: call it on ``hparams`` if it is a callable, then ``then``.

    Returns a float, a 0-dim tensor, or a dict of those keyed by parameter name. Under
    :class:`FrozenHParams` the result (after ``then``) is computed once per unroll.
    """
    if not callable(value):
        return value if then is None else then(value)
    if hparams is None:
        raise ValueError(
            f"{name} is a callable of hparams but update() got hparams=None; "
            f"pass the hparams dict to update()"
        )
    if isinstance(hparams, FrozenHParams):
        key = (id(value), then)
        cached = hparams.resolved.get(key)
        if cached is None:
            cached = value(hparams)
            cached = hparams.resolved[key] = cached if then is None else then(cached)
        return cached
    resolved = value(hparams)
    return resolved if then is None else then(resolved)


def of_hparams_only(fn: Callable[[HParams], Any]) -> Callable[[HParams], Any]:
    """Mark ``fn``, a hyperparameter's callable, as a function of its ``hparams`` argument
    alone (no clock, counter or other state of its own): a fused step may then keep the value
    it read while ``hparams`` holds the same, unwritten tensors (:mod:`selfmod.optim.fused`).
    An unmarked callable is called every step."""
    fn.of_hparams_only = True  # type: ignore[attr-defined]
    return fn


def kept_while_hparams_are(value: HParam) -> bool:
    """Whether ``value``'s result changes only with ``hparams``: a number, or a callable
    marked :func:`of_hparams_only` (a tensor or a dict given as a constant may be written by
    its owner between steps)."""
    if isinstance(value, int | float):
        return True
    return callable(value) and getattr(value, "of_hparams_only", False) is True


def negate(value: Scalar | Mapping[str, Scalar]) -> Scalar | dict[str, Scalar]:
    """``-value`` for a scalar or every entry of a per-tensor dict."""
    if isinstance(value, Mapping):
        return {k: -v for k, v in value.items()}
    return -value


def per_key(value: Scalar | Mapping[str, Scalar], key: str, name: str) -> Scalar:
    """The hyperparameter's value for the tensor named ``key``."""
    if isinstance(value, Mapping):
        try:
            return value[key]
        except KeyError:
            raise KeyError(
                f"per-tensor {name} has no entry for parameter {key!r} (has {sorted(value)})"
            ) from None
    return value


def check_range(
    name: str,
    value: HParam,
    low: float,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Validate a constant hyperparameter (callables and tensors are checked by their user)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        if callable(value) or isinstance(value, Tensor | Mapping):
            return
        raise TypeError(
            f"{name} must be a float, a tensor, a per-tensor dict or a callable of hparams "
            f"(got {type(value).__name__})"
        )
    ok_low = value > low if low_open else value >= low
    ok_high = True if high is None else (value < high if high_open else value <= high)
    if not (ok_low and ok_high):
        lo = f"{'(' if low_open else '['}{low}"
        hi = f"{high}{')' if high_open else ']'}" if high is not None else "inf)"
        hint = "; pass a callable of hparams to learn it" if name in ("lr", "learning_rate") else ""
        raise ValueError(f"{name} must be in {lo}, {hi} (got {value}){hint}")


def apply_updates(params: Mapping[str, Tensor], updates: Mapping[str, Tensor]) -> Params:
    """``params + updates``, out of place so it stays differentiable.

    Without a graph, one fused ``foreach`` op; with one, per-tensor adds, whose backward saves
    nothing (``_foreach_add``'s autograd keeps both inputs alive, a copy of the params per step).
    """
    keys = list(params)
    if torch.is_grad_enabled() and any(
        params[k].requires_grad or updates[k].requires_grad for k in keys
    ):
        return {k: params[k] + updates[k] for k in keys}
    summed = torch._foreach_add([params[k] for k in keys], [updates[k] for k in keys])
    return dict(zip(keys, summed, strict=True))


def step(
    opt: GradientTransformation,
    grads: Params,
    state: Any,
    params: Params,
    hparams: HParams | None = None,
    *,
    donate: bool = False,
) -> tuple[Params, Any]:
    """One optimizer step ``(params, state) -> (params + u, state')``: the optimizer's fused
    ``step`` where it has one that applies, else ``update`` and :func:`apply_updates`.

    ``donate``: the caller gives up ``params`` and ``state`` (nothing else holds them), so a
    fused step may write them in place and return them, saving a copy of the parameters and
    of the moments a step; the values are the same bit for bit. Where no fused step applies,
    the step is out of place as always (donation permits, it does not require)."""
    done = None if opt.step is None else opt.step(grads, state, params, hparams, donate=donate)
    if done is not None:
        return done
    updates, state = opt.update(grads, state, params, hparams)
    return apply_updates(params, updates), state


def is_zero(value: HParam) -> bool:
    """True only for a constant 0 (a tensor or callable may become non-zero when learned)."""
    return isinstance(value, int | float) and value == 0


def run_closure(closure: Callable[[], Tensor] | None) -> Tensor | None:
    """``torch.optim``'s ``step(closure)`` convention: the loss the closure recomputes (with
    autograd on, inside a ``no_grad`` step), or ``None`` without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
