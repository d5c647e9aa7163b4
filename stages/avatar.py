"""Stages `a2v_pretrain` and `personality_sft`: the avatar model (reference video + audio (+ text) ->
video) trained by rectified flow on the frozen autoencoder's latents, scored by the synthetic oracle.

a2v starts from the t2v weights (new audio / reference / identity weights are zero-gated, so it starts as
exactly the t2v model); sft fine-tunes a2v on chosen identities, fully or with LoRA, adding the static /
dynamic identity disentanglement losses.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from avatarforge.data.config import DataConfig
from avatarforge.data.loader import build_eval_batches
from avatarforge.data.synth.oracle import summarize
from avatarforge.model.audio import AudioEncoderConfig
from avatarforge.model.avatar import AvatarDiTConfig, AvatarModel
from avatarforge.model.flow import eval_flow_loss, flow_matching_loss
from avatarforge.model.guidance import sample_condition_drop
from avatarforge.model.identity import color_jitter, identity_losses
from avatarforge.model.lora import LoRAConfig, LoRALinear, inject_lora
from avatarforge.model.text_encoder import TextEncoderConfig
from avatarforge.stages.common import (
    FlowLossOptions,
    FrozenAutoencoder,
    mean_metrics,
    parent_of_kind,
    train_stream,
    typed,
)
from avatarforge.stages.quality import (
    Policy,
    Prompt,
    make_prompts,
    read_identities,
    read_world,
    sample_prompts,
    score_prompts,
    spread,
)

BATCH_KEYS = ("video", "audio", "text", "text_mask", "reference")
ORACLE_KEYS = ("lipsync_corr", "lipsync_conf", "lipsync_offset", "identity_error", "behaviour_error", "jitter")


@dataclass
class A2VOptions(FlowLossOptions):
    eval_clips: int = 8
    # independent condition dropout (multi-condition classifier-free guidance), plus all at once
    drop_text: float = 0.3
    drop_audio: float = 0.1
    drop_reference: float = 0.1
    drop_all: float = 0.05
    # extra flow-loss weight on the mouth region: a Gaussian prior at the lower centre of the face-centred
    # crops (the synthetic world and ingest both centre the face), 1 = no weighting
    mouth_weight: float = 2.0
    # (row, column) as a fraction; the synthetic renderer's mouth row is 0.46 + 0.52 face radii ~ 0.59-0.61
    mouth_center: list[float] = field(default_factory=lambda: [0.6, 0.5])
    mouth_sigma: float = 0.18
    # motion term on the mouth prior (model.flow.flow_matching_loss dynamic_scale): the clean estimate's
    # error in what changes over time. Within-clip change is ~3% of the mouth region's latent variance, so
    # without it the model predicts spurious mouth motion and the audio (which only explains motion) gets
    # no useful gradient. 0 = off
    dynamic_weight: float = 0.0
    # sampled videos at every eval: scored by the oracle and logged to W&B
    eval_videos: int = 4
    sample_steps: int = 12
    guidance_text: float = 1.0
    guidance_audio: float = 2.0
    guidance_reference: float = 1.5
    # a2v: leave the personality_sft stage's identities out of pretraining, so that stage fine-tunes people
    # the model has never seen (a new customer), as the product does; otherwise sft re-fits identities a2v
    # already trained on (README, claim c)
    holdout_personality: bool = False

    def validate(self) -> list[str]:
        errors = self.flow_errors()
        if self.dynamic_weight < 0 or self.mouth_sigma <= 0:
            errors.append(f"dynamic_weight must be >= 0 and mouth_sigma > 0, got {self.dynamic_weight}, "
                          f"{self.mouth_sigma}")
        return errors


@dataclass
class SFTOptions(A2VOptions):
    identities: list[str] = field(default_factory=list)  # train identities to fine-tune on; empty: first N
    num_identities: int = 2
    lora: bool = False  # LoRA adapters (merged into the exported weights) instead of full fine-tuning
    lora_config: LoRAConfig = field(default_factory=LoRAConfig)
    identity_loss_weight: float = 0.1

    def validate(self) -> list[str]:
        errors = super().validate()
        if self.holdout_personality:
            errors.append("holdout_personality is an a2v option: personality_sft trains on those identities")
        return errors


def mouth_prior(shape: tuple[int, ...], options: A2VOptions) -> torch.Tensor:
    """[1, 1, 1, H, W] Gaussian over the latent grid, 1 at the mouth prior."""
    h, w = shape[-2:]
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    cy, cx = options.mouth_center
    g = torch.exp(-((ys[:, None] - cy) ** 2 + (xs[None, :] - cx) ** 2) / (2 * options.mouth_sigma**2))
    return g.view(1, 1, 1, h, w)


def mouth_weight_map(shape: tuple[int, ...], options: A2VOptions) -> torch.Tensor:
    """[1, 1, 1, H, W] loss weights over the latent grid: 1 + (w - 1) * Gaussian at the mouth prior."""
    return 1 + (options.mouth_weight - 1) * mouth_prior(shape, options)


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


class AvatarTask:
    options_type: type = A2VOptions

    def __init__(self, args: dict[str, Any]) -> None:
        config, stage = args["config"], args["stage"]
        stage_cfg = config["stages"][stage]
        self.args = args
        self.options = typed(self.options_type, stage_cfg["options"])
        self.text_cfg = typed(TextEncoderConfig, config["model"]["text"])
        self.dit_cfg = typed(AvatarDiTConfig, config["model"]["dit"])
        self.audio_cfg = typed(AudioEncoderConfig, config["model"]["audio"])
        self.data = typed(DataConfig, config["data"])
        if self.data.reference_frames <= 0:
            raise ValueError(f"stage {stage!r} needs references: set data.reference_frames > 0")
        self.batch_size = stage_cfg["train"]["batch_size"]
        self.eval_batch_size = stage_cfg["train"]["eval"]["batch_size"]
        self.seed = config["seed"]
        self.autoencoder = FrozenAutoencoder(config["model"]["autoencoder"], parent_of_kind(args, "autoencoder"))
        self._eval: list[dict[str, Any]] | None = None
        self._prompts: list[Prompt] | None = None

    # -- model --------------------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        return AvatarModel(self.text_cfg, self.dit_cfg, self.audio_cfg)

    def init_from_parents(self, model: nn.Module) -> None:
        fresh = model.load_t2v_state_dict(load_file(parent_of_kind(self.args, "t2v_pretrain")))
        print(f"[a2v] loaded t2v weights; {len(fresh)} new (zero-gated) tensors", flush=True)

    # -- data ---------------------------------------------------------------------------------------

    def identities(self) -> list[str] | None:
        """The identities the stage is about (its evals); None: all."""
        return None

    def train_identities(self) -> list[str] | None:
        """The identities whose clips the stage trains on (None: the whole training split)."""
        if not self.options.holdout_personality:
            return self.identities()
        from avatarforge.data.index import read_index
        from avatarforge.stages.prompts import personality_identities

        tuned = set(personality_identities(self.args["config"], self.data))
        return [i for i in read_index(self.data.root, self.data.train_split)["identities"] if i not in tuned]

    def train_batches(self, *, rank: int, world_size: int, start_batch: int) -> Iterator[Any]:
        for batch in train_stream(self.data, batch_size=self.batch_size, rank=rank, world_size=world_size,
                                  seed=self.seed, start_batch=start_batch, identities=self.train_identities()):
            yield {k: batch[k] for k in BATCH_KEYS}

    def batch_stats(self, batch: Any) -> tuple[int, int]:
        b, _, t, h, w = batch["video"].shape
        pt, ph, pw = self.dit_cfg.patch_size
        lt = self.autoencoder.latent_shape((b, 3, t, h, w))
        return b, b * (lt[2] // pt) * (lt[3] // ph) * (lt[4] // pw)

    # -- training -----------------------------------------------------------------------------------

    def condition_drop(self, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        o = self.options
        probs = {"text": o.drop_text, "audio": o.drop_audio, "reference": o.drop_reference}
        return sample_condition_drop(batch_size, probs, p_all=o.drop_all, device=device)

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        x0 = self.autoencoder.encode(batch["video"])
        ref = self.autoencoder.encode(batch["reference"])
        o = self.options
        weight = mouth_weight_map(x0.shape, o).to(x0.device)
        loss, metrics = flow_matching_loss(
            model, x0, weight=weight, text=batch["text"], text_mask=batch["text_mask"], audio=batch["audio"],
            reference=ref, drop=self.condition_drop(x0.shape[0], x0.device), **o.flow_kwargs(),
            dynamic_scale=o.dynamic_weight, dynamic_weight=mouth_prior(x0.shape, o).to(x0.device),
        )
        return loss, {f"train/{k}": float(v) for k, v in metrics.items() if k != "loss"}

    # -- evaluation ---------------------------------------------------------------------------------

    def eval_batches(self) -> list[dict[str, Any]]:
        if self._eval is None:
            self._eval = build_eval_batches(self.data, split=self.data.eval_split,
                                            batch_size=self.eval_batch_size, max_clips=self.options.eval_clips)
        return self._eval

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Held-out flow loss, then windowed videos of whole held-out clips (>= 1.6 s, what the oracle's
        lip sync needs) scored by the oracle: lip sync against the prompt's own speech and, for the same
        video, against another clip's speech (the gap is what audio conditioning buys), identity and
        behaviour error against the ground truth, jitter; the first samples as a W&B video."""
        device = next(model.parameters()).device
        losses = []
        for i, batch in enumerate(self.eval_batches()):
            x0 = self.autoencoder.encode(batch["video"].to(device))
            cond = self.conditions(model, batch, device, x0.shape[2])
            loss, _ = eval_flow_loss(model, x0, seed=self.seed + i, **cond)
            losses.append({"flow_loss": float(loss)})
        out: dict[str, Any] = mean_metrics(losses)
        prompts = self.eval_prompts()
        if prompts:
            o = self.options
            policy = Policy("eval", model, scales=self.guidance_scales(), steps=o.sample_steps)
            run = sample_prompts(policy, self.autoencoder, prompts, self.data, seed=self.seed,
                                 batch_size=len(prompts))
            summary = summarize(score_prompts(run.videos, prompts, self.data, other_audio=True))
            out.update({f"oracle/{k}": summary[k] for k in (*ORACLE_KEYS, "lipsync_corr_other_audio")
                        if k in summary})
            out["samples"] = np.concatenate(run.videos[:4], axis=2)  # side by side
        return out

    def guidance_scales(self) -> dict[str, float]:
        o = self.options
        return {"text": o.guidance_text, "audio": o.guidance_audio, "reference": o.guidance_reference}

    def eval_prompts(self) -> list[Prompt]:
        """eval_videos whole held-out clips, identities taken in turn, each for its own identity (its
        reference record from frame 0)."""
        if self._prompts is None:
            n = self.options.eval_videos
            self._prompts = []
            if n > 0:
                speeches, records = read_world(self.data, self.data.eval_split, max_clips=8 * n)
                chosen = spread(speeches, n)
                self._prompts = make_prompts(chosen, records, self.data, count=len(chosen))
        return self._prompts

    def conditions(self, model: nn.Module, batch: dict[str, Any], device: torch.device,
                   latent_frames: int) -> dict[str, Any]:
        """Reference K/V and audio windows computed once, reused by every step and guidance pass."""
        ref = self.autoencoder.encode(batch["reference"].to(device))
        return {
            "text": batch["text"].to(device), "text_mask": batch["text_mask"].to(device),
            "audio": model.encode_audio(batch["audio"].to(device), latent_frames),
            "reference": model.encode_reference(ref),
        }


def rolled(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with every clip's speech (audio and phoneme timeline) taken from the next clip."""
    out = dict(batch)
    for key in ("audio", "phonemes"):
        if key in batch and batch[key] is not None:
            value = batch[key]
            out[key] = torch.roll(value, 1, 0) if isinstance(value, torch.Tensor) else value[-1:] + value[:-1]
    return out


class SFTTask(AvatarTask):
    """Personality fine-tuning on chosen identities: full or LoRA, plus the identity disentanglement losses."""

    options_type = SFTOptions

    def identities(self) -> list[str]:
        if self.options.identities:
            return list(self.options.identities)
        from avatarforge.data.index import read_index

        known = read_index(self.data.root, self.data.train_split)["identities"]
        return list(known[: self.options.num_identities])

    def train_batches(self, *, rank: int, world_size: int, start_batch: int) -> Iterator[Any]:
        """The rank's stream of the chosen identities' clips only: the loader selects them per shard, so a
        resume skips consumed batches arithmetically, without decoding them."""
        return super().train_batches(rank=rank, world_size=world_size, start_batch=start_batch)

    def eval_batches(self) -> list[dict[str, Any]]:
        """Held-out prompts for the chosen identities: each held-out clip's speech (audio, phonemes) with a
        chosen identity's reference, caption and ground truth. Flow loss stays on the held-out clips."""
        if self._eval is None:
            heldout = build_eval_batches(self.data, split=self.data.eval_split,
                                         batch_size=self.eval_batch_size, max_clips=self.options.eval_clips)
            keep = self.identities()
            own = {}
            for batch in build_eval_batches(self.data, split=self.data.train_split, batch_size=8,
                                            max_clips=10**6):
                for i, name in enumerate(batch["identity"]):
                    if name in keep and name not in own:
                        own[name] = {k: batch[k][i] for k in ("reference", "text", "text_mask",
                                                                "identity_params", "identity")}
            missing = [n for n in keep if n not in own]
            if missing:
                raise ValueError(f"identities {missing} have no clips in split {self.data.train_split!r}")
            prompts, k = [], 0
            for batch in heldout:
                rows = [own[keep[(k + i) % len(keep)]] for i in range(len(batch["identity"]))]
                k += len(rows)
                prompt = dict(batch)
                for key in ("reference", "text", "text_mask"):
                    prompt[key] = torch.stack([r[key] for r in rows])
                for key in ("identity_params", "identity"):
                    prompt[key] = [r[key] for r in rows]
                prompts.append(prompt)
            self._eval = prompts
        return self._eval

    def eval_prompts(self) -> list[Prompt]:
        """Held-out clips' speech given to the chosen identities in turn (their reference records from the
        training split, a caption asking for them in the clip's scene, their ground truth)."""
        if self._prompts is None:
            n = self.options.eval_videos
            self._prompts = []
            if n > 0:
                keep = self.identities()
                speeches, _ = read_world(self.data, self.data.eval_split, max_clips=8 * n)
                chosen = spread(speeches, n)
                records = read_identities(self.data, self.data.train_split, keep)
                self._prompts = make_prompts(chosen, records, self.data, count=len(chosen), targets=keep)
        return self._prompts

    def build_model(self) -> nn.Module:
        """Adapters are part of the structure (a resumed run restores them from its checkpoint)."""
        model = AvatarModel(self.text_cfg, self.dit_cfg, self.audio_cfg)
        if self.options.lora:
            inject_lora(model, self.options.lora_config)
            model.dit.identity.requires_grad_(True)  # the identity encoder learns the disentanglement
        return model

    def init_from_parents(self, model: nn.Module) -> None:
        state = load_file(parent_of_kind(self.args, "a2v_pretrain"))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith(("lora_a", "lora_b"))]
        if missing or unexpected:
            raise ValueError(f"a2v weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = super().loss(model, batch)
        if self.options.identity_loss_weight > 0:
            ref = self.autoencoder.encode(batch["reference"])
            clip = self.autoencoder.encode(batch["video"])
            ref_aug = self.autoencoder.encode(color_jitter(batch["reference"]))
            matte = model.dit.matte  # the identity encoder sees what encode_reference gives it
            ident, extra = identity_losses(model.dit.identity, matte(ref), matte(clip), matte(ref_aug))
            loss = loss + self.options.identity_loss_weight * ident
            metrics.update({f"train/{k}": float(v) for k, v in extra.items()})
        return loss, metrics

    def export_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """LoRA adapters merged into the base weights: the exported model is a plain AvatarModel."""
        out = dict(state)
        for name, module in model.named_modules():
            if isinstance(module, LoRALinear):
                out[f"{name}.weight"] = module.merged().weight.detach()
                for key in ("lora_a", "lora_b"):
                    out.pop(f"{name}.{key}", None)
        return out


def build_a2v_task(args: dict[str, Any]) -> AvatarTask:
    return AvatarTask(args)


def build_sft_task(args: dict[str, Any]) -> SFTTask:
    return SFTTask(args)
