"""Models: causal video autoencoder, byte-level text encoder, DiT, rectified flow. Depends only on torch."""

from .autoencoder import AutoencoderConfig, VideoAutoencoder, psnr
from .dit import DiT, DiTConfig
from .flow import euler_sample, eval_flow_loss, flow_matching_loss, sample_timesteps
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
]
