"""AdamWHD in your own training loop: the same loop, AdamW swapped for the self-tuning optimizer.

scikit-learn's 8x8 digits (bundled, offline), an MLP, 300 steps from a learning rate 30x too
small (1e-4): torch's AdamW stays there; AdamWHD raises each tensor's rate by its hypergradient.
Both get the same param groups (no weight decay on biases and norms), as any torch.optim does.

    python examples/drop_in_optimizer.py
"""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from selfmod.optim import AdamWHD


def data() -> tuple[torch.Tensor, ...]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # (1797, 64) in [0, 1]
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    return x[train], y[train], x[test], y[test]


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay on the weight matrices only: biases and norms (1-D) in a group without it."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def fit(make_optimizer, steps: int = 300, batch: int = 64) -> tuple[float, torch.optim.Optimizer]:
    x, y, x_test, y_test = data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = make_optimizer(param_groups(model))
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=gen)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return accuracy, opt


if __name__ == "__main__":
    picked, _ = fit(lambda params: torch.optim.AdamW(params, lr=3e-3))
    plain, _ = fit(lambda params: torch.optim.AdamW(params, lr=1e-4))
    tuned, opt = fit(lambda params: AdamWHD(params, lr=1e-4))
    print(f"AdamW (lr 3e-3, picked by hand): test accuracy {picked:.3f}")
    print(f"AdamW (lr 1e-4): test accuracy {plain:.3f}")
    print(f"AdamWHD (from lr 1e-4): test accuracy {tuned:.3f}")
    rates = [r for group in opt.rates() for r in group]  # weights, then biases
    print("learned rates", [f"{r:.2e}" for r in rates])
