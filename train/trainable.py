"""Restrict which parameters a stage optimises (`train.trainable`), e.g. only the audio pathway in RLHF."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn


def restrict_trainable(model: nn.Module, patterns: Sequence[str]) -> int:
    """Freeze every parameter whose name matches none of `patterns` (fnmatch); parameters the task already
    froze stay frozen. Returns how many parameters stay trainable; ValueError if none would."""
    if not patterns:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    kept = 0
    for name, param in model.named_parameters():
        keep = param.requires_grad and any(fnmatchcase(name, pattern) for pattern in patterns)
        param.requires_grad_(keep)
        kept += param.numel() if keep else 0
    if kept == 0:
        raise ValueError(f"train.trainable {list(patterns)} matches no trainable parameter of "
                         f"{type(model).__name__} (names look like {next(model.named_parameters())[0]!r})")
    return kept
