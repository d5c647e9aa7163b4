"""The one place that talks to DeepSpeed (OpenRLHF-style strategy): config, init, step, save, load, export."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from avatarforge.train.config import TrainConfig
from avatarforge.train.prebuild import clear_stale_build_locks

CHECKPOINT_TAG = "ds"


def ensure_accelerator(use_gpu: bool) -> None:
    """DeepSpeed caches its accelerator on first use: pick it before `import deepspeed`. On CPU its comm
    init loads a JIT-built op, which would wait forever on a killed build's lock."""
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        clear_stale_build_locks()


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "steps_per_print": 10**9,  # the runtime logs; keep DeepSpeed's own prints quiet
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.deepspeed.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 12}
    if cfg.optimizer.impl == "deepspeed":
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": cfg.optimizer.lr,
                "betas": list(cfg.optimizer.betas),
                "eps": cfg.optimizer.eps,
                "weight_decay": cfg.optimizer.weight_decay,
            },
        }
    if cfg.deepspeed.config_file:
        extra = json.loads(Path(cfg.deepspeed.config_file).read_text())
        ds = _deep_merge(ds, extra)
    return ds


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def lr_lambda(cfg: TrainConfig):
    """Warmup then cosine/linear/constant decay to min_lr_ratio, as a picklable-free closure for LambdaLR."""
    warmup, total, floor, kind = cfg.schedule.warmup_steps, cfg.steps, cfg.schedule.min_lr_ratio, cfg.schedule.kind

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
        return floor + (1.0 - floor) * decay

    return factor


class DeepSpeedStrategy:
    """Wraps the DeepSpeed engine: every DeepSpeed call of the project goes through here."""

    def __init__(self, cfg: TrainConfig, world_size: int) -> None:
        self.cfg = cfg
        self.world_size = world_size
        self.engine = None
        self._grad_norm = float("nan")

    def setup(self, model: nn.Module):
        import deepspeed

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = scheduler = None
        if self.cfg.optimizer.impl == "torch":
            optimizer = torch.optim.AdamW(
                params,
                lr=self.cfg.optimizer.lr,
                betas=tuple(self.cfg.optimizer.betas),
                eps=self.cfg.optimizer.eps,
                weight_decay=self.cfg.optimizer.weight_decay,
            )
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.cfg))
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model,
            model_parameters=params,
            optimizer=optimizer,
            lr_scheduler=scheduler
            or (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.cfg))),
            config=deepspeed_config(self.cfg, self.world_size),
        )
        self.engine = engine
        return engine

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def backward_step(self, loss: torch.Tensor, *, measure_grad_norm: bool = True) -> None:
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        if measure_grad_norm and self.cfg.deepspeed.zero_stage == 0 and boundary:
            # Without ZeRO, DeepSpeed's fp32 path does not record the norm: take it before step() clears grads.
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            self._grad_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
        self.engine.step()

    def grad_norm(self) -> float:
        """Global gradient norm of the last optimizer step (before clipping)."""
        if self.cfg.deepspeed.zero_stage == 0:
            return self._grad_norm
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, directory: str, client_state: dict[str, Any]) -> None:
        self.engine.save_checkpoint(directory, tag=CHECKPOINT_TAG, client_state=client_state)

    def load(self, directory: str) -> dict[str, Any]:
        path, client_state = self.engine.load_checkpoint(
            directory, tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint with tag {CHECKPOINT_TAG!r} under {directory}")
        return client_state or {}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unpartitioned) weights on every rank; gathers ZeRO-3 partitions when needed."""
        module = self.engine.module
        if self.cfg.deepspeed.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    def barrier(self) -> None:
        import deepspeed.comm as dist

        dist.barrier()
