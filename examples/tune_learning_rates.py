"""Learn per-tensor learning rates by gradient descent on the validation loss after training.

Each meta-step unrolls K SGD steps of an MLP on MNIST-1D from the same initial weights,
differentiates the validation loss through them (``hypergrad.reverse``) and takes an Adam step
on the log learning rates. Uses only selfmod's public API.

    python examples/tune_learning_rates.py
"""

import math

import torch

from selfmod import hypergrad, optim
from selfmod.data import batches, load_mnist1d
from selfmod.models import accuracy, cross_entropy_loss, functionalize, mlp

torch.manual_seed(0)
torch.set_num_threads(1)
data = load_mnist1d()
apply, params = functionalize(mlp([40, 128, 128, 10]))
names = list(params)
loss = cross_entropy_loss(apply)

# One learnable log learning rate per parameter tensor, starting 100x too small.
hparams = {"log_lr": torch.full((len(names),), math.log(1e-3))}
inner = optim.sgd(lr=lambda h: {k: h["log_lr"][i].exp() for i, k in enumerate(names)}, momentum=0.9)
meta = optim.adam(0.2)
meta_state = meta.init(hparams)

stream = batches(data.x_train[:3500], data.y_train[:3500], 128, torch.Generator().manual_seed(0))
train_batches = [next(stream) for _ in range(50)]  # K = 50 inner steps
validation = (data.x_train[3500:], data.y_train[3500:])

for step in range(30):
    res = hypergrad.reverse(loss, loss, inner, params, hparams, train_batches, validation)
    updates, meta_state = meta.update(res.hparams, meta_state, hparams)
    hparams = optim.apply_updates(hparams, updates)
    if step % 5 == 0 or step == 29:
        lrs = ", ".join(f"{x:.3g}" for x in hparams["log_lr"].exp().tolist())
        acc = accuracy(apply, res.final_params, data.x_test, data.y_test)
        print(
            f"meta-step {step:2d}  val loss {float(res.value):.3f}  test acc {acc:.3f}  lrs [{lrs}]"
        )
