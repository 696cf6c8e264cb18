"""Meta-learning over task distributions, as thin layers on :mod:`selfmod.hypergrad`.

- :func:`maml_step`: MAML (second or first order) and Meta-SGD meta-gradients over a batch of
  episodes. References: Finn et al. 2017; Nichol et al. 2018 (first order); Li et al. 2017
  (Meta-SGD).
- :mod:`selfmod.meta.distributed`: the meta-batch split across ``torch.distributed`` ranks.
"""

from selfmod.meta.maml import MetaGradient, adapt, maml_step, meta_sgd_optimizer

__all__ = ["MetaGradient", "adapt", "maml_step", "meta_sgd_optimizer"]
