"""The avatar model: the t2v DiT + Sparse Reference Attention, per-frame audio cross-attention and
static / dynamic identity tokens. Reference video + driving audio (+ text) -> lip-synced video latents.

    AvatarModel(text_cfg, AvatarDiTConfig, AudioEncoderConfig)
      .encode_reference(ref_latents [B, C, Tr, H, W]) -> ReferenceCache  (once per generation)
      .encode_audio(wave [B, S], n_latent_frames)     -> AudioWindows    (once per generation)
      (x, t, text_ids, text_mask, audio=wave | AudioWindows, reference=latents | ReferenceCache,
       drop={"text" | "audio" | "reference": [B] bool})  -> velocity, shape of x

Every DiT block, for the video tokens:
    x += g1 * SparseRefAttn(mod(norm(x)), reference K/V of this layer)    (self-attention when no reference)
    x += CrossAttn(norm(x), text)
    x += keep_audio * AudioAttn(norm(x), audio window of x's latent frame)  (zero-initialised output)
    x += g2 * MLP(mod(norm(x)))
and adaLN's conditioning vector gets + keep_ref * Linear(pooled identity tokens) (zero-initialised).
Before the blocks, every video token gets + keep_ref * Linear(the reference's first frame patch at the same
spatial place) (the reference anchor, zero-initialised; `ref_anchor`).

The reference stream runs through the same blocks (shared weights; its own segment embedding and RoPE
positions placed before the video in time; adaLN from the clean timestep t=0, no text, no audio): the
reference tokens attend within their temporal chunk + the summary tokens, the summary tokens (learned
queries + identity tokens) attend to everything in the reference. It never sees the noisy video, so its
per-layer K/V (`ReferenceCache`) serve every sampling step and every guidance pass.

With `reference_matte` the reference's latents outside a head-and-shoulders prior (`person_prior`) are
zeroed before the reference stream and the identity encoder, so the reference conveys the person and the
caption the room.

Zero-init: the per-head reference gate, the audio attention output, the identity adaLN linear and the
anchor embedding start at zero, so a model loaded from t2v weights (`load_t2v_state_dict`) computes exactly what the t2v DiT does,
whatever reference and audio it is given. Dropping a condition (`drop`) is exactly leaving it out.

Training step (a stage):
    drop = sample_condition_drop(B, {"text": 0.1, "audio": 0.2, "reference": 0.2}, p_all=0.05)
    loss, metrics = flow_matching_loss(model, x0, text=ids, text_mask=mask, audio=wave,
                                       reference=ref_latents, drop=drop, weight=mouth_weight)
    (+ identity_losses(model.dit.identity, ref_a, ref_b, ref_a_aug) for the disentanglement)
Sampling:
    cond = dict(text=ids, text_mask=mask, audio=model.encode_audio(wave, T_latent),
                reference=model.encode_reference(ref_latents))
    x0 = euler_sample(guided_model_fn(model, {"audio": 2.5, "reference": 1.5}), shape, steps, gen, **cond)
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, RoPE3D
from .audio import AudioEncoder, AudioEncoderConfig, AudioWindows
from .dit import DiT, DiTBlock, DiTConfig, modulate, timestep_embedding
from .identity import IdentityEncoder, IdentityTokens
from .reference_attention import (
    PATTERNS,
    ReferenceKV,
    attend_reference,
    attention_lse,
    merge_reference,
    reference_self_attention,
    share_calibration,
)
from .text_encoder import TextEncoder, TextEncoderConfig

CONDITIONS = ("text", "audio", "reference")


@dataclass
class AvatarDiTConfig(DiTConfig):
    # Sparse Reference Attention
    ref_pattern: str = "topk"  # "topk" (block top-k by pooled keys) | "fixed" (interleaved) | "dense"
    ref_top_k: int = 4  # reference blocks each video query block attends to
    ref_block: int = 64  # reference tokens per selectable block
    query_block: int = 64  # video queries that share one selection
    ref_chunk_frames: int = 1  # reference tokens attend within chunks of this many token-frames (+ summary)
    # > 0: the reference's share of each video query's softmax is kept at what this many reference tokens
    # give (the training reference's token count), so a longer reference at sampling does not take more of
    # the attention just by having more keys; 0: plain joint attention
    ref_share_tokens: int = 0
    n_summary: int = 8  # learned summary queries (identity tokens are appended to them)
    # audio cross-attention
    audio_dim: int = 128  # AudioEncoderConfig.dim
    # static / dynamic identity
    identity_dim: int = 64
    n_static: int = 4
    n_dynamic: int = 4
    # reference anchor: the reference's first latent frame, patch-embedded (zero-initialised linear) and
    # added to every video token at the same spatial place, as image-to-video models concatenate the
    # conditioning frame; attention alone must first learn *where* to copy from, the anchor hands each
    # token its own patch of the person, so training spends itself on what moves (mouth, head)
    ref_anchor: bool = False
    # the per-head reference gate's start: 0 = a fresh avatar model computes exactly the t2v model (the new
    # path must first earn its gate, and the reference K/V get no gradient while it is 0); 1 = exact joint
    # attention over [video; summary; reference] from the first step (in-context conditioning: the t2v
    # self-attention already matches a clean face's tokens to the noisy video's)
    ref_gate_init: float = 0.0
    # reference matte: the reference's latents outside a head-and-shoulders prior (`person_prior`) are zeroed
    # before the reference stream and the identity encoder see them, so the reference conveys the person and
    # not its room: the backdrop must come from the caption (cross-scene generation, README claim d)
    reference_matte: bool = False

    def dit_config(self) -> DiTConfig:
        """The t2v part of this config (what the t2v stage built its DiT from)."""
        return DiTConfig(**{f.name: getattr(self, f.name) for f in fields(DiTConfig)})


@dataclass
class ReferenceCache:
    """Everything the video stream needs from a reference: per-layer K/V, the identity adaLN vector."""

    layers: list[ReferenceKV]
    cond: torch.Tensor  # [B, dim], added to the DiT's conditioning vector
    identity: IdentityTokens
    grid: tuple[int, int, int]  # reference token grid (T, H, W)
    anchor: torch.Tensor | None = None  # [B, H*W tokens of one token-frame, dim]: embedded first frame

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def repeat(self, n: int) -> ReferenceCache:
        """The same reference for a batch n times larger (e.g. several samples of one reference)."""
        rep = lambda x: x.repeat(n, *([1] * (x.dim() - 1)))  # noqa: E731
        ids = IdentityTokens(rep(self.identity.static), rep(self.identity.dynamic))
        anchor = None if self.anchor is None else rep(self.anchor)
        return ReferenceCache([kv.repeat(n) for kv in self.layers], rep(self.cond), ids, self.grid, anchor)


# A face-centred crop's head and shoulders (centre x, centre y, radius x, radius y; fractions of the frame):
# the synthetic renderer and ingest's face crops put the head's centre at (0.5, 0.46) with a half-width of
# 0.22 (hair reaches ~0.3 and the top of the frame), and the shoulders rise from the bottom edge.
HEAD_ELLIPSE = (0.5, 0.45, 0.28, 0.38)
BODY_ELLIPSE = (0.5, 1.08, 0.48, 0.32)


def person_prior(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """[height, width] float mask, 1 inside the head-and-shoulders prior of a face-centred crop."""
    y = ((torch.arange(height, device=device) + 0.5) / height)[:, None]
    x = ((torch.arange(width, device=device) + 0.5) / width)[None, :]

    def inside(cx: float, cy: float, rx: float, ry: float) -> torch.Tensor:
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1

    return (inside(*HEAD_ELLIPSE) | inside(*BODY_ELLIPSE)).float()


def keep_person(x: torch.Tensor) -> torch.Tensor:
    """x [..., H, W] with everything outside the person prior zeroed."""
    return x * person_prior(*x.shape[-2:], device=x.device).to(x.dtype)


def _keep(drop: torch.Tensor | None) -> torch.Tensor | None:
    return None if drop is None else (~drop.bool()).float()


class AvatarDiTBlock(DiTBlock):
    def __init__(self, cfg: AvatarDiTConfig):
        super().__init__(cfg)
        if cfg.ref_pattern not in PATTERNS:
            raise ValueError(f"ref_pattern must be one of {PATTERNS}, got {cfg.ref_pattern!r}")
        self.cfg = cfg
        d = cfg.dim
        self.ref_gate = nn.Parameter(torch.zeros(cfg.heads))  # 0: video-only; 1: exact joint attention
        self.audio_norm = nn.LayerNorm(d, eps=1e-6)
        self.audio_attn = Attention(d, cfg.heads, context_dim=cfg.audio_dim, qk_norm=cfg.qk_norm)

    def reference_stream(self, h: torch.Tensor, n_summary: int, c_ref: torch.Tensor, rope: tuple, chunk: int,
                         update: bool) -> tuple[ReferenceKV, torch.Tensor]:
        """Reference-stream tokens h [B, S + R, dim] (summary first) -> this layer's K/V and, if `update`,
        the tokens after this block (attention within chunks + summary, MLP; adaLN from c_ref)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c_ref)[:, None].chunk(6, dim=-1)
        hn = modulate(self.norm1(h), shift1, scale1)
        k, v = self.attn.project_kv(hn, rope)
        kv = ReferenceKV.build(k, v, n_summary, self.cfg.ref_block)
        if not update:
            return kv, h
        pattern = "dense" if self.cfg.ref_pattern == "dense" else "chunk"
        o = reference_self_attention(self.attn.project_q(hn, rope), k, v, n_summary, pattern, chunk)
        h = h + gate1 * self.attn.out(o.transpose(1, 2).flatten(2))
        return kv, h + gate2 * self.mlp(modulate(self.norm3(h), shift2, scale2))

    def forward(self, x, c, rope, text, text_mask, audio: AudioWindows | None = None,
                ref: ReferenceKV | None = None, keep_audio: torch.Tensor | None = None,
                keep_ref: torch.Tensor | None = None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=-1)
        hn = modulate(self.norm1(x), shift1, scale1)
        if ref is None:
            a = self.attn(hn, rope=rope)
        else:
            q = self.attn.project_q(hn, rope)
            k, v = self.attn.project_kv(hn, rope)
            o_v, lse_v = attention_lse(q, k, v)
            cfg = self.cfg
            o_r, lse_r = attend_reference(q, ref, cfg.ref_pattern, cfg.ref_top_k, cfg.query_block)
            lse_r = lse_r - share_calibration(ref, cfg.ref_pattern, cfg.ref_top_k, cfg.ref_share_tokens)
            o = merge_reference(o_v, lse_v, o_r, lse_r, self.ref_gate, keep_ref)
            a = self.attn.out(o.transpose(1, 2).flatten(2))
        x = x + gate1 * a
        if text is not None:
            x = x + self.cross(self.norm2(x), context=text, key_mask=text_mask)
        if audio is not None:
            b, n, d = x.shape
            g = audio.tokens.shape[1]
            xa = self.audio_norm(x).reshape(b * g, n // g, d)  # the tokens of one token-frame
            a = self.audio_attn(xa, context=audio.tokens.flatten(0, 1), key_mask=audio.mask.flatten(0, 1))
            a = a.reshape(b, n, d)
            x = x + (a if keep_audio is None else a * keep_audio[:, None, None].to(a.dtype))
        return x + gate2 * self.mlp(modulate(self.norm3(x), shift2, scale2))


class AvatarDiT(DiT):
    block_class = AvatarDiTBlock

    def __init__(self, cfg: AvatarDiTConfig | None = None):
        cfg = cfg or AvatarDiTConfig()
        super().__init__(cfg)
        d = cfg.dim
        self.ref_segment = nn.Parameter(torch.randn(d) * 0.02)  # "this token is from the reference"
        self.summary = nn.Parameter(torch.randn(cfg.n_summary, d) * 0.02)
        self.identity = IdentityEncoder(cfg.latent_channels, cfg.identity_dim, d, cfg.n_static, cfg.n_dynamic,
                                        heads=max(1, cfg.identity_dim // 32))
        self.identity_ada = nn.Linear(2 * d, d)
        self.anchor_embed = nn.Linear(self.patch_dim, d) if cfg.ref_anchor else None
        self.reset_parameters()

    def set_reference_share(self, tokens: int) -> None:
        """Sampling-time `ref_share_tokens` (0: off); the blocks read it from the config they share, so a
        trained model can be sampled either way without retraining."""
        if tokens < 0:
            raise ValueError(f"reference share tokens must be >= 0, got {tokens}")
        self.cfg.ref_share_tokens = int(tokens)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for block in self.blocks:  # new paths start closed (gate 0: the model is exactly the t2v model)
            nn.init.constant_(block.ref_gate, self.cfg.ref_gate_init)
            nn.init.zeros_(block.audio_attn.out.weight)
            nn.init.zeros_(block.audio_attn.out.bias)
        if hasattr(self, "identity_ada"):
            nn.init.zeros_(self.identity_ada.weight)
            nn.init.zeros_(self.identity_ada.bias)
        if getattr(self, "anchor_embed", None) is not None:
            nn.init.zeros_(self.anchor_embed.weight)
            nn.init.zeros_(self.anchor_embed.bias)

    # -- reference ---------------------------------------------------------------------------------

    def matte(self, ref_latents: torch.Tensor) -> torch.Tensor:
        """The reference latents with everything outside the person prior zeroed (`reference_matte`), else
        as given."""
        return keep_person(ref_latents) if self.cfg.reference_matte else ref_latents

    def encode_reference(self, ref_latents: torch.Tensor, identity: IdentityTokens | None = None) -> ReferenceCache:
        """Reference latents [B, C, Tr, H, W] (scaled like the video latents) -> per-layer K/V.

        `identity` overrides the tokens the identity encoder would compute (e.g. `swap_identity(a, b)`)."""
        cfg = self.cfg
        ref_latents = self.matte(ref_latents)
        grid = self.token_grid(tuple(ref_latents.shape))
        h_ref = self.patch_embed(self.patchify(ref_latents)) + self.ref_segment.to(ref_latents.dtype)
        ids = self.identity(ref_latents) if identity is None else identity
        b = h_ref.shape[0]
        h_sum = torch.cat([self.summary.expand(b, -1, -1).to(h_ref.dtype), ids.static, ids.dynamic], dim=1)
        h = torch.cat([h_sum, h_ref], dim=1)  # one stream: summary tokens first
        pos = RoPE3D.grid(*grid, device=ref_latents.device)
        pos[:, 0] -= grid[0]  # the reference sits just before the video in time
        rope_ref = self.rope.angles(pos)
        rope = RoPE3D.cos_sin(torch.cat([rope_ref.new_zeros(h_sum.shape[1], rope_ref.shape[-1]), rope_ref]))  # summary: none
        c_ref = self.time_embed(timestep_embedding(torch.zeros(1, device=ref_latents.device), cfg.freq_dim)
                                .to(self.final.weight.dtype))  # clean (t = 0), no text
        chunk = cfg.ref_chunk_frames * grid[1] * grid[2]
        layers = []
        for i, block in enumerate(self.blocks):
            args = (h, h_sum.shape[1], c_ref, rope, chunk, i < len(self.blocks) - 1)
            if cfg.grad_checkpointing and self.training:
                kv, h = checkpoint(block.reference_stream, *args, use_reentrant=False)
            else:
                kv, h = block.reference_stream(*args)
            layers.append(kv)
        anchor = None
        if self.anchor_embed is not None:  # frame 0 (encoded alone by the causal autoencoder: a clean image)
            first = ref_latents[:, :, :1].expand(-1, -1, cfg.patch_size[0], -1, -1)
            anchor = self.anchor_embed(self.patchify(first))
        return ReferenceCache(layers, self.identity_ada(ids.pooled()), ids, grid, anchor)

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, *, audio: AudioWindows | None = None,
                reference: ReferenceCache | torch.Tensor | None = None,
                drop: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """As DiT.forward, plus audio windows, a reference (latents or a cache) and per-sample condition
        dropout `drop` {name: [B] bool, True = drop} for "text" (empty caption), "audio", "reference"."""
        grid = self.token_grid(tuple(x.shape))
        b = x.shape[0]
        if t.dim() == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must be [B]={b}, got shape {tuple(t.shape)}")
        drop = drop or {}
        unknown = set(drop) - set(CONDITIONS)
        if unknown:
            raise ValueError(f"drop keys must be among {CONDITIONS}, got {sorted(unknown)}")
        if text is not None:
            if text.shape[-1] != self.cfg.text_dim:
                raise ValueError(f"text must be [B, L, {self.cfg.text_dim}], got {tuple(text.shape)}")
            if drop.get("text") is not None:
                keep = ~drop["text"].bool()[:, None]
                text_mask = keep if text_mask is None else text_mask.bool() & keep
                text = text * text_mask[..., None].to(text.dtype)
        if audio is not None and tuple(audio.tokens.shape[:2]) != (b, grid[0]):
            raise ValueError(f"audio windows must be [B={b}, {grid[0]} token-frames, ...], "
                             f"got {tuple(audio.tokens.shape)}")
        if isinstance(reference, torch.Tensor):
            reference = self.encode_reference(reference)
        keep_ref, keep_audio = _keep(drop.get("reference")), _keep(drop.get("audio"))
        c, ctx = self.condition(t, text, text_mask)
        if reference is not None:
            if reference.cond.shape[0] != b:
                raise ValueError(f"reference batch {reference.cond.shape[0]} != video batch {b}; "
                                 "use ReferenceCache.repeat")
            c = c + (reference.cond if keep_ref is None else reference.cond * keep_ref[:, None].to(c.dtype))
        h = self.patch_embed(self.patchify(x))
        if reference is not None and reference.anchor is not None:
            if reference.grid[1:] != grid[1:]:
                raise ValueError(f"reference token grid {reference.grid[1:]} (H, W) != video's {grid[1:]}")
            anchor = reference.anchor if keep_ref is None else reference.anchor * keep_ref[:, None, None].to(h.dtype)
            h = (h.unflatten(1, (grid[0], -1)) + anchor[:, None]).flatten(1, 2)
        rope = RoPE3D.cos_sin(self.rope.angles(RoPE3D.grid(*grid, device=x.device)))
        for i, block in enumerate(self.blocks):
            kv = reference.layers[i] if reference is not None else None
            args = (h, c, rope, ctx, text_mask, audio, kv, keep_audio, keep_ref)
            if self.cfg.grad_checkpointing and self.training:
                h = checkpoint(block, *args, use_reentrant=False)
            else:
                h = block(*args)
        shift, scale = self.final_ada(c)[:, None].chunk(2, dim=-1)
        return self.velocity(self.unpatchify(self.final(modulate(self.final_norm(h), shift, scale)), grid), x, t)


class AvatarModel(nn.Module):
    """The trainable part of the avatar stages: text encoder + avatar DiT + audio encoder. State-dict keys
    of the t2v model (`text_encoder.*`, `dit.*`) are a subset of this model's (see load_t2v_state_dict)."""

    def __init__(self, text: TextEncoderConfig | None = None, dit: AvatarDiTConfig | None = None,
                 audio: AudioEncoderConfig | None = None):
        super().__init__()
        self.text_encoder = TextEncoder(text)
        self.dit = AvatarDiT(dit)
        self.audio_encoder = AudioEncoder(audio)
        if self.text_encoder.cfg.dim != self.dit.cfg.text_dim or self.audio_encoder.cfg.dim != self.dit.cfg.audio_dim:
            raise ValueError("text.dim must equal dit.text_dim and audio.dim must equal dit.audio_dim")

    def encode_reference(self, ref_latents: torch.Tensor, identity: IdentityTokens | None = None) -> ReferenceCache:
        return self.dit.encode_reference(ref_latents, identity)

    def encode_identity(self, ref_latents: torch.Tensor) -> IdentityTokens:
        return self.dit.identity(self.dit.matte(ref_latents))

    def encode_audio(self, wave: torch.Tensor, n_latent_frames: int) -> AudioWindows:
        """Waveform [B, S] covering the clip -> the audio window of each token-frame of the DiT."""
        return self.audio_encoder.windows(self.audio_encoder(wave), n_latent_frames, self.dit.cfg.patch_size[0])

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, audio: torch.Tensor | AudioWindows | None = None,
                reference: torch.Tensor | ReferenceCache | None = None,
                drop: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """text: byte ids [B, L] (0 = padding); audio: waveform [B, S] or encode_audio's windows;
        reference: latents [B, C, Tr, H, W] or encode_reference's cache."""
        ctx = None
        if text is not None:
            text_mask = text != 0 if text_mask is None else text_mask
            ctx = self.text_encoder(text, text_mask)
        if isinstance(audio, torch.Tensor):
            audio = self.encode_audio(audio, x.shape[2])
        return self.dit(x, t, ctx, text_mask, audio=audio, reference=reference, drop=drop)

    def load_t2v_state_dict(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Load t2v weights (`TextToVideo` keys); returns the new keys left at their (zero-gated) init.
        Raises ValueError if a key is unknown or a t2v weight is missing."""
        with torch.device("meta"):
            t2v_keys = {f"dit.{k}" for k in DiT(self.dit.cfg.dit_config()).state_dict()}
        t2v_keys |= {f"text_encoder.{k}" for k in self.text_encoder.state_dict()}
        own = set(self.state_dict())
        unexpected = sorted(set(state) - own)
        missing_t2v = sorted(t2v_keys - set(state))
        if unexpected or missing_t2v:
            raise ValueError(f"not t2v weights for this model: unexpected {unexpected[:5]}, "
                             f"missing {missing_t2v[:5]}")
        self.load_state_dict(state, strict=False)
        return sorted(own - set(state))


__all__ = ["AvatarDiTConfig", "AvatarDiT", "AvatarDiTBlock", "AvatarModel", "ReferenceCache", "CONDITIONS"]
