"""Driver side of a training stage: one Ray Train TorchTrainer run per stage."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from avatarforge.train.config import TrainConfig
from avatarforge.train.runtime import train_loop_per_worker
from avatarforge.train.task import RunSpec


@dataclass
class FitResult:
    checkpoint: str | None
    metrics: dict[str, Any]


def has_checkpoint(storage_path: str, name: str) -> bool:
    """Ray Train V2 restores a run by (storage_path, name) when its checkpoint snapshot exists."""
    return (Path(storage_path) / name / "checkpoint_manager_snapshot.json").exists()


def fit(spec: RunSpec, *, storage_path: str) -> FitResult:
    """Run a stage to completion; resumes from its latest checkpoint when one is stored under the name."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg: TrainConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), spec.train))
    scaling = cfg.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.gpus_per_worker:
        resources["GPU"] = scaling.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.gpus_per_worker > 0,
            resources_per_worker=resources,
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=spec.stage,
            storage_path=str(Path(storage_path).resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
        ),
    )
    spec.launched_at = time.time()
    result = trainer.fit()
    return FitResult(
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        metrics=dict(result.metrics or {}),
    )
