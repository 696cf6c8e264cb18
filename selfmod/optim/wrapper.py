"""A ``torch.optim.Optimizer`` that runs any selfmod transformation on an ``nn.Module``.

It holds no maths: ``step()`` reads ``.grad``, calls the pure ``update`` and adds the updates
in place. The functional state lives in ``self.functional_state``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from selfmod.optim.base import GradientTransformation, HParams


class Optimizer(torch.optim.Optimizer):
    """``Optimizer(model.named_parameters(), optim.adam(1e-3))`` then the usual loop.

    Pass named parameters so that per-tensor hyperparameters (dicts keyed by name) line up;
    plain parameters are named ``"0"``, ``"1"``, ... A parameter whose ``.grad`` is ``None``
    gets a zero gradient (stateful transforms still decay their state), unlike ``torch.optim``,
    which skips it.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[tuple[str, Tensor]],
        transform: GradientTransformation,
        hparams: HParams | None = None,
    ) -> None:
        items = list(params)
        if not items:
            raise ValueError("optimizer got an empty parameter list")
        if isinstance(items[0], tuple):
            names, tensors = [n for n, _ in items], [t for _, t in items]
        else:
            names, tensors = [str(i) for i in range(len(items))], items
        super().__init__(tensors, {})
        self.transform = transform
        self.hparams = hparams
        self.names = names
        self.functional_state = transform.init(self._params())

    def _params(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.param_groups[0]["params"], strict=True))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params()
        grads = {
            k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in params.items()
        }
        updates, self.functional_state = self.transform.update(
            grads, self.functional_state, params, self.hparams
        )
        for k, p in params.items():
            p.add_(updates[k])
        return loss

    def state_dict(self) -> dict[str, Any]:
        leaves, _ = pytree.tree_flatten(self.functional_state)
        return {"names": list(self.names), "leaves": leaves}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if list(state_dict["names"]) != self.names:
            raise ValueError("state_dict names do not match this optimizer's parameters")
        _, spec = pytree.tree_flatten(self.functional_state)
        self.functional_state = pytree.tree_unflatten(list(state_dict["leaves"]), spec)
