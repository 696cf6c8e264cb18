"""Bring your own model and data: ``selfmod.runs.fit`` tunes the learning rates and
weight decay of a residual network on two interleaved spirals while it trains, each change
verified on held-out data, logged and reversible. Uses only selfmod's public API.

    python examples/your_own_model.py
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from selfmod.runs import fit

torch.manual_seed(0)
torch.set_num_threads(1)


def spirals(n: int, noise: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved spirals: ``x (2n, 2)``, labels ``y (2n,)`` in {0, 1}."""
    t = torch.rand(n) * 3 * math.pi + 0.5
    arm = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 5  # (n, 2)
    x = torch.cat([arm, -arm]) + noise * torch.randn(2 * n, 2) / 5
    return x, torch.cat([torch.zeros(n), torch.ones(n)]).long()


class ResidualNet(nn.Module):
    """``x (B, 2) -> Linear(W) -> 3 x [h + MLP(LayerNorm(h))] -> Linear(2)``."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.inp = nn.Linear(2, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU()) for _ in range(3)
        )
        self.out = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)  # (B, W)
        return self.out(h)


train, guard, test = spirals(2000), spirals(250), spirals(1000)
result = fit(
    ResidualNet(),
    F.cross_entropy,
    train,  # an (X, Y) pair; a Dataset or a DataLoader work too
    guard,  # held out: every proposed change is verified on it before it commits
    test=test,
    optimizer="adamw",
    # every modifier that applies (fit's defaults name none): per-tensor rates from a poor 1e-4
    config={
        "steps": 600,
        "lr": 1e-4,
        "cycle": 50,
        "modifiers": None,
        "compare_fixed": True,
        "out": "runs",
    },
)
s = result.summary
fixed = s["fixed"]["test_accuracy"]
print(f"test accuracy {s['test_accuracy']:.3f} (fixed configuration: {fixed:.3f})")
print(f"changes committed / rejected / rolled back: {s['decisions']}")
print(f"learning rates now {[f'{v:.2g}' for v in result.run.values()['lr']]} (started at 1e-4)")
print(f"run directory {result.run_dir} (selfmod log / report / resume work on it)")
model = result.module  # the trained nn.Module
