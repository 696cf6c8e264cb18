"""A ``torch.optim.Optimizer`` that runs any selfmod transformation on an ``nn.Module``.

It holds no maths: ``step()`` reads ``.grad``, calls the pure ``update`` and adds the updates
in place. The functional state lives in ``self.functional_state``. Two ways to build it:

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
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from selfmod.optim.base import GradientTransformation, HParam, HParams, run_closure

Factory = Callable[..., GradientTransformation]


def _reader(key: str) -> Callable[[HParams], Any]:
    """The hyperparameter ``hparams[key]``: how the factory form reads its param group."""
    return lambda hparams: hparams[key]


def _inject(
    factory: Factory, given: dict[str, Any]
) -> tuple[dict[str, Any], GradientTransformation]:
    """Split ``factory``'s arguments into group entries (its float ``HParam`` arguments, with
    ``b1``/``b2`` stored as torch's ``betas``) and static ones; returns the group's defaults and
    the transformation that reads those entries from ``hparams`` by name."""
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
    for k, v in given.items():
        if k in hp and (not isinstance(v, int | float) or isinstance(v, bool)):
            raise TypeError(
                f"{k} must be a float to live in the param group (got {type(v).__name__}); "
                f"for tensors or learned callables pass a built transformation, "
                f"Optimizer(params, {name}({k}=...))"
            )
    values.update({k: float(v) for k, v in given.items() if k in hp})
    static = {k: v for k, v in given.items() if k not in hp}
    factory(**static, **values)  # validates the floats (ranges, nesterov needs momentum, ...)
    defaults = dict(values)
    if "b1" in defaults and "b2" in defaults:
        defaults["betas"] = (defaults.pop("b1"), defaults.pop("b2"))
    transform = factory(**static, **{k: _reader(k) for k in values})
    return defaults, transform


class Optimizer(torch.optim.Optimizer):
    """``Optimizer(model.named_parameters(), optim.adam, lr=1e-3)`` then the usual loop.

    Works with ``torch.optim.lr_scheduler``, ``state_dict()``/``load_state_dict()`` (state by
    parameter name), ``torch.amp.GradScaler`` and ``zero_grad(set_to_none=True)``; holds one
    param group (use per-tensor dict hyperparameters or one optimizer per group).

    Pass named parameters so that per-tensor hyperparameters (dicts keyed by name) line up;
    plain parameters are named ``"0"``, ``"1"``, ... A parameter whose ``.grad`` is ``None``
    gets a zero gradient (stateful transforms still decay their state), unlike ``torch.optim``,
    which skips it.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[tuple[str, Tensor]],
        transform: GradientTransformation | Factory,
        hparams: HParams | None = None,
        **hyperparams: Any,
    ) -> None:
        items = list(params)
        if not items:
            raise ValueError("optimizer got an empty parameter list")
        if isinstance(items[0], Mapping):
            raise TypeError(
                "selfmod.optim.Optimizer takes one parameter list, not param group dicts; give "
                "per-tensor hyperparameters as dicts keyed by parameter name, or use one "
                "optimizer per group"
            )
        if isinstance(items[0], tuple):
            names, tensors = [n for n, _ in items], [t for _, t in items]
        else:
            names, tensors = [str(i) for i in range(len(items))], items
        if isinstance(transform, GradientTransformation):
            if hyperparams:
                raise TypeError(
                    f"hyperparameters {sorted(hyperparams)} go with a factory, "
                    f"Optimizer(params, optim.adam, lr=...), not with a built transformation"
                )
            defaults: dict[str, Any] = {"lr": 1.0}
            self.reads_group = False  # group["lr"] multiplies the updates
        elif callable(transform):
            defaults, transform = _inject(transform, hyperparams)
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
        super().__init__(tensors, defaults)
        self.transform = transform
        self.hparams = hparams
        self.names = names
        self.functional_state = transform.init(self._params())

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.param_groups:
            raise ValueError(
                "selfmod.optim.Optimizer holds one param group (add_param_group got a second); "
                "give per-tensor hyperparameters as dicts keyed by parameter name, or use one "
                "optimizer per group"
            )
        super().add_param_group(param_group)

    def _params(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.param_groups[0]["params"], strict=True))

    def _group_hparams(self) -> HParams | None:
        """``hparams`` plus the param group's hyperparameters (``betas`` as ``b1``, ``b2``)."""
        if not self.reads_group:
            return self.hparams
        group = {k: v for k, v in self.param_groups[0].items() if k in self.defaults}
        if "betas" in group:
            group["b1"], group["b2"] = group.pop("betas")
        return {**(self.hparams or {}), **group}

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = run_closure(closure)
        params = self._params()
        grads = {
            k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in params.items()
        }
        updates, self.functional_state = self.transform.update(
            grads, self.functional_state, params, self._group_hparams()
        )
        group = self.param_groups[0]
        if not self.reads_group and "max_lr" in group:
            raise TypeError(
                "OneCycleLR sets absolute learning rates, but this optimizer's lr multiplies a "
                "built transformation's updates; build it from a factory, "
                "Optimizer(params, optim.adam, lr=...)"
            )
        alpha = 1.0 if self.reads_group else group["lr"]
        for k, p in params.items():
            p.add_(updates[k], alpha=alpha)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """``{"state": {path: leaf}, "param_groups": [group with "params" as names]}``; paths
        such as ``"[0].mu['fc.weight']"`` name each parameter, so loading never relies on order."""
        leaves, _ = pytree.tree_flatten_with_path(self.functional_state)
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return {
            "state": {pytree.keystr(path): leaf for path, leaf in leaves},
            "param_groups": [{**group, "params": list(self.names)}],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the functional state (matched by path, cast to this optimizer's devices and
        dtypes) and the group's hyperparameters (a scheduler's current ``lr``, ...)."""
        if "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError(
                f"not a selfmod.optim.Optimizer state_dict (keys {sorted(state_dict)}); "
                f"save it with this optimizer's state_dict()"
            )
        (saved_group,) = state_dict["param_groups"]
        if set(saved_group["params"]) != set(self.names):
            raise ValueError(
                "state_dict parameter names do not match this optimizer's: missing "
                f"{sorted(set(self.names) - set(saved_group['params']))}, unexpected "
                f"{sorted(set(saved_group['params']) - set(self.names))}"
            )
        leaves, spec = pytree.tree_flatten_with_path(self.functional_state)
        saved = state_dict["state"]
        paths = [pytree.keystr(path) for path, _ in leaves]
        if set(paths) != set(saved):
            raise ValueError(
                "state_dict is from another transformation: missing state "
                f"{sorted(set(paths) - set(saved))[:5]}, unexpected "
                f"{sorted(set(saved) - set(paths))[:5]}"
            )
        restored = []
        for path, (_, like) in zip(paths, leaves, strict=True):
            value = saved[path]
            if isinstance(like, Tensor):
                if value.shape != like.shape:
                    raise ValueError(
                        f"state {path} has shape {tuple(value.shape)}, expected {tuple(like.shape)}"
                    )
                value = value.to(device=like.device, dtype=like.dtype, copy=True)
            restored.append(value)
        self.functional_state = pytree.tree_unflatten(restored, spec)
        self.param_groups[0].update({k: v for k, v in saved_group.items() if k != "params"})


__all__ = ["Optimizer"]
