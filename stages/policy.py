"""The few-step avatar policy of the last stages (the distilled student, then the RL policy): a plain
AvatarModel with guidance baked in, sampled in `steps` single-pass Euler steps from per-prompt seeded noise.
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from avatarforge.data.config import DataConfig
from avatarforge.model.audio import AudioEncoderConfig
from avatarforge.model.avatar import AvatarDiTConfig, AvatarModel
from avatarforge.model.flow import euler_sample
from avatarforge.model.text_encoder import TextEncoderConfig
from avatarforge.stages.common import FrozenAutoencoder, typed


def build_avatar_model(config: dict[str, Any], weights: str | None = None) -> AvatarModel:
    """An AvatarModel from the curriculum's model sections, optionally loaded with exported weights."""
    model = AvatarModel(typed(TextEncoderConfig, config["model"]["text"]),
                        typed(AvatarDiTConfig, config["model"]["dit"]),
                        typed(AudioEncoderConfig, config["model"]["audio"]))
    if weights:
        model.load_state_dict(load_file(weights))
    return model


def distill_steps(config: dict[str, Any], stage: str, requested: int) -> int:
    """Sampling steps of the policy: `requested` if > 0, else the distill ancestor's student_steps."""
    if requested > 0:
        return requested
    stages = config["stages"]
    todo, seen = list(stages[stage]["needs"]), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if stages[name]["kind"] == "distill":
            return int(stages[name]["options"].get("student_steps", 4))
        todo += stages[name]["needs"]
    raise ValueError(f"stage {stage!r}: set options.sample_steps (no distill stage above it)")


class PolicySampler:
    """Conditions and rollouts of a few-step policy on prompt batches (see stages/prompts.py)."""

    def __init__(self, autoencoder: FrozenAutoencoder, data: DataConfig, steps: int) -> None:
        self.autoencoder, self.data, self.steps = autoencoder, data, steps

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        return tuple(self.autoencoder.latent_shape((batch, 3, self.data.frames, self.data.size, self.data.size)))

    def reference_latents(self, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
        return self.autoencoder.encode(batch["reference"].to(device))

    def conditions(self, model: nn.Module, batch: dict[str, Any], device: torch.device,
                   reference_latents: torch.Tensor | None = None) -> dict[str, Any]:
        """Model inputs for every step: text, audio windows and the reference K/V cache, computed once."""
        ref = reference_latents if reference_latents is not None else self.reference_latents(batch, device)
        frames = self.latent_shape(1)[2]
        return {
            "text": batch["text"].to(device), "text_mask": batch["text_mask"].to(device),
            "audio": model.encode_audio(batch["audio"].to(device), frames),
            "reference": model.encode_reference(ref),
        }

    def noise(self, seeds: list[int], device: torch.device) -> torch.Tensor:
        """One noise tensor per seed, so a video does not depend on which batch it is sampled in."""
        shape = self.latent_shape(1)[1:]
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
                           ).to(device)

    def sample(self, model: nn.Module, cond: dict[str, Any], noise: torch.Tensor, *,
               grad: bool = False) -> torch.Tensor:
        """Latents by `steps` single-pass Euler steps (guidance is baked into the policy)."""
        return euler_sample(model, noise.shape, self.steps, noise=noise, grad=grad, **cond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(latents)
