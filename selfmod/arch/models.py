"""Small self-modifying models: gated MLPs and gated CNNs as ``nn.Sequential`` so that
:func:`~selfmod.arch.surgery.sequential_groups` finds their unit groups."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from torch import Tensor, nn

from selfmod.arch.gates import HardConcreteGate


class GrowReLU(nn.Module):
    """``max(x, 0)`` with derivative 1 at 0 (``clamp_min``), unlike ``nn.ReLU`` (0 at 0).

    GradMax adds units with zero fan-in, whose pre-activations are exactly 0; with ``f'(0) = 1``
    their fan-in weights receive the gradient ``(W_out^T delta) x^T`` and start learning.
    References: Evci et al. 2022 (the derivation assumes ``f'(0) = 1``).
    """

    def forward(self, x: Tensor) -> Tensor:
        return x.clamp_min(0.0)


def gated_mlp(
    sizes: Sequence[int],
    gate: type[nn.Module] | None = HardConcreteGate,
    activation: type[nn.Module] = nn.ReLU,
    **gate_kwargs,
) -> nn.Sequential:
    """``Linear -> act -> gate -> ... -> Linear``; ``gate=None`` gives a plain MLP whose
    hidden layers can still be grown or pruned by surgery."""
    if len(sizes) < 2:
        raise ValueError(f"sizes needs at least 2 entries (got {list(sizes)})")
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(sizes) - 2:
            layers.append(activation())
            if gate is not None:
                layers.append(gate(d_out, **gate_kwargs))
    return nn.Sequential(*layers)


def gated_cnn1d(
    length: int,
    channels: Sequence[int],
    num_classes: int,
    kernel_size: int = 5,
    gate: type[nn.Module] | None = HardConcreteGate,
) -> nn.Sequential:
    """``(B, C_0, L)`` -> ``Conv1d -> ReLU -> gate`` per entry of ``channels[1:]`` (same padding)
    -> ``Flatten -> Linear(num_classes)``."""
    layers: list[nn.Module] = []
    for c_in, c_out in itertools.pairwise(channels):
        layers += [nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2), nn.ReLU()]
        if gate is not None:
            layers.append(gate(c_out))
    layers += [nn.Flatten(), nn.Linear(channels[-1] * length, num_classes)]
    return nn.Sequential(*layers)
