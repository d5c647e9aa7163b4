"""Audio encoder: 16 kHz waveform -> log-mel (torch.stft) -> conv stem -> transformer, and per-latent-frame
windows for the DiT's audio cross-attention.

    wave [B, S] -> log-mel [B, 80, S/160 + 1] (100 Hz) -> conv (stride 2) -> [B, F, dim] at 50 Hz

Windows. Latent frame i of the causal autoencoder covers video frames 4i-3 .. 4i (frame 0 alone for i=0),
i.e. audio up to the end of frame 4i. Each latent frame gets the fixed-length window of features ending
there: `core` = 4 frames' worth of features (8 at 25 fps / 50 Hz) plus `context` features on either side;
positions before the start or after the end of the audio are masked. With a DiT temporal patch of p
latent frames, token-frame g gets the window of its p latent frames (p * core + 2 * context).

With `wav2vec2` set to a local directory, a frozen pretrained wav2vec2 (also 50 Hz) replaces log-mel + conv.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .dit import timestep_embedding
from .text_encoder import TransformerBlock


@dataclass
class AudioEncoderConfig:
    sample_rate: int = 16000
    n_fft: int = 400  # 25 ms window
    hop_length: int = 160  # 10 ms hop -> 100 Hz log-mel, 50 Hz features after the stride-2 conv
    n_mels: int = 80
    dim: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    fps: float = 25.0  # video frame rate the windows align to
    temporal_factor: int = 4  # video frames per latent frame (the first latent frame is a single frame)
    context: int = 2  # features of context on each side of a latent frame's window
    wav2vec2: str = ""  # local path of a pretrained wav2vec2 (empty: train the mel encoder here)


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0,
                   f_max: float | None = None) -> torch.Tensor:
    """Triangular HTK-mel filters [n_freqs, n_mels], each normalised to unit area (Slaney)."""
    f_max = sample_rate / 2 if f_max is None else f_max

    def to_mel(f):
        return 2595.0 * math.log10(1.0 + f / 700.0)

    mels = torch.linspace(to_mel(f_min), to_mel(f_max), n_mels + 2, dtype=torch.float64)
    hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    freqs = torch.linspace(0, sample_rate / 2, n_freqs, dtype=torch.float64)
    lo, mid, hi = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    up, down = (freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)
    fb = torch.clamp(torch.minimum(up, down), min=0.0) * (2.0 / (hi - lo))
    return fb.T.float()


def log_mel(wave: torch.Tensor, cfg: AudioEncoderConfig, filters: torch.Tensor | None = None) -> torch.Tensor:
    """[B, S] float waveform -> [B, n_mels, S // hop + 1] log-mel, Whisper-style scaling to about [-1, 1]."""
    if wave.dim() != 2:
        raise ValueError(f"audio must be [B, samples], got shape {tuple(wave.shape)}")
    if filters is None:
        filters = mel_filterbank(cfg.n_fft // 2 + 1, cfg.n_mels, cfg.sample_rate).to(wave.device)
    window = torch.hann_window(cfg.n_fft, device=wave.device, dtype=torch.float32)
    spec = torch.stft(wave.float(), cfg.n_fft, cfg.hop_length, window=window, center=True,
                      return_complex=True).abs().pow(2)
    mel = torch.einsum("fm,bft->bmt", filters, spec)
    logm = mel.clamp_min(1e-10).log10()
    logm = torch.maximum(logm, logm.amax(dim=(1, 2), keepdim=True) - 8.0)
    return (logm + 4.0) / 4.0


@dataclass
class AudioWindows:
    """Per token-frame audio: tokens [B, G, W, dim], mask [B, G, W] (True = a real audio feature)."""

    tokens: torch.Tensor
    mask: torch.Tensor


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig | None = None):
        super().__init__()
        cfg = cfg or AudioEncoderConfig()
        self.cfg = cfg
        self.pretrained: nn.Module | None = None
        if cfg.wav2vec2:
            from .pretrained import load_wav2vec2

            self.pretrained = load_wav2vec2(cfg.wav2vec2)
            self.stem = nn.Linear(self.pretrained.config.hidden_size, cfg.dim)
        else:
            self.register_buffer(
                "filters", mel_filterbank(cfg.n_fft // 2 + 1, cfg.n_mels, cfg.sample_rate), persistent=False
            )
            self.stem = nn.Sequential(
                nn.Conv1d(cfg.n_mels, cfg.dim, 3, padding=1), nn.GELU(approximate="tanh"),
                nn.Conv1d(cfg.dim, cfg.dim, 3, stride=2, padding=1), nn.GELU(approximate="tanh"),
            )
        self.blocks = nn.ModuleList(TransformerBlock(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)

    @property
    def frame_rate(self) -> float:
        """Features per second (50 for both the mel stem and wav2vec2)."""
        return self.cfg.sample_rate / (320 if self.pretrained is not None else 2 * self.cfg.hop_length)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """[B, S] waveform at cfg.sample_rate -> features [B, F, dim] at `frame_rate`."""
        if self.pretrained is not None:
            with torch.no_grad():
                x = self.pretrained(wave.float()).last_hidden_state
            x = self.stem(x)
        else:
            x = self.stem(log_mel(wave, self.cfg, self.filters)).transpose(1, 2)
        pos = timestep_embedding(torch.arange(x.shape[1], device=x.device, dtype=torch.float32), x.shape[-1])
        x = x + pos.to(x.dtype)
        for block in self.blocks:
            x = block(x, None)
        return self.norm(x)

    def windows(self, features: torch.Tensor, n_latent_frames: int, group: int = 1) -> AudioWindows:
        """features [B, F, dim] -> the window of each of the n_latent_frames / group token-frames."""
        cfg = self.cfg
        if n_latent_frames % group:
            raise ValueError(f"{n_latent_frames} latent frames do not split into temporal patches of {group}")
        per_frame = self.frame_rate / cfg.fps  # features per video frame
        core = round(cfg.temporal_factor * group * per_frame)
        width = core + 2 * cfg.context
        last = torch.arange(1, n_latent_frames // group + 1, device=features.device) * group - 1
        end = torch.round((cfg.temporal_factor * last + 1) * per_frame).long()  # exclusive end of the frame
        idx = end[:, None] + cfg.context - width + torch.arange(width, device=features.device)  # [G, W]
        n = features.shape[1]
        valid = (idx >= 0) & (idx < n)
        tokens = features[:, idx.clamp(0, max(n - 1, 0))]
        return AudioWindows(tokens, valid.expand(features.shape[0], -1, -1))


__all__ = ["AudioEncoderConfig", "AudioEncoder", "AudioWindows", "log_mel", "mel_filterbank"]
