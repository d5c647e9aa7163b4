"""A small causal 3D-conv video autoencoder (8x space, 4x time), readable in one sitting.

    video [B, 3, T, H, W] in [-1, 1], T = 1 + 4k   ->   latent [B, C, 1 + k, H/8, W/8]

Layout (defaults):  pixel-unshuffle 2x2 (the "patch" stem, as in the Cosmos / LTX-Video tokenizers)
-> conv -> [levels: res blocks, causal strided downsample] -> 1x1 conv to the latent. The decoder
mirrors it with depth-to-space upsampling and ends with pixel-shuffle back to full resolution.
Spatial factor = patch_size * 2 ** (len(channel_mult) - 1); temporal factor = 2 ** sum(temporal_downsample).

Causality: temporal convolutions pad only on the past side (replicating the first frame), and the
channel RMSNorm normalises each voxel on its own, so latent frame i never sees frames after 4i. A
temporal downsampling is a conv with kernel 3 / stride 2 / past padding 2: output i covers input frames
(2i-2, 2i-1, 2i), so the first frame is encoded on its own (as an image) and 1 + 2m frames -> 1 + m.
The decoder inverts it: every latent frame but the first expands to two frames (1 + m -> 1 + 2m).

Cost is kept off full resolution (only the stem/out convs run there, on 12/16 channels; level 0 has no
res blocks by default), and activations are channels_last_3d, several times faster for Conv3d on CPU
(fine on GPU). The tiny default (widths 16/32/64, 0.67M params) trains a batch of 4 x 9 x 64 x 64 in
~0.15 s per step on 2 CPU threads; scale it up with base_channels / channel_mult / num_res_blocks.

Latent scale: the DiT wants ~unit-variance latents. `scale` is a persistent buffer initialised from
`cfg.scale` (so exported weights carry the calibrated value): `scale_latent(z) = z * scale`, and
`calibrate_scale(z)` sets it to 1 / std(z) from a batch of raw latents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

CL3D = torch.channels_last_3d


@dataclass
class AutoencoderConfig:
    channels: int = 3  # video channels (RGB)
    latent_channels: int = 8
    patch_size: int = 2  # spatial pixel-unshuffle at the input / pixel-shuffle at the output
    base_channels: int = 16
    # One entry per level; between consecutive levels space halves (patch 2 * 2 * 2 = 8x by default).
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4])
    num_res_blocks: list[int] = field(default_factory=lambda: [0, 1, 1])  # per level (0 keeps full res cheap)
    # Which of the len(channel_mult) - 1 downsamplings also halve time (causally); two -> 4x.
    temporal_downsample: list[bool] = field(default_factory=lambda: [True, True])
    # Temporal taps of the stem, res-block and output convs (the strided downsampling always has 3).
    # 1 = per-frame convs, time mixed only where it is compressed. Measured on the tiny world: with
    # 3, every causal conv starts out averaging its past frames and reconstructions lag and smear the
    # mouth (lip sync at offset 0 about 0 after 600 steps, best-offset 0.5-0.67 two to three frames
    # late); with 1 (and 4x space / 2x time) 0.79 after 600 steps.
    temporal_kernel: int = 3
    # loss = l1_weight * L1 + mse_weight * MSE + latent_l2_weight * mean(z^2) (keeps raw latents bounded)
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    latent_l2_weight: float = 1e-4
    # multiplier taking raw latents to ~unit variance for the DiT (see VideoAutoencoder.calibrate_scale)
    scale: float = 1.0


# ---------------------------------------------------------------------------------------------------
# building blocks


class CausalConv3d(nn.Conv3d):
    """Conv3d padded on the past side only in time (first frame replicated), symmetrically in space."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int, int] = 3,
                 stride: int | tuple[int, int, int] = 1):
        kt, kh, kw = (kernel,) * 3 if isinstance(kernel, int) else kernel
        super().__init__(cin, cout, (kt, kh, kw), stride=stride, padding=(0, kh // 2, kw // 2))
        self.time_pad = kt - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time_pad:
            x = torch.cat([x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1), x], dim=2)
        return super().forward(x.contiguous(memory_format=CL3D))


def temporal_factor(temporal_downsample: Sequence[bool]) -> int:
    """Video frames per latent frame (after the first): each temporal downsampling halves time."""
    return 2 ** sum(bool(x) for x in temporal_downsample)


class ChannelRMSNorm(nn.Module):
    """RMS norm over channels at each voxel (as in the Wan VAE): never mixes time, so it is causal."""

    def __init__(self, c: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(c))
        self.scale = c**0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * (self.scale * self.gamma.view(1, -1, 1, 1, 1))


class ResBlock3d(nn.Module):
    def __init__(self, cin: int, cout: int, kt: int = 3):
        super().__init__()
        self.norm1, self.conv1 = ChannelRMSNorm(cin), CausalConv3d(cin, cout, (kt, 3, 3))
        self.norm2, self.conv2 = ChannelRMSNorm(cout), CausalConv3d(cout, cout, (kt, 3, 3))
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(CausalConv3d):
    """Strided causal conv: H, W halve; with `temporal`, T = 1 + 2m -> 1 + m."""

    def __init__(self, cin: int, cout: int, temporal: bool):
        super().__init__(cin, cout, (3 if temporal else 1, 3, 3), stride=(2 if temporal else 1, 2, 2))


class Upsample(nn.Module):
    """1x1 conv to r * cout channels, then depth-to-space: H, W double; with `temporal`, T = 1 + m -> 1 + 2m
    (frame 0 makes one frame, every later latent frame two). The following 3x3x3 convs do the mixing."""

    def __init__(self, cin: int, cout: int, temporal: bool):
        super().__init__()
        self.rt = 2 if temporal else 1
        self.proj = nn.Conv3d(cin, cout * self.rt * 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        b, _, t, h, w = x.shape
        x = x.reshape(b, -1, self.rt, 2, 2, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(b, -1, t * self.rt, h * 2, w * 2)
        if self.rt == 2:
            x = x[:, :, 1:]  # frame 0 is an image: keep one of its two copies
        return x.contiguous(memory_format=CL3D)


def space_to_depth(x: torch.Tensor, p: int) -> torch.Tensor:
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // p, p, w // p, p).permute(0, 1, 4, 6, 2, 3, 5)
    return x.reshape(b, c * p * p, t, h // p, w // p)


def depth_to_space(x: torch.Tensor, p: int) -> torch.Tensor:
    b, c, t, h, w = x.shape
    x = x.reshape(b, c // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 2, 6, 3)
    return x.reshape(b, c // (p * p), t, h * p, w * p)


# ---------------------------------------------------------------------------------------------------
# the autoencoder


class VideoAutoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig | None = None):
        super().__init__()
        cfg = cfg or AutoencoderConfig()
        n = len(cfg.channel_mult)
        if cfg.temporal_kernel < 1:
            raise ValueError(f"temporal_kernel must be >= 1, got {cfg.temporal_kernel}")
        if len(cfg.temporal_downsample) != n - 1 or len(cfg.num_res_blocks) != n:
            raise ValueError(
                f"with {n} levels (channel_mult) need {n} num_res_blocks and {n - 1} temporal_downsample "
                f"entries, got {len(cfg.num_res_blocks)} and {len(cfg.temporal_downsample)}"
            )
        self.cfg = cfg
        self.spatial_factor = cfg.patch_size * 2 ** (n - 1)
        self.temporal_factor = temporal_factor(cfg.temporal_downsample)
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        pixels = cfg.channels * cfg.patch_size**2

        kt = cfg.temporal_kernel
        enc: list[nn.Module] = [CausalConv3d(pixels, widths[0], (kt, 3, 3))]
        c = widths[0]
        for i in range(n):
            if i > 0:
                enc.append(Downsample(c, widths[i], bool(cfg.temporal_downsample[i - 1])))
                c = widths[i]
            enc += [ResBlock3d(c, c, kt) for _ in range(cfg.num_res_blocks[i])]
        enc += [ChannelRMSNorm(c), nn.SiLU(), nn.Conv3d(c, cfg.latent_channels, 1)]
        self.encoder = nn.Sequential(*enc)

        dec: list[nn.Module] = [CausalConv3d(cfg.latent_channels, widths[-1], (kt, 3, 3))]
        c = widths[-1]
        for i in reversed(range(n)):
            dec += [ResBlock3d(c, c, kt) for _ in range(cfg.num_res_blocks[i])]
            if i > 0:
                dec.append(Upsample(c, widths[i - 1], bool(cfg.temporal_downsample[i - 1])))
                c = widths[i - 1]
        dec += [ChannelRMSNorm(c), nn.SiLU(), CausalConv3d(c, pixels, (kt, 3, 3))]
        self.decoder = nn.Sequential(*dec)

        self.register_buffer("scale", torch.tensor(float(cfg.scale)))
        # params stay contiguous (safetensors and ZeRO flattening need it); activations are channels_last_3d

    # -- shapes ------------------------------------------------------------------------------------

    def latent_shape(self, video_shape: tuple[int, ...]) -> tuple[int, int, int, int, int]:
        """[B, 3, T, H, W] -> [B, C, 1 + (T-1)/4, H/8, W/8]; raises ValueError on a bad shape."""
        b, _, t, h, w = self._check_video_shape(tuple(video_shape))
        sf = self.spatial_factor
        return (b, self.cfg.latent_channels, 1 + (t - 1) // self.temporal_factor, h // sf, w // sf)

    def video_shape(self, latent_shape: tuple[int, ...]) -> tuple[int, int, int, int, int]:
        self._check_latent_shape(tuple(latent_shape))
        b, _, t, h, w = latent_shape
        sf = self.spatial_factor
        return (b, self.cfg.channels, 1 + (t - 1) * self.temporal_factor, h * sf, w * sf)

    def _check_video_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        tf, sf = self.temporal_factor, self.spatial_factor
        if len(shape) != 5:
            raise ValueError(f"video must be [B, C, T, H, W], got shape {shape}")
        _, c, t, h, w = shape
        if c != self.cfg.channels:
            raise ValueError(f"video must have {self.cfg.channels} channels, got {c} (shape {shape})")
        if t < 1 or (t - 1) % tf:
            raise ValueError(f"frame count T must be 1 + {tf}k (1, {1 + tf}, {1 + 2 * tf}, ...), got T={t}")
        if h % sf or w % sf:
            raise ValueError(f"H and W must be divisible by {sf}, got H={h}, W={w}")
        return shape

    def _check_latent_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 5 or shape[1] != self.cfg.latent_channels:
            raise ValueError(f"latent must be [B, {self.cfg.latent_channels}, T, H, W], got shape {shape}")

    # -- encode / decode ---------------------------------------------------------------------------

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video in [-1, 1] -> raw latent (the decoder's space); use scale_latent() before the DiT."""
        self._check_video_shape(tuple(video.shape))
        return self.encoder(space_to_depth(video, self.cfg.patch_size)).contiguous()

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw latent -> video, roughly in [-1, 1] (not clamped: the loss should see the true error)."""
        self._check_latent_shape(tuple(latent.shape))
        return depth_to_space(self.decoder(latent), self.cfg.patch_size).contiguous()

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent = self.encode(video)
        return self.decode(latent), latent

    # -- latent scaling for the DiT ----------------------------------------------------------------

    def scale_latent(self, latent: torch.Tensor) -> torch.Tensor:
        return latent * self.scale

    def unscale_latent(self, latent: torch.Tensor) -> torch.Tensor:
        return latent / self.scale

    @torch.no_grad()
    def calibrate_scale(self, latent: torch.Tensor) -> float:
        """Set `scale` = 1 / std of these raw latents (e.g. a few training batches); returns it."""
        self.scale.fill_(1.0 / latent.float().std().clamp_min(1e-6).item())
        return float(self.scale)

    # -- training ----------------------------------------------------------------------------------

    def reconstruction_loss(self, video: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L1 + MSE + a small latent L2 penalty. Metrics are detached scalar tensors (no host sync)."""
        cfg = self.cfg
        recon, latent = self(video)
        err = recon - video
        l1, mse, lat = err.abs().mean(), err.pow(2).mean(), latent.pow(2).mean()
        loss = cfg.l1_weight * l1 + cfg.mse_weight * mse + cfg.latent_l2_weight * lat
        metrics = {
            "loss": loss.detach(),
            "l1": l1.detach(),
            "mse": mse.detach(),
            "psnr": psnr(recon.detach(), video),
            "latent_std": latent.detach().std(),
        }
        return loss, metrics


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """PSNR in dB over the whole tensor; data_range 2 for videos in [-1, 1]. Clamp `pred` first if the
    comparison should be on displayable pixels."""
    mse = (pred.float() - target.float()).pow(2).mean().clamp_min(1e-10)
    return 10.0 * torch.log10(data_range**2 / mse)


__all__ = ["AutoencoderConfig", "VideoAutoencoder", "CausalConv3d", "psnr", "temporal_factor"]
