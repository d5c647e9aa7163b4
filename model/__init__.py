"""Models: causal video autoencoder, byte-level text encoder, DiT, rectified flow, and the avatar model
(Sparse Reference Attention, audio, static / dynamic identity, multi-condition guidance, LoRA).
Depends only on torch."""

from .audio import AudioEncoder, AudioEncoderConfig, AudioWindows, log_mel
from .autoencoder import AutoencoderConfig, VideoAutoencoder, psnr
from .avatar import AvatarDiT, AvatarDiTConfig, AvatarModel, ReferenceCache
from .dit import DiT, DiTConfig
from .flow import euler_sample, eval_flow_loss, flow_matching_loss, sample_timesteps
from .guidance import guided_model_fn, guided_velocity, sample_condition_drop
from .identity import (
    IdentityEncoder,
    IdentityTokens,
    color_jitter,
    identity_losses,
    latent_jitter,
    swap_identity,
)
from .lora import LoRAConfig, inject_lora, lora_parameters, merge_lora
from .pretrained import PretrainedConfig
from .text_encoder import TextEncoder, TextEncoderConfig

__all__ = [
    "AutoencoderConfig",
    "VideoAutoencoder",
    "psnr",
    "DiTConfig",
    "DiT",
    "TextEncoderConfig",
    "TextEncoder",
    "sample_timesteps",
    "flow_matching_loss",
    "euler_sample",
    "eval_flow_loss",
    "AvatarDiTConfig",
    "AvatarDiT",
    "AvatarModel",
    "ReferenceCache",
    "AudioEncoderConfig",
    "AudioEncoder",
    "AudioWindows",
    "log_mel",
    "IdentityEncoder",
    "IdentityTokens",
    "swap_identity",
    "identity_losses",
    "color_jitter",
    "latent_jitter",
    "sample_condition_drop",
    "guided_velocity",
    "guided_model_fn",
    "LoRAConfig",
    "inject_lora",
    "merge_lora",
    "lora_parameters",
    "PretrainedConfig",
]
