"""The v0 synthetic avatar world: parametric identities, tone 'speech', numpy-rendered faces."""

from .generate import HELDOUT_SPLIT, TRAIN_SPLIT, dataset_exists, generate_dataset

__all__ = ["HELDOUT_SPLIT", "TRAIN_SPLIT", "dataset_exists", "generate_dataset"]
