"""What a self-modifying run trains: any ``nn.Module`` as a pure function of its parameters and
buffers, a loss ``(output, target) -> scalar``, a metric, and where the architecture can change.

    problem = Problem(model, F.cross_entropy)              # classification: accuracy reported
    problem = Problem(model, F.mse_loss, metric="loss")    # regression: the loss is the metric
    out, buffers = problem.forward(params, buffers, x, train=True, rates=p, noise=u)

Units that can grow and be pruned are :class:`selfmod.arch.UnitGroup`\\ s, found by
:func:`selfmod.arch.sequential_groups` for an ``nn.Sequential`` of supported layers or given as
``groups=``. Learnable dropout sites are the model's
:class:`~selfmod.arch.dropout.ConcreteDropout` modules; their rates and noise go in by name.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from selfmod import arch
from selfmod.arch.dropout import ConcreteDropout
from selfmod.arch.surgery import sync_sizes
from selfmod.models import FunctionalModel, eval_mode

Params = dict[str, Tensor]
Loss = Callable[[Any, Tensor], Tensor]

#: guard and test sets are evaluated in chunks: a first of ``EVAL_FIRST`` examples, then chunks
#: of about ``EVAL_OUTPUT`` output elements (at least ``EVAL_FIRST`` examples): a token model's
#: logits are wide, so its chunks are short and an evaluation's activations stay near a step's
EVAL_FIRST = 64
EVAL_OUTPUT = 2**20


def _widened(out: Any, params: Params) -> Any:
    """An autocast forward's floating-point output tensors in the parameters' dtype: the loss
    and the metrics are computed in it, not in bfloat16."""
    dtype = next(iter(params.values())).dtype if params else torch.float32
    return torch.utils._pytree.tree_map(
        lambda t: t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t, out
    )


class Problem:
    """A model, its loss and metric, and the structure the modifiers need.

    ``metric``: ``"accuracy"`` (``argmax(-1) == target``; needs integer targets) or ``"loss"``
    (regression, language modelling: lower is better). ``groups``: the unit groups of the hidden
    layers (default: :func:`selfmod.arch.sequential_groups` where it applies, else none: growth
    and pruning then do not apply).
    """

    def __init__(
        self,
        module: nn.Module,
        loss: Loss,
        *,
        metric: Literal["accuracy", "loss"] = "accuracy",
        groups: Sequence[arch.UnitGroup] | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (got {type(module).__name__})")
        if metric not in ("accuracy", "loss"):
            raise ValueError(f"metric must be 'accuracy' or 'loss' (got {metric!r})")
        self.module, self.loss, self.metric = module, loss, metric
        self.model = FunctionalModel(module)
        #: the forward's autocast dtype (``config.autocast``, set by the run), else ``None``
        self.autocast: torch.dtype | None = None
        self.dropout_sites = [
            n for n, m in module.named_modules() if isinstance(m, ConcreteDropout)
        ]
        self.gate_sites = [
            n for n, m in module.named_modules() if isinstance(m, arch.HardConcreteGate)
        ]
        self.groups_error: str | None = None
        if groups is not None:
            self.groups = list(groups)
        else:
            self.groups, self.groups_error = _find_groups(module)

    def init(self) -> tuple[Params, Params]:
        """Copies of the module's parameters and persistent buffers."""
        return self.model.init()

    def forward(
        self,
        params: Params,
        buffers: Params,
        x: Tensor,
        *,
        train: bool,
        update_buffers: bool = False,
        rates: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> tuple[Any, Params]:
        """``(output, buffers)``; with ``rates (S,)`` and ``noise (S, B, >=W)``, concrete
        dropout at the S dropout sites (training mode only)."""
        extra = None
        if rates is not None and noise is not None and self.dropout_sites:
            extra = {}
            for i, site in enumerate(self.dropout_sites):
                extra[f"{site}.rate"] = rates[i]
                extra[f"{site}.noise"] = noise[i]
        if self.autocast is None:
            return self.model(
                params, buffers, x, train=train, update_buffers=update_buffers, extra=extra
            )
        kind = next(iter(params.values())).device.type if params else "cpu"
        with torch.autocast(kind, dtype=self.autocast):
            out, new = self.model(
                params, buffers, x, train=train, update_buffers=update_buffers, extra=extra
            )
        return _widened(out, params), new

    def predict(self, params: Params, buffers: Params, x: Tensor) -> Any:
        """Eval-mode output (no dropout, running statistics), in chunks sized by the first's
        output (``EVAL_FIRST``, ``EVAL_OUTPUT``), without grad."""
        with torch.no_grad():
            head = self.forward(params, buffers, x[:EVAL_FIRST], train=False)[0]
            if len(x) <= EVAL_FIRST:
                return head
            if not isinstance(head, Tensor):  # a structured output cannot be joined: one pass
                return self.forward(params, buffers, x, train=False)[0]
            rows = max(EVAL_FIRST, EVAL_OUTPUT * len(head) // max(head.numel(), 1))
            outs = [head] + [
                self.forward(params, buffers, x[i : i + rows], train=False)[0]
                for i in range(EVAL_FIRST, len(x), rows)
            ]
            return torch.cat(outs)

    def evaluate(
        self, params: Params, buffers: Params, x: Tensor, y: Tensor
    ) -> tuple[float, float]:
        """``(loss, metric)`` on ``x (n, ...)``, ``y (n, ...)``; NaN for an empty set."""
        if len(y) == 0:
            return math.nan, math.nan
        return self.score(self.predict(params, buffers, x), y)

    def score(self, out: Any, y: Tensor) -> tuple[float, float]:
        """``(loss, metric)`` of outputs ``out`` (:meth:`predict`'s) against ``y``."""
        with torch.no_grad():
            loss = float(self.loss(out, y))
            if self.metric == "loss":
                return loss, loss
            return loss, float((out.argmax(-1) == y).float().mean())

    def cost(self, params: Params, example: Tensor | Sequence[int]) -> arch.Cost:
        """Parameters, FLOPs and activation bytes per example at ``params`` (eval mode), on
        ``example`` (a real batch of one: integer inputs such as token ids work) or a shape."""
        with eval_mode(self.module):
            chosen = arch.choice.committed_from_params(self.module, params)
            return arch.cost(self.module, example, params, chosen)

    def export(self, params: Params, buffers: Params) -> nn.Module:
        r"""A copy of the module holding ``params`` and ``buffers`` (in their current shapes:
        grown or pruned layers get new ``nn.Parameter``\ s and sizes), in eval mode: a trained
        model, ready to predict (call ``.train()`` to train it further); a committed
        :class:`~selfmod.arch.Choice` is replaced by its chosen option."""
        model = write_into(copy.deepcopy(self.module), params, buffers)
        return arch.resolve(model).eval()  # a committed Choice: its chosen option

    def layer_signals(
        self, params: Params, buffers: Params, x: Tensor, y: Tensor
    ) -> dict[str, arch.LayerSignals]:
        """Every ``nn.Linear``'s input, output gradient and weight gradient on ``(x, y)`` in
        eval mode (:func:`selfmod.arch.linear_signals`), by module name."""
        with eval_mode(self.module), torch.enable_grad():
            return arch.linear_signals(
                self.module, {**params, **buffers}, lambda out: self.loss(out, y), x
            )

    def gate_keys(self) -> list[str | None]:
        """Per unit group, the key of its :class:`~selfmod.arch.HardConcreteGate`'s
        ``log_alpha`` (``None``: the group has no gate)."""
        gates = {f"{n}.log_alpha" for n in self.gate_sites}
        return [next((s.key for s in g.producers if s.key in gates), None) for g in self.groups]

    def expected_gated_params(self, params: Params) -> Tensor:
        """``sum_g c_g sum_j P(z_gj != 0)``: the gated groups' expected parameters, with
        ``c_g`` the parameters of one unit of group ``g`` (its fan-in, bias, gate and fan-out
        slices; a weight between two gated groups counts in both), differentiable in the
        gates' ``log_alpha``. A 0-dim tensor (0 without gates)."""
        total = torch.zeros(())
        for group, key in zip(self.groups, self.gate_keys(), strict=True):
            if key is None:
                continue
            w = group.width(params)
            per_unit = sum(params[s.key].numel() for s in group.slots()) // w
            total = total + per_unit * arch.expected_l0(params[key])
        return total

    def widths(self, params: Params) -> list[int]:
        """Units per unit group (hidden layer)."""
        return [g.width(params) for g in self.groups]

    def saliency(self, params: Params, i: int) -> Tensor:
        """``(W,)``: ``||fan-in_j|| ||fan-out_j||`` per unit of group ``i`` (its first producer
        slot and its consumer slots)."""
        g = self.groups[i]
        w = g.width(params)
        # the first producer that holds the fan-in (a factored layer's emptied weight does not)
        first = next((s for s in g.producers if params[s.key].numel()), g.producers[0])
        fan_in = params[first.key].movedim(first.dim, 0).reshape(w, -1).norm(dim=1)
        fan_out = torch.cat(
            [params[s.key].movedim(s.dim, 0).reshape(w, -1) for s in g.consumers], dim=1
        ).norm(dim=1)
        return fan_in * fan_out


def default_metric(y: Tensor, metric: str | None = None) -> Literal["accuracy", "loss"]:
    """``metric`` if given (not ``None`` or ``"auto"``), else ``"accuracy"`` for integer
    targets ``y`` and ``"loss"`` for real-valued ones (regression)."""
    if metric not in (None, "auto"):
        return metric  # type: ignore[return-value]
    return "loss" if y.is_floating_point() or y.is_complex() else "accuracy"


def _find_groups(module: nn.Module) -> tuple[list[arch.UnitGroup], str | None]:
    """``(groups, why none)``: :func:`selfmod.arch.sequential_groups` where it applies."""
    if not isinstance(module, nn.Sequential):
        return [], (
            f"{type(module).__name__} is not an nn.Sequential; pass groups= "
            "(selfmod.arch.UnitGroup) to grow or prune it"
        )
    try:
        groups = arch.sequential_groups(module)
    except (TypeError, ValueError) as err:
        return [], f"{err}; pass groups= to grow or prune it"
    if not groups:
        return [], "the model has no hidden layer to grow or prune"
    return groups, None


def write_into(module: nn.Module, params: Params, buffers: Params) -> nn.Module:
    r"""``module`` holding ``params`` and ``buffers``, in place: a tensor of the same shape is
    copied into the existing ``nn.Parameter`` (an optimizer holding it keeps working); a grown
    or pruned one becomes a new ``nn.Parameter`` and the layer's sizes follow. Returns it."""
    for key, value in {**params, **buffers}.items():
        owner, _, attr = key.rpartition(".")
        mod = module.get_submodule(owner)
        old = getattr(mod, attr, None)
        if isinstance(old, Tensor) and old.shape == value.shape and old.dtype == value.dtype:
            with torch.no_grad():
                old.copy_(value)
        elif key in params:
            setattr(mod, attr, nn.Parameter(value.detach().clone()))
        else:
            mod.register_buffer(attr, value.detach().clone())
        sync_sizes(mod)
    return module
