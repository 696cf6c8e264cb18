"""Models and data the project does not define, written as a user would: imported by the CLI
as ``user_models:residual_mlp`` etc. (the tests run it with this folder as the current one)."""

from __future__ import annotations

import torch
from torch import nn

from selfmod.data import load_digits


class ResidualMLP(nn.Module):
    """``x (B, 64) -> Linear -> [x + MLP(LayerNorm(x))] -> LayerNorm -> Linear(10)``."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(64, width)
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + self.mlp(self.norm(h))  # (B, W)
        return self.out(h)


class DigitCNN(nn.Module):
    """``x (B, 64)`` as an 8x8 image ``-> Conv(8) -> BatchNorm -> ReLU -> Dropout -> pool ->
    Linear(10)``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.view(-1, 1, 8, 8))


class TinyTransformer(nn.Module):
    """The 8 rows of a digit as 8 tokens of 8 values ``-> Linear(16) + position -> one encoder
    layer (2 heads) -> mean -> Linear(10)``."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.zeros(8, d))
        self.encoder = nn.TransformerEncoderLayer(
            d, nhead=2, dim_feedforward=2 * d, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.view(-1, 8, 8)) + self.pos  # (B, T, D)
        return self.head(self.encoder(h).mean(1))


def residual_mlp() -> nn.Module:
    return ResidualMLP()


def digit_cnn() -> nn.Module:
    return DigitCNN()


def tiny_transformer() -> nn.Module:
    return TinyTransformer()


def choice_mlp() -> nn.Module:
    """``x (B, 64) -> Linear(32) -> a Choice of activation -> Linear(10)``: the run chooses."""
    from selfmod.arch import Choice

    act = Choice({"relu": nn.ReLU(), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid()})
    return nn.Sequential(nn.Linear(64, 32), act, nn.Linear(32, 10))


class Abs(nn.Module):
    """``|x|``: the activation an :func:`abs_task` needs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs()


def abs_task(n: int = 3000) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 1 iff ``sum_i<4 |x_i| > 3.2``: an ``abs`` unit fits it; tanh or sigmoid units hardly
    do in a layer of 16. ``x (n, 8)``, ``y (n,)``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, :4].abs().sum(1) > 3.2).long()


def digits():
    """scikit-learn's bundled digits: ``(x_train, y_train, x_test, y_test)``."""
    d = load_digits(seed=0)
    return d.x_train, d.y_train, d.x_test, d.y_test


def not_a_model():
    return 42


def broken():
    raise RuntimeError("no weights here")
