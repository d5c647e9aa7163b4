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

`method: dmd2` replaces phase 2 with DMD2 (distribution matching distillation, Yin et al. 2024): the trained
module is a `StudentCritic`, the student plus a fake-score critic (both from the sft weights). Per sample the
student denoises x_{t_k} (t_k on its schedule; from data or its own rollout, as above: DMD2's backward
simulation) to x0_hat = x_t - t v_student; x0_hat is re-noised at a random tau and denoised by the guided
teacher (real) and by the critic's single pass (fake); the student's x0 is pushed along
(fake - real) / mean|x0_hat - real| (`dmd_generator_loss`). The critic learns the student's distribution:
flow matching on the detached x0_hat (`critic_loss`, from phase 1 on). The teacher and critic are evaluated
without gradients in the generator term, and the critic sees only detached samples, so the two terms touch
disjoint parameters and the trainer's one optimizer updates both at once (each with its own Adam moments).
`dmd_critic_updates` critic terms (fresh noise each, averaged) per step stand in for DMD2's two-time-scale
rule: with one optimizer they give the critic a less noisy gradient, not more steps (Adam's step size does
not scale with the loss). `dmd_regression_weight` adds phase 2's trajectory loss as DMD's regression term.

The teacher is the sft stage's exported weights, loaded read-only by every worker: nothing it computes
depends on training progress, so the stage's state is only the student (and critic), optimizer, RNG and
batch position, and a resumed run gives the same result.

The export is a plain AvatarModel state dict (with dmd2: the student's alone; checkpoints keep both); the
stage's options record how to sample it (`DistillOptions.sampling()`: `student_steps` Euler steps, every
guidance scale 1: a single pass per step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from avatarforge.data.synth.oracle import summarize
from avatarforge.model.avatar import AvatarModel
from avatarforge.model.flow import (
    flow_matching_loss,
    interpolate,
    regression_loss,
    sample_timesteps,
    sampling_timesteps,
)
from avatarforge.model.guidance import guided_velocity
from avatarforge.stages.avatar import SFTOptions, SFTTask, mouth_prior, mouth_weight_map
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
METHODS = ("trajectory", "dmd2")
TRAIN_IDENTITIES = ("sft", "all")


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
    # phase 2: "trajectory" (step distillation) or "dmd2" (distribution matching with a fake-score critic)
    method: str = "trajectory"
    dmd_critic_updates: int = 1  # dmd2: critic flow-matching terms (fresh noise each) per generator term
    dmd_regression_weight: float = 0.0  # dmd2: weight of the trajectory step loss added as regression term
    # the teacher's mouth, which the plain MSE under-weights (a few latents of the frame; lip motion is a few
    # percent of their variance): extra weight on the sft stage's mouth prior (1 = none), and the motion
    # term (model.flow.regression_loss: the error in what changes over time there; 0 = off). Phases 1 and 2.
    mouth_weight: float = 1.0
    dynamic_weight: float = 0.0
    # whose clips the student learns on: "sft" (the fine-tuned identities' few clips: the student sees only
    # their few speeches and its lip sync on new speech suffers) or "all" (the whole training split, every
    # speech, still given the sft teacher's targets: the teacher is the sft model whatever the identity)
    train_identities: str = "all"
    # evaluation: held-out 9-frame clips for the step-distillation error; whole held-out clips' speech
    # (windowed) given to the sft identities for the teacher / student comparison
    eval_clips: int = 4
    eval_videos: int = 4

    def teacher_scales(self) -> dict[str, float]:
        return {"text": self.guidance_text, "audio": self.guidance_audio, "reference": self.guidance_reference}

    def sampling(self) -> dict[str, Any]:
        """How the exported student samples: `student_steps` steps, guidance baked in (all scales 1)."""
        return {"steps": self.student_steps, "guidance_text": 1.0, "guidance_audio": 1.0, "guidance_ref": 1.0}

    def validate(self) -> list[str]:
        errors = []
        if self.student_steps < 1 or self.teacher_steps < self.student_steps or self.teacher_steps % self.student_steps:
            errors.append(f"teacher_steps: must be a multiple of student_steps ({self.student_steps}) >= 1, "
                          f"got {self.teacher_steps}")
        if not 0.0 <= self.rollout_fraction <= 1.0:
            errors.append(f"rollout_fraction: must be in [0, 1], got {self.rollout_fraction}")
        if self.guidance_batches < 0:
            errors.append(f"guidance_batches: must be >= 0, got {self.guidance_batches}")
        if self.method not in METHODS:
            errors.append(f"method: must be one of {METHODS}, got {self.method!r}")
        if self.train_identities not in TRAIN_IDENTITIES:
            errors.append(f"train_identities: must be one of {TRAIN_IDENTITIES}, got {self.train_identities!r}")
        if self.dmd_critic_updates < 1:
            errors.append(f"dmd_critic_updates: must be >= 1, got {self.dmd_critic_updates}")
        if self.dmd_regression_weight < 0:
            errors.append(f"dmd_regression_weight: must be >= 0, got {self.dmd_regression_weight}")
        if self.mouth_weight < 1 or self.dynamic_weight < 0:
            errors.append(f"mouth_weight must be >= 1 and dynamic_weight >= 0, got {self.mouth_weight}, "
                          f"{self.dynamic_weight}")
        return errors


def check_options(o: DistillOptions) -> None:
    errors = o.validate()
    if errors:
        raise ValueError("distill: " + "; ".join(errors))


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


@dataclass
class RegionWeights:
    """How the distillation MSE weighs the video (model.flow.regression_loss): `weight` broadcastable to
    the latents (e.g. the mouth map), the motion term's scale and its weight map. Default: a plain MSE."""

    weight: torch.Tensor | None = None
    dynamic_scale: float = 0.0
    dynamic_weight: torch.Tensor | None = None

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, metrics = regression_loss(pred, target, weight=self.weight, dynamic_scale=self.dynamic_scale,
                                        dynamic_weight=self.dynamic_weight)
        metrics["distill_mse"] = metrics.pop("mse")
        return loss, metrics


PLAIN_MSE = RegionWeights()


def guidance_loss(student: VelocityFn, teacher: VelocityFn, x0: torch.Tensor,
                  generator: torch.Generator | None = None, *, region: RegionWeights = PLAIN_MSE
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Phase 1: (region-weighted) MSE between the student's velocity and the guided teacher's at random t
    on x_t."""
    t = sample_timesteps(x0.shape[0], generator, device=x0.device)
    noise = _draw(torch.randn, tuple(x0.shape), generator, x0).to(x0.dtype)
    x_t = interpolate(x0, noise, t)
    with torch.no_grad():
        target = teacher(x_t, t)
    loss, metrics = region.loss(student(x_t, t), target)
    return loss, {**metrics, "t_mean": t.mean()}


def step_targets(teacher: VelocityFn, x_start: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor,
                 substeps: int) -> torch.Tensor:
    """Phase 2 target velocity: the guided teacher's mean velocity over [t_to, t_from], integrated with
    `substeps` Euler steps: (x_T(t_to) - x_start) / (t_to - t_from). One student Euler step with it lands
    exactly where the teacher lands."""
    x_end = integrate(teacher, x_start, t_from, t_to, substeps)
    return (x_end - x_start) / _bcast(t_to - t_from, x_start)


@dataclass
class ScheduleStart:
    """Where a phase-2 student step starts: per sample an interval of the student's schedule."""

    x: torch.Tensor  # x_{t_i}
    t_from: torch.Tensor  # t_i [B]
    t_to: torch.Tensor  # t_{i+1} [B]
    from_rollout: torch.Tensor  # [B] bool


def schedule_start(student: VelocityFn, x0: torch.Tensor, *, student_steps: int, rollout_fraction: float,
                   generator: torch.Generator | None = None) -> ScheduleStart:
    """Per sample a random interval i of the student's schedule; x_{t_i} from data interpolation or (with
    probability rollout_fraction) the student's own rollout from noise (no gradients)."""
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
    return ScheduleStart(x_start, t_from, t_to, from_rollout)


def step_loss(student: VelocityFn, teacher: VelocityFn, x0: torch.Tensor, *, student_steps: int,
              teacher_steps: int, rollout_fraction: float, generator: torch.Generator | None = None,
              region: RegionWeights = PLAIN_MSE) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Phase 2: at a schedule_start (x_{t_i}, t_i), the student's velocity against step_targets
    ((region-weighted) MSE)."""
    start = schedule_start(student, x0, student_steps=student_steps, rollout_fraction=rollout_fraction,
                           generator=generator)
    target = step_targets(teacher, start.x, start.t_from, start.t_to, teacher_steps // student_steps)
    loss, metrics = region.loss(student(start.x, start.t_from), target)
    return loss, {**metrics, "t_mean": start.t_from.mean(), "rollout_share": start.from_rollout.float().mean()}


# -- DMD2 ---------------------------------------------------------------------------------------------


class StudentCritic(nn.Module):
    """dmd2's trained module: the few-step student and the fake-score critic that models its samples.
    Disjoint parameters; only the student is exported."""

    def __init__(self, student: nn.Module, critic: nn.Module) -> None:
        super().__init__()
        self.student, self.critic = student, critic


def student_of(model: nn.Module) -> nn.Module:
    return model.student if isinstance(model, StudentCritic) else model


def student_x0(student: VelocityFn, x0: torch.Tensor, *, student_steps: int, rollout_fraction: float,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The student's one-pass x0 prediction x0_hat = x_t - t v_student(x_t, t) at a schedule_start (with
    gradients into the student): the generated sample DMD matches to the teacher's distribution."""
    start = schedule_start(student, x0, student_steps=student_steps, rollout_fraction=rollout_fraction,
                           generator=generator)
    x0_hat = start.x - _bcast(start.t_from, start.x) * student(start.x, start.t_from).to(start.x.dtype)
    return x0_hat, {"t_mean": start.t_from.mean(), "rollout_share": start.from_rollout.float().mean()}


def dmd_generator_loss(x0_hat: torch.Tensor, teacher: VelocityFn, critic: VelocityFn,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DMD's distribution-matching term on the student's samples x0_hat: re-noised at a random tau, the
    guided teacher's denoised x0 (real score) and the critic's (fake score, its single pass) give the
    per-sample direction (fake - real) / mean|x0_hat - real|; loss 0.5 * mse(x0_hat, (x0_hat - grad).detach())
    has exactly that gradient (/ numel) with respect to x0_hat. Teacher and critic get no gradients."""
    b = x0_hat.shape[0]
    tau = sample_timesteps(b, generator, device=x0_hat.device)
    eps = _draw(torch.randn, tuple(x0_hat.shape), generator, x0_hat).to(x0_hat.dtype)
    with torch.no_grad():
        sample = x0_hat.detach()
        x_tau = interpolate(sample, eps, tau)
        real = x_tau - _bcast(tau, x_tau) * teacher(x_tau, tau).to(x_tau.dtype)
        fake = x_tau - _bcast(tau, x_tau) * critic(x_tau, tau).to(x_tau.dtype)
        scale = (sample - real).abs().float().flatten(1).mean(1).clamp_min(1e-6)
        grad = (fake - real).float() / _bcast(scale, real).float()
    target = (x0_hat.float() - grad).detach()
    loss = 0.5 * (x0_hat.float() - target).pow(2).mean()
    return loss, {"dmd_gen": loss.detach(), "dmd_grad_abs": grad.abs().mean(),
                  "dmd_real_fake_gap": (fake - real).abs().float().mean(), "tau_mean": tau.mean()}


def critic_loss(critic: VelocityFn, samples: torch.Tensor, *, updates: int = 1,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The fake-score critic's flow-matching loss on the student's samples (detached: no gradient reaches
    the student), averaged over `updates` draws of (t, noise)."""
    samples = samples.detach()
    losses = [flow_matching_loss(critic, samples, generator=generator)[0] for _ in range(updates)]
    loss = torch.stack(losses).mean()
    return loss, {"dmd_critic": loss.detach()}


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
    """Student = a plain AvatarModel (full fine-tuning) from the sft weights; teacher = the same weights, frozen;
    with dmd2 the trained module is a StudentCritic (student and critic both from the sft weights).
    Data: the whole training split, or the sft stage's identities' clips (options.train_identities); held-out
    prompts as in personality_sft (the sft identities)."""

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
        student = AvatarModel(self.text_cfg, self.dit_cfg, self.audio_cfg)
        if self.options.method != "dmd2":
            return student
        return StudentCritic(student, AvatarModel(self.text_cfg, self.dit_cfg, self.audio_cfg))

    def init_from_parents(self, model: nn.Module) -> None:
        state = load_file(parent_of_kind(self.args, "personality_sft"))
        for part in (model.student, model.critic) if isinstance(model, StudentCritic) else (model,):
            part.load_state_dict(state)

    def export_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A plain AvatarModel (SFTTask's would look for LoRA adapters): with dmd2 the student's weights."""
        if not isinstance(model, StudentCritic):
            return dict(state)
        return {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}

    def _teacher(self, device: torch.device) -> AvatarModel:
        return self.teacher.to(device)

    # -- data ---------------------------------------------------------------------------------------

    def sft_options(self) -> SFTOptions:
        """The parent personality_sft stage's options (its identities, the mouth prior it trained with)."""
        config, stage = self.args["config"], self.args["stage"]
        (sft,) = [p for p in config["stages"][stage]["needs"] if config["stages"][p]["kind"] == "personality_sft"]
        return typed(SFTOptions, config["stages"][sft]["options"])

    def identities(self) -> list[str]:
        """The identities the parent sft stage fine-tuned (its options decide)."""
        options = self.sft_options()
        if options.identities:
            return list(options.identities)
        from avatarforge.data.index import read_index

        return list(read_index(self.data.root, self.data.train_split)["identities"][: options.num_identities])

    def train_identities(self) -> list[str] | None:
        """The sft identities, or (train_identities: all) the whole training split."""
        return None if self.options.train_identities == "all" else self.identities()

    def train_batches(self, *, rank: int, world_size: int, start_batch: int) -> Iterator[Any]:
        """The stream of train_identities()' clips, each batch tagged with its phase (from its position in
        the stream, so a resumed run continues in the right phase)."""
        stream = super().train_batches(rank=rank, world_size=world_size, start_batch=start_batch)
        for index, batch in enumerate(stream, start=start_batch):
            yield {**batch, "phase": phase_of(index, self.options.guidance_batches)}

    # -- training -----------------------------------------------------------------------------------

    def region(self, x0: torch.Tensor) -> RegionWeights:
        """The distillation MSE's weighting: the options' mouth weight and motion term on the sft stage's
        mouth prior (the teacher's training weighting, by its own centre and width)."""
        o = self.options
        if o.mouth_weight == 1 and o.dynamic_weight == 0:
            return PLAIN_MSE
        mouth = replace(self.sft_options(), mouth_weight=o.mouth_weight)
        return RegionWeights(mouth_weight_map(x0.shape, mouth).to(x0.device), o.dynamic_weight,
                             mouth_prior(x0.shape, mouth).to(x0.device))

    def velocity_fns(self, batch: dict[str, Any], x0: torch.Tensor,
                     *models: nn.Module) -> tuple[VelocityFn, list[VelocityFn]]:
        """The teacher's guided velocity function for this batch's conditions, and each model's single
        conditional pass (gradients flow into its encoders too)."""
        teacher = self._teacher(x0.device)
        ref = self.autoencoder.encode(batch["reference"])
        fns = [velocity_fn(m, model_conditions(m, batch, ref, x0.shape[2])) for m in models]
        with torch.no_grad():
            t_cond = model_conditions(teacher, batch, ref, x0.shape[2])
        return velocity_fn(teacher, t_cond, self.options.teacher_scales()), fns

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        x0 = self.autoencoder.encode(batch["video"])
        o = self.options
        if isinstance(model, StudentCritic):
            loss, metrics = self.dmd_loss(model, batch, x0)
        else:
            teacher, (student,) = self.velocity_fns(batch, x0, model)
            region = self.region(x0)
            if batch["phase"] == 1:
                loss, metrics = guidance_loss(student, teacher, x0, region=region)
            else:
                loss, metrics = step_loss(student, teacher, x0, student_steps=o.student_steps, region=region,
                                          teacher_steps=o.teacher_steps, rollout_fraction=o.rollout_fraction)
        out = {f"train/{k}": float(v) for k, v in metrics.items()}
        out["train/phase"] = float(batch["phase"])
        return loss, out

    def dmd_loss(self, model: StudentCritic, batch: dict[str, Any],
                 x0: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """dmd2: the student's term (phase 1: guidance distillation; phase 2: DMD's distribution matching,
        plus the trajectory loss as regression term if weighted) + the critic's flow matching on the
        student's detached samples (both phases, so the critic follows the student from the start)."""
        o = self.options
        teacher, (student, critic) = self.velocity_fns(batch, x0, model.student, model.critic)
        sampling = {"student_steps": o.student_steps, "rollout_fraction": o.rollout_fraction}
        region = self.region(x0)
        if batch["phase"] == 1:
            loss, metrics = guidance_loss(student, teacher, x0, region=region)
            with torch.no_grad():
                x0_hat, _ = student_x0(student, x0, **sampling)
        else:
            x0_hat, metrics = student_x0(student, x0, **sampling)
            loss, gen_metrics = dmd_generator_loss(x0_hat, teacher, critic)
            metrics.update(gen_metrics)
            if o.dmd_regression_weight > 0:
                regression, reg_metrics = step_loss(student, teacher, x0, teacher_steps=o.teacher_steps,
                                                    region=region, **sampling)
                loss = loss + o.dmd_regression_weight * regression
                metrics["distill_mse"] = reg_metrics["distill_mse"]
        fake, critic_metrics = critic_loss(critic, x0_hat, updates=o.dmd_critic_updates)
        metrics.update(critic_metrics)
        return loss + fake, metrics

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
        model = student_of(model)  # dmd2: the critic only trains
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
           "RegionWeights", "step_targets", "schedule_start", "step_loss", "StudentCritic", "student_of", "student_x0",
           "dmd_generator_loss", "critic_loss", "model_conditions", "velocity_fn", "ratio", "video_mse"]
