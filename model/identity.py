"""Static vs dynamic identity from a reference video's latents [B, C, T, H, W].

- static tokens (appearance: face geometry, skin, teeth, hair): per-frame conv features averaged over
  time, then attention-pooled by learned queries. Exactly invariant to the order of frames; the
  cross-clip loss makes them invariant to what the person does in the clip.
- dynamic tokens (behaviour: talking rhythm, habitual motion): temporal differences of the latents,
  normalised per channel, per-frame conv + temporal conv, attention-pooled. Exactly invariant to a static
  per-pixel offset and a per-channel gain of the latents (a reference's lighting / colour cast to first
  order); the augmentation loss makes them invariant to real colour jitter of the reference video.

Losses (`identity_losses`): InfoNCE between two clips of the same identity for static and for dynamic
tokens (in-batch negatives: other identities), and MSE between the dynamic tokens of a reference and of
its appearance-augmented copy. `swap_identity(a, b)`: the static tokens of A with the dynamic tokens of B.
The avatar DiT feeds both as extra summary tokens of Sparse Reference Attention and through adaLN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import Attention


@dataclass
class IdentityTokens:
    static: torch.Tensor  # [B, n_static, dim]
    dynamic: torch.Tensor  # [B, n_dynamic, dim]

    def pooled(self) -> torch.Tensor:
        """[B, 2 * dim]: mean static token and mean dynamic token."""
        return torch.cat([self.static.mean(dim=1), self.dynamic.mean(dim=1)], dim=-1)


def swap_identity(appearance: IdentityTokens, behaviour: IdentityTokens) -> IdentityTokens:
    """Static tokens of `appearance` (person A) with dynamic tokens of `behaviour` (person B)."""
    return IdentityTokens(appearance.static, behaviour.dynamic)


def sincos_2d(h: int, w: int, dim: int, device=None) -> torch.Tensor:
    """[h * w, dim] fixed 2D sin-cos position embedding (half the channels per axis)."""
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter, 1))
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    parts = [f(a.reshape(-1, 1) * freqs) for a in (ys, xs) for f in (torch.sin, torch.cos)]
    emb = torch.cat(parts, dim=-1)
    return F.pad(emb, (0, dim - emb.shape[-1]))


class AttentionPool(nn.Module):
    """n learned queries cross-attending to a token set [B, N, dim] -> [B, n, dim]."""

    def __init__(self, dim: int, n: int, heads: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.queries.expand(x.shape[0], -1, -1).to(x.dtype)
        return q + self.attn(q, context=self.norm(x))


def _frame_conv(cin: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, dim, 3, padding=1), nn.GELU(approximate="tanh"),
                         nn.Conv2d(dim, dim, 3, stride=2, padding=1), nn.GELU(approximate="tanh"))


class IdentityEncoder(nn.Module):
    def __init__(self, latent_channels: int = 8, dim: int = 128, out_dim: int = 128, n_static: int = 4,
                 n_dynamic: int = 4, heads: int = 4):
        super().__init__()
        self.static_conv = _frame_conv(latent_channels, dim)
        self.dynamic_conv = _frame_conv(latent_channels, dim)
        self.temporal = nn.Conv1d(dim, dim, 3, padding=1)
        self.static_pool = AttentionPool(dim, n_static, heads)
        self.dynamic_pool = AttentionPool(dim, n_dynamic, heads)
        self.static_out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, out_dim))
        self.dynamic_out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, out_dim))

    @staticmethod
    def _per_frame(conv: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """[B, C, T, H, W] -> [B, T, h * w, dim] conv features of every frame, and (h, w)."""
        b, c, t, hh, ww = x.shape
        f = conv(x.transpose(1, 2).reshape(b * t, c, hh, ww))
        h, w = f.shape[-2:]
        return f.flatten(2).transpose(1, 2).reshape(b, t, h * w, -1), h, w

    def static(self, ref: torch.Tensor) -> torch.Tensor:
        f, h, w = self._per_frame(self.static_conv, ref)
        f = f.mean(dim=1) + sincos_2d(h, w, f.shape[-1], f.device).to(f.dtype)  # pooled over time
        return self.static_out(self.static_pool(f))

    def dynamic(self, ref: torch.Tensor) -> torch.Tensor:
        d = ref[:, :, 1:] - ref[:, :, :-1] if ref.shape[2] > 1 else torch.zeros_like(ref)
        d = d * torch.rsqrt(d.float().pow(2).mean(dim=(2, 3, 4), keepdim=True) + 1e-12).to(d.dtype)
        f, h, w = self._per_frame(self.dynamic_conv, d)
        b, t, n, dim = f.shape
        f = self.temporal(f.permute(0, 2, 3, 1).reshape(b * n, dim, t))  # conv over time at each patch
        f = f.reshape(b, n, dim, t).permute(0, 3, 1, 2) + sincos_2d(h, w, dim, f.device).to(f.dtype)
        return self.dynamic_out(self.dynamic_pool(f.reshape(b, t * n, dim)))

    def forward(self, ref: torch.Tensor) -> IdentityTokens:
        if ref.dim() != 5:
            raise ValueError(f"reference latents must be [B, C, T, H, W], got shape {tuple(ref.shape)}")
        return IdentityTokens(self.static(ref), self.dynamic(ref))


# ---------------------------------------------------------------------------------------------------
# losses and augmentation


def _flat_unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.flatten(1).float(), dim=-1)


def info_nce(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor | None = None,
             temperature: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE between token sets a, b [B, ...]: a[i] and b[j] are positives when labels agree
    (default: i == j); everything else in the batch is a negative."""
    za, zb = _flat_unit(a), _flat_unit(b)
    logits = za @ zb.T / temperature
    labels = torch.arange(len(za), device=za.device) if labels is None else labels
    neg = labels[:, None] != labels[None, :]
    # -log(total probability of the positives): rows of one identity share the mass instead of competing
    loss_ab = -F.log_softmax(logits, dim=1).masked_fill(neg, -torch.inf).logsumexp(dim=1)
    loss_ba = -F.log_softmax(logits, dim=0).masked_fill(neg, -torch.inf).logsumexp(dim=0)
    return 0.5 * (loss_ab.mean() + loss_ba.mean())


def invariance_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MSE between unit-normalised token sets (scale-free, so shrinking the tokens cannot game it)."""
    return (_flat_unit(a) - _flat_unit(b)).pow(2).sum(-1).mean()


def pair_similarity(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor | None = None):
    """(mean cosine similarity of same-identity pairs, of different-identity pairs) between a[i], b[j]."""
    sim = _flat_unit(a) @ _flat_unit(b).T
    labels = torch.arange(len(sim), device=sim.device) if labels is None else labels
    same = labels[:, None] == labels[None, :]
    diff = sim[~same].mean() if (~same).any() else sim.new_tensor(float("nan"))
    return sim[same].mean(), diff


def identity_losses(encoder: IdentityEncoder, ref_a: torch.Tensor, ref_b: torch.Tensor,
                    ref_a_aug: torch.Tensor, labels: torch.Tensor | None = None, *, temperature: float = 0.1,
                    static_weight: float = 1.0, dynamic_weight: float = 1.0,
                    augment_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Disentanglement losses from two clips of each identity (ref_a[i], ref_b[i] show the same person;
    `labels` identity ids if several rows share one) and an appearance-augmented copy of ref_a.

    static InfoNCE (same person across clips) + dynamic InfoNCE (same habits across clips)
    + augment_weight * MSE(dynamic(ref_a), dynamic(ref_a_aug)) (appearance must not change behaviour)."""
    ia, ib = encoder(ref_a), encoder(ref_b)
    dyn_aug = encoder.dynamic(ref_a_aug)
    static_nce = info_nce(ia.static, ib.static, labels, temperature)
    dynamic_nce = info_nce(ia.dynamic, ib.dynamic, labels, temperature)
    augment = invariance_mse(ia.dynamic, dyn_aug)
    loss = static_weight * static_nce + dynamic_weight * dynamic_nce + augment_weight * augment
    with torch.no_grad():
        s_same, s_diff = pair_similarity(ia.static, ib.static, labels)
        d_same, d_diff = pair_similarity(ia.dynamic, ib.dynamic, labels)
    metrics = {
        "identity/static_nce": static_nce.detach(), "identity/dynamic_nce": dynamic_nce.detach(),
        "identity/dynamic_augment_mse": augment.detach(),
        "identity/static_sim_same": s_same, "identity/static_sim_diff": s_diff,
        "identity/dynamic_sim_same": d_same, "identity/dynamic_sim_diff": d_diff,
    }
    return loss, metrics


def _uniform(shape, lo, hi, generator, device):
    u = torch.rand(shape, generator=generator, device=generator.device if generator else None).to(device)
    return lo + (hi - lo) * u


def color_jitter(video: torch.Tensor, generator: torch.Generator | None = None, brightness: float = 0.2,
                 contrast: float = 0.2, saturation: float = 0.2) -> torch.Tensor:
    """Per-sample brightness / contrast / saturation jitter of video [B, 3, T, H, W] in [-1, 1], the same
    for every frame (an appearance change, not a motion change)."""
    b = video.shape[0]
    x = (video.float() + 1) / 2
    shape = (b, 1, 1, 1, 1)
    x = x * _uniform(shape, 1 - brightness, 1 + brightness, generator, video.device)
    mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
    x = (x - mean) * _uniform(shape, 1 - contrast, 1 + contrast, generator, video.device) + mean
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey) * _uniform(shape, 1 - saturation, 1 + saturation, generator, video.device) + grey
    return (x.clamp(0, 1) * 2 - 1).to(video.dtype)


def latent_jitter(latents: torch.Tensor, generator: torch.Generator | None = None,
                  strength: float = 0.3) -> torch.Tensor:
    """A cheap appearance change in latent space: per-sample, per-channel gain and offset, constant over time
    and space (dynamic tokens are exactly invariant to it)."""
    b, c = latents.shape[:2]
    gain = _uniform((b, c, 1, 1, 1), 1 - strength, 1 + strength, generator, latents.device)
    std = latents.float().std(dim=(2, 3, 4), keepdim=True)
    offset = _uniform((b, c, 1, 1, 1), -strength, strength, generator, latents.device) * std
    return (latents.float() * gain + offset).to(latents.dtype)


__all__ = [
    "IdentityTokens",
    "IdentityEncoder",
    "swap_identity",
    "info_nce",
    "invariance_mse",
    "pair_similarity",
    "identity_losses",
    "color_jitter",
    "latent_jitter",
]
