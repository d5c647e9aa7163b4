"""Stage kinds: what each kind trains (its task factory), its options, the model parts it depends on."""

from __future__ import annotations

from dataclasses import dataclass

from avatarforge.stages.autoencoder import AutoencoderOptions
from avatarforge.stages.avatar import A2VOptions, SFTOptions
from avatarforge.stages.distill import DistillOptions
from avatarforge.stages.preferences import PreferenceOptions
from avatarforge.stages.reward import RewardOptions
from avatarforge.stages.rlhf import RLHFOptions
from avatarforge.stages.t2v import T2VOptions


@dataclass(frozen=True)
class StageKind:
    name: str
    task_factory: str
    options: type
    model_sections: tuple[str, ...]
    runtime: str = "train"  # "train": a Ray Train + DeepSpeed run (TrainTask); "collect": Ray actors (CollectTask)
    reads_captions: bool = True  # False: data.captions does not change what it trains (no text, or always full)


KINDS: dict[str, StageKind] = {
    kind.name: kind
    for kind in (
        StageKind("autoencoder", "avatarforge.stages.autoencoder:build_task", AutoencoderOptions, ("autoencoder",),
                  reads_captions=False),
        StageKind("t2v_pretrain", "avatarforge.stages.t2v:build_task", T2VOptions,
                  ("autoencoder", "text", "dit:base"), reads_captions=False),
        StageKind("a2v_pretrain", "avatarforge.stages.avatar:build_a2v_task", A2VOptions,
                  ("autoencoder", "text", "dit", "audio")),
        StageKind("personality_sft", "avatarforge.stages.avatar:build_sft_task", SFTOptions,
                  ("autoencoder", "text", "dit", "audio")),
        StageKind("distill", "avatarforge.stages.distill:build_task", DistillOptions,
                  ("autoencoder", "text", "dit", "audio")),
        StageKind("preference_collect", "avatarforge.stages.preferences:build_task", PreferenceOptions,
                  ("autoencoder", "text", "dit", "audio"), runtime="collect"),
        StageKind("reward_model", "avatarforge.stages.reward:build_task", RewardOptions, ()),
        StageKind("rlhf", "avatarforge.stages.rlhf:build_task", RLHFOptions, ("autoencoder", "text", "dit", "audio")),
    )
}
