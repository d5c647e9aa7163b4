"""Stage `t2v_pretrain`: text -> video rectified flow, a DiT on the frozen autoencoder's latents."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from avatarforge.data.config import DataConfig
from avatarforge.data.loader import build_eval_batches
from avatarforge.model.avatar import AvatarDiTConfig
from avatarforge.model.dit import DiT, DiTConfig
from avatarforge.model.flow import eval_flow_loss, flow_matching_loss
from avatarforge.model.text_encoder import TextEncoder, TextEncoderConfig
from avatarforge.stages.common import (
    FlowLossOptions,
    FrozenAutoencoder,
    mean_metrics,
    parent_of_kind,
    train_stream,
    typed,
)


@dataclass
class T2VOptions(FlowLossOptions):
    eval_clips: int = 8
    # Share of training captions replaced by the empty caption, so the model also learns the
    # unconditional velocity that classifier-free guidance needs.
    text_dropout: float = 0.1

    def validate(self) -> list[str]:
        return self.flow_errors()


class TextToVideo(nn.Module):
    """The trainable part of t2v: a text encoder and the DiT (the autoencoder stays frozen outside)."""

    def __init__(self, text: TextEncoderConfig, dit: DiTConfig) -> None:
        super().__init__()
        self.text_encoder = TextEncoder(text)
        self.dit = DiT(dit)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return self.dit(x, t, self.text_encoder(text, text_mask), text_mask)


class T2VTask:
    def __init__(self, args: dict[str, Any]) -> None:
        config, stage = args["config"], args["stage"]
        stage_cfg = config["stages"][stage]
        self.options = typed(T2VOptions, stage_cfg["options"])
        self.text_cfg = typed(TextEncoderConfig, config["model"]["text"])
        self.dit_cfg = typed(AvatarDiTConfig, config["model"]["dit"]).dit_config()
        # text is all a t2v model is given: it reads the whole caption whatever data.captions says
        self.data = replace(typed(DataConfig, config["data"]), captions="full")
        self.batch_size = stage_cfg["train"]["batch_size"]
        self.eval_batch_size = stage_cfg["train"]["eval"]["batch_size"]
        self.seed = config["seed"]
        self.autoencoder = FrozenAutoencoder(config["model"]["autoencoder"], parent_of_kind(args, "autoencoder"))
        self._eval: list[dict[str, Any]] | None = None

    def latents(self, video: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(video)

    def build_model(self) -> nn.Module:
        return TextToVideo(self.text_cfg, self.dit_cfg)

    def init_from_parents(self, model: nn.Module) -> None:
        """Nothing to inherit: the autoencoder parent is used frozen, the DiT starts fresh."""

    def train_batches(self, *, rank: int, world_size: int, start_batch: int) -> Iterator[Any]:
        for batch in train_stream(self.data, batch_size=self.batch_size, rank=rank, world_size=world_size,
                                  seed=self.seed, start_batch=start_batch):
            yield {k: batch[k] for k in ("video", "text", "text_mask")}

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        x0 = self.latents(batch["video"])
        text, mask = batch["text"], batch["text_mask"]
        if self.options.text_dropout > 0:
            drop = torch.rand(text.shape[0], device=text.device) < self.options.text_dropout
            mask = mask & ~drop[:, None]
            text = torch.where(mask, text, torch.zeros_like(text))
        loss, metrics = flow_matching_loss(model, x0, text=text, text_mask=mask, **self.options.flow_kwargs())
        return loss, {f"train/{k}": float(v) for k, v in metrics.items() if k != "loss"}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if self._eval is None:
            self._eval = build_eval_batches(self.data, split=self.data.eval_split,
                                            batch_size=self.eval_batch_size, max_clips=self.options.eval_clips)
        device = next(model.parameters()).device
        results = []
        for i, batch in enumerate(self._eval):
            x0 = self.latents(batch["video"].to(device))
            text, mask = batch["text"].to(device), batch["text_mask"].to(device)
            loss, _ = eval_flow_loss(model, x0, seed=self.seed + i, text=text, text_mask=mask)
            results.append({"flow_loss": float(loss)})
        return mean_metrics(results)

    def batch_stats(self, batch: Any) -> tuple[int, int]:
        b, _, t, h, w = batch["video"].shape
        pt, ph, pw = self.dit_cfg.patch_size
        lt = self.autoencoder.latent_shape((b, 3, t, h, w))
        return b, b * (lt[2] // pt) * (lt[3] // ph) * (lt[4] // pw)


def build_task(args: dict[str, Any]) -> T2VTask:
    return T2VTask(args)
