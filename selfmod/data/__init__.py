"""Offline datasets (MNIST-1D, scikit-learn's digits) and resumable batch streams."""

from selfmod.data.datasets import Dataset, Split, batches, hold_out, load_digits, load_mnist1d
from selfmod.data.streams import IndexedBatches, IterableBatches, Stream, as_batches, materialize

__all__ = [
    "Dataset",
    "IndexedBatches",
    "IterableBatches",
    "Split",
    "Stream",
    "as_batches",
    "batches",
    "hold_out",
    "load_digits",
    "load_mnist1d",
    "materialize",
]
