"""A t2v-shaped training task on fixed random tensors: measures the runtime's overhead (Ray Train +
DeepSpeed) against a plain PyTorch loop on the same model and batch, with no data loading involved."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from avatarforge.model.dit import DiTConfig
from avatarforge.model.flow import flow_matching_loss
from avatarforge.model.text_encoder import TextEncoderConfig
from avatarforge.stages.common import typed
from avatarforge.stages.t2v import TextToVideo


def synthetic_batch(args: dict[str, Any]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    b, c, t, h, w = args["latent_shape"]
    text = torch.randint(1, 257, (b, args["text_len"]), generator=gen)
    return {"x0": torch.randn(b, c, t, h, w, generator=gen), "text": text, "text_mask": text > 0}


class SyntheticT2VTask:
    def __init__(self, args: dict[str, Any]) -> None:
        self.args = args
        self.batch = synthetic_batch(args)

    def build_model(self) -> nn.Module:
        return TextToVideo(typed(TextEncoderConfig, self.args["text"]), typed(DiTConfig, self.args["dit"]))

    def init_from_parents(self, model: nn.Module) -> None:
        pass

    def train_batches(self, *, rank: int, world_size: int, start_batch: int) -> Iterator[Any]:
        while True:
            yield self.batch

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        return flow_matching_loss(model, batch["x0"], text=batch["text"], text_mask=batch["text_mask"])[0], {}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {}

    def batch_stats(self, batch: Any) -> tuple[int, int]:
        return batch["x0"].shape[0], batch["x0"][:, 0].numel()


def build_task(args: dict[str, Any]) -> SyntheticT2VTask:
    return SyntheticT2VTask(args)
