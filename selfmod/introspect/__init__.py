"""Training runs that tune themselves by meta-gradients, each change verified before commit."""

from selfmod.introspect.lr_tuning import CycleRecord, History, train

__all__ = ["CycleRecord", "History", "train"]
