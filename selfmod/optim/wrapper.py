"""A ``torch.optim.Optimizer`` that runs any selfmod transformation on an ``nn.Module``.

It holds no maths: ``step()`` reads ``.grad``, calls the pure ``update`` and adds the updates
in place. The functional state of param group ``i`` lives in ``self.functional_states[i]``
(``self.functional_state`` with one group). Two ways to build it:

    Optimizer(model.named_parameters(), optim.adam, lr=1e-3, betas=(0.9, 0.999))  # factory
    Optimizer(model.named_parameters(), optim.adam(1e-3))  # a built transformation

With a factory, every ``HParam`` argument (``lr``, ``momentum``, ``b1``/``b2`` as torch's
``betas``, ``weight_decay``, ...) lives in the param group and ``update`` reads it from there
each step, so ``torch.optim.lr_scheduler`` (OneCycleLR's momentum/beta cycling included) moves
the step exactly as for ``torch.optim``. With a built transformation, whose hyperparameters are
closed over, the group's ``lr`` starts at 1.0 and multiplies the updates: schedulers that
*multiply* the lr (StepLR, LambdaLR, ExponentialLR, ReduceLROnPlateau, CosineAnnealingLR with
``eta_min=0``) act as for torch; those given absolute rates (OneCycleLR, CyclicLR, ``eta_min``)
need the factory form (OneCycleLR is refused at the first step).
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from selfmod.optim.base import GradientTransformation, HParam, HParams, run_closure

Factory = Callable[..., GradientTransformation]

#: torch.optim's state names for the fields of selfmod's transforms (``scale_by_adam``, ``trace``)
TORCH_NAMES = {"mu": "exp_avg", "nu": "exp_avg_sq", "count": "step", "trace": "momentum_buffer"}


def _scalar(key: str, value: Any, name: str) -> float:
    """A param group's hyperparameter as the float the factory checks: a number, or a 1-element
    tensor (which the group keeps, as torch keeps a tensor lr)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {key} must be 1-element (got shape {tuple(value.shape)})")
        return float(value)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(
            f"{key} must be a float or a 1-element tensor to live in the param group (got "
            f"{type(value).__name__}); for per-tensor dicts or learned callables pass a built "
            f"transformation, Optimizer(params, {name}({key}=...))"
        )
    return float(value)


def _reader(key: str) -> Callable[[HParams], Any]:
    """The hyperparameter ``hparams[key]``: how the factory form reads its param group."""
    return lambda hparams: hparams[key]


def _inject(
    factory: Factory, given: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], GradientTransformation]:
    """Split ``factory``'s arguments into group entries (its float ``HParam`` arguments, with
    ``b1``/``b2`` stored as torch's ``betas``) and static ones; returns the group's defaults and
    the static arguments and the transformation that reads those entries from ``hparams``
    by name."""
    name = getattr(factory, "__name__", repr(factory))
    sig = inspect.signature(factory, eval_str=True)
    hp = {n for n, p in sig.parameters.items() if p.annotation is HParam}
    if "lr" not in hp:
        raise TypeError(
            f"{name} has no `lr: HParam` argument to read from the param group; pass a built "
            f"transformation instead, Optimizer(params, {name}(...)), whose updates the "
            f"group's lr (starting at 1.0) multiplies"
        )
    given = dict(given)
    if "betas" in given:
        if not {"b1", "b2"} <= hp:
            raise TypeError(f"{name} takes no b1/b2, so betas= has nowhere to go")
        given["b1"], given["b2"] = given.pop("betas")
    unknown = sorted(set(given) - set(sig.parameters))
    if unknown:
        raise TypeError(f"{name} has no argument(s) {unknown} (has {list(sig.parameters)})")
    values = {
        n: p.default
        for n, p in sig.parameters.items()
        if n in hp and isinstance(p.default, int | float) and not isinstance(p.default, bool)
    }
    checked = {k: _scalar(k, v, name) for k, v in given.items() if k in hp}
    static = {k: v for k, v in given.items() if k not in hp}
    factory(**static, **{**values, **checked})  # its checks: ranges, nesterov needs momentum
    values.update(
        {k: v if isinstance(v, Tensor) else checked[k] for k, v in given.items() if k in hp}
    )
    defaults = dict(values)
    if "b1" in defaults and "b2" in defaults:
        defaults["betas"] = (defaults.pop("b1"), defaults.pop("b2"))
    transform = factory(**static, **{k: _reader(k) for k in values})
    return defaults, static, transform


class Optimizer(torch.optim.Optimizer):
    """``Optimizer(model.named_parameters(), optim.adam, lr=1e-3)`` then the usual loop.

    Behaves as ``torch.optim`` optimizers do: param groups with their own hyperparameters
    (``[{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]``, each group with its own
    functional state), named or plain parameters, complex parameters stepped as real views,
    ``torch.optim.lr_scheduler``, ``torch.amp.GradScaler``, ``zero_grad``, deep copies, and
    ``state_dict()`` / ``load_state_dict()`` in torch's layout (per-parameter state, with their
    hooks), matched by parameter name where both sides have names.

    Differences from ``torch.optim``: a parameter without a ``.grad`` is left alone and keeps
    its state, as in torch, but state shared by its group (a step count) still advances; the
    per-parameter state is the transformation's, under torch's names where its fields have one
    (``optim.adamw``'s loads from and into ``torch.optim.AdamW``; others keep their paths, such
    as ``".log_lr"``); hyperparameters in a group are floats or 1-element tensors (a
    per-tensor dict or learned callable goes into a built transformation); only the
    factory form pickles (a built transformation is a closure); it reads ``.grad`` without a
    host sync, but a transformation may read values on the host (``adamw_hd`` does, once per
    step for its rates); ``foreach``, ``fused``, ``capturable``, ``differentiable`` and
    ``maximize`` are not arguments (they would be the transformation's).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]],
        transform: GradientTransformation | Factory,
        hparams: HParams | None = None,
        **hyperparams: Any,
    ) -> None:
        # the hyperparameters first, as torch checks them before the parameters
        self._recipe: tuple[Factory, dict[str, Any], list[str]] | None = None
        if isinstance(transform, GradientTransformation):
            if hyperparams:
                raise TypeError(
                    f"hyperparameters {sorted(hyperparams)} go with a factory, "
                    f"Optimizer(params, optim.adam, lr=...), not with a built transformation"
                )
            defaults: dict[str, Any] = {"lr": 1.0}
            self.reads_group = False  # group["lr"] multiplies the updates
        elif callable(transform):
            factory = transform
            defaults, static, transform = _inject(factory, hyperparams)
            self._recipe = (factory, static, list(defaults))
            self.reads_group = True  # update() reads every group entry from hparams
            clash = sorted(set(hparams or {}) & {*defaults, "b1", "b2"})
            if clash:
                raise ValueError(
                    f"hparams keys {clash} clash with the param group's hyperparameters; "
                    f"rename them in hparams"
                )
        else:
            raise TypeError(
                "transform must be a GradientTransformation (optim.adam(1e-3)) or a factory "
                f"(optim.adam) (got {type(transform).__name__})"
            )
        self.transform = transform
        self.hparams = hparams
        self.functional_states: list[Any] = []  # one per param group
        self._names: list[list[str]] = []
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, then the group's own hyperparameters checked by the factory and its
        functional state initialised."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if self._recipe is not None:
            factory, static, keys = self._recipe
            values = {}
            for k in keys:
                v = group[k]
                if k == "betas":
                    values["b1"], values["b2"] = (_scalar("betas", b, "betas") for b in v)
                else:
                    values[k] = _scalar(k, v, getattr(factory, "__name__", "the factory"))
            factory(**static, **values)  # its range checks, one line each
        start = sum(len(g) for g in self._names)
        names = group.get("param_names") or [str(start + i) for i in range(len(group["params"]))]
        self._names.append(list(names))
        self.functional_states.append(self.transform.init(self._params(-1)))

    # one group: the attributes selfmod's surgery reads and rewrites
    @property
    def functional_state(self) -> Any:
        return self.functional_states[self._single()]

    @functional_state.setter
    def functional_state(self, value: Any) -> None:
        self.functional_states[self._single()] = value

    @property
    def names(self) -> list[str]:
        return self._names[self._single()]

    @names.setter
    def names(self, value: list[str]) -> None:
        self._names[self._single()] = list(value)
        if "param_names" in self.param_groups[0]:
            self.param_groups[0]["param_names"] = list(value)

    def _single(self) -> int:
        if len(self.param_groups) != 1:
            raise AttributeError(
                f"this optimizer has {len(self.param_groups)} param groups; use "
                f"functional_states[i] (and the names of group i)"
            )
        return 0

    def _params(self, i: int) -> dict[str, Tensor]:
        """Group ``i``'s parameters by name, complex ones as real views."""
        params = self.param_groups[i]["params"]
        return {n: _real(p) for n, p in zip(self._names[i], params, strict=True)}

    def _group_hparams(self, group: dict[str, Any]) -> HParams | None:
        """``hparams`` plus the param group's hyperparameters (``betas`` as ``b1``, ``b2``)."""
        if not self.reads_group:
            return self.hparams
        values = {
            k: v.reshape(()) if isinstance(v, Tensor) else v  # a [1, 1] lr scales as a scalar
            for k, v in group.items()
            if k in self.defaults
        }
        if "betas" in values:
            values["b1"], values["b2"] = values.pop("betas")
        return {**(self.hparams or {}), **values}

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = run_closure(closure)
        for i, group in enumerate(self.param_groups):
            if all(p.grad is None for p in group["params"]):
                continue  # as torch skips parameters without a gradient
            if not self.reads_group and "max_lr" in group:
                raise TypeError(
                    "OneCycleLR sets absolute learning rates, but this optimizer's lr multiplies "
                    "a built transformation's updates; build it from a factory, "
                    "Optimizer(params, optim.adam, lr=...)"
                )
            if any(p.grad is not None and p.grad.is_sparse for p in group["params"]):
                raise RuntimeError(
                    "selfmod.optim.Optimizer does not support sparse gradients; use "
                    "torch.optim.SparseAdam"
                )
            params = self._params(i)
            idle = {
                n for n, p in zip(self._names[i], group["params"], strict=True) if p.grad is None
            }
            grads = {
                n: _real(p.grad) if p.grad is not None else torch.zeros_like(params[n])
                for n, p in zip(self._names[i], group["params"], strict=True)
            }
            before = self.functional_states[i]
            updates, after = self.transform.update(
                grads, before, params, self._group_hparams(group)
            )
            self.functional_states[i] = self._keep(i, before, after, idle) if idle else after
            alpha = 1.0 if self.reads_group else group["lr"]
            for n, p in params.items():
                if n not in idle:
                    p.add_(updates[n], alpha=alpha)
        return loss

    def _keep(self, i: int, before: Any, after: Any, idle: set[str]) -> Any:
        """``after``, with the state of the parameters in ``idle`` (no gradient this step) as it
        was ``before``: torch leaves a parameter without a gradient alone."""
        owners = [owner for _, owner, _ in self._leaves(i, after)]
        old, _ = pytree.tree_flatten(before)
        new, spec = pytree.tree_flatten(after)
        kept = [o if owner in idle else n for o, n, owner in zip(old, new, owners, strict=True)]
        return pytree.tree_unflatten(kept, spec)

    def _leaves(self, i: int, state: Any = None) -> list[tuple[str, str | None, Any]]:
        """Group ``i``'s functional state as ``(key, parameter name or None, leaf)``: a leaf under
        a parameter's name is that parameter's (``"[0].mu"``), any other the group's."""
        names = set(self._names[i])
        out = []
        state = self.functional_states[i] if state is None else state
        for path, leaf in pytree.tree_flatten_with_path(state)[0]:
            owner = next(
                (k.key for k in path if isinstance(k, pytree.MappingKey) and k.key in names), None
            )
            rest = [k for k in path if not (isinstance(k, pytree.MappingKey) and k.key == owner)]
            out.append((pytree.keystr(tuple(rest)), owner, leaf))
        # torch's name for a leaf whose field has one, where no other leaf takes that name
        torch_names = [TORCH_NAMES.get(key.rsplit(".", 1)[-1]) for key, _, _ in out]
        counts = Counter(
            (name, owner) for name, (_, owner, _) in zip(torch_names, out, strict=True)
        )
        return [
            (name if name and counts[name, owner] == 1 else key, owner, leaf)
            for name, (key, owner, leaf) in zip(torch_names, out, strict=True)
        ]

    def state_dict(self) -> dict[str, Any]:
        """torch's layout and hooks: ``{"state": {index: {key: leaf}}, "param_groups": [...]}``,
        the keys being torch's names where a field has one (``exp_avg``, ``exp_avg_sq``, ``step``,
        ``momentum_buffer``), else paths in the transformation's state; a leaf shared by the
        group (a step count) is in each of its parameters' entries."""
        for i, group in enumerate(self.param_groups):
            leaves = self._leaves(i)
            shared = {key: leaf for key, owner, leaf in leaves if owner is None}
            for name, p in zip(self._names[i], group["params"], strict=True):
                own = {key: leaf for key, owner, leaf in leaves if owner == name}
                self.state[p] = {**own, **shared}
        try:
            return super().state_dict()
        finally:
            self.state.clear()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's (hooks run, tensors cast to each parameter's device and dtype), matched by
        parameter name where both have names, then the functional states rebuilt from it."""
        if "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError(
                f"not an optimizer state_dict (keys {sorted(state_dict)}); save it with this "
                f"optimizer's state_dict()"
            )
        state_dict = _by_name(state_dict, self._names)
        super().load_state_dict(state_dict)
        try:
            for i, group in enumerate(self.param_groups):
                by_name = dict(zip(self._names[i], group["params"], strict=True))
                first = self.state.get(group["params"][0], {})
                restored = []
                for key, owner, like in self._leaves(i):
                    entry = self.state.get(by_name[owner], {}) if owner else first
                    if key not in entry:
                        raise ValueError(
                            f"state_dict is from another transformation: no state {key!r} for "
                            f"parameter {owner or self._names[i][0]!r} (has {sorted(entry)})"
                        )
                    value = entry[key]
                    if isinstance(like, Tensor):
                        if value.shape != like.shape:
                            raise ValueError(
                                f"state {key} of {owner!r} has shape {tuple(value.shape)}, "
                                f"expected {tuple(like.shape)}"
                            )
                        value = value.to(device=like.device, dtype=like.dtype, copy=True)
                    elif isinstance(like, int) and not isinstance(like, bool):
                        value = int(value)  # torch's step count, a float32 tensor
                    restored.append(value)
                spec = pytree.tree_structure(self.functional_states[i])
                self.functional_states[i] = pytree.tree_unflatten(restored, spec)
        finally:
            self.state.clear()

    def __getstate__(self) -> dict[str, Any]:
        """torch's (defaults, state, groups) plus the functional states; the factory form
        rebuilds its transformation on unpickling, a built one is kept as is (deep copies)."""
        keep = ("hparams", "reads_group", "functional_states", "_names", "_recipe")
        extra = {k: self.__dict__[k] for k in keep}
        if self._recipe is None:
            extra["transform"] = self.transform
        return {**super().__getstate__(), **extra}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if self._recipe is not None:
            factory, static, keys = self._recipe
            values = {"b1": 0.0, "b2": 0.0} if "betas" in keys else {}
            values.update({k: 0.0 for k in keys if k != "betas"})
            self.transform = factory(**static, **{k: _reader(k) for k in values})


def _real(t: Tensor) -> Tensor:
    """Complex tensors as real views ``(..., 2)``, as torch's optimizers step them."""
    return torch.view_as_real(t) if t.is_complex() else t


def _by_name(state_dict: dict[str, Any], names: list[list[str]]) -> dict[str, Any]:
    """``state_dict`` with each saved group's parameters put in this optimizer's order, when
    both name them the same (torch itself matches by position)."""
    groups = []
    for saved, ours in zip(state_dict.get("param_groups", []), names, strict=False):
        saved_names = saved.get("param_names")
        if saved_names and list(saved_names) != ours and sorted(saved_names) == sorted(ours):
            index = dict(zip(saved_names, saved["params"], strict=True))
            saved = {**saved, "params": [index[n] for n in ours], "param_names": list(ours)}
        elif saved_names and sorted(saved_names) != sorted(ours):
            raise ValueError(
                "state_dict parameter names do not match this optimizer's: missing "
                f"{sorted(set(ours) - set(saved_names))}, unexpected "
                f"{sorted(set(saved_names) - set(ours))}"
            )
        groups.append(saved)
    if not groups:
        return state_dict
    return {**state_dict, "param_groups": groups}


__all__ = ["Optimizer"]
