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
summary lets it check identity. With `sync.enabled` a SyncNet-shaped head adds a lip-sync term to the score:
per token-frame features of the mouth region and of the audio window, each centred over time, dotted and
averaged (a learned correlation of mouth motion with speech). `sync_contrastive_loss` trains it on
ground-truth clips (aligned audio preferred over shifted or another clip's), as SyncNet is trained: the
transformer alone, fitted to a few hundred preference pairs, does not learn lip sync
(benchmarks/reward_learnability.py). With `identity.enabled` an identity head adds a learned
similarity of the video to the reference (`IdentityHead`, trained by `identity_contrastive_loss` on
ground-truth clips). The audio encoder has AvatarModel's structure and key names
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
from .avatar import keep_person
from .dit import timestep_embedding
from .text_encoder import TransformerBlock


@dataclass
class SyncConfig:
    enabled: bool = False
    dim: int = 32  # width of the mouth / audio features that are correlated
    hidden: int = 128
    # the mouth region, fractions of the latent grid (face-centred crops: the mouth at ~0.6 rows, 0.5
    # columns), average-pooled to pool x pool so the head does not depend on the resolution
    rows: list[float] = field(default_factory=lambda: [0.45, 0.8])
    cols: list[float] = field(default_factory=lambda: [0.25, 0.75])
    pool: int = 4
    # "dot": the mean dot product of the time-centred features (unbounded: a policy optimised against it
    # can raise it by amplitude alone); "cosine": their correlation over the whole clip (the centred
    # features' cosine, in [-1, 1], as SyncNet's cosine similarity) times a learned scale
    score: str = "dot"
    init_scale: float = 10.0  # cosine: the learned scale's start (CLIP's inverse temperature)


@dataclass
class IdentityHeadConfig:
    enabled: bool = False
    dim: int = 32  # width of the identity embedding
    hidden: int = 128
    pool: int = 4  # latents averaged over time and pooled to pool x pool before the embedding
    init_scale: float = 10.0  # the learned scale of the cosine (CLIP's inverse temperature) starts here
    # "frame": the whole latent frame; "person": latents outside the head-and-shoulders prior of face-centred
    # crops (model.avatar.person_prior) zeroed first, so the room does not enter the embedding
    region: str = "frame"


IDENTITY_REGIONS = ("frame", "person")


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
    sync: SyncConfig = field(default_factory=SyncConfig)
    identity: IdentityHeadConfig = field(default_factory=IdentityHeadConfig)


def _positions(t: torch.Tensor, h: torch.Tensor, w: torch.Tensor, freq_dim: int) -> torch.Tensor:
    """Sinusoids of (t, h, w) positions [N] each -> [N, 3 * freq_dim]."""
    return torch.cat([timestep_embedding(a.float(), freq_dim, max_period=100.0) for a in (t, h, w)], dim=-1)


SYNC_SCORES = ("dot", "cosine")


class SyncHead(nn.Module):
    """Lip sync as a learned correlation: mouth features and audio features per token-frame, centred over
    time, dotted and averaged. A still mouth or audio-independent motion scores ~0."""

    def __init__(self, latent_channels: int, patch_t: int, audio_dim: int, cfg: SyncConfig) -> None:
        super().__init__()
        if cfg.score not in SYNC_SCORES:
            raise ValueError(f"sync.score must be one of {SYNC_SCORES}, got {cfg.score!r}")
        self.cfg, self.patch_t = cfg, patch_t
        if cfg.score == "cosine":
            # shape [1], not 0-dim: DeepSpeed's parameter broadcast cannot view a 0-dim tensor as bytes
            self.log_scale = nn.Parameter(torch.full((1,), math.log(cfg.init_scale)))
        self.video = nn.Sequential(nn.Linear(latent_channels * patch_t * cfg.pool**2, cfg.hidden), nn.GELU(),
                                   nn.Linear(cfg.hidden, cfg.dim))
        self.audio = nn.Sequential(nn.Linear(audio_dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.dim))

    def features(self, video: torch.Tensor, audio: AudioWindows) -> tuple[torch.Tensor, torch.Tensor]:
        """video latents [B, C, T, H, W], audio windows [B, G = T / patch_t, W, dim] -> ([B, G, d], [B, G, d])."""
        b, c, t, h, w = video.shape
        (r0, r1), (c0, c1) = self.cfg.rows, self.cfg.cols
        mouth = video[..., int(r0 * h):max(int(r0 * h) + 1, round(r1 * h)),
                      int(c0 * w):max(int(c0 * w) + 1, round(c1 * w))]
        mouth = F.adaptive_avg_pool2d(mouth.flatten(1, 2), self.cfg.pool).view(b, c, t, -1)
        g = t // self.patch_t
        mouth = mouth.view(b, c, g, self.patch_t, -1).permute(0, 2, 1, 3, 4).reshape(b, g, -1)
        mask = audio.mask.unsqueeze(-1).to(audio.tokens.dtype)
        pooled = (audio.tokens * mask).sum(2) / mask.sum(2).clamp_min(1.0)
        return self.video(mouth), self.audio(pooled)

    def score(self, video_features: torch.Tensor, audio_features: torch.Tensor) -> torch.Tensor:
        """[B, G, d] each -> [B]: the time-centred features' mean dot product per token-frame ("dot"), or
        their cosine over the whole window times the learned scale ("cosine")."""
        v = video_features - video_features.mean(1, keepdim=True)
        a = audio_features - audio_features.mean(1, keepdim=True)
        if self.cfg.score == "dot":
            return (v * a).sum(-1).mean(1)
        cosine = (v * a).sum((1, 2)) / (v.flatten(1).norm(dim=1) * a.flatten(1).norm(dim=1)).clamp_min(1e-6)
        return self.log_scale.clamp(max=math.log(100.0)).exp() * cosine

    def forward(self, video: torch.Tensor, audio: AudioWindows) -> torch.Tensor:
        return self.score(*self.features(video, audio))


class IdentityHead(nn.Module):
    """Identity as a learned similarity of the video to the reference, as a face-recognition embedding
    scores avatar models: both averaged over time, pooled to pool x pool latents, embedded by one shared
    MLP; the score is the embeddings' cosine times a learned scale. `identity_contrastive_loss` trains it on
    ground-truth clips: a GRPO policy chasing the sync head's lip sync otherwise drifts from the reference's
    person on almost every prompt by a little (README, rlhf)."""

    def __init__(self, latent_channels: int, cfg: IdentityHeadConfig) -> None:
        super().__init__()
        if cfg.region not in IDENTITY_REGIONS:
            raise ValueError(f"identity.region must be one of {IDENTITY_REGIONS}, got {cfg.region!r}")
        self.cfg = cfg
        # shape [1], not 0-dim: DeepSpeed's parameter broadcast cannot view a 0-dim tensor as bytes
        self.log_scale = nn.Parameter(torch.full((1,), math.log(cfg.init_scale)))
        self.embed = nn.Sequential(nn.Linear(latent_channels * cfg.pool**2, cfg.hidden), nn.GELU(),
                                   nn.Linear(cfg.hidden, cfg.dim))

    def embedding(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, T, H, W] -> unit embeddings [B, dim]."""
        if self.cfg.region == "person":
            latents = keep_person(latents)
        pooled = F.adaptive_avg_pool3d(latents, (1, self.cfg.pool, self.cfg.pool)).flatten(1)
        return F.normalize(self.embed(pooled), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=math.log(100.0)).exp()

    def similarity(self, video: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Embeddings [B, d] x [N, d] -> scaled cosines [B, N]."""
        return self.scale() * video @ reference.T

    def forward(self, video: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Latents [B, ...] each -> scaled cosine of each video with its own reference [B]."""
        return self.scale() * (self.embedding(video) * self.embedding(reference)).sum(-1)


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
        self.sync = (SyncHead(cfg.latent_channels, cfg.patch_size[0], cfg.audio.dim, cfg.sync)
                     if cfg.sync.enabled else None)
        self.identity = IdentityHead(cfg.latent_channels, cfg.identity) if cfg.identity.enabled else None

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
        score = self.head(self.norm(h[:, 0])).squeeze(-1).float()
        if self.sync is not None and audio is not None:
            score = score + self.sync(video, audio).float()
        if self.identity is not None and reference is not None:
            score = score + self.identity(video, reference).float()
        return score


def sync_contrastive_loss(model: RewardModel, latents: torch.Tensor, wave: torch.Tensor, *, crop: int,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SyncNet-style training of the sync head (and the audio encoder) on ground-truth clips: latents
    [B >= 2, C, T, H, W] with their own audio [B, S]. Per clip a random window of `crop` token-frames; its
    aligned audio must score above the same clip's audio shifted by up to 2 .. crop / 2 token-frames (same
    voice, wrong timing; near the clip's ends the farther of the two directions) and above the next clip's
    audio at the same place (Bradley-Terry on both). Metrics: loss, accuracy (aligned above shifted)."""
    if model.sync is None:
        raise ValueError("sync_contrastive_loss needs a reward model with sync.enabled")
    b, g = latents.shape[0], latents.shape[2] // model.cfg.patch_size[0]
    max_shift = min(crop // 2, g - crop)
    if b < 2 or max_shift < 2:
        raise ValueError(f"need >= 2 clips and >= crop + 2 = {crop + 2} token-frames, got {b} clips of {g}")
    video, audio = model.sync.features(latents, model.encode_audio(wave, latents.shape[2]))

    def draw(high: int) -> torch.Tensor:
        return torch.randint(0, high, (b,), generator=generator).to(latents.device)

    start = draw(g - crop + 1)
    shift = (draw(max_shift - 1) + 2) * (draw(2) * 2 - 1)
    forward, backward = (start + shift).clamp(0, g - crop), (start - shift).clamp(0, g - crop)
    shifted = torch.where((forward - start).abs() >= (backward - start).abs(), forward, backward)  # the farther
    frames = torch.arange(crop, device=latents.device)

    def window(x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        return x.gather(1, (at[:, None] + frames)[..., None].expand(-1, -1, x.shape[-1]))

    v = window(video, start)
    aligned = model.sync.score(v, window(audio, start))
    off = model.sync.score(v, window(audio, shifted))
    other = model.sync.score(v, window(audio.roll(1, dims=0), start))
    loss = 0.5 * (bradley_terry_loss(aligned, off)[0] + bradley_terry_loss(aligned, other)[0])
    return loss, {"loss": loss.detach(), "accuracy": pair_accuracy(aligned, off)}


def identity_contrastive_loss(model: RewardModel, latents: torch.Tensor, references: torch.Tensor,
                              identities: torch.Tensor, altered: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training of the identity head on ground-truth clips: latents [B, C, T, H, W], the reference latents of
    each clip's identity [B, C, Tr, H, W], identity ids [B] (>= 2 distinct). Each clip must match the
    references of its own identity above the batch's other identities' (InfoNCE with every same-identity
    reference a positive). `altered` [B, C, T, H, W]: the same clips with the person changed a little (hard
    negatives: other identities differ too much to teach a drift's size); each must score below its clip
    against the clip's reference (Bradley-Terry). Metrics: loss, accuracy (own reference above every other
    identity's), altered_accuracy."""
    if model.identity is None:
        raise ValueError("identity_contrastive_loss needs a reward model with identity.enabled")
    if identities.unique().numel() < 2:
        raise ValueError("identity_contrastive_loss needs clips of >= 2 identities in the batch")
    head = model.identity
    e_ref = head.embedding(references)
    scores = head.similarity(head.embedding(latents), e_ref).float()  # [B, B]
    same = identities[:, None] == identities[None, :]
    loss = (torch.logsumexp(scores, 1) - torch.logsumexp(scores.masked_fill(~same, float("-inf")), 1)).mean()
    own = scores.diagonal()
    other_best = scores.masked_fill(same, float("-inf")).amax(1)
    metrics = {"accuracy": (own > other_best).float().mean().detach()}
    if altered is not None:
        own_altered = (head.scale() * (head.embedding(altered) * e_ref).sum(-1)).float()
        hard, _ = bradley_terry_loss(own, own_altered)
        loss = loss + hard
        metrics["altered_accuracy"] = pair_accuracy(own, own_altered)
    return loss, {"loss": loss.detach(), **metrics}


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


__all__ = ["IDENTITY_REGIONS", "SYNC_SCORES", "IdentityHead", "IdentityHeadConfig", "RewardModelConfig", "SyncConfig", "SyncHead",
           "RewardModel", "bradley_terry_loss", "identity_contrastive_loss", "pair_accuracy", "sync_contrastive_loss"]
