"""Attention shared by the text encoder and the DiT: multi-head attention on F.scaled_dot_product_attention
with an optional key padding mask, optional QK RMSNorm, and 3D rotary position embeddings.

The module is split into `project_q` / `project_kv` / `attend` / `out` so that extensions (reference
tokens for Sparse Reference Attention, cached K/V across sampling steps, audio cross-attention) can
reuse the projections and concatenate their own keys/values.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, h, Nq, d], k/v [B, h, Nk, d]; key_mask [B, Nk] bool, True = a real token to attend to.

    A row whose keys are all padding (e.g. an empty caption dropped for classifier-free guidance) gets a
    zero output instead of the NaN a fully-masked softmax would give."""
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    key_mask = key_mask.bool()
    valid = key_mask.any(dim=-1)  # [B]
    mask = (key_mask | ~valid[:, None])[:, None, None, :]  # [B, 1, 1, Nk]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out * valid.view(-1, 1, 1, 1).to(out.dtype)


class RoPE3D(nn.Module):
    """Rotary embeddings over (t, h, w): the head dim is split into three even parts, one per axis.

    `angles(pos)` takes positions [..., N, 3] (float, so references / other streams can use offsets or
    fractional positions) and returns [..., N, head_dim / 2] rotation angles; `rotate(x, angles)` (not `apply`: that would shadow nn.Module.apply, which DeepSpeed calls) rotates
    consecutive pairs of x [B, heads, N, head_dim]. q.k then depends only on the position difference."""

    def __init__(self, head_dim: int, theta: float = 10000.0, axes_dim: list[int] | None = None):
        super().__init__()
        if axes_dim is None:
            hw = 2 * (head_dim // 6)
            axes_dim = [head_dim - 2 * hw, hw, hw]
        if sum(axes_dim) != head_dim or any(d % 2 for d in axes_dim):
            raise ValueError(f"RoPE axes dims {axes_dim} must be even and sum to head_dim={head_dim}")
        self.axes_dim = list(axes_dim)
        for i, d in enumerate(axes_dim):
            freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
            self.register_buffer(f"freqs{i}", freqs.float(), persistent=False)

    def angles(self, pos: torch.Tensor) -> torch.Tensor:
        pos = pos.float()
        parts = [pos[..., i : i + 1] * getattr(self, f"freqs{i}") for i in range(3)]
        return torch.cat(parts, dim=-1)

    @staticmethod
    def grid(t: int, h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
        """Integer (t, h, w) positions of a token grid in raster order: [t*h*w, 3]."""
        axes = [torch.arange(n, device=device, dtype=torch.float32) for n in (t, h, w)]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)

    @staticmethod
    def cos_sin(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Precomputed (cos, sin) of angles: pass it to `rotate` instead of the angles when the same
        positions rotate many tensors (every layer's q and k)."""
        return angles.cos(), angles.sin()

    @staticmethod
    def rotate(x: torch.Tensor, angles: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cos, sin = angles if isinstance(angles, tuple) else RoPE3D.cos_sin(angles)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        if cos.dim() == 3:  # [B, N, d/2] -> broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class Attention(nn.Module):
    """Self-attention (context=None) or cross-attention to `context` [B, Nk, context_dim]."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qk_norm: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, dim] -> [B, heads, N, head_dim]
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def project_q(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        q = self.q_norm(self._heads(self.q(x)))
        return RoPE3D.rotate(q, rope) if rope is not None else q

    def project_kv(self, context: torch.Tensor, rope: torch.Tensor | None = None):
        k, v = self.kv(context).chunk(2, dim=-1)
        k = self.k_norm(self._heads(k))
        return (RoPE3D.rotate(k, rope) if rope is not None else k), self._heads(v)

    def attend(self, q, k, v, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.out(masked_sdpa(q, k, v, key_mask).transpose(1, 2).flatten(2))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, rope: torch.Tensor | None = None) -> torch.Tensor:
        """rope: angles from RoPE3D.angles, applied to q and (self-attention only) k."""
        q = self.project_q(x, rope)
        k, v = self.project_kv(x if context is None else context, rope if context is None else None)
        return self.attend(q, k, v, key_mask)

    @staticmethod
    def flops(n_q: int, n_kv: int, dim: int, context_dim: int | None = None) -> int:
        """Forward matmul FLOPs for one sample (2 per multiply-add)."""
        proj = 2 * n_q * dim * dim * 2 + 2 * n_kv * (context_dim or dim) * 2 * dim  # q, out; k, v
        return proj + 2 * 2 * n_q * n_kv * dim  # scores + weighted sum


__all__ = ["Attention", "RoPE3D", "masked_sdpa"]
