"""Network surgery on units: remove, duplicate or add units of a layer, in the params and in
every optimizer state that holds per-coordinate tensors.

A *unit group* names where one layer's units live: the *producer* slots index units along
the output dimension (``Linear.weight`` dim 0, its bias, its gate), the *consumer* slots along
the input dimension of the next layer (``weight`` dim 1; after a ``Flatten`` each channel owns
``repeat`` contiguous columns). A :class:`Surgery` is a new-from-old index over those units::

    new[..., j, ...] = old[..., index[j], ...]      if index[j] >= 0
    new[..., j, ...] = fill (zeros by default)      if index[j] == -1   (a new unit)

so pruning keeps a subset, growth appends ``-1`` entries, and Net2Net splitting repeats an
index. The same index slices or extends the optimizer state: every tensor stored under a
param's key with that param's shape (momentum, Adam moments, ...) in a selfmod optimizer
state, and every such tensor in a ``torch.optim`` optimizer's per-param ``state``. New units
get zero state; kept units keep theirs, so the next step on them is the one the unmodified
network would take.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from selfmod.arch.choice import Choice
from selfmod.arch.dropout import ConcreteDropout
from selfmod.arch.factorable import FactorableLinear
from selfmod.arch.gates import HardConcreteGate, StraightThroughGate
from selfmod.arch.models import GrowReLU

Params = dict[str, Tensor]


class Slot(NamedTuple):
    """Units of a group live in ``params[key]`` along ``dim``, ``repeat`` entries per unit."""

    key: str
    dim: int
    repeat: int = 1


class UnitGroup(NamedTuple):
    """The producer and consumer slots of one layer's units."""

    producers: tuple[Slot, ...]
    consumers: tuple[Slot, ...]

    def slots(self) -> tuple[Slot, ...]:
        return self.producers + self.consumers

    def width(self, params: Mapping[str, Tensor]) -> int:
        """Number of units, read from the first producer."""
        s = self.producers[0]
        return params[s.key].shape[s.dim] // s.repeat


class Surgery(NamedTuple):
    """``new = old[index]`` over the units of ``group`` (``-1``: a new unit).

    ``fill[key]`` holds the new units' slices of ``params[key]`` (size ``n_new * repeat`` along
    the slot's dim; missing keys are zero-filled). ``scale[key] (len(index),)`` multiplies each
    resulting unit's slice (Net2Net's fan-out split).
    """

    group: UnitGroup
    index: Tensor  # (n_new_width,) int64
    fill: Mapping[str, Tensor] = {}
    scale: Mapping[str, Tensor] = {}


# ----------------------------------------------------------------------------- core maths


def take_units(
    x: Tensor, slot: Slot, index: Tensor, fill: Tensor | None = None, scale: Tensor | None = None
) -> Tensor:
    """``x`` re-indexed along ``slot.dim`` by unit ``index`` (out of place, differentiable).

    ``x (..., n_old * repeat, ...) -> (..., len(index) * repeat, ...)``.
    """
    r, dim = slot.repeat, slot.dim
    if x.shape[dim] == 0:  # holds no units (a factored layer's emptied weight): left as it is
        return x
    index = torch.as_tensor(index, dtype=torch.long, device=x.device)
    n_old = x.shape[dim] // r
    if x.shape[dim] % r:
        raise ValueError(
            f"{slot.key}: size {x.shape[dim]} along dim {dim} is not a multiple of "
            f"repeat={r}; check the unit group"
        )
    if index.numel() and int(index.max()) >= n_old:
        raise IndexError(
            f"{slot.key}: unit index {int(index.max())} out of range for {n_old} units"
        )
    offs = torch.arange(r, device=x.device)
    full = (index.clamp(min=0)[:, None] * r + offs).reshape(-1)  # (n_new * r,)
    out = x.index_select(dim, full)
    new = (index < 0).repeat_interleave(r)  # (n_new * r,)
    if bool(new.any()):
        pos = new.nonzero().squeeze(1)
        if fill is None:
            out = out.index_fill(dim, pos, 0.0)
        else:
            if fill.shape[dim] != pos.numel():
                raise ValueError(
                    f"fill for {slot.key} has size {fill.shape[dim]} along dim {dim}"
                    f"; the surgery adds {pos.numel() // r} units x repeat {r}"
                )
            out = out.index_copy(dim, pos, fill.to(out.device, out.dtype))
    if scale is not None:
        s = scale.to(out.device, out.dtype).repeat_interleave(r)
        shape = [1] * out.dim()
        shape[dim] = s.numel()
        out = out * s.reshape(shape)
    return out


def apply_params(surgery: Surgery, params: Mapping[str, Tensor]) -> Params:
    """The params after ``surgery``; keys outside the group are passed through."""
    out = dict(params)
    for s in surgery.group.slots():
        out[s.key] = take_units(
            params[s.key], s, surgery.index, surgery.fill.get(s.key), surgery.scale.get(s.key)
        )
    return out


def apply_state(surgery: Surgery, state: Any, params: Mapping[str, Tensor]) -> Any:
    """A selfmod optimizer state after ``surgery``.

    Walks the state pytree (NamedTuples, tuples, lists, dicts); inside every dict, a tensor under
    a slot's key whose shape equals ``params[key].shape`` (``params`` *before* surgery) is
    re-indexed; new units get zeros. Step counters, scalars and per-tensor hyperparameters
    pass through.
    """
    slots = {s.key: s for s in surgery.group.slots()}
    shapes = {k: params[k].shape for k in slots}

    def fn(key: str, x: Tensor) -> Tensor:
        return take_units(x, slots[key], surgery.index)

    return map_state(state, shapes, fn)


def map_state(state: Any, shapes: Mapping[str, torch.Size], fn) -> Any:
    """Rebuild ``state`` with ``fn(key, x)`` applied to each tensor ``x`` found under a dict key
    in ``shapes`` whose shape equals ``shapes[key]``."""
    if isinstance(state, Mapping):
        return {
            k: (
                fn(k, v)
                if k in shapes and isinstance(v, Tensor) and v.shape == shapes[k]
                else map_state(v, shapes, fn)
            )
            for k, v in state.items()
        }
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(map_state(v, shapes, fn) for v in state))
    if isinstance(state, tuple | list):
        return type(state)(map_state(v, shapes, fn) for v in state)
    return state


def rename_state(state: Any, mapping: Mapping[str, str | None]) -> Any:
    """Rename (or, for ``None``, drop) the param keys of every dict in a state pytree whose keys
    include any key of ``mapping``; used when discretising renames or removes params."""
    if isinstance(state, Mapping):
        if any(k in mapping for k in state):
            return {
                mapping.get(k, k): rename_state(v, mapping)
                for k, v in state.items()
                if mapping.get(k, k) is not None
            }
        return {k: rename_state(v, mapping) for k, v in state.items()}
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(rename_state(v, mapping) for v in state))
    if isinstance(state, tuple | list):
        return type(state)(rename_state(v, mapping) for v in state)
    return state


def apply_torch_optimizer(
    surgery: Surgery,
    optimizer: torch.optim.Optimizer,
    old: Mapping[str, Tensor],
    new: Mapping[str, Tensor],
) -> None:
    """Swap ``old[key]`` for ``new[key]`` in ``optimizer`` (a stateful wrapper: in place) and
    re-index its state to match.

    Handles ``torch.optim`` optimizers (per-param ``state`` dicts: ``exp_avg``, ``exp_avg_sq``,
    ``momentum_buffer``, ...) and :class:`selfmod.optim.Optimizer` (its ``functional_state``).
    """
    slots = {s.key: s for s in surgery.group.slots()}
    if hasattr(optimizer, "functional_state"):
        # selfmod.optim.Optimizer: its state is keyed by its own names; match params by identity
        name_of = {
            id(p): n
            for n, p in zip(optimizer.names, optimizer.param_groups[0]["params"], strict=True)
        }
        own = {name_of[id(old[k])]: k for k in slots if id(old[k]) in name_of}
        group = UnitGroup(
            *(
                tuple(s._replace(key=n) for n in own for s in part if s.key == own[n])
                for part in (surgery.group.producers, surgery.group.consumers)
            )
        )
        optimizer.functional_state = apply_state(
            surgery._replace(group=group),
            optimizer.functional_state,
            {n: old[k] for n, k in own.items()},
        )
    swap_torch_params(optimizer, {id(old[k]): new[k] for k in slots})
    for k, s in slots.items():
        st = optimizer.state.pop(old[k], None)
        if st:
            optimizer.state[new[k]] = {
                name: (
                    take_units(v, s, surgery.index)
                    if isinstance(v, Tensor) and v.shape == old[k].shape
                    else v
                )
                for name, v in st.items()
            }


def swap_torch_params(optimizer: torch.optim.Optimizer, by_id: Mapping[int, Tensor]) -> None:
    """Replace parameters (matched by ``id``) in every param group of ``optimizer``."""
    for g in optimizer.param_groups:
        g["params"] = [by_id.get(id(p), p) for p in g["params"]]


def drop_torch_params(optimizer: torch.optim.Optimizer, params: Iterable[Tensor]) -> None:
    """Remove ``params`` (and their state) from ``optimizer``; used after discretisation.

    For :class:`selfmod.optim.Optimizer` the names and ``functional_state`` entries go too.
    """
    gone = {id(p) for p in params}
    if hasattr(optimizer, "functional_state"):
        before = optimizer.param_groups[0]["params"]
        dropped = {n: None for n, p in zip(optimizer.names, before, strict=True) if id(p) in gone}
        optimizer.names = [n for n in optimizer.names if n not in dropped]
        optimizer.functional_state = rename_state(optimizer.functional_state, dropped)
    for g in optimizer.param_groups:
        g["params"] = [p for p in g["params"] if id(p) not in gone]
    for p in [p for p in optimizer.state if id(p) in gone]:
        del optimizer.state[p]


# ----------------------------------------------------------------------------- plans


def prune_plan(group: UnitGroup, keep: Tensor) -> Surgery:
    """Keep the units where the boolean ``keep (C,)`` is true, in order."""
    keep = torch.as_tensor(keep)
    if keep.dtype != torch.bool:
        raise TypeError(
            f"keep must be a boolean mask (got {keep.dtype}); use index_plan for an index"
        )
    if not bool(keep.any()):
        raise ValueError("pruning would remove every unit of the layer; keep at least one")
    return Surgery(group, keep.nonzero().squeeze(1))


def grow_plan(group: UnitGroup, width: int, fill: Mapping[str, Tensor]) -> Surgery:
    """Append new units after the ``width`` existing ones, with slices ``fill`` (keys missing
    from ``fill`` are zero-filled); see :mod:`selfmod.arch.growth` for function-preserving
    fills. The number of new units is read from the first fill tensor."""
    if not fill:
        raise ValueError("grow_plan needs at least one fill tensor to know how many units to add")
    key, x = next(iter(fill.items()))
    s = _slot(group, key)
    n = x.shape[s.dim] // s.repeat
    index = torch.cat([torch.arange(width), torch.full((n,), -1)])
    return Surgery(group, index, dict(fill))


def _slot(group: UnitGroup, key: str) -> Slot:
    for s in group.slots():
        if s.key == key:
            return s
    raise KeyError(
        f"{key!r} is not a slot of the unit group (slots: {[s.key for s in group.slots()]})"
    )


# ----------------------------------------------------------------------------- modules

_PASS = (
    nn.ReLU,
    nn.GELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.SiLU,
    nn.LeakyReLU,
    nn.Dropout,
    nn.Identity,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    GrowReLU,
    ConcreteDropout,
)
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, FactorableLinear)
_GATES = {HardConcreteGate: "log_alpha", StraightThroughGate: "scores"}


def sequential_groups(model: nn.Sequential, prefix: str = "") -> list[UnitGroup]:
    """The unit group of every hidden layer of a ``Sequential`` of ``Linear``/``Conv1d``/
    ``Conv2d`` layers, gates, activations, pooling and ``Flatten``.

    Each group: the layer's ``weight`` (dim 0), ``bias``, the following gate's parameter, and
    the next layer's ``weight`` (dim 1, ``repeat = in_features // channels`` after ``Flatten``).
    A :class:`~selfmod.arch.factorable.FactorableLinear` adds its ``left`` (dim 0) as a producer
    and its ``right`` (dim 1) as a consumer (empty while it is dense, as its weight is once
    factored: surgery leaves an empty slot as it is).
    Modules before the first layer (input reshaping, normalisation) are not part of any group.
    """
    groups: list[UnitGroup] = []
    producers: list[Slot] = []
    width = 0
    for name, m in model.named_children():
        full = f"{prefix}{name}"
        if isinstance(m, _LAYERS):
            if isinstance(m, nn.Conv1d | nn.Conv2d) and m.groups != 1:
                raise ValueError(f"{full}: grouped convolutions are not supported by surgery")
            if producers:
                fan_in = m.weight.shape[1] or m.right.shape[1]  # type: ignore[union-attr]
                if fan_in % width:
                    raise ValueError(
                        f"{full}: {fan_in} inputs is not a multiple of the {width} units before it"
                    )
                consumers = [Slot(f"{full}.weight", 1, fan_in // width)]
                if isinstance(m, FactorableLinear):  # its input units, once factored
                    consumers.append(Slot(f"{full}.right", 1))
                groups.append(UnitGroup(tuple(producers), tuple(consumers)))
            producers = [Slot(f"{full}.weight", 0)]
            if isinstance(m, FactorableLinear):  # after weight: the fan-in once it is empty
                producers.append(Slot(f"{full}.left", 0))
            if m.bias is not None:
                producers.append(Slot(f"{full}.bias", 0))
            width = m.weight.shape[0]
        elif type(m) in _GATES:
            producers.append(Slot(f"{full}.{_GATES[type(m)]}", 0))
        elif isinstance(m, _PASS) or _elementwise_choice(m) or not producers:
            continue  # activations and such; anything before the first layer
        else:
            raise TypeError(
                f"{full}: {type(m).__name__} is not supported by sequential_groups; "
                f"build the UnitGroup by hand"
            )
    return groups


def _elementwise_choice(m: nn.Module) -> bool:
    """A :class:`~selfmod.arch.choice.Choice` among activations and such: it keeps units."""
    return isinstance(m, Choice) and all(isinstance(o, _PASS) for o in m.options.values())


def operate(
    model: nn.Module, surgeries: Iterable[Surgery], optimizers: Iterable[torch.optim.Optimizer] = ()
) -> None:
    """Apply ``surgeries`` in order to a stateful ``model`` (new ``nn.Parameter`` objects) and
    re-index the state of each optimizer over its parameters. The thin wrapper over
    :func:`apply_params` and :func:`apply_torch_optimizer`."""
    optimizers = list(optimizers)
    for surgery in surgeries:
        old = dict(model.named_parameters())
        with torch.no_grad():
            new_vals = apply_params(surgery, old)
        new = {}
        for s in surgery.group.slots():
            mod_name, _, attr = s.key.rpartition(".")
            mod = model.get_submodule(mod_name)
            p = nn.Parameter(
                new_vals[s.key].detach().clone(), requires_grad=old[s.key].requires_grad
            )
            setattr(mod, attr, p)
            new[s.key] = p
            sync_sizes(mod)
        for opt in optimizers:
            apply_torch_optimizer(surgery, opt, old, new)


def sync_sizes(mod: nn.Module) -> None:
    """Keep ``in_features``/``out_channels``... consistent with the new weight (cosmetic)."""
    w = getattr(mod, "weight", None)
    if isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = w.shape
    elif isinstance(mod, nn.Conv1d | nn.Conv2d):
        mod.out_channels, mod.in_channels = w.shape[0], w.shape[1]
