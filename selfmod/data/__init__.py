"""Offline datasets: MNIST-1D (generated locally) and scikit-learn's bundled digits."""

from selfmod.data.datasets import Dataset, batches, load_digits, load_mnist1d

__all__ = ["Dataset", "batches", "load_digits", "load_mnist1d"]
