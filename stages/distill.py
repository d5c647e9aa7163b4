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

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from avatarforge.data.synth.oracle import score_batch, summarize
from avatarforge.model.avatar import AvatarModel
from avatarforge.model.flow import euler_sample, interpolate, sample_timesteps, sampling_timesteps
from avatarforge.model.guidance import guidance_terms, guided_model_fn, guided_velocity
from avatarforge.stages.avatar import SFTOptions, SFTTask, to_uint8_frames
from avatarforge.stages.common import parent_of_kind, typed

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
    # evaluation on held-out speech spoken by the chosen identities
    eval_clips: int = 8
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


class CallCounter:
    """A model wrapper counting its forward calls: function evaluations, measured rather than assumed."""

    def __init__(self, model: Callable[..., torch.Tensor]) -> None:
        self.model, self.calls = model, 0

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        return self.model(*args, **kwargs)


def ratio(student: float, teacher: float, higher_is_better: bool) -> float:
    """The student's share of the teacher's score: student/teacher, or teacher/student for errors (so >= 0.9
    reads "keeps >= 90%" either way); NaN when the denominator is 0."""
    num, den = (student, teacher) if higher_is_better else (teacher, student)
    return num / den if den != 0 else float("nan")


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
        s_cond = self.conditions(model, batch, x0.device, x0.shape[2])
        with torch.no_grad():
            t_cond = self.conditions(teacher, batch, x0.device, x0.shape[2])
        scales = self.options.teacher_scales()

        def student_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model(x, t, **s_cond)

        def teacher_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return guided_velocity(teacher, x, t, t_cond, scales)

        return student_fn, teacher_fn

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

    def generate(self, model: nn.Module, batch: dict[str, Any], noise: torch.Tensor, steps: int,
                 scales: dict[str, float] | None) -> tuple[torch.Tensor, int, float]:
        """(video, function evaluations per video, wall seconds per video): conditions, sampling, decode."""
        counter = CallCounter(model)
        start = time.perf_counter()
        cond = self.conditions(model, batch, noise.device, noise.shape[2])
        fn = guided_model_fn(counter, scales) if scales else counter
        latents = euler_sample(fn, noise.shape, steps, noise=noise, **cond)
        video = self.autoencoder.decode(latents)
        wall = (time.perf_counter() - start) / noise.shape[0]
        return video, counter.calls, wall

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Held-out prompts, the same noise for teacher (teacher_steps, guided) and student (student_steps,
        single pass): NFEs and wall time per video, oracle scores of both, the student/teacher ratio per
        score, and the pixel MSE of the student's samples to the teacher's (and, as the baseline, of the sft
        model's own samples with the student's budget: single pass, student_steps). Sample videos: teacher above, student below."""
        device = next(model.parameters()).device
        teacher, o = self._teacher(device), self.options
        scales = o.teacher_scales()
        present = ["text", "audio", "reference"]
        out: dict[str, Any] = {}
        scores: dict[str, list[dict[str, float]]] = {"teacher": [], "student": []}
        timing = {"teacher": [], "student": []}
        nfe = {"teacher": [], "student": []}
        gaps = {"student": [], "undistilled": []}
        clips = []
        remaining = o.eval_videos
        for i, batch in enumerate(self.eval_batches()):
            if remaining <= 0:
                break
            n = min(remaining, len(batch["identity"]))
            remaining -= n
            sub = {k: (v[:n] if hasattr(v, "__getitem__") else v) for k, v in batch.items()}
            shape = self.autoencoder.latent_shape(tuple(sub["video"].shape))
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(self.seed + i)).to(device)
            videos = {}
            for name, net, steps, sc in (("teacher", teacher, o.teacher_steps, scales),
                                         ("student", model, o.student_steps, None)):
                video, calls, wall = self.generate(net, sub, noise, steps, sc)
                videos[name] = video.cpu()
                nfe[name].append(calls)
                timing[name].append(wall)
                scores[name] += score_batch(video.cpu(), sub, sample_rate=self.data.sample_rate, fps=self.data.fps)
            # the sft model itself at the student's budget (what the student was before distilling)
            undistilled, _, _ = self.generate(teacher, sub, noise, o.student_steps, None)
            for name, video in (("student", videos["student"]), ("undistilled", undistilled.cpu())):
                gaps[name].append(float((video - videos["teacher"]).pow(2).mean()))
            clips += [torch.cat([videos["teacher"][j], videos["student"][j]], dim=-2) for j in range(n)]
        for name in ("teacher", "student"):
            summary = summarize(scores[name])
            out[f"{name}_nfe"] = sum(nfe[name]) / len(nfe[name])
            out[f"{name}_wall_s"] = sum(timing[name]) / len(timing[name])
            for key in (*SCORES, "jitter"):
                out[f"{name}_{key}"] = summary.get(key, float("nan"))
        out["teacher_nfe_expected"] = o.teacher_steps * len(guidance_terms(scales, present))
        out["nfe_ratio"] = out["teacher_nfe"] / out["student_nfe"]
        out["wall_speedup"] = out["teacher_wall_s"] / out["student_wall_s"]
        for key, higher in SCORES.items():
            out[f"ratio_{key}"] = ratio(out[f"student_{key}"], out[f"teacher_{key}"], higher)
        out["student_teacher_video_mse"] = sum(gaps["student"]) / len(gaps["student"])
        out["undistilled_teacher_video_mse"] = sum(gaps["undistilled"]) / len(gaps["undistilled"])
        out["samples"] = to_uint8_frames(torch.cat(clips[:4], dim=-1))
        return out


def build_task(args: dict[str, Any]) -> DistillTask:
    return DistillTask(args)


__all__ = ["DistillOptions", "DistillTask", "build_task", "phase_of", "integrate", "rollout", "guidance_loss",
           "step_targets", "step_loss", "CallCounter", "ratio"]
