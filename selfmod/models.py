"""Small models as pure functions of a params dict, and a bridge from ``nn.Module``.

``apply(params, x)`` with ``params: dict[str, Tensor]`` is the form every selfmod estimator
differentiates through.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

Params = dict[str, Tensor]


def mlp(sizes: Sequence[int], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """``Linear(sizes[0], sizes[1]) -> act -> ... -> Linear(sizes[-2], sizes[-1])``."""
    if len(sizes) < 2:
        raise ValueError(f"sizes needs at least 2 entries (got {list(sizes)})")
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def init_mlp_params(sizes: Sequence[int], generator: torch.Generator) -> Params:
    """He-initialised weights ``w{i} (sizes[i+1], sizes[i])`` and zero biases ``b{i}`` for
    :func:`mlp_forward`, a plain-dict MLP for meta-learning loops that make many small nets."""
    params = {}
    for i, (d_in, d_out) in enumerate(itertools.pairwise(sizes)):
        params[f"w{i}"] = torch.randn(d_out, d_in, generator=generator) * math.sqrt(2.0 / d_in)
        params[f"b{i}"] = torch.zeros(d_out)
    return params


def mlp_forward(params: Params, x: Tensor) -> Tensor:
    """``x (B, sizes[0]) -> (B, sizes[-1])`` through ReLU layers of :func:`init_mlp_params`."""
    n = len(params) // 2
    for i in range(n):
        x = F.linear(x, params[f"w{i}"], params[f"b{i}"])
        if i < n - 1:
            x = torch.relu(x)
    return x


def functionalize(module: nn.Module) -> tuple[Callable[[Params, Tensor], Tensor], Params]:
    """``(apply, params)`` with ``apply(params, x) == module(x)`` evaluated at ``params``.

    For an ``nn.Sequential`` of plain layers (:func:`direct_plan`) the returned ``apply`` is a
    direct chain of ``F.linear``/``relu``/... calls, skipping ``functional_call``'s per-call
    module patching (a measurable cost on the small models of meta-learning).
    """
    params = {k: v.detach().clone() for k, v in module.named_parameters()}
    plan = direct_plan(module)
    if plan is not None:

        def apply_direct(p: Params, x: Tensor) -> Tensor:
            for step in plan:
                x = step(p, None, x)
            return x

        return apply_direct, params

    def apply(p: Params, x: Tensor) -> Tensor:
        return functional_call(module, p, (x,))

    return apply, params


Step = Callable[[Params, Params | None, Tensor], Tensor]


def direct_plan(module: nn.Module) -> list[Step] | None:
    """The forward pass of an ``nn.Sequential`` of ``Linear``,
    :class:`~selfmod.arch.factorable.FactorableLinear`, ``Conv1d`` (zero padding), ``ReLU``,
    ``Flatten``, ``Unflatten`` and :class:`~selfmod.arch.dropout.ConcreteDropout`
    as functional steps ``step(params, extra, x) -> x``, the same ops ``module(x)`` runs;
    ``None`` for any other module. ``extra`` holds the dropout sites' ``rate`` and ``noise``
    (training mode: none, the identity)."""
    from selfmod.arch.dropout import ConcreteDropout, concrete_dropout
    from selfmod.arch.factorable import FactorableLinear, factorable_linear

    if not isinstance(module, nn.Sequential):
        return None
    steps: list[Step] = []
    for name, m in module.named_children():
        w, b = f"{name}.weight", f"{name}.bias"
        kind = type(m)
        if kind is nn.Linear:
            steps.append(lambda p, e, x, w=w, b=b: F.linear(x, p[w], p.get(b)))
        elif kind is FactorableLinear:
            keys = (w, b, f"{name}.left", f"{name}.right")
            steps.append(
                lambda p, e, x, k=keys: factorable_linear(x, p[k[0]], p.get(k[1]), p[k[2]], p[k[3]])
            )
        elif kind is nn.Conv1d and m.padding_mode == "zeros" and not isinstance(m.padding, str):
            args = (m.stride, m.padding, m.dilation, m.groups)
            steps.append(lambda p, e, x, w=w, b=b, a=args: F.conv1d(x, p[w], p.get(b), *a))
        elif kind is nn.ReLU and not m.inplace:
            steps.append(lambda p, e, x: torch.relu(x))
        elif kind is nn.Flatten:
            steps.append(lambda p, e, x, d=(m.start_dim, m.end_dim): x.flatten(*d))
        elif kind is nn.Unflatten:
            steps.append(lambda p, e, x, d=m.dim, size=m.unflattened_size: x.unflatten(d, size))
        elif kind is ConcreteDropout:
            rate, noise = f"{name}.rate", f"{name}.noise"

            def drop(p: Params, e: Params | None, x: Tensor, r=rate, n=noise) -> Tensor:
                if not e or n not in e or e[n].numel() == 0:
                    return x
                return concrete_dropout(x, e[r], e[n][: x.shape[0], : x.shape[1]])

            steps.append(drop)
        else:
            return None
    return steps


class FunctionalModel:
    """An ``nn.Module`` as a pure function of its parameters and buffers::

        fm = FunctionalModel(module)
        params, buffers = fm.init()
        out, buffers = fm(params, buffers, x, train=True, update_buffers=True)

    ``train`` puts every submodule in training or eval mode for the call (restored after).
    ``update_buffers=True`` (with ``train``) lets BatchNorm update its running statistics, on
    copies that are returned: the caller's ``buffers`` are never written. ``update_buffers=False``
    runs BatchNorm on batch statistics without touching any buffer (safe inside ``vmap`` and
    grad transforms) and returns ``buffers`` itself. ``extra`` substitutes further tensors by
    name (e.g. :class:`selfmod.arch.dropout.ConcreteDropout`'s ``rate`` and ``noise``).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._plan = direct_plan(module)  # plain layers: direct calls, no module patching
        self._submodules = list(module.modules())  # scanned for hooks on the direct path
        self._slots: TensorSlots | None = None  # built on the first call through the module

    def _needs_module(self, args: tuple, kwargs: dict) -> bool:
        """Whether a call needs the module itself: more than one input, or hooks to run."""
        if len(args) != 1 or kwargs:
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for m in self._submodules)

    def init(self) -> tuple[Params, Params]:
        """Detached copies of the parameters and the persistent buffers."""
        params = {k: v.detach().clone() for k, v in self.module.named_parameters()}
        return params, {k: v.detach().clone() for k, v in persistent_buffers(self.module).items()}

    def __call__(
        self,
        params: Params,
        buffers: Params,
        *args: Any,
        train: bool,
        update_buffers: bool = False,
        extra: Params | None = None,
        **kwargs: Any,
    ) -> tuple[Any, Params]:
        if self._plan is not None and not buffers and not self._needs_module(args, kwargs):
            x = args[0]
            extra = extra if train else None  # eval mode: dropout is the identity
            for step in self._plan:
                x = step(params, extra, x)
            return x, buffers
        tracking = train and update_buffers
        if tracking:
            buffers = {k: v.clone() for k, v in buffers.items()}  # updated in place below
        values = {**params, **buffers, **(extra or {})}
        fits = self._slots is not None and self._slots.holds(values)
        if not fits:  # the first call, or the module changed: its slots found again
            self._slots = TensorSlots(self.module)
            fits = self._slots.holds(values)  # else a name that is no parameter or buffer
        with _modes(self.module, train, tracking, self._slots.modules):
            if not fits:
                return functional_call(self.module, values, args, kwargs), buffers
            return self._slots.call(values, args, kwargs), buffers


class TensorSlots:
    """Where ``module``'s parameters and buffers live, to call it at other tensors of the same
    names as :func:`torch.func.functional_call` does (``strict=False``, tied weights swapped
    together), without its per-call search of the module tree (25-53 us a call on the
    panel's CNN, GRU and Transformer: ``benchmarks/forward_call.py``).

    ``slots[name]``: every ``(table, attr)`` holding that tensor, ``table`` its owner's
    ``_parameters`` or ``_buffers`` dict (a tied tensor's other places under the name
    ``named_parameters`` gives it). :meth:`holds` says whether they still describe the module:
    every submodule where it was and every slot holding the tensor it held; else build anew.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.modules = list(module.modules())  # as module.modules() while :meth:`holds`
        self.slots: dict[str, list[tuple[dict[str, Any], str]]] = {}
        self._edges = [
            (parent._modules, name, child)
            for parent in self.modules
            for name, child in parent._modules.items()
        ]
        self._held: list[tuple[dict[str, Any], str, Tensor]] = []
        first: dict[int, str] = {}  # a tensor's first name (named_parameters' order)
        seen: set[tuple[int, str]] = set()
        for prefix, m in module.named_modules(remove_duplicate=False):
            for table in (m._parameters, m._buffers):
                for attr, t in table.items():
                    if t is None or (id(table), attr) in seen:
                        continue
                    seen.add((id(table), attr))
                    name = first.setdefault(id(t), f"{prefix}.{attr}" if prefix else attr)
                    self.slots.setdefault(name, []).append((table, attr))
                    self._held.append((table, attr, t))

    def holds(self, values: Params) -> bool:
        """Whether the slots are the module's as it is now and name every key of ``values``."""
        return (
            all(d.get(n) is c for d, n, c in self._edges)
            and all(t.get(a) is h for t, a, h in self._held)
            and all(k in self.slots for k in values)
        )

    def call(self, values: Params, args: tuple, kwargs: dict) -> Any:
        """``module(*args, **kwargs)`` with ``values`` in the slots of their names, the module's
        own tensors put back after (also on an error)."""
        swapped: list[tuple[dict[str, Any], str, Any]] = []
        try:
            for name, t in values.items():
                for table, attr in self.slots[name]:
                    swapped.append((table, attr, table[attr]))
                    table[attr] = t
            return self.module(*args, **kwargs)
        finally:
            for table, attr, own in reversed(swapped):
                table[attr] = own


def persistent_buffers(module: nn.Module) -> Params:
    """The buffers that belong in a checkpoint (``state_dict``'s), by name."""
    out = {}
    for prefix, m in module.named_modules():
        for name, b in m.named_buffers(recurse=False):
            if b is not None and name not in m._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = b
    return out


@contextlib.contextmanager
def _modes(
    module: nn.Module, train: bool, track: bool, modules: Sequence[nn.Module] | None = None
) -> Iterator[None]:
    """``module.train(train)`` (skipped where every flag is ``train`` already; where no module
    overrides ``train``, the flags set directly, as it sets them); with ``train`` and not
    ``track``, BatchNorm layers use batch statistics and leave their running statistics alone.
    Restores every changed flag on exit. ``modules``: ``module.modules()``, where the caller
    holds them. (16 modules: 14 us a call in eval mode, against 144 us through
    ``nn.Module.__setattr__`` for every flag.)"""
    mods = list(module.modules()) if modules is None else modules
    saved = [m.training for m in mods]
    norms = []
    if train and not track:
        norms = [
            m
            for m in mods
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        ]
    if any(flag is not train for flag in saved):
        if any(type(m).train is not nn.Module.train for m in mods):
            module.train(train)  # an override of ``train`` has its say
        else:
            for m in mods:
                object.__setattr__(m, "training", train)  # as nn.Module.__init__ sets it
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, flag in zip(mods, saved, strict=True):
            if m.training is not flag:  # only the changed: nn.Module.__setattr__ is slow
                object.__setattr__(m, "training", flag)
        for m in norms:
            m.track_running_stats = True


def eval_mode(module: nn.Module):
    """A context in which ``module`` and its submodules are in eval mode (restored after)."""
    return _modes(module, False, False)


def cross_entropy_loss(apply: Callable[[Params, Tensor], Tensor]):
    """``loss(params, hparams, (x, y)) = CE(apply(params, x), y)``, the estimators' signature."""

    def loss(params: Params, hparams: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(apply(params, x), y)

    return loss


def accuracy(
    apply: Callable[[Params, Tensor], Tensor], params: Params, x: Tensor, y: Tensor
) -> float:
    with torch.no_grad():
        return (apply(params, x).argmax(-1) == y).float().mean().item()
