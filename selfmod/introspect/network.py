"""The network an :class:`~selfmod.introspect.Introspector` trains, as pure functions of a params
dict: an MLP or a 1-D CNN whose hidden layers (units or channels) can be grown and pruned.

Both name their tensors as an ``nn.Sequential`` of (layer, ReLU) pairs and a head:
``"{2i}.weight"``, ``"{2i}.bias"`` for hidden layer ``i < depth``, ``"{2 depth}.weight"`` for the
head, so hyperparameters, surgery and checkpoints address them alike.

- ``mlp``: ``x (B, D) -> Linear(W) -> ReLU -> ... -> Linear(C)``.
- ``cnn``: ``x (B, L)`` read as one channel ``(B, 1, L)`` ``-> Conv1d(W, k, stride s,
  padding k // 2) -> ReLU -> ...`` (length ``L_{i+1} = floor((L_i - 1) / s) + 1``) ``->
  flatten (B, W L_depth) -> Linear(C)``. A unit is a channel: its fan-out into the head is
  ``L_depth`` consecutive columns (``Slot(repeat=L_depth)``).

Dropout is concrete dropout per unit (per channel in the CNN, the same mask along the length).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfmod import arch
from selfmod.arch.dropout import concrete_dropout
from selfmod.models import mlp

Params = dict[str, Tensor]


class FlatLinear(nn.Linear):
    """``nn.Linear`` on the flattened input ``(B, *) -> (B, n_out)``: the CNN's head."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.flatten(1))


@dataclass(frozen=True)
class Network:
    """An MLP (``kind="mlp"``) or 1-D CNN (``kind="cnn"``) with ``depth`` hidden layers on
    inputs of ``num_features`` values and ``num_classes`` outputs."""

    kind: Literal["mlp", "cnn"]
    depth: int
    num_features: int
    num_classes: int = 10
    kernel_size: int = 5
    stride: int = 2

    def lengths(self) -> list[int]:
        """CNN: the sequence length after each conv layer (``depth`` entries)."""
        out, n = [], self.num_features
        for _ in range(self.depth):
            n = (n - 1) // self.stride + 1
            out.append(n)
        return out

    def module(self, widths: list[int]) -> nn.Sequential:
        """The ``nn.Sequential`` these params belong to (its initialisation and cost)."""
        if self.kind == "mlp":
            return mlp([self.num_features, *widths, self.num_classes])
        layers: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise([1, *widths]):
            conv = nn.Conv1d(c_in, c_out, self.kernel_size, self.stride, self.kernel_size // 2)
            layers += [conv, nn.ReLU()]
        layers.append(FlatLinear(widths[-1] * self.lengths()[-1], self.num_classes))
        return nn.Sequential(*layers)

    def init(self, width: int) -> Params:
        """PyTorch's default initialisation of :meth:`module` with ``width`` per hidden layer."""
        return {
            k: v.detach().clone() for k, v in self.module([width] * self.depth).named_parameters()
        }

    def cost(self, params: Params) -> arch.Cost:
        with torch.random.fork_rng():  # building the module must not consume the run's RNG
            module = self.module(self.widths(params))
        return arch.cost(module, self.input_shape, params)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.num_features,) if self.kind == "mlp" else (1, self.num_features)

    def widths(self, params: Params) -> list[int]:
        return [params[f"{2 * i}.weight"].shape[0] for i in range(self.depth)]

    def _layer(self, params: Params, h: Tensor, i: int) -> Tensor:
        w, b = params[f"{2 * i}.weight"], params[f"{2 * i}.bias"]
        if self.kind == "mlp":
            return torch.relu(F.linear(h, w, b))  # (B, W)
        return torch.relu(F.conv1d(h, w, b, self.stride, self.kernel_size // 2))  # (B, W, L_i)

    def _input(self, x: Tensor) -> Tensor:
        return x if self.kind == "mlp" else x.unsqueeze(1)

    def apply(
        self, params: Params, x: Tensor, p: Tensor | None = None, noise: Tensor | None = None
    ) -> Tensor:
        """``x (B, D) -> logits (B, C)``; with ``p (depth,)`` and ``noise (depth, B, >=W)``,
        concrete dropout after every hidden ReLU."""
        h = self._input(x)
        for i in range(self.depth):
            h = self._layer(params, h, i)
            if p is not None and noise is not None:
                h = concrete_dropout(h, p[i], noise[i, : h.shape[0], : h.shape[1]])
        d = 2 * self.depth
        return F.linear(h.flatten(1), params[f"{d}.weight"], params[f"{d}.bias"])

    def active_units(self, params: Params, x: Tensor) -> list[int]:
        """Per hidden layer, how many units are positive for at least one row of ``x (B, D)``
        (anywhere along the length for a channel; no dropout). A layer with none makes the
        output constant."""
        h, out = self._input(x), []
        with torch.no_grad():
            for i in range(self.depth):
                h = self._layer(params, h, i)
                alive = (h > 0).flatten(2).any(2) if h.dim() > 2 else h > 0  # (B, W)
                out.append(int(alive.any(0).sum()))
        return out

    def group(self, i: int) -> arch.UnitGroup:
        """Hidden layer ``i``'s units: rows of ``2i.weight`` and ``2i.bias``, and their fan-out
        in ``(2i+2).weight`` (columns; a CNN's channel into the head owns ``L_depth``)."""
        repeat = self.lengths()[-1] if self.kind == "cnn" and i == self.depth - 1 else 1
        return arch.UnitGroup(
            (arch.Slot(f"{2 * i}.weight", 0), arch.Slot(f"{2 * i}.bias", 0)),
            (arch.Slot(f"{2 * i + 2}.weight", 1, repeat),),
        )

    def fan_in(self, params: Params, i: int) -> int:
        """Inputs to one unit of hidden layer ``i`` (``C_in k`` for a channel)."""
        w = params[f"{2 * i}.weight"]
        return w[0].numel()

    def saliency(self, params: Params, i: int) -> Tensor:
        """``(W,)``: ``||W_in[j]|| ||W_out[j]||`` per unit of hidden layer ``i``."""
        w_in = params[f"{2 * i}.weight"]  # (W, n_in) or (W, C_in, k)
        w_out = params[f"{2 * i + 2}.weight"]  # (n_out, W * repeat) or (W_next, W, k)
        if self.kind == "mlp":
            return w_in.norm(dim=1) * w_out.norm(dim=0)
        width = w_in.shape[0]
        # per unit: its slice of W_out, (W_next, k) or, into the head, (C, L_depth)
        fan_out = w_out.reshape(w_out.shape[0], width, -1).transpose(0, 1).reshape(width, -1)
        return w_in.reshape(width, -1).norm(dim=1) * fan_out.norm(dim=1)
