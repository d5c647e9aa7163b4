"""Helpers shared by stage tasks: typed configs from the shipped container, weights I/O, data streams."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn

from avatarforge.data.config import DataConfig
from avatarforge.data.loader import build_train_loader
from avatarforge.model.autoencoder import AutoencoderConfig, VideoAutoencoder
from avatarforge.model.flow import flow_loss_errors


def typed(schema: type, container: Any) -> Any:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), container))


@dataclass
class FlowLossOptions:
    """How a flow-matching stage draws training timesteps and measures its error (model/flow.py), shared by
    the t2v, a2v and sft options."""

    timesteps: str = "logit_normal"  # model.flow.TIMESTEP_DISTRIBUTIONS
    timestep_shift: float = 1.0  # > 1 draws more high-noise timesteps (model.flow.shift_timesteps)
    loss_weighting: str = "velocity"  # model.flow.LOSS_WEIGHTINGS

    def flow_errors(self) -> list[str]:
        return flow_loss_errors(self.timesteps, self.timestep_shift, self.loss_weighting)

    def flow_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of model.flow.flow_matching_loss."""
        return {"timesteps": self.timesteps, "timestep_shift": self.timestep_shift, "weighting": self.loss_weighting}


def load_weights(module: nn.Module, path: str | Path, *, prefix: str = "", strict: bool = True) -> None:
    """Load safetensors weights (optionally those under `prefix.`) into `module`, with a clear error."""
    state = load_file(str(path))
    if prefix:
        state = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(
            f"weights {path} do not fit {type(module).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def parent_of_kind(args: dict[str, Any], kind: str) -> str:
    """The exported weights of the (single) parent stage of `kind`."""
    config, stage = args["config"], args["stage"]
    found = [p for p in config["stages"][stage]["needs"] if config["stages"][p]["kind"] == kind]
    if len(found) != 1:
        raise ValueError(f"stage {stage!r} needs exactly one parent of kind {kind!r}, found {found}")
    return args["parent_weights"][found[0]]


def train_stream(data: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int,
                 start_batch: int, identities: list[str] | None = None) -> Iterator[dict[str, Any]]:
    extra = {"identities": identities} if identities else {}
    loader = build_train_loader(data, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                                start_batch=start_batch, **extra)
    yield from loader


def mean_metrics(per_batch: list[dict[str, float]]) -> dict[str, float]:
    keys = per_batch[0].keys() if per_batch else ()
    return {k: float(sum(m[k] for m in per_batch) / len(per_batch)) for k in keys}


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in metrics.items()}


class FrozenAutoencoder:
    """The autoencoder stage's exported weights, frozen: video <-> unit-variance latents for the DiT
    stages (the calibrated latent scale is part of those weights)."""

    def __init__(self, config: dict[str, Any], weights: str | Path) -> None:
        self.model = VideoAutoencoder(typed(AutoencoderConfig, config))
        load_weights(self.model, weights)
        self.model.requires_grad_(False).eval()

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        ae = self.model.to(video.device)
        return ae.scale_latent(ae.encode(video))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        ae = self.model.to(latents.device)
        return ae.decode(ae.unscale_latent(latents)).clamp(-1, 1)

    def round_trip(self, latents: torch.Tensor) -> torch.Tensor:
        """encode(decode(latents)), differentiable in the latents: what survives decoding, e.g. to score
        samples without the latent directions the decoder ignores (a reward gradient finds those)."""
        ae = self.model.to(latents.device)
        return ae.scale_latent(ae.encode(ae.decode(ae.unscale_latent(latents)).clamp(-1, 1)))

    def latent_shape(self, video_shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.model.latent_shape(video_shape)

    def encodable_frames(self, frames: int) -> int:
        """The longest frame count <= `frames` the autoencoder takes: 1 + k * its temporal factor."""
        tf = self.model.temporal_factor
        return 1 + (frames - 1) // tf * tf


def audio_for_frames(wave: torch.Tensor, frames: int, data: DataConfig) -> torch.Tensor:
    """Audio [..., S] cut (or zero-padded) to exactly `frames` video frames at data.fps / data.sample_rate."""
    samples = round(frames * data.sample_rate / data.fps)
    return F.pad(wave, (0, max(0, samples - wave.shape[-1])))[..., :samples]


def epoch_batches(n_items: int, batch_size: int, *, seed: int, rank: int, world_size: int,
                  start_batch: int) -> Iterator[list[int]]:
    """Endless index batches over an in-memory dataset: a fresh seeded permutation per epoch, global batch
    g going to rank g % world_size; this rank's first `start_batch` batches are skipped arithmetically."""
    per_epoch = n_items // batch_size
    if per_epoch < 1:
        raise ValueError(f"{n_items} items cannot fill one batch of {batch_size}")
    g = start_batch * world_size + rank
    while True:
        epoch, b = divmod(g, per_epoch)
        order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        yield order[b * batch_size:(b + 1) * batch_size].tolist()
        g += world_size
