"""Stage `autoencoder`: a causal 3D conv video autoencoder trained on reconstruction."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from avatarforge.data.config import DataConfig
from avatarforge.data.loader import build_eval_batches
from avatarforge.model.autoencoder import AutoencoderConfig, VideoAutoencoder, psnr
from avatarforge.stages.common import load_weights, mean_metrics, scalars, train_stream, typed


@dataclass
class AutoencoderOptions:
    eval_clips: int = 8
    calibration_clips: int = 16  # training clips that set the latent scale at export
    # A local safetensors file of pretrained weights; the stage then fine-tunes from it.
    init_weights: str = ""


class AutoencoderTask:
    def __init__(self, args: dict[str, Any]) -> None:
        config, stage = args["config"], args["stage"]
        self.options = typed(AutoencoderOptions, config["stages"][stage]["options"])
        self.model_cfg = typed(AutoencoderConfig, config["model"]["autoencoder"])
        self.data = typed(DataConfig, config["data"])
        self.batch_size = config["stages"][stage]["train"]["batch_size"]
        self.eval_batch_size = config["stages"][stage]["train"]["eval"]["batch_size"]
        self.seed = config["seed"]
        self._eval: list[dict[str, Any]] | None = None

    def build_model(self) -> nn.Module:
        return VideoAutoencoder(self.model_cfg)

    def init_from_parents(self, model: nn.Module) -> None:
        if self.options.init_weights:
            load_weights(model, self.options.init_weights)

    def train_batches(self, *, rank: int, world_size: int, start_batch: int) -> Iterator[Any]:
        for batch in train_stream(self.data, batch_size=self.batch_size, rank=rank, world_size=world_size,
                                  seed=self.seed, start_batch=start_batch):
            yield {"video": batch["video"]}

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = model.reconstruction_loss(batch["video"])
        return loss, {f"train/{k}": v for k, v in scalars(metrics).items() if k != "loss"}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if self._eval is None:
            self._eval = build_eval_batches(self.data, split=self.data.eval_split,
                                            batch_size=self.eval_batch_size, max_clips=self.options.eval_clips)
        device = next(model.parameters()).device
        results = []
        for batch in self._eval:
            video = batch["video"].to(device)
            recon, _ = model(video)
            results.append({"psnr": float(psnr(recon, video)), "l1": float((recon - video).abs().mean())})
        return mean_metrics(results)

    def export_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Calibrate the latent scale (unit-variance latents for every DiT stage) on fixed training clips,
        with the weights being exported, so the scale travels inside the autoencoder's weights."""
        batches = build_eval_batches(self.data, split=self.data.train_split, batch_size=self.eval_batch_size,
                                     max_clips=self.options.calibration_clips)
        device = next(model.parameters()).device
        latents = torch.cat([model.encode(b["video"].to(device)) for b in batches])
        model.calibrate_scale(latents)
        return {**state, "scale": model.scale}

    def batch_stats(self, batch: Any) -> tuple[int, int]:
        """Tokens = latent positions, comparable with the DiT stages' token counts."""
        b, _, t, h, w = batch["video"].shape
        cfg = self.model_cfg
        time_factor = 2 ** sum(cfg.temporal_downsample)
        space_factor = cfg.patch_size * 2 ** (len(cfg.channel_mult) - 1)
        return b, b * (1 + (t - 1) // time_factor) * (h // space_factor) * (w // space_factor)


def build_task(args: dict[str, Any]) -> AutoencoderTask:
    return AutoencoderTask(args)
