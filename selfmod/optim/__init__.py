"""Differentiable optimizers as pure ``(init, update)`` pairs over dicts of tensors.

opt = optim.sgd(lr=lambda h: h["log_lr"].exp(), momentum=0.9)
state = opt.init(params)
updates, state = opt.update(grads, state, params, hparams)
params = optim.apply_updates(params, updates)

params, state = optim.step(opt, grads, state, params, hparams)  # both at once: fused where
                                                                # the optimizer has a kernel
"""

from selfmod.optim.adamw_hd import AdamWHD
from selfmod.optim.aliases import adam, adamw, rmsprop, sgd
from selfmod.optim.base import (
    EmptyState,
    GradientTransformation,
    HParam,
    apply_updates,
    of_hparams_only,
    per_key,
    resolve,
    step,
)
from selfmod.optim.hypergradient import (
    HypergradientState,
    OnlineLogLRState,
    adam_hd,
    adamw_hd,
    hypergradient_descent,
    hyperoptimizer_stack,
    normalized_hypergradient_descent,
    sgd_hd,
)
from selfmod.optim.transforms import (
    AdamState,
    RmsState,
    TraceState,
    add_decayed_weights,
    chain,
    clip,
    clip_by_global_norm,
    identity,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_rms,
    sum_updates,
    trace,
)
from selfmod.optim.wrapper import Optimizer

__all__ = [
    "AdamState",
    "AdamWHD",
    "EmptyState",
    "GradientTransformation",
    "HParam",
    "HypergradientState",
    "OnlineLogLRState",
    "Optimizer",
    "RmsState",
    "TraceState",
    "adam",
    "adam_hd",
    "adamw",
    "adamw_hd",
    "add_decayed_weights",
    "apply_updates",
    "chain",
    "clip",
    "clip_by_global_norm",
    "hypergradient_descent",
    "hyperoptimizer_stack",
    "identity",
    "normalized_hypergradient_descent",
    "of_hparams_only",
    "per_key",
    "resolve",
    "rmsprop",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_rms",
    "sgd",
    "sgd_hd",
    "step",
    "sum_updates",
    "trace",
]
