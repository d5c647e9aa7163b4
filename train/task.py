"""What the runtime needs from a stage: the contract between `stages` (what to optimise) and `train`."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn


class TrainTask(Protocol):
    """A stage's training problem. The runtime owns the engine, loop, checkpoints and tracking."""

    def build_model(self) -> nn.Module:
        """The trainable module, freshly initialised (same seed on every rank)."""

    def init_from_parents(self, model: nn.Module) -> None:
        """Weights-only initialisation from parent stages; called only when no own checkpoint exists."""

    def train_batches(self, *, rank: int, world_size: int, start_batch: int) -> Iterator[Any]:
        """An endless, deterministic stream of micro batches, continuing after `start_batch` consumed ones."""

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss to minimise and extra metrics to log."""

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metrics; called on every rank (ZeRO-3 needs all ranks in a forward)."""

    def batch_stats(self, batch: Any) -> tuple[int, int]:
        """(samples, tokens) in a micro batch, for throughput metrics."""

    # Optional: `export_state(model, state) -> state`: the state dict to export, given the default one
    # (full weights, EMA when enabled) and the model with those weights applied; e.g. a calibrated buffer
    # or LoRA adapters merged into the base weights.


@dataclass
class RunSpec:
    """Everything a training worker needs, built by the driver and shipped through Ray."""

    stage: str
    kind: str
    task_factory: str  # "package.module:function" returning a TrainTask from task_args
    task_args: dict[str, Any]
    train: dict[str, Any]  # a TrainConfig as a plain container
    seed: int
    export_path: str  # where rank 0 writes the exported safetensors weights
    tracking: dict[str, Any] = field(default_factory=dict)  # W&B settings, see train.tracking
    launched_at: float = 0.0  # driver wall clock when fit() was called (for fit-to-first-step time)


def resolve_factory(path: str) -> Callable[[dict[str, Any]], TrainTask]:
    module_name, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"task factory {path!r} must look like 'package.module:function'")
    return getattr(importlib.import_module(module_name), attr)
