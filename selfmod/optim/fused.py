"""Adam's and AdamW's whole step in one pass over memory: torch's fused kernels, on copies.

``update`` then ``apply_updates`` is about twelve ``foreach`` passes over a model's size and as
many new tensors; a base step outside autograd needs none of that. The step here copies
``params``, ``mu`` and ``nu`` (the inputs stay as they were: the contract is still pure; a
caller that donates them, ``donate=True``, has them written in place instead) and runs
``torch._fused_adamw_`` (``torch._fused_adam_`` for Adam's L2 decay, ``g <- g + wd p`` first)
on the copies, which is the same maths in one pass::

    m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
    p <- p (1 - lr wd) - lr m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps)

The result equals the chain's to rounding (the kernel orders the operations differently),
but for ``eps_root``: the chain's ``sqrt(v_hat + eps_root)`` keeps a derivative through the
root finite at ``v = 0``; a step outside autograd takes no derivative, so the kernel's
``sqrt(v_hat)`` stands (``torch.optim.AdamW``'s). A coordinate's step then differs by a
relative ``eps_root / 2 v_hat`` (``eps_root = 1e-16``: 1e-4 at gradients of 1e-6, 1e-2 at 1e-7).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from selfmod.optim.base import (
    HParam,
    HParams,
    Params,
    kept_while_hparams_are,
    per_key,
    resolve,
)
from selfmod.optim.transforms import AdamState


def _floats(values: list[Any]) -> list[float] | None:
    """``values`` (floats and 0-dim tensors) as floats, with one host read for all the
    tensors; ``None`` where one is not a scalar."""
    tensors = [v.detach() for v in values if isinstance(v, Tensor)]
    if any(t.dim() for t in tensors):
        return None
    if len({t.dtype for t in tensors}) > 1:
        tensors = [t.double() for t in tensors]
    read = iter(torch.stack(tensors).tolist() if tensors else [])
    return [next(read) if isinstance(v, Tensor) else float(v) for v in values]


class HostRead:
    """The last host read of a function of ``(keys, hparams)``, kept while ``keys`` and every
    value of ``hparams`` are the same: the same tensor objects, none written in place since
    (their version counters), or equal non-tensor values. Where a step's hyperparameters are
    functions of ``hparams`` alone (numbers, callables marked
    :func:`~selfmod.optim.base.of_hparams_only`: the loop's), their floats are then the same;
    reading them again costs a dozen small tensor operations and, on a GPU, a wait for the
    device, every step."""

    def __init__(self) -> None:
        # (key, the tensors of key: their ids stay theirs, value), replaced whole: a thread
        # sharing the step never sees one read's key with another's value
        self.last: tuple[tuple[Any, ...], list[Any], Any] | None = None

    def get(
        self,
        keys: list[str],
        hparams: HParams | None,
        read: Callable[[list[str], HParams | None], Any],
    ) -> Any:
        values = list(hparams.values()) if hparams is not None else []
        key = (tuple(keys), tuple(hparams or ()), tuple(stamp(v) for v in values))
        last = self.last
        if last is not None and last[0] == key and all(k is not None for k in key[2]):
            return last[2]
        value = read(keys, hparams)
        self.last = (key, values, value)
        return value


def stamp(value: Any) -> Any:
    """What identifies ``value``'s contents now: a tensor's id and version, a number itself;
    ``None`` (never taken as unchanged) for an inference tensor, which keeps no version, and
    for anything else (a container's contents may change under the same object)."""
    if isinstance(value, int | float):
        return value
    if not isinstance(value, Tensor) or value.is_inference():
        return None
    return id(value), value._version


def _copies(tensors: list[Tensor]) -> list[Tensor]:
    """New tensors equal to ``tensors`` in one ``foreach`` dispatch (``x * 1`` is ``x`` bit for
    bit, -0.0 and inf included): the kernel's targets, so that the inputs stay as they were."""
    return torch._foreach_mul(tensors, 1.0)


def adam_step(
    lr: HParam,
    b1: HParam,
    b2: HParam,
    eps: HParam,
    weight_decay: HParam,
    decoupled: bool,
    at: int = 0,
):
    """The fused step of :func:`selfmod.optim.adamw` (``decoupled``, else
    :func:`selfmod.optim.adam`) with these hyperparameters, whose chain's state holds the
    :class:`AdamState` at index ``at``:
    ``step(grads, state, params, hparams) -> (params, state)``, or ``None`` where it does not
    apply (inside autograd, a per-tensor ``b1``, ``b2`` or ``eps``, or tensors the kernel does
    not take); the caller then runs ``update`` and ``apply_updates``. ``donate=True``: the
    kernel writes ``params`` and the moments in place and returns them. ``eps_root`` is not
    used (the module docstring)."""

    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    # the hyperparameters' floats, read again only when hparams change (where every one is a
    # constant or a function of hparams alone)
    last = HostRead() if all(map(kept_while_hparams_are, (lr, b1, b2, eps, weight_decay))) else None

    def hyperparameters(keys: list[str], hparams: HParams | None) -> list[float] | None:
        """``[b1, b2, eps, lr per key..., weight decay per key...]`` as floats, or ``None``
        where one is per tensor where it must be shared, or not a scalar."""
        shared = [resolve(v, hparams, name) for v, name in ((b1, "b1"), (b2, "b2"), (eps, "eps"))]
        if any(isinstance(v, Mapping) for v in shared):
            return None
        rate, decay = resolve(lr, hparams, "lr"), resolve(weight_decay, hparams, "weight_decay")
        rates = [per_key(rate, k, "lr") for k in keys]
        decays = [per_key(decay, k, "weight_decay") for k in keys]
        return _floats([*shared, *rates, *decays])

    def step(
        grads: Params,
        state: Any,
        params: Params,
        hparams: HParams | None = None,
        *,
        donate: bool = False,
    ) -> tuple[Params, Any] | None:
        if torch.is_grad_enabled():
            return None
        keys, n = list(grads), len(grads)
        read = (
            hyperparameters(keys, hparams)
            if last is None
            else last.get(keys, hparams, hyperparameters)
        )
        tensors = [params[k] for k in keys]
        if read is None or not all(
            t.is_floating_point() and t.device == tensors[0].device for t in tensors
        ):
            return None
        (k1, k2, e), rates, decays = read[:3], read[3 : 3 + n], read[3 + n :]
        adam, t = state[at], state[at].count + 1
        own = (lambda xs: xs) if donate else _copies  # the kernel's targets
        p = dict(zip(keys, own(tensors), strict=True))
        mu = dict(zip(keys, own([adam.mu[k] for k in keys]), strict=True))
        nu = dict(zip(keys, own([adam.nu[k] for k in keys]), strict=True))
        groups: dict[tuple[float, float, torch.dtype], list[str]] = {}
        for k, r, d in zip(keys, rates, decays, strict=True):
            groups.setdefault((r, d, p[k].dtype), []).append(k)
        for i, ((r, d, _), ks) in enumerate(groups.items()):
            count = torch.full((), float(t), device=tensors[0].device)
            try:
                kernel(
                    [p[k] for k in ks], [grads[k] for k in ks], [mu[k] for k in ks],
                    [nu[k] for k in ks], [], [count] * len(ks), lr=r, beta1=k1, beta2=k2,
                    weight_decay=d, eps=e, amsgrad=False, maximize=False,
                )  # fmt: skip
            except (NotImplementedError, RuntimeError):  # a device or dtype without the kernel
                if donate and i:  # donated tensors already written: no way back to update
                    raise
                return None
        return p, (*state[:at], AdamState(t, mu, nu), *state[at + 1 :])

    return step


__all__ = ["adam_step"]
