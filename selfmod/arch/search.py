"""A small 1-D CNN search space for DARTS/GDAS: cells that each choose an operation
(:class:`~selfmod.arch.mixed.MixedOp`) and their input among earlier cells
(:class:`~selfmod.arch.mixed.Connections`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from selfmod.arch.mixed import Connections, MixedOp, Zero

OPS = ("conv3", "conv5", "dil_conv3", "skip", "none", "max_pool3")


def candidate_op(name: str, channels: int) -> nn.Module:
    """One candidate ``(B, C, L) -> (B, C, L)``: ``conv{k}`` and ``dil_conv3`` (dilation 2) are
    ``Conv1d -> ReLU``; ``skip`` is the identity, ``none`` is zero, ``max_pool3`` stride 1."""
    c = channels
    table: dict[str, Callable[[], nn.Module]] = {
        "conv3": lambda: nn.Sequential(nn.Conv1d(c, c, 3, padding=1), nn.ReLU()),
        "conv5": lambda: nn.Sequential(nn.Conv1d(c, c, 5, padding=2), nn.ReLU()),
        "dil_conv3": lambda: nn.Sequential(nn.Conv1d(c, c, 3, padding=2, dilation=2), nn.ReLU()),
        "skip": nn.Identity,
        "none": Zero,
        "max_pool3": lambda: nn.MaxPool1d(3, stride=1, padding=1),
    }
    if name not in table:
        raise ValueError(f"unknown op {name!r}; candidates are {sorted(table)}")
    return table[name]()


class SearchCNN1d(nn.Module):
    """``(B, L) or (B, 1, L)`` -> stem ``Conv1d(1, C, 5) -> ReLU`` -> ``cells`` cells -> pool by
    ``pool`` -> ``Flatten -> Linear(classes)``.

    Cell ``i`` reads ``Connections`` over the stem and cells ``0..i-1`` (cell 0 reads the stem)
    and applies a ``MixedOp`` over ``ops``. ``ops`` of length 1 gives a fixed network.
    """

    def __init__(
        self,
        length: int,
        channels: int = 32,
        cells: int = 4,
        num_classes: int = 10,
        ops: Sequence[str] = OPS,
        mode: str = "darts",
        tau: float = 1.0,
        pool: int = 2,
        connections: bool = True,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(1, channels, 5, padding=2), nn.ReLU())
        self.cells = nn.ModuleList()
        self.inputs = nn.ModuleList()
        for i in range(cells):
            if len(ops) == 1:
                self.cells.append(candidate_op(ops[0], channels))
            else:
                self.cells.append(MixedOp({o: candidate_op(o, channels) for o in ops}, mode, tau))
            self.inputs.append(
                Connections(i + 1, mode, tau) if connections and i > 0 else nn.Identity()
            )
        self.head = nn.Sequential(
            nn.MaxPool1d(pool), nn.Flatten(), nn.Linear(channels * (length // pool), num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)  # (B, 1, L)
        states = [self.stem(x)]  # each (B, C, L)
        for cell, conn in zip(self.cells, self.inputs, strict=True):
            inp = states[-1] if isinstance(conn, nn.Identity) else conn(states)
            states.append(cell(inp))
        return self.head(states[-1])  # (B, classes)
