"""The inner training loop shared by every estimator, and the one result type they return.

An inner step is ``(p, s) -> (p + u, s')`` with ``u, s' = optimizer.update(grad L_in(p), s, p, h)``.
Estimators differ only in how they differentiate the outer loss through a sequence of steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from selfmod import tree
from selfmod.errors import NonFiniteError
from selfmod.optim.base import FrozenHParams, GradientTransformation, apply_updates, step

Params = dict[str, Tensor]
HParams = dict[str, Tensor]
Loss = Callable[[Params, HParams, Any], Tensor]

#: steps between two finiteness checks of the recorded losses and gradients (one sync each)
CHECK_EVERY = 64


@dataclass(frozen=True)
class HypergradResult:
    """What every estimator returns.

    Attributes:
        value: the outer loss after the unrolled training, 0-dim, detached.
        hparams: ``d value / d hparams``, keyed like ``hparams``.
        params: ``d value / d initial params``, keyed like ``params``; ``None`` where the
            method cannot give it (truncated with ``window < K``, forward, implicit).
        final_params: the trained params, detached.
        final_state: the optimizer state after the K steps, detached (to continue training,
            e.g. in persistent truncated unrolls); ``None`` where a method does not track it.
    """

    value: Tensor
    hparams: dict[str, Tensor]
    params: dict[str, Tensor] | None
    final_params: dict[str, Tensor]
    final_state: Any = None


class FiniteMonitor:
    """Records each step's loss and gradient norms, and checks them in batches.

    Checking every ``CHECK_EVERY`` steps avoids a host sync per step; the error still names
    the first bad step. One fused ``foreach`` norm per step catches NaN and inf anywhere.
    """

    def __init__(self, start: int = 0) -> None:
        self.start = start
        self.losses: list[Tensor] = []
        self.grad_norms: list[list[Tensor]] = []

    def record(self, loss: Tensor, grads: Sequence[Tensor]) -> None:
        with torch.no_grad():
            self.losses.append(loss.detach())
            self.grad_norms.append(torch._foreach_norm(list(grads)))
        if len(self.losses) >= CHECK_EVERY:
            self.check()

    def check(self) -> None:
        if not self.losses:
            return
        losses = torch.stack(self.losses)
        norms = torch.stack([torch.stack(n) for n in self.grad_norms])  # (steps, tensors)
        bad_loss, bad_grad = ~torch.isfinite(losses), ~torch.isfinite(norms).all(dim=1)
        if bool(bad_loss.any() | bad_grad.any()):
            i = int(torch.nonzero(bad_loss | bad_grad)[0])
            what = "inner loss" if bool(bad_loss[i]) else "gradient"
            raise NonFiniteError(
                what, step=self.start + i, hint="lower the learning rate or clip gradients"
            )
        self.start += len(self.losses)
        self.losses, self.grad_norms = [], []


def second_order(create_graph: bool) -> contextlib.AbstractContextManager[Any]:
    """Where a step is differentiated again (``create_graph``, or under ``jvp``), run it with
    ``sdpa_kernel([SDPBackend.MATH])``; otherwise change nothing.

    The fused attention kernels (flash, memory-efficient, cuDNN) have a backward but no
    derivative of that backward and no forward-mode rule, so a transformer fails under
    double backward or ``jvp``; the math backend is plain matmuls and softmax, which have both.
    The backend is chosen when the loss runs forward; the previous choice is restored on exit
    (``sdpa_kernel`` sets process-wide flags: other threads see them during the step).
    """
    return sdpa_kernel([SDPBackend.MATH]) if create_graph else contextlib.nullcontext()


def inner_step(
    inner_loss: Loss,
    optimizer: GradientTransformation,
    params: Params,
    state: Any,
    hparams: HParams,
    batch: Any,
    *,
    create_graph: bool,
    monitor: FiniteMonitor | None = None,
    fused: bool = False,
    donate: bool = False,
) -> tuple[Params, Any]:
    """One optimizer step on ``inner_loss``. With ``create_graph`` the step is part of the
    autograd graph (second order, attention on the math backend: :func:`second_order`);
    without, it is a plain training step on detached tensors, by the optimizer's fused
    ``step`` where ``fused`` (:func:`selfmod.optim.step`: the same maths in other rounding, so
    an estimator that recomputes a step with a graph keeps ``fused=False``). ``donate`` (with
    ``fused``): the caller gives up ``params`` and ``state``, which the step may then write in
    place (:func:`selfmod.optim.step`)."""
    if not create_graph:
        params = tree.detach(params, requires_grad=True)
    with torch.enable_grad(), second_order(create_graph):
        loss = inner_loss(params, hparams, batch)
        grads = torch.autograd.grad(
            loss, tuple(params.values()), create_graph=create_graph, materialize_grads=True
        )
    if monitor is not None:
        monitor.record(loss, grads)
    g = dict(zip(params.keys(), grads, strict=True))
    if create_graph:
        updates, state = optimizer.update(g, state, params, hparams)
        return apply_updates(params, updates), state
    with torch.no_grad():
        if fused:
            return step(optimizer, g, state, tree.detach(params), hparams, donate=donate)
        updates, state = optimizer.update(g, state, params, hparams)
        return apply_updates(tree.detach(params), updates), state


def run(
    inner_loss: Loss,
    optimizer: GradientTransformation,
    params: Params,
    state: Any,
    hparams: HParams,
    batches: Sequence[Any],
    *,
    create_graph: bool,
    monitor: FiniteMonitor | None = None,
    fused: bool = False,
) -> tuple[Params, Any]:
    """``len(batches)`` inner steps from ``(params, state)`` (``fused``: :func:`inner_step`'s).

    Hyperparameter callables are evaluated once for the whole run (:class:`FrozenHParams`).
    """
    hparams = FrozenHParams(hparams)
    for batch in batches:
        params, state = inner_step(
            inner_loss,
            optimizer,
            params,
            state,
            hparams,
            batch,
            create_graph=create_graph,
            monitor=monitor,
            fused=fused,
        )
    return params, state


def outer_value(outer_loss: Loss, params: Params, hparams: HParams, batch: Any) -> Tensor:
    with torch.enable_grad():
        value = outer_loss(params, hparams, batch)
    if value.dim() != 0:
        raise ValueError(f"outer_loss must return a scalar (got shape {tuple(value.shape)})")
    if not torch.isfinite(value):
        raise NonFiniteError("outer loss", hint="the trained params give a NaN or inf loss")
    return value


def grads_or_zeros(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor] | None = None,
    retain_graph: bool | None = None,
) -> list[Tensor]:
    """``torch.autograd.grad`` with zeros for inputs the outputs do not depend on."""
    pairs = [
        (o, g)
        for o, g in zip(outputs, grad_outputs or [None] * len(outputs), strict=True)
        if o.requires_grad
    ]
    if not pairs:
        return [torch.zeros_like(x) for x in inputs]
    outs, gouts = zip(*pairs, strict=True)
    grads = torch.autograd.grad(
        outs,
        inputs,
        grad_outputs=None if grad_outputs is None else gouts,
        allow_unused=True,
        materialize_grads=True,
        retain_graph=retain_graph,
    )
    return list(grads)


def result(
    value: Tensor,
    hparams: HParams,
    hgrads: Sequence[Tensor],
    params: Params | None,
    pgrads: Sequence[Tensor] | None,
    final_params: Params,
    final_state: Any = None,
) -> HypergradResult:
    """Package gradients as dicts, checking that they are finite."""
    h = {k: g.detach() for k, g in zip(hparams.keys(), hgrads, strict=True)}
    p = (
        None
        if pgrads is None or params is None
        else {k: g.detach() for k, g in zip(params.keys(), pgrads, strict=True)}
    )
    for name, group in (("hparams", h), ("params", p or {})):
        for k, g in group.items():
            if not torch.isfinite(g).all():
                raise NonFiniteError(
                    f"meta-gradient for {name}[{k!r}]",
                    hint="a sqrt or division at 0 on the differentiable path? "
                    "(Adam, RMSprop: pass eps_root > 0)",
                )
    if final_state is not None:
        leaves, rebuild = tree.partition(final_state)
        final_state = rebuild([x.detach() for x in leaves])
    return HypergradResult(value.detach(), h, p, tree.detach(final_params), final_state)
