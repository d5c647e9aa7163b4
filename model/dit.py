"""Diffusion transformer on video latents (rectified-flow velocity prediction).

    x [B, C, T, H, W] latents, t [B] in [0, 1], text [B, L, text_dim], text_mask [B, L]  ->  v, shape of x

- patchify: (pt, ph, pw) patches -> linear -> tokens in raster order (t, h, w)
- 3D RoPE on self-attention q/k (head dim split across t / h / w)
- conditioning vector c = MLP(sinusoid(t)) + Linear(masked mean of text); adaLN-Zero: every block's
  shift / scale / gate come from c through a zero-initialised linear, so a fresh block is the identity
  and a fresh head outputs exactly zero (the final adaLN + linear are zero-initialised too)
- block: x += g1 * SelfAttn(mod(norm(x))); x += CrossAttn(norm(x), text); x += g2 * MLP(mod(norm(x)))
- final adaLN + linear -> unpatchify -> the velocity: the head's output itself (`prediction: velocity`) or,
  with `prediction: data`, the head's clean estimate x0 turned into v = (x_t - x0) / t

An empty caption (all-False text_mask, as used for classifier-free guidance dropout) contributes
nothing: cross-attention outputs zero and the pooled text is zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, RoPE3D
from .text_encoder import masked_mean


@dataclass
class DiTConfig:
    latent_channels: int = 8
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])  # (t, h, w)
    dim: int = 192
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    text_dim: int = 128
    qk_norm: bool = True
    rope_theta: float = 10000.0
    freq_dim: int = 256  # size of the sinusoidal timestep embedding
    time_scale: float = 1000.0  # t in [0, 1] is multiplied by this before the sinusoid
    pooled_text: bool = True  # add the masked-mean text to the conditioning vector
    # What the network's output head predicts; forward() always returns the velocity. "data": the clean
    # latents x0, turned into v = (x_t - x0) / max(t, min_t). A token whose patch holds more numbers than
    # the width (4x4 patches of 8 channels = 128 into dim 128) cannot carry the noise through to predict
    # v or the noise, but can predict the clean patch, which lies near a low-dimensional set (Li & He,
    # "Back to Basics: Let Denoising Generative Models Denoise", 2025).
    prediction: str = "velocity"  # "velocity" | "data"
    min_t: float = 0.05  # "data": the velocity's 1/t is capped here (t near 0 would amplify any error)
    grad_checkpointing: bool = False


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (scaled) timesteps t [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


PREDICTIONS = ("velocity", "data")


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, cfg.heads, qk_norm=cfg.qk_norm)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.cross = Attention(d, cfg.heads, qk_norm=cfg.qk_norm)
        self.norm3 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor,
                text: torch.Tensor | None, text_mask: torch.Tensor | None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), rope=rope)
        if text is not None:
            x = x + self.cross(self.norm2(x), context=text, key_mask=text_mask)
        return x + gate2 * self.mlp(modulate(self.norm3(x), shift2, scale2))


class DiT(nn.Module):
    block_class: type[DiTBlock] = DiTBlock  # subclasses (the avatar DiT) swap in an extended block

    def __init__(self, cfg: DiTConfig | None = None):
        super().__init__()
        cfg = cfg or DiTConfig()
        if cfg.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {cfg.prediction!r}")
        if len(cfg.patch_size) != 3:
            raise ValueError(f"patch_size must be (t, h, w), got {cfg.patch_size}")
        self.cfg = cfg
        d = cfg.dim
        self.patch_dim = cfg.latent_channels * math.prod(cfg.patch_size)
        self.patch_embed = nn.Linear(self.patch_dim, d)
        self.time_embed = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.text_proj = nn.Sequential(
            nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d)
        )
        self.text_pool = nn.Linear(cfg.text_dim, d) if cfg.pooled_text else None
        self.rope = RoPE3D(d // cfg.heads, cfg.rope_theta)
        self.blocks = nn.ModuleList(self.block_class(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.final = nn.Linear(d, self.patch_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for lin in (self.time_embed[0], self.time_embed[2]):
            nn.init.normal_(lin.weight, std=0.02)
        # adaLN-Zero: modulation and output start at zero
        for ada in [b.ada for b in self.blocks] + [self.final_ada]:
            nn.init.zeros_(ada[-1].weight)
            nn.init.zeros_(ada[-1].bias)
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)

    # -- patches -----------------------------------------------------------------------------------

    def token_grid(self, x_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """Latent shape [B, C, T, H, W] -> token grid (T/pt, H/ph, W/pw); ValueError if it doesn't fit."""
        if len(x_shape) != 5 or x_shape[1] != self.cfg.latent_channels:
            raise ValueError(f"x must be [B, {self.cfg.latent_channels}, T, H, W], got {tuple(x_shape)}")
        sizes = x_shape[2:]
        if any(s % p for s, p in zip(sizes, self.cfg.patch_size, strict=True)):
            raise ValueError(
                f"latent (T, H, W)={tuple(sizes)} not divisible by patch_size={self.cfg.patch_size}"
            )
        return tuple(s // p for s, p in zip(sizes, self.cfg.patch_size, strict=True))

    def patchify(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T, H, W] -> [B, N, C*pt*ph*pw]
        b, c = x.shape[:2]
        (gt, gh, gw), (pt, ph, pw) = self.token_grid(tuple(x.shape)), self.cfg.patch_size
        x = x.reshape(b, c, gt, pt, gh, ph, gw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(b, gt * gh * gw, self.patch_dim)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        b, c = tokens.shape[0], self.cfg.latent_channels
        (gt, gh, gw), (pt, ph, pw) = grid, self.cfg.patch_size
        x = tokens.reshape(b, gt, gh, gw, c, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(b, c, gt * pt, gh * ph, gw * pw)

    # -- forward -----------------------------------------------------------------------------------

    def velocity(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The head's output (shape of x) as the velocity at (x, t), whatever `prediction` says it is."""
        if self.cfg.prediction == "velocity":
            return out
        t = t.to(x.dtype).clamp_min(self.cfg.min_t).view(-1, *([1] * (x.dim() - 1)))
        return (x - out) / t

    def condition(self, t: torch.Tensor, text: torch.Tensor | None, text_mask: torch.Tensor | None):
        """Conditioning vector c [B, dim] and projected text tokens [B, L, dim] (or None)."""
        freq = timestep_embedding(t * self.cfg.time_scale, self.cfg.freq_dim)
        c = self.time_embed(freq.to(self.final.weight.dtype))
        if text is None:
            return c, None
        if self.text_pool is not None:
            c = c + self.text_pool(masked_mean(text, text_mask))
        return c, self.text_proj(text)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        grid = self.token_grid(tuple(x.shape))
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be [B]={x.shape[0]}, got shape {tuple(t.shape)}")
        if text is not None and text.shape[-1] != self.cfg.text_dim:
            raise ValueError(f"text must be [B, L, {self.cfg.text_dim}], got {tuple(text.shape)}")
        c, ctx = self.condition(t, text, text_mask)
        h = self.patch_embed(self.patchify(x))
        rope = self.rope.angles(RoPE3D.grid(*grid, device=x.device))
        for block in self.blocks:
            if self.cfg.grad_checkpointing and self.training:
                h = checkpoint(block, h, c, rope, ctx, text_mask, use_reentrant=False)
            else:
                h = block(h, c, rope, ctx, text_mask)
        shift, scale = self.final_ada(c)[:, None].chunk(2, dim=-1)
        return self.velocity(self.unpatchify(self.final(modulate(self.final_norm(h), shift, scale)), grid), x, t)

    # -- cost --------------------------------------------------------------------------------------

    def approx_flops(self, x_shape: tuple[int, ...], text_len: int = 0) -> int:
        """Forward matmul FLOPs for the batch in x_shape [B, C, T, H, W] (a training step is ~3x this)."""
        cfg, d = self.cfg, self.cfg.dim
        n = math.prod(self.token_grid(tuple(x_shape)))
        hidden = int(d * cfg.mlp_ratio)
        per_block = Attention.flops(n, n, d) + 2 * 2 * n * d * hidden + 2 * d * 6 * d
        if text_len:
            per_block += Attention.flops(n, text_len, d)
        total = cfg.depth * per_block
        total += 2 * n * self.patch_dim * d * 2 + 2 * d * 2 * d  # patch embed + final linear, final adaLN
        total += 2 * (cfg.freq_dim * d + d * d)  # timestep MLP
        if text_len:
            total += 2 * text_len * (cfg.text_dim * d + d * d)  # text projection
            total += 2 * cfg.text_dim * d if cfg.pooled_text else 0
        return x_shape[0] * total


__all__ = ["DiTConfig", "DiT", "DiTBlock", "timestep_embedding"]
