"""Stage `reward_model`: a video + audio + reference scorer fitted to the collected preference pairs with
the Bradley-Terry loss. Evaluated on the held-out prompts' pairs: accuracy against the rater's labels (what
it was taught, noise included) and against the noiseless oracle ordering (what we actually want).

With `sync_pretrain_steps` > 0 (and `model.sync.enabled`) the first steps train the model's sync head and
audio encoder contrastively on ground-truth training clips (model.reward.sync_contrastive_loss), encoded by
the autoencoder parent, before the Bradley-Terry steps: lip-sync perception learned from the data, which a
few hundred preference pairs do not teach (benchmarks/reward_learnability.py). With `model.identity.enabled`
the same batches also train the identity head (model.reward.identity_contrastive_loss: each clip against
its own identity's reference and the batch's other identities').
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from avatarforge.data.config import DataConfig
from avatarforge.data.pair_shards import PromptGroupRecord, read_groups, shard_list
from avatarforge.model.avatar import person_prior
from avatarforge.model.identity import color_jitter
from avatarforge.model.reward import (
    IDENTITY_REGIONS,
    SYNC_SCORES,
    RewardModel,
    RewardModelConfig,
    bradley_terry_loss,
    identity_contrastive_loss,
    sync_contrastive_loss,
)
from avatarforge.stages.common import (
    FrozenAutoencoder,
    audio_for_frames,
    epoch_batches,
    parent_of_kind,
    typed,
)
from avatarforge.stages.quality import Speech, read_world, to_float


@dataclass
class RewardOptions:
    model: RewardModelConfig = field(default_factory=RewardModelConfig)
    eval_batch_size: int = 16
    # A parent stage holding an avatar model (a2v / sft / distill) whose trained `audio_encoder.*` starts the
    # reward model's, so its audio features already follow what the mouth does ("" = from scratch). Checked
    # before Ray starts: it must be in the stage's `needs` with the same audio encoder config.
    audio_encoder_from: str = ""
    # contrastive sync pretraining on ground-truth training clips before the Bradley-Terry steps (counted in
    # train.steps); needs model.sync.enabled and an autoencoder parent
    sync_pretrain_steps: int = 0
    sync_clips: int = 64  # training clips read (whole clips)
    sync_batch_size: int = 16
    sync_crop: int = 8  # token-frames per contrastive window
    # model.identity: each ground-truth clip with its person recoloured (person_recoloured) is a hard negative
    identity_recoloured: bool = True

    def validate(self) -> list[str]:
        errors = []
        if self.sync_pretrain_steps < 0 or self.sync_clips < 2 or self.sync_batch_size < 2 or self.sync_crop < 2:
            errors.append("sync_pretrain_steps must be >= 0 and sync_clips, sync_batch_size, sync_crop >= 2")
        if self.model.sync.score not in SYNC_SCORES:
            errors.append(f"model.sync.score: must be one of {SYNC_SCORES}, got {self.model.sync.score!r}")
        if self.sync_pretrain_steps and not self.model.sync.enabled:
            errors.append("sync_pretrain_steps: needs model.sync.enabled (the head it trains)")
        if self.model.identity.region not in IDENTITY_REGIONS:
            errors.append(f"model.identity.region: must be one of {IDENTITY_REGIONS}, got {self.model.identity.region!r}")
        if self.model.identity.enabled and not self.sync_pretrain_steps:
            errors.append("model.identity.enabled: needs sync_pretrain_steps > 0 (the ground-truth batches that "
                          "train the identity head)")
        return errors


@dataclass
class PairSet:
    """Pairs as index arrays into stacked group tensors (latents are stored once per video, not per pair)."""

    latents: torch.Tensor  # [videos, C, T, H, W]
    reference: torch.Tensor  # [groups, C, Tr, H, W]
    audio: torch.Tensor  # [groups, S]
    text: torch.Tensor  # [groups, L]
    text_mask: torch.Tensor  # [groups, L]
    chosen: torch.Tensor  # [pairs] video index
    rejected: torch.Tensor  # [pairs] video index
    group: torch.Tensor  # [pairs] group index
    oracle_agrees: torch.Tensor  # [pairs] bool: the noiseless oracle prefers `chosen` too
    oracle_known: torch.Tensor  # [pairs] bool: the oracle has a preference (no tie, scores present)

    def __len__(self) -> int:
        return int(self.chosen.numel())

    def batch(self, index: list[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(index, dtype=torch.long)
        g = self.group[index]
        return {"chosen": self.latents[self.chosen[index]], "rejected": self.latents[self.rejected[index]],
                "reference": self.reference[g], "audio": self.audio[g], "text": self.text[g],
                "text_mask": self.text_mask[g], "oracle_agrees": self.oracle_agrees[index],
                "oracle_known": self.oracle_known[index]}


def pair_set(groups: list[PromptGroupRecord]) -> PairSet:
    """Stack the groups' arrays; one pair per label, oriented chosen/rejected."""
    latents, refs, audio, text, mask, chosen, rejected, group, agrees, known = ([] for _ in range(10))
    offset = 0
    for gi, grp in enumerate(groups):
        videos = {vid: offset + j for j, vid in enumerate(grp.meta["videos"])}
        latents.append(torch.from_numpy(grp.arrays["latents"]))
        refs.append(torch.from_numpy(grp.arrays["reference"]))
        audio.append(torch.from_numpy(grp.arrays["audio"]))
        text.append(torch.from_numpy(grp.arrays["text"]))
        mask.append(torch.from_numpy(grp.arrays["text_mask"]))
        for label in grp.meta["labels"]:
            a, b = videos[label["video_a"]], videos[label["video_b"]]
            win, lose = (a, b) if label["choice"] == "a" else (b, a)
            chosen.append(win)
            rejected.append(lose)
            group.append(gi)
            agrees.append(label.get("oracle_choice") == label["choice"])
            known.append(label.get("oracle_choice") is not None)
        offset += len(grp.meta["videos"])
    if not chosen:
        raise ValueError("no labelled pairs to train the reward model on")
    return PairSet(torch.cat(latents), torch.stack(refs), torch.stack(audio), torch.stack(text), torch.stack(mask),
                   torch.tensor(chosen),
                   torch.tensor(rejected), torch.tensor(group), torch.tensor(agrees), torch.tensor(known))


def encode_clips(autoencoder: FrozenAutoencoder, speeches: Sequence[Speech], data: DataConfig,
                 video_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole clips as latents [N, C, T, H, W], cut to the shortest clip's longest encodable frame count, and
    their audio over those frames [N, S] (zero-padded where a clip's audio is shorter). `video_fn` changes
    each clip's video [1, 3, T, H, W] in [-1, 1] before it is encoded."""
    frames = autoencoder.encodable_frames(min(sp.frames for sp in speeches))
    video_fn = video_fn or (lambda video: video)
    latents = torch.cat([autoencoder.encode(video_fn(to_float(sp.video[:frames])[None])) for sp in speeches])
    return latents, torch.stack([audio_for_frames(sp.wave, frames, data) for sp in speeches])


def person_recoloured(video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Video [B, 3, T, H, W] in [-1, 1] with brightness, contrast and saturation jittered inside the
    head-and-shoulders prior (model.avatar.person_prior) only: the same room, a slightly different person."""
    mask = person_prior(*video.shape[-2:], device=video.device).to(video.dtype)
    return video * (1 - mask) + color_jitter(video, generator) * mask


def preference_groups(args: dict[str, Any]) -> list[PromptGroupRecord]:
    """The groups of the (single) preference_collect parent."""
    config, stage = args["config"], args["stage"]
    found = [p for p in config["stages"][stage]["needs"] if config["stages"][p]["kind"] == "preference_collect"]
    if len(found) != 1:
        raise ValueError(f"stage {stage!r} needs exactly one preference_collect parent, found {found}")
    directory = Path(args["parent_outputs"][found[0]]["pairs"])
    return read_groups(shard_list(directory))


def reward_model_config(config: dict[str, Any], stage: str) -> RewardModelConfig:
    return typed(RewardOptions, config["stages"][stage]["options"]).model


class RewardTask:
    def __init__(self, args: dict[str, Any]) -> None:
        config, stage = args["config"], args["stage"]
        self.args = args
        self.options: RewardOptions = typed(RewardOptions, config["stages"][stage]["options"])
        self.batch_size = config["stages"][stage]["train"]["batch_size"]
        self.seed = int(config["seed"])
        groups = preference_groups(args)
        self.train = pair_set([g for g in groups if g.meta["split"] == "train"])
        heldout = [g for g in groups if g.meta["split"] == "heldout"]
        self.heldout = pair_set(heldout) if heldout else None

        self.data = typed(DataConfig, config["data"])
        self.autoencoder_weights = parent_of_kind(args, "autoencoder") if self.options.sync_pretrain_steps else ""
        self._truth: dict[str, torch.Tensor] | None = None

    def build_model(self) -> nn.Module:
        return RewardModel(self.options.model)

    def ground_truth(self) -> dict[str, torch.Tensor]:
        """The first `sync_clips` whole training clips, encoded (encode_clips; read once, on CPU): latents,
        wave, and for the identity head each clip's identity reference latents and identity id."""
        if self._truth is None:
            speeches, records = read_world(self.data, self.data.train_split)
            speeches = speeches[: self.options.sync_clips]
            if len(speeches) < 2:
                raise ValueError(f"sync pretraining needs >= 2 training clips, found {len(speeches)}")
            autoencoder = FrozenAutoencoder(self.args["config"]["model"]["autoencoder"], self.autoencoder_weights)
            latents, wave = encode_clips(autoencoder, speeches, self.data)
            self._truth = {"latents": latents, "wave": wave}
            if self.options.model.identity.enabled:
                names = sorted({sp.identity for sp in speeches})
                if len(names) < 2:
                    raise ValueError("the identity head needs training clips of >= 2 identities")
                refs = {n: autoencoder.encode(records[n].reference[None]) for n in names}
                self._truth["references"] = torch.cat([refs[sp.identity] for sp in speeches])
                self._truth["identities"] = torch.tensor([names.index(sp.identity) for sp in speeches])
                if self.options.identity_recoloured:
                    g = torch.Generator().manual_seed(self.seed)
                    self._truth["recoloured"], _ = encode_clips(autoencoder, speeches, self.data,
                                                                video_fn=lambda video: person_recoloured(video, g))
        return self._truth

    def init_from_parents(self, model: nn.Module) -> None:
        """From scratch, except the audio encoder when `audio_encoder_from` names a parent avatar model."""
        source = self.options.audio_encoder_from
        if source:
            if source not in self.args["parent_weights"]:
                raise ValueError(f"audio_encoder_from: {source!r} is not a parent with weights of this stage")
            model.load_audio_encoder(load_file(self.args["parent_weights"][source]))

    def train_batches(self, *, rank: int, world_size: int, start_batch: int) -> Iterator[Any]:
        """`sync_pretrain_steps` contrastive batches of ground-truth clips, then preference pairs; each batch
        follows from its position (and rank), so a resumed run continues where it stopped."""
        o = self.options
        for index in range(start_batch, o.sync_pretrain_steps):
            truth = self.ground_truth()
            g = torch.Generator().manual_seed(self.seed * 7919 + index * world_size + rank)
            pick = torch.randperm(len(truth["wave"]), generator=g)[: o.sync_batch_size]
            yield {f"sync_{k}": v[pick] for k, v in truth.items()} | {
                "sync_seed": int(torch.randint(0, 2**31 - 1, (1,), generator=g))}
        for index in epoch_batches(len(self.train), self.batch_size, seed=self.seed, rank=rank,
                                   world_size=world_size, start_batch=max(0, start_batch - o.sync_pretrain_steps)):
            yield self.train.batch(index)

    def batch_stats(self, batch: Any) -> tuple[int, int]:
        return (batch["sync_wave"] if "sync_wave" in batch else batch["chosen"]).shape[0], 0

    def scores(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.cat([batch["chosen"], batch["rejected"]])
        r = model(both, torch.cat([batch["audio"]] * 2), torch.cat([batch["reference"]] * 2))
        return r.chunk(2)

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        if "sync_latents" in batch:
            loss, metrics = sync_contrastive_loss(model, batch["sync_latents"], batch["sync_wave"],
                                                  crop=self.options.sync_crop,
                                                  generator=torch.Generator().manual_seed(batch["sync_seed"]))
            out = {f"train/sync_{k}": float(v) for k, v in metrics.items() if k != "loss"}
            if "sync_identities" in batch and batch["sync_identities"].unique().numel() > 1:
                ident, id_metrics = identity_contrastive_loss(model, batch["sync_latents"], batch["sync_references"],
                                                              batch["sync_identities"], batch.get("sync_recoloured"))
                loss = loss + ident
                out.update({f"train/identity_{k}": float(v) for k, v in id_metrics.items()})
            return loss, out
        r_chosen, r_rejected = self.scores(model, batch)
        loss, metrics = bradley_terry_loss(r_chosen, r_rejected)
        return loss, {f"train/{k}": float(v) for k, v in metrics.items() if k != "loss"}

    def pair_metrics(self, model: nn.Module, pairs: PairSet, prefix: str) -> dict[str, float]:
        device = next(model.parameters()).device
        rows = []
        for start in range(0, len(pairs), self.options.eval_batch_size):
            batch = pairs.batch(list(range(start, min(start + self.options.eval_batch_size, len(pairs)))))
            batch = {k: v.to(device) for k, v in batch.items()}
            r_c, r_r = self.scores(model, batch)
            loss, _ = bradley_terry_loss(r_c, r_r)
            right = (r_c > r_r).float()
            agrees, known = batch["oracle_agrees"].float(), batch["oracle_known"]
            # against the noiseless oracle: right where it agrees with the label, wrong where it does not;
            # pairs the oracle has no preference on (ties) are left out
            oracle_right = (right * agrees + (1 - right) * (1 - agrees))[known]
            rows.append({"loss": float(loss) * len(right), "accuracy": float(right.sum()),
                         "oracle_accuracy": float(oracle_right.sum()), "n": len(right),
                         "n_oracle": int(known.sum())})
        n, n_oracle = sum(r["n"] for r in rows), sum(r["n_oracle"] for r in rows)
        return {f"{prefix}/loss": sum(r["loss"] for r in rows) / n,
                f"{prefix}/accuracy": sum(r["accuracy"] for r in rows) / n,
                f"{prefix}/oracle_accuracy": sum(r["oracle_accuracy"] for r in rows) / max(n_oracle, 1)}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        out = self.pair_metrics(model, self.train, "train_pairs")
        if self.heldout is not None:
            out.update(self.pair_metrics(model, self.heldout, "heldout"))
        out["heldout_pairs"] = float(len(self.heldout) if self.heldout is not None else 0)
        return out


def build_task(args: dict[str, Any]) -> RewardTask:
    return RewardTask(args)

