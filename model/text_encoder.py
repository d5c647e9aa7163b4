"""A small byte-level text encoder trained from scratch: token + learned position embeddings and a pre-norm
transformer encoder. Token ids are byte + 1 with 0 = padding (the tokenizer lives with the data code).

    ids [B, L] long, mask [B, L] bool (True = real token)  ->  [B, L, dim], zero at padded positions
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .attention import Attention


@dataclass
class TextEncoderConfig:
    vocab_size: int = 257  # 256 bytes + padding id 0
    dim: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    max_len: int = 96
    dropout: float = 0.0


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float = 0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qk_norm=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), key_mask=mask))
        return x + self.dropout(self.mlp(self.norm2(x)))


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig | None = None):
        super().__init__()
        cfg = cfg or TextEncoderConfig()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Parameter(torch.zeros(cfg.max_len, cfg.dim))
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        # Token + position at unit variance (half each). At GPT-2's 0.02 the first block's attention output,
        # O(1) and nearly a plain average over the caption at init, drowns the tokens: every position comes
        # out the same (mean cosine 0.95), the DiT's cross-attention keys are identical, its queries get no
        # gradient, and the caption is never learned (t2v output identical with and without it).
        nn.init.normal_(self.tok.weight, std=0.5**0.5)
        nn.init.normal_(self.pos, std=0.5**0.5)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if ids.dim() != 2:
            raise ValueError(f"ids must be [B, L], got shape {tuple(ids.shape)}")
        if ids.shape[1] > self.cfg.max_len:
            raise ValueError(f"text length {ids.shape[1]} exceeds max_len={self.cfg.max_len}")
        if mask is None:
            mask = ids != 0
        x = self.tok(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x) * mask[..., None].to(x.dtype)

    def approx_flops(self, text_len: int, batch: int = 1) -> int:
        """Forward matmul FLOPs (training step ~3x)."""
        d, hidden = self.cfg.dim, int(self.cfg.dim * self.cfg.mlp_ratio)
        per_layer = Attention.flops(text_len, text_len, d) + 2 * 2 * text_len * d * hidden
        return batch * self.cfg.layers * per_layer


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 1 of x [B, L, D] counting only mask [B, L]; zero for an all-padding row."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


__all__ = ["TextEncoderConfig", "TextEncoder", "masked_mean"]
