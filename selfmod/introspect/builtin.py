"""The built-in problem of ``selfmod train``: an MLP or 1-D CNN (``model = "mlp" | "cnn"``) on
MNIST-1D or scikit-learn's digits, from a deliberately poor start, with a
:class:`~selfmod.arch.dropout.ConcreteDropout` site after every hidden ReLU.

The networks are ordinary ``nn.Sequential`` modules whose tensors keep the names of
:class:`~selfmod.introspect.network.Network` (``"{2i}.weight"`` for hidden layer ``i``,
``"{2 depth}.weight"`` for the head); :class:`Introspector` is the :class:`~.loop.Loop` over
them.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selfmod.arch.dropout import ConcreteDropout
from selfmod.arch.gates import HardConcreteGate
from selfmod.arch.lowrank import FactorableLinear
from selfmod.data import Split, as_batches, hold_out, load_digits, load_mnist1d
from selfmod.introspect.loop import Loop, Recorder, Source
from selfmod.introspect.network import Network
from selfmod.introspect.problem import Problem


def builtin_module(
    kind: str,
    depth: int,
    num_features: int,
    width: int,
    num_classes: int = 10,
    gates: bool = False,
    factorable: bool = False,
) -> nn.Sequential:
    """``Linear(W) -> ReLU -> ConcreteDropout -> ... -> Linear(C)`` (``cnn``: the signal as one
    channel, ``Conv1d`` layers of ``W`` channels, kernel 5, stride 2, then ``Flatten`` and the
    head); PyTorch's default initialisation, drawn in the order of :meth:`Network.module`.
    ``gates``: a :class:`~selfmod.arch.HardConcreteGate` (``"gate{i}"``) after every dropout
    site, for L0 pruning (their initialisation draws no random numbers). ``factorable``: the
    MLP's hidden-to-hidden layers are :class:`~selfmod.arch.lowrank.FactorableLinear` (the same
    function and random draws), for the ``factorize`` modifier."""
    net = Network(kind, depth, num_features, num_classes)  # type: ignore[arg-type]
    cnn = kind == "cnn"
    # a CNN reads the signal (B, L) as one channel (B, 1, L)
    layers: list[tuple[str, nn.Module]] = (
        [("input", nn.Unflatten(1, (1, num_features)))] if cnn else []
    )
    sizes = [1 if cnn else num_features, *[width] * depth]
    for i, (d_in, d_out) in enumerate(itertools.pairwise(sizes)):
        layer = (
            nn.Conv1d(d_in, d_out, net.kernel_size, net.stride, net.kernel_size // 2)
            if cnn
            else FactorableLinear(d_in, d_out)
            if factorable and i > 0
            else nn.Linear(d_in, d_out)
        )
        layers += [
            (f"{2 * i}", layer),
            (f"{2 * i + 1}", nn.ReLU()),
            (f"drop{i}", ConcreteDropout()),
        ]
        if gates:
            layers.append((f"gate{i}", HardConcreteGate(d_out)))
    if cnn:
        layers.append(("flatten", nn.Flatten()))
    n_in = width * (net.lengths()[-1] if cnn else 1)
    layers.append((f"{2 * depth}", nn.Linear(n_in, num_classes)))
    return nn.Sequential(OrderedDict(layers))


def uses_gates(cfg: Any) -> bool:
    """Whether the built-in model gets L0 gates: pruning is on (named or by default) and by
    ``prune_rule = "l0"``."""
    return "prune" in cfg.chosen() and cfg.settings_of("prune").prune_rule == "l0"


def uses_factorable(cfg: Any) -> bool:
    """Whether the built-in MLP gets factorable hidden-to-hidden layers: the run has the
    ``factorize`` modifier (named, or on by default when the run names none)."""
    return cfg.model == "mlp" and "factorize" in cfg.chosen()


def builtin_splits(cfg: Any) -> list[Split]:
    """``data = "mnist1d"``: MNIST-1D; with ``shift_step`` a second source with more noise and
    translation. ``data = "digits"``: scikit-learn's 8x8 digits."""
    if cfg.data == "digits":
        return [hold_out(load_digits(seed=cfg.seed), cfg.guard_size, cfg.seed)]
    out = [hold_out(load_mnist1d(seed=42), cfg.guard_size, cfg.seed)]
    if cfg.shift_step:
        shifted = load_mnist1d(
            seed=43, noise_scale=cfg.shift_noise, max_translation=cfg.shift_translation
        )
        out.append(hold_out(shifted, cfg.guard_size, cfg.seed + 1))
    return out


def sources_of(splits: Sequence[Split], seed: int) -> list[Source]:
    """Loop sources over splits: source ``s`` streams its pool with ``Stream(seed, n, s)``."""
    return [
        Source(as_batches((s.x, s.y), seed, i), s.guard_x, s.guard_y, s.x_test, s.y_test)
        for i, s in enumerate(splits)
    ]


class Introspector(Loop):
    """The built-in run: ``cfg.model`` (an MLP or 1-D CNN) on ``splits`` (default
    :func:`builtin_splits`)."""

    def __init__(
        self,
        cfg: Any,
        *,
        splits: Sequence[Split] | None = None,
        tune: bool = True,
        lrs: Sequence[float] | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        splits = list(splits) if splits is not None else builtin_splits(cfg)
        torch.manual_seed(cfg.seed)  # the initial weights, as before the loop seeds the rest
        x = splits[0].x
        gates = tune and uses_gates(cfg)  # the fixed baseline is the plain network
        module = builtin_module(
            cfg.model, cfg.depth, x.shape[1], cfg.width, gates=gates,
            factorable=tune and uses_factorable(cfg),
        )  # fmt: skip
        super().__init__(
            Problem(module, F.cross_entropy),
            sources_of(splits, cfg.seed),
            cfg,
            tune=tune,
            lrs=lrs,
            recorder=recorder,
        )
