"""Stage `distill`: a few-step student with guidance baked in, taught by the frozen many-step guided teacher.

The student (an AvatarModel initialised from the personality_sft weights) learns in two phases, switched by
the number of batches consumed (the batch carries its phase, so a resumed run is in the same phase):

1. guidance distillation: at random t on x_t = (1 - t) x0 + t noise, the student's single conditional pass
   regresses onto the teacher's guided velocity (one pass per step instead of one per guidance term);
2. step distillation (trajectory distillation): on the student's `student_steps` schedule, the student's
   one Euler step from t_i to t_{i+1} must land where the guided teacher lands integrating the same interval
   with teacher_steps / student_steps Euler sub-steps. x_{t_i} comes from data interpolation or (with
   probability `rollout_fraction`) from the student's own rollout from noise, so it also learns on the
   states it visits when sampling. The loss is in velocity form: the student's velocity against the
   teacher's mean velocity over the interval (x_T(t_{i+1}) - x_{t_i}) / (t_{i+1} - t_i).

The teacher is the sft stage's exported weights, loaded read-only by every worker: nothing it computes
depends on training progress, so the stage's state is only the student, optimizer, RNG and batch position,
and a resumed run gives the same result. DMD2 (distribution matching with a fake-score critic) is not built.

The export is a plain AvatarModel state dict; the stage's options record how to sample it
(`DistillOptions.sampling()`: `student_steps` Euler steps, every guidance scale 1: a single pass per step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from avatarforge.data.synth.oracle import summarize
from avatarforge.model.avatar import AvatarModel
from avatarforge.model.flow import interpolate, sample_timesteps, sampling_timesteps
from avatarforge.model.guidance import guided_velocity
from avatarforge.stages.avatar import SFTOptions, SFTTask
from avatarforge.stages.common import parent_of_kind, typed
from avatarforge.stages.quality import (
    Policy,
    Scorer,
    oracle_utility,
    paired_stats,
    sample_and_score,
    sample_prompts,
)

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B, ...], t [B]) -> velocity
# oracle scores compared between teacher and student; True: higher is better
SCORES = {"lipsync_corr": True, "identity_error": False, "behaviour_error": False}


@dataclass
class DistillOptions:
    # the teacher: the sft model sampled with `teacher_steps` Euler steps and these guidance scales
    teacher_steps: int = 12
    guidance_text: float = 1.0
    guidance_audio: float = 2.0
    guidance_reference: float = 1.5
    # the student: `student_steps` Euler steps, one conditional pass each
    student_steps: int = 4
    guidance_batches: int = 20  # batches (micro batches) of phase 1 before step distillation starts
    rollout_fraction: float = 0.5  # phase-2 starts taken from the student's own rollout (else from data)
    # evaluation: held-out 9-frame clips for the step-distillation error; whole held-out clips' speech
    # (windowed) given to the sft identities for the teacher / student comparison
    eval_clips: int = 4
    eval_videos: int = 4

    def teacher_scales(self) -> dict[str, float]:
        return {"text": self.guidance_text, "audio": self.guidance_audio, "reference": self.guidance_reference}

    def sampling(self) -> dict[str, Any]:
        """How the exported student samples: `student_steps` steps, guidance baked in (all scales 1)."""
        return {"steps": self.student_steps, "guidance_text": 1.0, "guidance_audio": 1.0, "guidance_ref": 1.0}


def check_options(o: DistillOptions) -> None:
    if o.student_steps < 1 or o.teacher_steps < o.student_steps or o.teacher_steps % o.student_steps:
        raise ValueError(f"distill: teacher_steps ({o.teacher_steps}) must be a multiple of student_steps "
                         f"({o.student_steps}) >= 1")
    if not 0.0 <= o.rollout_fraction <= 1.0:
        raise ValueError(f"distill: rollout_fraction must be in [0, 1], got {o.rollout_fraction}")
    if o.guidance_batches < 0:
        raise ValueError(f"distill: guidance_batches must be >= 0, got {o.guidance_batches}")


def phase_of(batch_index: int, guidance_batches: int) -> int:
    """1 (guidance distillation) for the first `guidance_batches` batches, then 2 (step distillation)."""
    return 1 if batch_index < guidance_batches else 2


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def _draw(fn: Callable[..., torch.Tensor], shape: tuple[int, ...], generator: torch.Generator | None,
          like: torch.Tensor) -> torch.Tensor:
    """torch.rand / randn on the generator's device (a CPU generator gives the same numbers on any device)."""
    device = generator.device if generator is not None else like.device
    return fn(shape, generator=generator, device=device).to(like.device)


@torch.no_grad()
def integrate(fn: VelocityFn, x: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor, steps: int) -> torch.Tensor:
    """Euler integration of dx/dt = fn(x, t) from t_from to t_to (both [B], per sample) in `steps` equal steps."""
    for k in range(steps):
        t = t_from + (t_to - t_from) * (k / steps)
        t_next = t_from + (t_to - t_from) * ((k + 1) / steps)
        x = x + _bcast(t_next - t, x) * fn(x, t).to(x.dtype)
    return x


@torch.no_grad()
def rollout(fn: VelocityFn, noise: torch.Tensor, stop: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """The sampler's state after stop[b] Euler steps on the schedule `times` (steps + 1 values, 1 -> 0),
    per sample, starting from noise; samples that stopped keep their state."""
    x = noise
    for k in range(int(stop.max()) if stop.numel() else 0):
        t = times[k].expand(x.shape[0])
        moving = _bcast((stop > k).float(), x)
        x = x + moving * (times[k + 1] - times[k]).to(x.dtype) * fn(x, t).to(x.dtype)
    return x


def guidance_loss(student: VelocityFn, teacher: VelocityFn, x0: torch.Tensor,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Phase 1: MSE between the student's velocity and the guided teacher's at random t on x_t."""
    t = sample_timesteps(x0.shape[0], generator, device=x0.device)
    noise = _draw(torch.randn, tuple(x0.shape), generator, x0).to(x0.dtype)
    x_t = interpolate(x0, noise, t)
    with torch.no_grad():
        target = teacher(x_t, t)
    loss = (student(x_t, t).float() - target.float()).pow(2).mean()
    return loss, {"distill_mse": loss.detach(), "t_mean": t.mean()}


def step_targets(teacher: VelocityFn, x_start: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor,
                 substeps: int) -> torch.Tensor:
    """Phase 2 target velocity: the guided teacher's mean velocity over [t_to, t_from], integrated with
    `substeps` Euler steps: (x_T(t_to) - x_start) / (t_to - t_from). One student Euler step with it lands
    exactly where the teacher lands."""
    x_end = integrate(teacher, x_start, t_from, t_to, substeps)
    return (x_end - x_start) / _bcast(t_to - t_from, x_start)


def step_loss(student: VelocityFn, teacher: VelocityFn, x0: torch.Tensor, *, student_steps: int,
              teacher_steps: int, rollout_fraction: float,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Phase 2: per sample a random interval i of the student's schedule; x_{t_i} from data interpolation or
    the student's own rollout from noise; the student's velocity at (x_{t_i}, t_i) against step_targets."""
    b = x0.shape[0]
    times = sampling_timesteps(student_steps, device=x0.device)
    interval = (_draw(torch.rand, (b,), generator, x0) * student_steps).long().clamp_max(student_steps - 1)
    from_rollout = _draw(torch.rand, (b,), generator, x0) < rollout_fraction
    noise = _draw(torch.randn, tuple(x0.shape), generator, x0).to(x0.dtype)
    t_from, t_to = times[interval], times[interval + 1]
    x_start = interpolate(x0, noise, t_from)
    if bool(from_rollout.any()):
        rolled = rollout(student, noise, torch.where(from_rollout, interval, 0), times)
        x_start = torch.where(_bcast(from_rollout.float(), x0) > 0, rolled, x_start)
    target = step_targets(teacher, x_start, t_from, t_to, teacher_steps // student_steps)
    loss = (student(x_start, t_from).float() - target.float()).pow(2).mean()
    return loss, {"distill_mse": loss.detach(), "t_mean": t_from.mean(),
                  "rollout_share": from_rollout.float().mean()}


def model_conditions(model: nn.Module, batch: dict[str, Any], ref_latents: torch.Tensor,
                     latent_frames: int) -> dict[str, Any]:
    """AvatarTask.conditions from already encoded reference latents (shared by student and teacher)."""
    return {"text": batch["text"], "text_mask": batch["text_mask"],
            "audio": model.encode_audio(batch["audio"], latent_frames), "reference": model.encode_reference(ref_latents)}


def ratio(student: float, teacher: float, higher_is_better: bool) -> float:
    """The student's share of the teacher's score: student/teacher, or teacher/student for errors (so >= 0.9
    reads "keeps >= 90%" either way). NaN unless both are > 0: a share of a non-positive score (e.g. a
    lip-sync correlation at or below chance) means nothing."""
    if not (student > 0 and teacher > 0):
        return float("nan")
    return student / teacher if higher_is_better else teacher / student


def velocity_fn(model: nn.Module, cond: dict[str, Any], scales: dict[str, float] | None = None) -> VelocityFn:
    """(x, t) -> velocity of `model` under `cond`: guided with `scales`, else its single conditional pass."""
    if scales is None:
        return lambda x, t: model(x, t, **cond)
    return lambda x, t: guided_velocity(model, x, t, cond, scales)


class DistillTask(SFTTask):
    """Student = a plain AvatarModel (full fine-tuning) from the sft weights; teacher = the same weights, frozen.
    Data (the sft stage's identities' clips) and held-out prompts as in personality_sft."""

    options_type = DistillOptions

    def __init__(self, args: dict[str, Any]) -> None:
        super().__init__(args)
        check_options(self.options)
        with torch.random.fork_rng(devices=[]):  # building the teacher must not move the training RNG
            self.teacher = AvatarModel(self.text_cfg, self.dit_cfg, self.audio_cfg)
        self.teacher.load_state_dict(load_file(parent_of_kind(args, "personality_sft")))
        self.teacher.requires_grad_(False).eval()

    # -- model --------------------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        return AvatarModel(self.text_cfg, self.dit_cfg, self.audio_cfg)

    def init_from_parents(self, model: nn.Module) -> None:
        model.load_state_dict(load_file(parent_of_kind(self.args, "personality_sft")))

    def export_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(state)  # already a plain AvatarModel (SFTTask's would look for LoRA adapters)

    def _teacher(self, device: torch.device) -> AvatarModel:
        return self.teacher.to(device)

    # -- data ---------------------------------------------------------------------------------------

    def identities(self) -> list[str]:
        """The identities the parent sft stage fine-tuned (its options decide)."""
        config, stage = self.args["config"], self.args["stage"]
        (sft,) = [p for p in config["stages"][stage]["needs"] if config["stages"][p]["kind"] == "personality_sft"]
        options = typed(SFTOptions, config["stages"][sft]["options"])
        if options.identities:
            return list(options.identities)
        from avatarforge.data.index import read_index

        return list(read_index(self.data.root, self.data.train_split)["identities"][: options.num_identities])

    def train_batches(self, *, rank: int, world_size: int, start_batch: int) -> Iterator[Any]:
        """The sft stream of the chosen identities, each batch tagged with its phase (from its position in
        the stream, so a resumed run continues in the right phase)."""
        stream = super().train_batches(rank=rank, world_size=world_size, start_batch=start_batch)
        for index, batch in enumerate(stream, start=start_batch):
            yield {**batch, "phase": phase_of(index, self.options.guidance_batches)}

    # -- training -----------------------------------------------------------------------------------

    def velocity_fns(self, model: nn.Module, batch: dict[str, Any],
                     x0: torch.Tensor) -> tuple[VelocityFn, VelocityFn]:
        """(student, teacher) velocity functions for this batch's conditions: the student's single
        conditional pass (gradients flow into its encoders too), the teacher's guided velocity."""
        teacher = self._teacher(x0.device)
        ref = self.autoencoder.encode(batch["reference"])
        s_cond = model_conditions(model, batch, ref, x0.shape[2])
        with torch.no_grad():
            t_cond = model_conditions(teacher, batch, ref, x0.shape[2])
        return velocity_fn(model, s_cond), velocity_fn(teacher, t_cond, self.options.teacher_scales())

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        x0 = self.autoencoder.encode(batch["video"])
        student, teacher = self.velocity_fns(model, batch, x0)
        o = self.options
        if batch["phase"] == 1:
            loss, metrics = guidance_loss(student, teacher, x0)
        else:
            loss, metrics = step_loss(student, teacher, x0, student_steps=o.student_steps,
                                      teacher_steps=o.teacher_steps, rollout_fraction=o.rollout_fraction)
        out = {f"train/{k}": float(v) for k, v in metrics.items()}
        out["train/phase"] = float(batch["phase"])
        return loss, out

    # -- evaluation ---------------------------------------------------------------------------------

    @torch.no_grad()
    def heldout_step_mse(self, model: nn.Module, teacher: AvatarModel) -> dict[str, float]:
        """Phase 2's objective on held-out clips with fixed noise, every interval of the student's schedule
        from the data-noise line: the student's velocity against the guided teacher's mean velocity over
        the interval; the sft model's own single pass against the same targets is the baseline."""
        o, device = self.options, next(model.parameters()).device
        times = sampling_timesteps(o.student_steps, device=device)
        errors: dict[str, list[float]] = {"heldout_step_mse": [], "undistilled_step_mse": []}
        for i, batch in enumerate(self.eval_batches()):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            x0 = self.autoencoder.encode(batch["video"])
            ref = self.autoencoder.encode(batch["reference"])
            student_fn = velocity_fn(model, model_conditions(model, batch, ref, x0.shape[2]))
            t_cond = model_conditions(teacher, batch, ref, x0.shape[2])
            teacher_fn, own_fn = velocity_fn(teacher, t_cond, o.teacher_scales()), velocity_fn(teacher, t_cond)
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(self.seed + i)).to(device)
            for k in range(o.student_steps):
                t_from, t_to = times[k].expand(x0.shape[0]), times[k + 1].expand(x0.shape[0])
                x = interpolate(x0, noise, t_from)
                target = step_targets(teacher_fn, x, t_from, t_to, o.teacher_steps // o.student_steps)
                errors["heldout_step_mse"].append(float((student_fn(x, t_from) - target).pow(2).mean()))
                errors["undistilled_step_mse"].append(float((own_fn(x, t_from) - target).pow(2).mean()))
        return {k: sum(v) / len(v) for k, v in errors.items() if v}

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Held-out prompts (whole held-out clips' speech given to the sft identities, windowed as generate
        does), the same noise for teacher (teacher_steps, guided) and student (student_steps, one pass):
        NFEs and wall time per video, oracle scores of both, the student/teacher ratio per score, the
        student's oracle-preference win rate over the teacher (0.5: as good), and the pixel MSE of the
        student's videos to the teacher's, against the sft model's own at the student's budget (one pass,
        student_steps) as the baseline. Sample videos: teacher above, student below."""
        device = next(model.parameters()).device
        teacher, o = self._teacher(device), self.options
        out: dict[str, Any] = self.heldout_step_mse(model, teacher)
        prompts = self.eval_prompts()
        if not prompts:
            return out
        policies = (Policy("teacher", teacher, scales=o.teacher_scales(), steps=o.teacher_steps),
                    Policy("student", model, steps=o.student_steps))
        runs, scores = {}, {}
        with Scorer(self.data) as scorer:
            for policy in policies:
                runs[policy.name], scores[policy.name] = sample_and_score(
                    policy, self.autoencoder, prompts, self.data, scorer, seed=self.seed, batch_size=len(prompts))
        undistilled = sample_prompts(Policy("undistilled", teacher, steps=o.student_steps), self.autoencoder,
                                     prompts, self.data, seed=self.seed, batch_size=len(prompts))
        for name in ("teacher", "student"):
            means = summarize(scores[name])
            out[f"{name}_nfe"] = runs[name].nfe
            out[f"{name}_wall_s"] = runs[name].seconds_per_video
            for key in (*SCORES, "jitter"):
                out[f"{name}_{key}"] = means.get(key, float("nan"))
        out["nfe_ratio"] = out["teacher_nfe"] / out["student_nfe"]
        out["wall_speedup"] = out["teacher_wall_s"] / out["student_wall_s"]
        for key, higher in SCORES.items():
            out[f"ratio_{key}"] = ratio(out[f"student_{key}"], out[f"teacher_{key}"], higher)
        preference = paired_stats([oracle_utility(s) for s in scores["student"]],
                                  [oracle_utility(s) for s in scores["teacher"]])
        out["student_win_rate"] = preference.get("win_rate", float("nan"))
        teacher_videos = runs["teacher"].videos
        out["student_teacher_video_mse"] = video_mse(runs["student"].videos, teacher_videos)
        out["undistilled_teacher_video_mse"] = video_mse(undistilled.videos, teacher_videos)
        pairs = [np.concatenate([a, b], axis=1) for a, b in zip(teacher_videos[:4], runs["student"].videos[:4],
                                                                 strict=True)]
        out["samples"] = np.concatenate(pairs, axis=2)  # teacher above student, prompts side by side
        return out


def video_mse(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Mean squared difference of uint8 videos in [-1, 1] units."""
    diffs = [((x.astype(np.float32) - y.astype(np.float32)) / 127.5) ** 2 for x, y in zip(a, b, strict=True)]
    return float(np.mean([d.mean() for d in diffs]))


def build_task(args: dict[str, Any]) -> DistillTask:
    return DistillTask(args)


__all__ = ["DistillOptions", "DistillTask", "build_task", "phase_of", "integrate", "rollout", "guidance_loss",
           "step_targets", "step_loss", "model_conditions", "velocity_fn", "ratio", "video_mse"]
