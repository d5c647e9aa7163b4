"""Stage `preference_collect`: Ray actors sample groups of videos per prompt from the distilled policy, a
pluggable rater labels pairs within each group, and every work item becomes one shard of prompt groups
(data/pair_shards.py) for the reward model and DPO.

Prompts are the fine-tuned identities' references driven by train-split speech (stages/prompts.py); every
`heldout_every`-th prompt is marked held out, so the reward model is scored on prompts it never saw.
Raters (data/preferences.py): `oracle` turns the synthetic world's scores into noisy Bradley-Terry choices;
`jsonl` reads human labels. `to_label.jsonl` lists every candidate pair for people to label.
"""

from __future__ import annotations

import json
import tempfile
import zlib
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avatarforge.atomic import atomic_write_text
from avatarforge.data.config import DataConfig
from avatarforge.data.pair_shards import PromptGroupRecord, read_groups, shard_list, write_group_shard
from avatarforge.data.preferences import PromptGroup, UtilityWeights, build_rater, oracle_utility
from avatarforge.data.synth.oracle import score_batch
from avatarforge.stages.avatar import to_uint8_frames
from avatarforge.stages.common import FrozenAutoencoder, parent_of_kind, typed
from avatarforge.stages.policy import PolicySampler, build_avatar_model, distill_steps
from avatarforge.stages.prompts import personality_identities, select, speech_prompts


@dataclass
class RaterOptions:
    name: str = "oracle"  # oracle | jsonl
    temperature: float = 0.05  # oracle: Bradley-Terry temperature on utility differences
    disagreement: float = 0.1  # oracle: probability a label is flipped (rater noise)
    path: str = ""  # jsonl: the human labels file
    utility: UtilityWeights = field(default_factory=UtilityWeights)


@dataclass
class PreferenceOptions:
    num_prompts: int = 24
    group_size: int = 4  # videos per prompt; every pair within a group is a candidate
    prompts_per_item: int = 4  # prompts per work item (= per shard)
    sample_steps: int = 0  # 0: the distill stage's student_steps
    heldout_every: int = 4  # every k-th prompt is held out (reward model evaluation)
    write_videos: bool = True  # mp4s (with audio) in the shards, for people to look at and label
    rater: RaterOptions = field(default_factory=RaterOptions)

    def validate(self) -> list[str]:
        errors = []
        if self.group_size < 2:
            errors.append("group_size: must be >= 2 (pairs come from within a group)")
        if self.num_prompts < 1 or self.prompts_per_item < 1 or self.heldout_every < 1:
            errors.append("num_prompts, prompts_per_item, heldout_every: must be >= 1")
        if self.rater.name not in ("oracle", "jsonl"):
            errors.append(f"rater.name: unknown rater {self.rater.name!r}; known: oracle, jsonl")
        if self.rater.name == "jsonl" and not Path(self.rater.path).is_file():
            errors.append(f"rater.path: human labels file {self.rater.path!r} not found")
        return errors


def video_seed(seed: int, prompt_id: str, k: int) -> int:
    return zlib.crc32(f"{seed}|{prompt_id}|{k}".encode())


class PreferenceCollectTask:
    """A CollectTask (train/collect.py): item k = prompts [k * prompts_per_item, (k + 1) * prompts_per_item)."""

    def __init__(self, args: dict[str, Any]) -> None:
        config, stage = args["config"], args["stage"]
        self.args, self.config, self.stage = args, config, stage
        self.options: PreferenceOptions = typed(PreferenceOptions, config["stages"][stage]["options"])
        if self.options.validate():
            raise ValueError("; ".join(self.options.validate()))
        self.data = typed(DataConfig, config["data"])
        self.seed = int(config["seed"])
        self.out_dir = Path(args["stage_dir"]) / "pairs"
        self.steps = distill_steps(config, stage, self.options.sample_steps)
        self._models: tuple[Any, PolicySampler] | None = None
        self._prompts: list[dict[str, Any]] | None = None

    # -- work items ---------------------------------------------------------------------------------

    def items(self) -> list[str]:
        n = -(-self.options.num_prompts // self.options.prompts_per_item)
        return [f"groups-{k:06d}" for k in range(n)]

    def shard_path(self, item: str) -> Path:
        return self.out_dir / f"{item}.tar"

    def is_done(self, item: str) -> bool:
        return self.shard_path(item).exists()

    def prompts(self) -> list[dict[str, Any]]:
        if self._prompts is None:
            o = self.options
            self._prompts = speech_prompts(self.data, personality_identities(self.config, self.data),
                                           split=self.data.train_split, count=o.num_prompts,
                                           batch_size=o.prompts_per_item)
        return self._prompts

    def models(self) -> tuple[Any, PolicySampler]:
        if self._models is None:
            policy = build_avatar_model(self.config, parent_of_kind(self.args, "distill")).eval()
            policy.requires_grad_(False)
            autoencoder = FrozenAutoencoder(self.config["model"]["autoencoder"],
                                            parent_of_kind(self.args, "autoencoder"))
            self._models = (policy, PolicySampler(autoencoder, self.data, self.steps))
        return self._models

    # -- one item -----------------------------------------------------------------------------------

    @torch.no_grad()
    def run_item(self, item: str) -> dict[str, Any]:
        o = self.options
        k = int(item.rsplit("-", 1)[1])
        batch = self.prompts()[k]
        policy, sampler = self.models()
        device = torch.device("cpu")
        n, g = len(batch["prompt_id"]), o.group_size
        rows = select(batch, [i for i in range(n) for _ in range(g)])  # prompt-major groups
        ref_latents = sampler.reference_latents(batch, device)
        cond = sampler.conditions(policy, rows, device, ref_latents.repeat_interleave(g, dim=0))
        seeds = [video_seed(self.seed, pid, j) for pid in batch["prompt_id"] for j in range(g)]
        latents = sampler.sample(policy, cond, sampler.noise(seeds, device))
        videos = sampler.decode(latents)
        scores = score_batch(videos, rows, sample_rate=self.data.sample_rate, fps=self.data.fps,
                             use_references=False)
        rater = build_rater(o.rater.name, o.rater, seed=self.seed)
        records, agree, labels_total, known_total, spreads = [], 0, 0, 0, []
        for i, prompt_id in enumerate(batch["prompt_id"]):
            ids = [f"{prompt_id}#v{j}" for j in range(g)]
            group_scores = scores[i * g:(i + 1) * g]
            utilities = [oracle_utility(s, o.rater.utility) for s in group_scores]
            labels = [asdict_label(label) for label in rater.rate(PromptGroup(prompt_id, ids, group_scores))]
            known = [label for label in labels if label.get("oracle_choice") is not None]
            agree += sum(label["oracle_choice"] == label["choice"] for label in known)
            labels_total += len(labels)
            known_total += len(known)
            spreads.append(float(np.std(utilities)))
            index = k * o.prompts_per_item + i
            meta = {
                "identity": batch["identity"][i], "speech_key": batch["key"][i],
                "split": "heldout" if index % o.heldout_every == o.heldout_every - 1 else "train",
                "videos": ids, "seeds": seeds[i * g:(i + 1) * g], "steps": self.steps,
                "scores": group_scores, "utilities": utilities, "labels": labels,
            }
            arrays = {
                "latents": latents[i * g:(i + 1) * g].float().numpy(),
                "reference": ref_latents[i].float().numpy(),
                "audio": batch["audio"][i].float().numpy(),
                "text": batch["text"][i].numpy(),
                "text_mask": batch["text_mask"][i].numpy(),
            }
            mp4s = {}
            if o.write_videos:
                for j in range(g):
                    mp4s[f"v{j}"] = mp4_with_audio(to_uint8_frames(videos[i * g + j]), batch["audio"][i], self.data)
                meta["video_members"] = {vid: f"v{j}.mp4" for j, vid in enumerate(ids)}
            records.append(PromptGroupRecord(prompt_id, meta, arrays, mp4s))
        write_group_shard(self.shard_path(item), records)
        flat = latents.flatten(1)
        per_group = flat.view(n, g, -1)
        diversity = torch.cdist(per_group, per_group).sum() / (n * g * (g - 1)) / flat.norm(dim=1).mean()
        return {
            "utility": float(np.mean([oracle_utility(s, o.rater.utility) for s in scores])),
            "utility_spread_in_group": float(np.mean(spreads)),
            "label_agreement_with_oracle": agree / max(known_total, 1),
            "pairs": labels_total,
            "diversity": float(diversity),
            "samples": to_uint8_frames(torch.cat(list(videos[:g]), dim=-1)),
        }

    # -- summary ------------------------------------------------------------------------------------

    def finalize(self) -> dict[str, Any]:
        shards = {path: read_groups([path]) for path in shard_list(self.out_dir)}
        groups = [grp for found in shards.values() for grp in found]
        labels = [label for grp in groups for label in grp.meta["labels"]]
        if not labels:
            raise ValueError(f"{self.out_dir}: the rater produced no labelled pairs "
                             f"(rater {self.options.rater.name!r}; for jsonl, do its prompt ids match?)")
        candidates = [
            {"prompt_id": grp.prompt_id, "video_a": a, "video_b": b,
             "shard": str(path), "member_a": grp.meta.get("video_members", {}).get(a),
             "member_b": grp.meta.get("video_members", {}).get(b)}
            for path, found in shards.items() for grp in found
            for a, b in combinations(grp.meta["videos"], 2)
        ]
        atomic_write_text(self.out_dir.parent / "to_label.jsonl",
                          "".join(json.dumps(c) + "\n" for c in candidates))
        known = [label for label in labels if label.get("oracle_choice") is not None]
        agree = sum(label["oracle_choice"] == label["choice"] for label in known)
        summary = {
            "prompts": len(groups),
            "pairs": len(labels),
            "heldout_pairs": sum(len(g.meta["labels"]) for g in groups if g.meta["split"] == "heldout"),
            "label_agreement_with_oracle": agree / max(len(known), 1),
            "utility": float(np.mean([u for g in groups for u in g.meta["utilities"]])),
        }
        atomic_write_text(self.out_dir / "index.json", json.dumps(
            {"shards": [p.name for p in shards], **summary}, indent=2))
        return {**summary, "outputs": {"pairs": str(self.out_dir)}}


def asdict_label(label: Any) -> dict[str, Any]:
    from dataclasses import asdict, is_dataclass

    return asdict(label) if is_dataclass(label) else dict(label)


def mp4_with_audio(frames: np.ndarray, wave: torch.Tensor, data: DataConfig) -> bytes:
    from avatarforge.stages.generate import write_mp4

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "video.mp4"
        write_mp4(path, frames, data.fps, wave.float(), data.sample_rate)
        return path.read_bytes()


def build_task(args: dict[str, Any]) -> PreferenceCollectTask:
    return PreferenceCollectTask(args)
