"""Meta-gradients: d (outer loss after training) / d (hyperparameters, initial params).

One contract for every estimator (:class:`Estimator`, its arguments declared once in
:class:`MetaProblem`)::

    res = hypergrad.reverse(inner_loss, outer_loss, optimizer, params, hparams,
                            inner_batches, outer_batch)
    res.value, res.hparams, res.params, res.final_params

=====================  ==========================  =================  ==============
estimator              exact?                      memory             d/d params_0
=====================  ==========================  =================  ==============
``reverse``            yes                         O(K)               yes
``checkpointed``       yes                         O(K/S + S)         yes
``truncated``          last ``window`` steps only  O(window)          if window >= K
``forward``            yes                         O(H), flat in K    no
``implicit``           at a fixed point            O(1)               no
``finite_difference``  O(eps^2)                    O(1)               yes
=====================  ==========================  =================  ==============

Common layers: run an ``nn.Module`` through :class:`selfmod.models.FunctionalModel` with
``update_buffers=False`` (BatchNorm on batch statistics, no buffer written, safe under ``vmap``);
dropout draws its masks from the global RNG, and from one ``torch.manual_seed`` every unrolled
estimator trains with the same masks (``forward`` shares each step's mask across its tangents,
``finite_difference`` replays them for each evaluation); steps that are differentiated again
run attention on the math backend (:func:`unroll.second_order`).
"""

from selfmod.hypergrad.contract import Estimator, MetaProblem
from selfmod.hypergrad.estimators import checkpointed, finite_difference, reverse, truncated
from selfmod.hypergrad.forward import forward
from selfmod.hypergrad.implicit import conjugate_gradient, implicit, neumann
from selfmod.hypergrad.unroll import FiniteMonitor, HypergradResult, inner_step, run

ESTIMATORS: dict[str, Estimator] = {
    "reverse": reverse,
    "checkpointed": checkpointed,
    "truncated": truncated,
    "forward": forward,
    "implicit": implicit,
    "finite_difference": finite_difference,
}

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "FiniteMonitor",
    "HypergradResult",
    "MetaProblem",
    "checkpointed",
    "conjugate_gradient",
    "finite_difference",
    "forward",
    "implicit",
    "inner_step",
    "neumann",
    "reverse",
    "run",
    "truncated",
]
