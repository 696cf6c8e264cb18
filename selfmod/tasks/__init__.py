"""Task distributions for meta-learning, built offline and seeded.

- :class:`TemplateTasks`: unlimited MNIST-1D classes made from random templates through the
  ``mnist1d`` transform pipeline, with held-out templates for meta-test.
- :class:`DigitsTasks`: scikit-learn's digits with disjoint meta-train / meta-test classes.
- :class:`SineTasks`: sine-wave regression (Finn et al. 2017).
"""

from selfmod.tasks.episodes import DigitsTasks, Episode, SineTasks, TemplateTasks

__all__ = ["DigitsTasks", "Episode", "SineTasks", "TemplateTasks"]
