"""Typed configs of the per-worker runtime: optimisation, checkpoints, DeepSpeed, scaling, tracking."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # "torch": torch.optim.AdamW handed to DeepSpeed (no JIT-built op, best on CPU);
    # "deepspeed": DeepSpeed's own AdamW from the DS config (FusedAdam on GPU).
    impl: str = "torch"


@dataclass
class ScheduleConfig:
    kind: str = "cosine"  # cosine | linear | constant, after a linear warmup
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.99


@dataclass
class CheckpointConfig:
    every_steps: int = 50
    num_to_keep: int = 2


@dataclass
class EvalConfig:
    every_steps: int = 50
    batches: int = 2
    batch_size: int = 4


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp32 on CPU: bf16 matmul there is far slower)
    # Optional JSON file merged under the generated DS config (for knobs not modelled here).
    config_file: str = ""


@dataclass
class ScalingConfig:
    num_workers: int = 1
    cpus_per_worker: int = 2
    gpus_per_worker: float = 0.0
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    max_failures: int = 2
    # torch intra-op threads per worker; 0 means cpus_per_worker.
    torch_threads: int = 0


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 4  # micro batch per worker
    grad_accum: int = 1
    grad_clip: float = 1.0
    log_every: int = 10
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    # fnmatch patterns over parameter names ("dit.blocks.*.audio_attn.*"): only the parameters the task
    # left trainable *and* matching one are optimised; empty = all the task left trainable
    trainable: list[str] = field(default_factory=list)


@dataclass
class WandbConfig:
    project: str = "avatarforge"
    entity: str = ""
    # offline | online | disabled; the WANDB_MODE environment variable wins when set.
    mode: str = "offline"
    tags: list[str] = field(default_factory=list)


CHOICES = {
    "optimizer.impl": ("torch", "deepspeed"),
    "schedule.kind": ("cosine", "linear", "constant"),
    "deepspeed.precision": ("fp32", "bf16", "fp16"),
    "deepspeed.zero_stage": (0, 1, 2, 3),
    "scaling.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
}


def check_train_config(cfg: TrainConfig, prefix: str) -> list[str]:
    """Value checks OmegaConf's types cannot express; returns messages naming the full key."""
    errors = []
    for path, allowed in CHOICES.items():
        section, key = path.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            errors.append(f"{prefix}.{path}: {value!r} is not one of {list(allowed)}")
    positive = {
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "log_every": cfg.log_every,
        "checkpoint.every_steps": cfg.checkpoint.every_steps,
        "checkpoint.num_to_keep": cfg.checkpoint.num_to_keep,
        "eval.every_steps": cfg.eval.every_steps,
        "scaling.num_workers": cfg.scaling.num_workers,
        "scaling.cpus_per_worker": cfg.scaling.cpus_per_worker,
    }
    errors += [f"{prefix}.{k}: must be > 0, got {v}" for k, v in positive.items() if v <= 0]
    if not 0.0 <= cfg.ema.decay < 1.0:
        errors.append(f"{prefix}.ema.decay: must be in [0, 1), got {cfg.ema.decay}")
    if cfg.optimizer.lr <= 0:
        errors.append(f"{prefix}.optimizer.lr: must be > 0, got {cfg.optimizer.lr}")
    if any(not pattern.strip() for pattern in cfg.trainable):
        errors.append(f"{prefix}.trainable: patterns must be non-empty, got {list(cfg.trainable)}")
    return errors
