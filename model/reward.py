"""A learned reward: video + audio + reference scorer on latents, trained on preference pairs with the
Bradley-Terry loss.

    RewardModel(RewardModelConfig)(video [B, C, T, H, W], audio=wave [B, S] | AudioWindows,
                                   reference=ref_latents [B, C, Tr, H, W]) -> scores [B]

Inputs are the frozen autoencoder's scaled latents, as the DiT sees them, so rewards are computed without
decoding. The network, one joint transformer over

    [score token; video patches; reference summary tokens; audio window tokens]

- video patches: (pt, ph, pw) patches -> linear, + sinusoidal (t, h, w) position, + segment embedding;
- reference: the same patch embedding, pooled into `n_ref_summary` tokens by learned queries
  (cross-attention), so a long reference costs the joint transformer nothing extra;
- audio: model/audio.py's AudioEncoder and its per-token-frame windows (as AvatarModel.encode_audio),
  each window feature a token placed at its token-frame's time, + its position within the window;
  padding features (before / after the audio) are masked out of attention;
- the score token's output -> LayerNorm -> linear -> the scalar.

Video and audio tokens carry the same temporal positions, so attention can check lip sync; the reference
summary lets it check identity. The audio encoder has AvatarModel's structure and key names
(`audio_encoder.*`): `load_audio_encoder` starts it from a trained avatar model's weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import Attention
from .audio import AudioEncoder, AudioEncoderConfig, AudioWindows
from .dit import timestep_embedding
from .text_encoder import TransformerBlock


@dataclass
class RewardModelConfig:
    latent_channels: int = 8
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])  # (t, h, w)
    dim: int = 128
    depth: int = 3
    heads: int = 4
    mlp_ratio: float = 4.0
    n_ref_summary: int = 8  # learned queries that pool the reference
    pos_freq_dim: int = 32  # sinusoid size per axis of the (t, h, w) position embedding
    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)


def _positions(t: torch.Tensor, h: torch.Tensor, w: torch.Tensor, freq_dim: int) -> torch.Tensor:
    """Sinusoids of (t, h, w) positions [N] each -> [N, 3 * freq_dim]."""
    return torch.cat([timestep_embedding(a.float(), freq_dim, max_period=100.0) for a in (t, h, w)], dim=-1)


class RewardModel(nn.Module):
    def __init__(self, cfg: RewardModelConfig | None = None):
        super().__init__()
        cfg = cfg or RewardModelConfig()
        if len(cfg.patch_size) != 3:
            raise ValueError(f"patch_size must be (t, h, w), got {cfg.patch_size}")
        self.cfg = cfg
        d = cfg.dim
        self.patch_dim = cfg.latent_channels * math.prod(cfg.patch_size)
        self.patch_embed = nn.Linear(self.patch_dim, d)
        self.pos = nn.Linear(3 * cfg.pos_freq_dim, d)
        self.segment = nn.Parameter(torch.randn(3, d) * 0.02)  # video, reference, audio
        self.score_token = nn.Parameter(torch.randn(d) * 0.02)
        self.ref_queries = nn.Parameter(torch.randn(cfg.n_ref_summary, d) * 0.02)
        self.ref_norm = nn.LayerNorm(d)
        self.ref_pool = Attention(d, cfg.heads)
        self.audio_encoder = AudioEncoder(cfg.audio)
        self.audio_proj = nn.Linear(cfg.audio.dim, d)
        self.audio_slot = nn.Parameter(torch.randn(self._audio_width(), d) * 0.02)  # place within a window
        self.blocks = nn.ModuleList(TransformerBlock(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1)

    def _audio_width(self) -> int:
        """Features per token-frame window: what AudioEncoder.windows returns for this patch size."""
        a = self.audio_encoder.cfg
        core = round(a.temporal_factor * self.cfg.patch_size[0] * self.audio_encoder.frame_rate / a.fps)
        return core + 2 * a.context

    # -- inputs ------------------------------------------------------------------------------------

    def _patches(self, x: torch.Tensor, name: str) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Latents [B, C, T, H, W] -> embedded patches + positions [B, N, dim] and the token grid."""
        if x.dim() != 5 or x.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"{name} must be [B, {self.cfg.latent_channels}, T, H, W], got {tuple(x.shape)}")
        p = self.cfg.patch_size
        if any(s % q for s, q in zip(x.shape[2:], p, strict=True)):
            raise ValueError(f"{name} (T, H, W)={tuple(x.shape[2:])} not divisible by patch_size={p}")
        b, c = x.shape[:2]
        gt, gh, gw = (s // q for s, q in zip(x.shape[2:], p, strict=True))
        tokens = x.reshape(b, c, gt, p[0], gh, p[1], gw, p[2]).permute(0, 2, 4, 6, 1, 3, 5, 7)
        tokens = tokens.reshape(b, gt * gh * gw, self.patch_dim)
        axes = [torch.arange(n, device=x.device) for n in (gt, gh, gw)]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
        pos = self.pos(_positions(grid[:, 0], grid[:, 1], grid[:, 2], self.cfg.pos_freq_dim).to(x.dtype))
        return self.patch_embed(tokens) + pos, (gt, gh, gw)

    def encode_audio(self, wave: torch.Tensor, n_latent_frames: int) -> AudioWindows:
        """Waveform [B, S] covering the clip -> the audio window of each token-frame (as AvatarModel)."""
        return self.audio_encoder.windows(self.audio_encoder(wave), n_latent_frames, self.cfg.patch_size[0])

    def load_audio_encoder(self, state: dict[str, torch.Tensor], prefix: str = "audio_encoder.") -> None:
        """Start the audio encoder from another model's weights (e.g. AvatarModel's `audio_encoder.*`)."""
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not sub:
            raise ValueError(f"no '{prefix}*' weights in the given state dict")
        self.audio_encoder.load_state_dict(sub)

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, video: torch.Tensor, audio: torch.Tensor | AudioWindows | None = None,
                reference: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B] (fp32). audio: waveform [B, S] or encode_audio's windows; reference: latents."""
        b = video.shape[0]
        h_video, (gt, _, _) = self._patches(video, "video")
        parts = [self.score_token.expand(b, 1, -1).to(h_video.dtype), h_video + self.segment[0]]
        masks = [torch.ones(b, 1 + h_video.shape[1], dtype=torch.bool, device=video.device)]
        if reference is not None:
            if reference.shape[0] != b:
                raise ValueError(f"reference batch {reference.shape[0]} != video batch {b}")
            h_ref, _ = self._patches(reference, "reference")
            q = self.ref_queries.expand(b, -1, -1).to(h_ref.dtype)
            parts.append(q + self.ref_pool(q, context=self.ref_norm(h_ref)) + self.segment[1])
            masks.append(torch.ones(b, q.shape[1], dtype=torch.bool, device=video.device))
        if audio is not None:
            if isinstance(audio, torch.Tensor):
                audio = self.encode_audio(audio, video.shape[2])
            g, w = audio.tokens.shape[1:3]
            if audio.tokens.shape[0] != b or g != gt or w != self.audio_slot.shape[0]:
                raise ValueError(f"audio windows must be [B={b}, {gt} token-frames, {self.audio_slot.shape[0]}, "
                                 f"dim], got {tuple(audio.tokens.shape)}")
            frame = torch.arange(g, device=video.device).repeat_interleave(w)
            zero = torch.zeros_like(frame)
            pos = self.pos(_positions(frame, zero, zero, self.cfg.pos_freq_dim).to(h_video.dtype))
            h_audio = self.audio_proj(audio.tokens) + self.audio_slot
            parts.append(h_audio.flatten(1, 2) + pos + self.segment[2])
            masks.append(audio.mask.flatten(1, 2).bool())
        h, mask = torch.cat(parts, dim=1), torch.cat(masks, dim=1)
        for block in self.blocks:
            h = block(h, mask)
        return self.head(self.norm(h[:, 0])).squeeze(-1).float()


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-log sigmoid(r_chosen - r_rejected), averaged over pairs [B]. Metrics (detached): loss, accuracy
    (pair_accuracy), margin (mean r_chosen - r_rejected)."""
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"r_chosen {tuple(r_chosen.shape)} and r_rejected {tuple(r_rejected.shape)} differ")
    diff = r_chosen.float() - r_rejected.float()
    loss = -F.logsigmoid(diff).mean()
    return loss, {"loss": loss.detach(), "accuracy": pair_accuracy(r_chosen, r_rejected),
                  "margin": diff.detach().mean()}


def pair_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Share of pairs the scores order like the labels (a tie counts half), a detached 0-dim tensor."""
    diff = (r_chosen.float() - r_rejected.float()).detach()
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean()


__all__ = ["RewardModelConfig", "RewardModel", "bradley_terry_loss", "pair_accuracy"]
