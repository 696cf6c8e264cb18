"""The estimator contract, declared once.

Every meta-gradient estimator takes the seven arguments of :class:`MetaProblem`, in order,
then its own keyword-only options, and returns a
:class:`~selfmod.hypergrad.unroll.HypergradResult`::

    est(inner_loss, outer_loss, optimizer, params, hparams, inner_batches, outer_batch, **options)

An estimator is written as ``core(problem: MetaProblem, *, option=default, ...)`` under
:func:`estimator`, which gives it that public signature (``inspect.signature`` and ``help`` show
all of it) and passes the seven arguments on as one :class:`MetaProblem`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from torch import Tensor

from selfmod import tree
from selfmod.hypergrad.unroll import HParams, HypergradResult, Loss, Params
from selfmod.optim.base import GradientTransformation


class MetaProblem(NamedTuple):
    """What an estimator differentiates: ``K = len(inner_batches)`` steps of ``optimizer`` on
    ``inner_loss`` from ``params``, then ``value = outer_loss(params_K, hparams, outer_batch)``,
    and its gradient with respect to ``hparams`` (and, where the method can, ``params``)."""

    inner_loss: Loss  # (params, hparams, batch) -> 0-dim loss the inner steps descend
    outer_loss: Loss  # (params, hparams, batch) -> 0-dim loss after the K steps
    optimizer: GradientTransformation  # its update reads hparams
    params: Params  # the initial params, floating-point tensors
    hparams: Params  # what the meta-gradient is taken with respect to, floating-point tensors
    inner_batches: Sequence[Any]  # one batch per inner step (K = its length)
    outer_batch: Any  # the outer loss's batch


class Estimator(Protocol):
    """A meta-gradient estimator: ``est(*MetaProblem, **options) -> HypergradResult``.

    The seven fields of :class:`MetaProblem` are its positional-or-keyword arguments, in their
    order; its options are keyword-only. Every estimator takes ``state`` (the initial optimizer
    state, default ``optimizer.init(params)``); the rest are its own (``window``, ``segments``,
    ``solver``, ``eps``, ...).
    """

    def __call__(self, *problem: Any, **options: Any) -> HypergradResult: ...


_SHARED = [  # annotations as written (NamedTuple holds them as ForwardRef)
    inspect.Parameter(
        name,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation=getattr(annotation, "__forward_arg__", annotation),
    )
    for name, annotation in MetaProblem.__annotations__.items()
]


def estimator(core: Callable[..., HypergradResult]) -> Estimator:
    """``core(problem, *, options)`` as an :class:`Estimator` with the public signature (module
    docstring); its name, docstring and options are ``core``'s."""
    options = list(inspect.signature(core).parameters.values())[1:]
    if any(p.kind is not inspect.Parameter.KEYWORD_ONLY for p in options):
        raise TypeError(f"{core.__name__}: an estimator's options must be keyword-only")
    signature = inspect.Signature([*_SHARED, *options], return_annotation="HypergradResult")

    @functools.wraps(core)
    def call(*args: Any, **kwargs: Any) -> HypergradResult:
        given = signature.bind(*args, **kwargs).arguments
        problem = MetaProblem(*(given.pop(name) for name in MetaProblem._fields))
        return core(problem, **given)

    call.__signature__ = signature  # type: ignore[attr-defined]
    return call


def prepare(problem: MetaProblem) -> tuple[Params, HParams, list[Any]]:
    """Validate the shared arguments; return detached leaf copies of ``params`` and ``hparams``
    that require grad, and the inner batches as a list."""
    for name, group in (("params", problem.params), ("hparams", problem.hparams)):
        if not isinstance(group, Mapping):
            raise TypeError(f"{name} must be a dict[str, Tensor] (got {type(group).__name__})")
        for k, v in group.items():
            if not (isinstance(v, Tensor) and v.is_floating_point()):
                raise TypeError(
                    f"{name}[{k!r}] must be a floating-point tensor (got {type(v).__name__})"
                )
    batches = list(problem.inner_batches)
    return tree.detach(problem.params, True), tree.detach(problem.hparams, True), batches
