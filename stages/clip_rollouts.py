"""Whole-clip SDE rollouts for policy optimisation: a prompt's whole speech sampled in windows exactly as
`generate` samples it (stages/sampling.py), each window's steps stochastic (model/sde.py) and recorded with
their log-probabilities. GRPO then trains on the transitions of what is deployed (continuation windows
included: a policy trained on first windows only can get worse on the rest), and the reward model scores
the whole clip, where its sync head ranks lip sync (on 9-frame windows it is at chance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from avatarforge.data.config import DataConfig
from avatarforge.data.tokenizer import tokenize
from avatarforge.model.sde import gaussian_log_prob, sde_step
from avatarforge.stages.common import FrozenAutoencoder, audio_for_frames
from avatarforge.stages.quality import Prompt, make_prompts, read_identities, read_world, spread
from avatarforge.stages.sampling import sample_windows, window_wave


@dataclass
class Transition:
    """One SDE step of one window for the whole batch: x (as the model saw it, shared first frame held)
    -> x_next, at times t -> t_next, with its log-probability [B] under the sampling policy."""

    window: int
    step: int
    x: torch.Tensor
    x_next: torch.Tensor
    t: torch.Tensor
    t_next: torch.Tensor
    log_prob: torch.Tensor


class RecordingSDEStep:
    """A sample_windows step function: the SDE step, every transition kept."""

    def __init__(self, noise_level: float, reduce: str, generator: torch.Generator | None = None) -> None:
        self.noise_level, self.reduce, self.generator = noise_level, reduce, generator
        self.transitions: list[Transition] = []

    def __call__(self, x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, *, window: int,
                 step: int) -> torch.Tensor:
        x_next, mean, std = sde_step(x, v, t, t_next, self.noise_level, self.generator)
        # clones: sample_windows writes the next step's held first frame into x in place
        self.transitions.append(Transition(window, step, x.clone(), x_next.clone(), t, t_next,
                                           gaussian_log_prob(x_next, mean, std, self.reduce)))
        return x_next


@dataclass
class ClipRollout:
    video: torch.Tensor  # [B, 3, T, H, W] in [-1, 1]
    transitions: list[Transition]


def clip_rollout(model: nn.Module, autoencoder: FrozenAutoencoder, reference_latents: torch.Tensor,
                 batch: dict[str, Any], data: DataConfig, *, steps: int, noise_level: float, reduce: str,
                 seeds: list[int], generator: torch.Generator | None = None) -> ClipRollout:
    """SDE rollouts of `batch`'s whole clips (audio [B, S], text, text_mask) as sample_windows samples them;
    seeds: each sample's initial noise per window, generator: the step noise."""
    recorder = RecordingSDEStep(noise_level, reduce, generator)
    out = sample_windows(model, autoencoder, reference_latents, batch["audio"], batch["text"], batch["text_mask"],
                         frames_per_window=data.frames, size=data.size, fps=data.fps, sample_rate=data.sample_rate,
                         steps=steps, step_fn=recorder, seeds=seeds)
    return ClipRollout(out.video, recorder.transitions)


def window_conditions(model: nn.Module, batch: dict[str, Any], transition: Transition, data: DataConfig,
                      reference: Any) -> dict[str, Any]:
    """The model inputs of a recorded transition's window (with grad into the audio encoder)."""
    seg = window_wave(batch["audio"], transition.window, data.frames, data.fps, data.sample_rate)
    return {"text": batch["text"], "text_mask": batch["text_mask"],
            "audio": model.encode_audio(seg.to(transition.x.device), transition.x.shape[2]), "reference": reference}


def whole_clip_latents(autoencoder: FrozenAutoencoder, video: torch.Tensor, wave: torch.Tensor, data: DataConfig
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled clips [B, 3, T, H, W] -> latents of their longest encodable part and its audio [B, S]
    (as stages.reward.encode_clips encodes the ground truth the sync head learned on)."""
    frames = autoencoder.encodable_frames(video.shape[2])
    return autoencoder.encode(video[:, :, :frames]), audio_for_frames(wave, frames, data)


def clip_prompts(data: DataConfig, identities: list[str], *, split: str, count: int,
                 reference_seconds: float | None = None) -> list[Prompt]:
    """Up to `count` whole clips of `split` given to `identities` in turn (a caption for the target in the
    clip's scene; stages.quality's prompts, which the oracle scores against). Clips of another length than
    the first are left out: a batch shares one length. References: `reference_seconds` of the identity's
    record (default the training length)."""
    speeches, _ = read_world(data, split)  # all of them: `spread` takes their speakers in turn
    speeches = [s for s in spread(speeches, len(speeches)) if s.frames == speeches[0].frames]
    records = read_identities(data, data.train_split, identities, reference_seconds=reference_seconds)
    return make_prompts(speeches, records, data, count=min(count, len(speeches)), targets=identities)


def prompt_rows(prompts: list[Prompt], data: DataConfig) -> list[dict[str, Any]]:
    """One model-input row per prompt (tensors [1, ...]): audio (the whole clip), text, text_mask,
    reference (every frame of the prompt's reference that was read), prompt_id."""
    rows = []
    for p in prompts:
        ids, mask = tokenize(p.caption, data)
        rows.append({"audio": p.wave[None], "text": ids[None], "text_mask": mask[None],
                     "reference": p.reference[None],
                     "prompt_id": [f"{p.identity}|{p.key}"]})
    return rows


__all__ = ["Transition", "RecordingSDEStep", "ClipRollout", "clip_rollout", "window_conditions",
           "whole_clip_latents", "clip_prompts", "prompt_rows"]
