"""Let the run choose part of your model: mark a choice with ``selfmod.arch.Choice`` and
``selfmod.runs.fit`` makes it. The options race at the run's start, each on its own copy of
the weights; the best on held-out data is committed, its training kept, and the rest of the
run trains it alone. Uses only selfmod's public API and scikit-learn's bundled digits.

    python examples/choose_an_activation.py
"""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from selfmod.arch import Choice
from selfmod.runs import fit

torch.manual_seed(0)
torch.set_num_threads(1)

digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16  # (1797, 64)
y = torch.tensor(digits.target)
order = torch.randperm(len(y))
x, y = x[order], y[order]
train, guard, test = (x[:1200], y[:1200]), (x[1200:1500], y[1200:1500]), (x[1500:], y[1500:])


def activation() -> Choice:
    """One choice per layer; choices with the same options are raced together (one candidate
    per option, used at every layer)."""
    return Choice({"relu": nn.ReLU(), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid()})


model = nn.Sequential(nn.Linear(64, 64), activation(), nn.Linear(64, 64), activation(),
                      nn.Linear(64, 10))  # fmt: skip
result = fit(
    model,
    F.cross_entropy,
    train,
    guard,  # held out: the race ranks the options on it
    test=test,
    # race: each option trains 10% of the steps, the best two 10% more (the default)
    config={"steps": 600, "batch_size": 64, "modifiers.choice.race": 0.1, "out": "runs"},
)
(race,) = [d for d in result.run.history["decisions"] if d["modifier"] == "choice"]
print(f"{race['decision']}: {race['reason']}")
print("the exported model:", result.module)  # each Choice replaced by the option it chose
print(f"test accuracy {result.summary['test_metric']:.3f}; run directory {result.run_dir}")
