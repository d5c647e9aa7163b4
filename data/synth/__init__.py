"""The synthetic avatar world: eSpeak NG speech, viseme-driven numpy-rendered faces, and its oracle."""

from __future__ import annotations

from typing import Any

__all__ = ["HELDOUT_SPLIT", "TRAIN_SPLIT", "dataset_exists", "generate_dataset"]


def __getattr__(name: str) -> Any:
    # lazy: importing a submodule (the oracle, the speech engine) must not pull in the dataset writer
    if name in __all__:
        from . import generate

        return getattr(generate, name)
    raise AttributeError(name)
