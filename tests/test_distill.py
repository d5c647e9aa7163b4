"""The distill stage's phase logic and loss targets (fast), and the stage on a finished sft run (slow)."""

from __future__ import annotations

import copy
import json
import re
import shutil
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from avatarforge.model.audio import AudioEncoderConfig
from avatarforge.model.avatar import AvatarDiTConfig, AvatarModel
from avatarforge.model.flow import euler_sample, sampling_timesteps
from avatarforge.model.guidance import guided_model_fn, guided_velocity
from avatarforge.model.text_encoder import TextEncoderConfig
from avatarforge.stages import distill
from avatarforge.stages.avatar import SFTTask
from avatarforge.stages.common import typed
from avatarforge.stages.config import ConfigError, load_config
from avatarforge.stages.distill import (
    DistillOptions,
    DistillTask,
    RegionWeights,
    StudentCritic,
    check_options,
    critic_loss,
    dmd_generator_loss,
    guidance_loss,
    integrate,
    phase_of,
    ratio,
    rollout,
    step_loss,
    step_targets,
    student_x0,
    video_mse,
)
from tests.conftest import TINY, kill_at_checkpoint, run_cli, small_overrides
from tests.wandb_files import read_offline_run

SCALES = {"text": 1.0, "audio": 2.0, "reference": 1.5}


SMALL = (TextEncoderConfig(dim=16, layers=1, heads=2, max_len=16),
         AvatarDiTConfig(dim=32, depth=2, heads=2, text_dim=16, audio_dim=16, identity_dim=32,
                         ref_block=8, query_block=8, ref_top_k=2),
         AudioEncoderConfig(dim=16, layers=1, heads=2))


def small_model(seed: int) -> AvatarModel:
    """A tiny avatar model whose zero-initialised gates are opened, so every condition matters."""
    torch.manual_seed(seed)
    model = AvatarModel(*SMALL)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def setup(one_thread):
    """(teacher, x0, its conditions, guided teacher fn)."""
    teacher = small_model(0)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 8, 3, 4, 4, generator=g)
    ids = torch.randint(1, 257, (3, 6), generator=g)
    with torch.no_grad():
        cond = dict(text=ids, text_mask=ids != 0, audio=teacher.encode_audio(torch.randn(3, 5760, generator=g), 3),
                    reference=teacher.encode_reference(torch.randn(3, 8, 5, 4, 4, generator=g)))

    def teacher_fn(x, t):
        return guided_velocity(teacher, x, t, cond, SCALES)

    return teacher, x0, cond, teacher_fn


# -- phases --------------------------------------------------------------------------------------------


def test_phase_switches_after_guidance_batches():
    assert [phase_of(i, 3) for i in range(6)] == [1, 1, 1, 2, 2, 2]
    assert phase_of(0, 0) == 2  # no guidance phase at all


def test_batch_stream_phase_is_resume_exact(monkeypatch):
    def fake_stream(self, *, rank, world_size, start_batch):
        yield from ({"video": torch.zeros(1), "n": n} for n in range(start_batch, start_batch + 10))

    monkeypatch.setattr(SFTTask, "train_batches", fake_stream)
    task = DistillTask.__new__(DistillTask)
    task.options = DistillOptions(guidance_batches=4)
    whole = [(b["n"], b["phase"]) for b in islice(task.train_batches(rank=0, world_size=1, start_batch=0), 8)]
    resumed = [(b["n"], b["phase"]) for b in islice(task.train_batches(rank=0, world_size=1, start_batch=3), 5)]
    assert [phase for _, phase in whole] == [1, 1, 1, 1, 2, 2, 2, 2]
    assert resumed == whole[3:]


def test_options_are_checked():
    check_options(DistillOptions())
    for bad in (DistillOptions(teacher_steps=10, student_steps=4), DistillOptions(student_steps=0),
                DistillOptions(teacher_steps=2, student_steps=4), DistillOptions(rollout_fraction=1.5),
                DistillOptions(guidance_batches=-1), DistillOptions(method="dmd3"),
                DistillOptions(method="dmd2", dmd_critic_updates=0),
                DistillOptions(method="dmd2", dmd_regression_weight=-1.0), DistillOptions(mouth_weight=0.5),
                DistillOptions(dynamic_weight=-1.0)):
        with pytest.raises(ValueError, match="distill"):
            check_options(bad)
    assert DistillOptions(method="dmd2").validate() == []
    assert DistillOptions(method="dmd3").validate() == [
        "method: must be one of ('trajectory', 'dmd2'), got 'dmd3'"]
    assert DistillOptions(student_steps=3).sampling() == {
        "steps": 3, "guidance_text": 1.0, "guidance_audio": 1.0, "guidance_ref": 1.0}


def test_unknown_method_fails_config_validation():
    """Before Ray starts: the curriculum's validation names the key."""
    assert load_config(TINY, ["stages.distill.options.method=dmd2"]).stages.distill.options.method == "dmd2"
    with pytest.raises(ConfigError, match=r"stages\.distill\.options\.method: must be one of"):
        load_config(TINY, ["stages.distill.options.method=consistency"])


# -- phase 1: guidance distillation -------------------------------------------------------------------


def test_guidance_target_is_the_guided_velocity(setup):
    teacher, x0, cond, teacher_fn = setup
    seen = {}
    offset = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))

    def student(x, t):
        seen["x"], seen["t"] = x, t
        return offset

    loss, metrics = guidance_loss(student, teacher_fn, x0, torch.Generator().manual_seed(3))
    with torch.no_grad():
        target = guided_velocity(teacher, seen["x"], seen["t"], cond, SCALES)
        plain = teacher(seen["x"], seen["t"], **cond)  # the single conditional pass differs from it
    assert torch.allclose(loss, (offset - target).pow(2).mean(), atol=1e-6)
    assert not torch.allclose(target, plain, atol=1e-3)
    assert float(metrics["distill_mse"]) == pytest.approx(float(loss))
    # x_t lies on the data-noise line at t: x_t - (1 - t) x0 is t * (unit normal noise)
    assert 0 < float(seen["t"].min()) and float(seen["t"].max()) < 1
    zero, _ = guidance_loss(teacher_fn, teacher_fn, x0, torch.Generator().manual_seed(3))
    assert float(zero.detach()) == 0.0


# -- phase 2: step distillation -----------------------------------------------------------------------


def test_integrate_is_exact_for_constant_velocity():
    x = torch.randn(2, 3)
    v = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]])
    out = integrate(lambda x, t: v, x, torch.tensor([1.0, 0.5]), torch.tensor([0.75, 0.0]), 3)
    assert torch.allclose(out, x + torch.tensor([[-0.25], [-0.5]]) * v)


def test_step_target_lands_on_the_teacher_trajectory(setup):
    """Teacher 12 guided steps: one student step with the target from teacher state k*3 lands on state (k+1)*3."""
    _, x0, _, teacher_fn = setup
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    times = sampling_timesteps(12)
    states = [noise]
    with torch.no_grad():
        for i in range(12):
            states.append(states[-1] + (times[i + 1] - times[i]) * teacher_fn(states[-1], times[i].expand(3)))
    student_times = sampling_timesteps(4)
    for k in range(4):
        t_from, t_to = student_times[k].expand(3), student_times[k + 1].expand(3)
        v = step_targets(teacher_fn, states[3 * k], t_from, t_to, 3)
        landed = states[3 * k] + (student_times[k + 1] - student_times[k]) * v
        assert torch.allclose(landed, states[3 * k + 3], atol=1e-5), k
    # and euler_sample with the guided teacher agrees with the chain above
    full = euler_sample(guided_model_fn(setup[0], SCALES), x0.shape, 12, noise=noise, **setup[2])
    assert torch.allclose(full, states[-1], atol=1e-5)


def trajectory_student(teacher_fn, student_steps: int, teacher_steps: int):
    """A student that exactly follows the teacher's trajectory: at a student time t_i its velocity is the
    teacher's mean velocity over [t_{i+1}, t_i]."""
    times = sampling_timesteps(student_steps)

    def fn(x, t):
        i = torch.round((1 - t) * student_steps).long()
        return step_targets(teacher_fn, x, times[i], times[i + 1], teacher_steps // student_steps)

    return fn


@pytest.mark.parametrize("rollout_fraction", [0.0, 0.5, 1.0])
def test_a_student_on_the_teacher_trajectory_has_zero_loss(setup, rollout_fraction):
    _, x0, cond, teacher_fn = setup
    student = trajectory_student(teacher_fn, 4, 12)
    loss, metrics = step_loss(student, teacher_fn, x0, student_steps=4, teacher_steps=12,
                              rollout_fraction=rollout_fraction, generator=torch.Generator().manual_seed(1))
    assert float(loss) < 1e-10
    share = float(metrics["rollout_share"]) * 3
    assert share == pytest.approx(round(share)) and (rollout_fraction != 0 or share == 0)
    assert rollout_fraction != 1 or share == pytest.approx(3)
    # ... and its 4-step samples are the teacher's 12-step samples
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        fast = euler_sample(lambda x, t: student(x, t), x0.shape, 4, noise=noise)
        slow = euler_sample(teacher_fn, x0.shape, 12, noise=noise)
    assert torch.allclose(fast, slow, atol=1e-5)
    # a student that is off the trajectory is not
    wrong, _ = step_loss(lambda x, t: 1.1 * student(x, t), teacher_fn, x0, student_steps=4, teacher_steps=12,
                         rollout_fraction=rollout_fraction, generator=torch.Generator().manual_seed(1))
    assert float(wrong) > 1e-4


def test_step_loss_starts_from_data_or_the_students_rollout(setup):
    _, x0, _, teacher_fn = setup
    calls = []

    def student(x, t):
        calls.append((x.clone(), t.clone()))
        return -x  # any velocity

    # all starts from the rollout: the last call is the graded pass, at the rollout's state
    step_loss(student, teacher_fn, x0, student_steps=4, teacher_steps=8, rollout_fraction=1.0,
              generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    interval = (torch.rand(3, generator=gen) * 4).long().clamp_max(3)
    torch.rand(3, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    times = sampling_timesteps(4)
    expected = rollout(lambda x, t: -x, noise, interval, times)
    x_graded, t_graded = calls[-1]
    assert torch.allclose(x_graded, expected) and torch.equal(t_graded, times[interval])
    # all from data: the graded state is the interpolation of x0 and the noise at t_i (no rollout pass)
    calls.clear()
    step_loss(student, teacher_fn, x0, student_steps=4, teacher_steps=8, rollout_fraction=0.0,
              generator=torch.Generator().manual_seed(0))
    t = times[interval].view(-1, 1, 1, 1, 1)
    assert len(calls) == 1 and torch.allclose(calls[0][0], (1 - t) * x0 + t * noise)


def test_rollout_stops_per_sample():
    noise = torch.ones(3, 2)
    times = sampling_timesteps(4)  # 1, .75, .5, .25, 0
    out = rollout(lambda x, t: torch.full_like(x, 2.0), noise, torch.tensor([0, 1, 3]), times)
    assert torch.allclose(out[:, 0], torch.tensor([1.0, 0.5, -0.5]))


# -- the task's loss: student and teacher wired to the batch ------------------------------------------


class IdentityAutoencoder:
    """Batches hold latents already (the real stage encodes videos with the frozen autoencoder)."""

    def encode(self, x):
        return x


def latent_task(teacher: AvatarModel, **options) -> DistillTask:
    task = DistillTask.__new__(DistillTask)
    task.options = DistillOptions(**options)
    task.teacher = teacher.requires_grad_(False)
    task.autoencoder = IdentityAutoencoder()
    return task


def latent_batch(phase: int) -> dict:
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(1, 257, (2, 6), generator=g)
    return {"video": torch.randn(2, 8, 3, 4, 4, generator=g), "reference": torch.randn(2, 8, 5, 4, 4, generator=g),
            "audio": torch.randn(2, 5760, generator=g), "text": ids, "text_mask": ids != 0, "phase": phase}


@pytest.mark.parametrize("phase", [1, 2])
def test_task_loss_trains_the_student_only(setup, phase):
    teacher = setup[0]
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    task = latent_task(teacher, teacher_steps=4, student_steps=2)
    torch.manual_seed(0)
    loss, metrics = task.loss(student, latent_batch(phase))
    assert metrics["train/phase"] == phase and float(loss.detach()) > 0  # guidance makes the teacher differ
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    for part in (student.dit, student.audio_encoder, student.text_encoder):  # its encoders learn too
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


@pytest.mark.parametrize("phase", [1, 2])
def test_dmd2_task_loss_trains_student_and_critic(setup, phase):
    """One loss for the trainer's one optimizer: the student's term (phase 1 guidance distillation, phase 2
    distribution matching plus the weighted trajectory regression) and the critic's flow matching."""
    teacher = setup[0]
    pair = StudentCritic(*(copy.deepcopy(teacher).requires_grad_(True).train() for _ in range(2)))
    task = latent_task(teacher, teacher_steps=4, student_steps=2, method="dmd2", dmd_regression_weight=0.5)
    torch.manual_seed(0)
    loss, metrics = task.loss(pair, latent_batch(phase))
    assert metrics["train/phase"] == phase and metrics["train/dmd_critic"] > 0
    assert ("train/dmd_gen" in metrics) == (phase == 2) and "train/distill_mse" in metrics
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    for part in (pair.student.dit, pair.student.audio_encoder, pair.critic.dit, pair.critic.audio_encoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_region_weights_put_the_loss_on_the_mouth_and_its_motion():
    """The plain MSE by default; a weight map makes a weighted mean; the motion term scores only the error in
    what changes over time, where its map weighs."""
    torch.manual_seed(0)
    target = torch.randn(2, 3, 4, 5, 5)
    static = target.mean(dim=2, keepdim=True).expand_as(target)  # the right picture without its motion
    plain, m = RegionWeights().loss(static, target)
    assert torch.allclose(plain, (static - target).pow(2).mean()) and set(m) == {"distill_mse"}
    mouth = torch.zeros(1, 1, 1, 5, 5)
    mouth[..., 3, 2] = 1.0
    only_mouth, _ = RegionWeights(weight=mouth).loss(static, target)
    assert torch.allclose(only_mouth, (static - target)[..., 3, 2].pow(2).mean())
    moving, m = RegionWeights(dynamic_scale=2.0, dynamic_weight=mouth).loss(static, target)
    motion = (target - static)[..., 3, 2].pow(2).mean()
    assert torch.allclose(m["dynamic"], motion) and torch.allclose(moving, plain + 2.0 * motion)
    shifted = target + torch.randn(2, 3, 1, 5, 5)  # wrong picture, right motion: no motion error
    _, m = RegionWeights(dynamic_scale=1.0).loss(shifted, target)
    assert float(m["dynamic"]) < 1e-10


def test_task_region_follows_the_sft_mouth_prior():
    config = {"stages": {"sft": {"kind": "personality_sft", "options": {"mouth_center": [0.6875, 0.5625],
                                                                         "mouth_sigma": 0.1}},
                         "distill": {"kind": "distill", "needs": ["sft"], "options": {}}}}
    task = DistillTask.__new__(DistillTask)
    task.args, task.options = {"config": config, "stage": "distill"}, DistillOptions()
    x0 = torch.zeros(1, 8, 3, 8, 8)
    assert task.region(x0) is distill.PLAIN_MSE  # the defaults keep the plain MSE
    task.options = DistillOptions(mouth_weight=4.0, dynamic_weight=10.0)
    region = task.region(x0)
    assert region.weight.shape == (1, 1, 1, 8, 8) and region.dynamic_scale == 10.0
    peak = divmod(int(region.weight.flatten().argmax()), 8)
    assert peak == (5, 4) and float(region.weight.max()) == pytest.approx(4.0)  # the latent at the centre
    assert float(region.weight.min()) == pytest.approx(1.0, abs=1e-3)  # far from the mouth: weight 1
    assert torch.equal(region.dynamic_weight.flatten().argmax(), region.weight.flatten().argmax())


@pytest.mark.parametrize("phase", [1, 2])
def test_mouth_weighting_changes_the_task_loss(setup, phase):
    teacher = setup[0]
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    losses = {}
    for weight in (1.0, 8.0):
        task = latent_task(teacher, teacher_steps=4, student_steps=2, mouth_weight=weight, dynamic_weight=weight - 1)
        task.region = lambda x0, t=task: RegionWeights(
            1 + (t.options.mouth_weight - 1) * torch.eye(4).view(1, 1, 1, 4, 4), t.options.dynamic_weight,
            torch.eye(4).view(1, 1, 1, 4, 4))
        torch.manual_seed(0)
        losses[weight] = task.loss(student, latent_batch(phase))
    assert "train/dynamic" in losses[8.0][1] and "train/dynamic" not in losses[1.0][1]
    assert float(losses[8.0][0].detach()) != pytest.approx(float(losses[1.0][0].detach()), rel=1e-3)
    # same draws: the unweighted MSE of the two is equal
    assert losses[8.0][1]["train/distill_mse"] == pytest.approx(losses[1.0][1]["train/distill_mse"], rel=1e-5)


def test_dmd2_builds_student_and_critic_from_the_sft_weights(setup, monkeypatch):
    teacher = setup[0]
    task = latent_task(teacher, method="dmd2")
    task.args, (task.text_cfg, task.dit_cfg, task.audio_cfg) = {}, SMALL
    monkeypatch.setattr(distill, "parent_of_kind", lambda args, kind: f"{kind}.safetensors")
    monkeypatch.setattr(distill, "load_file", lambda path: teacher.state_dict())
    model = task.build_model()
    assert isinstance(model, StudentCritic) and distill.student_of(model) is model.student
    task.init_from_parents(model)
    for part in (model.student, model.critic):
        assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in part.state_dict().items())
    task.options.method = "trajectory"
    assert type(task.build_model()) is AvatarModel


def test_guidance_distillation_reduces_the_loss(setup):
    teacher = setup[0]
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    task = latent_task(teacher)
    batch = latent_batch(1)
    optim = torch.optim.Adam(student.parameters(), lr=3e-3)

    def fixed_loss():
        torch.manual_seed(0)
        return task.loss(student, batch)[0]

    start = float(fixed_loss())
    for _ in range(15):
        optim.zero_grad()
        fixed_loss().backward()
        optim.step()
    assert float(fixed_loss()) < 0.5 * start


# -- dmd2: distribution matching with a fake-score critic ---------------------------------------------


def denoiser_to(target: torch.Tensor):
    """A velocity field whose x0 prediction x - t v(x, t) is `target` wherever it is evaluated."""
    return lambda x, t: (x - target) / t.view(-1, *([1] * (x.dim() - 1)))


def test_dmd_gradient_vanishes_when_the_critic_is_the_teacher(setup):
    _, x0, _, teacher_fn = setup
    x0_hat = (x0 + 0.3).requires_grad_(True)
    loss, metrics = dmd_generator_loss(x0_hat, teacher_fn, teacher_fn, torch.Generator().manual_seed(0))
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(x0_hat.grad.abs().max()) == 0.0
    assert float(metrics["dmd_real_fake_gap"]) == 0.0


def test_dmd_gradient_moves_the_sample_toward_the_teachers_x0():
    """The critic denoises to the student's own sample, the teacher to `real`: the gradient is
    (fake - real) / mean|x0_hat - real| per sample, and a small step brings x0_hat closer to `real`."""
    g = torch.Generator().manual_seed(0)
    real = torch.randn(4, 3, 2, 2, generator=g)
    sample = torch.randn(4, 3, 2, 2, generator=g) * 2
    x0_hat = sample.clone().requires_grad_(True)
    loss, metrics = dmd_generator_loss(x0_hat, denoiser_to(real), denoiser_to(sample), g)
    loss.backward()
    scale = (sample - real).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    expected = (sample - real) / scale
    assert torch.allclose(x0_hat.grad * x0_hat.numel(), expected, atol=1e-4)
    assert float(loss.detach()) == pytest.approx(0.5 * float(expected.pow(2).mean()), rel=1e-4)
    assert float(metrics["dmd_grad_abs"]) == pytest.approx(float(expected.abs().mean()), rel=1e-4)
    before = (sample - real).flatten(1).norm(dim=1)
    after = (sample - 0.1 * x0_hat.grad * x0_hat.numel() - real).flatten(1).norm(dim=1)
    assert bool((after < before).all())


def test_dmd_terms_reach_only_their_own_model(setup):
    """The generator term trains the student only (teacher and critic evaluated without gradients), the
    critic's flow matching the critic only (the student's samples are detached)."""
    teacher, x0, cond, teacher_fn = setup
    student = copy.deepcopy(teacher).requires_grad_(True)
    critic = copy.deepcopy(teacher).requires_grad_(True)

    def student_fn(x, t):
        return student(x, t, **cond)

    def critic_fn(x, t):
        return critic(x, t, **cond)

    x0_hat, metrics = student_x0(student_fn, x0, student_steps=2, rollout_fraction=0.5,
                                 generator=torch.Generator().manual_seed(0))
    assert {"t_mean", "rollout_share"} <= metrics.keys()
    gen, _ = dmd_generator_loss(x0_hat, teacher_fn, critic_fn, torch.Generator().manual_seed(1))
    gen.backward(retain_graph=True)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.dit.parameters())
    assert all(p.grad is None for p in (*critic.parameters(), *teacher.parameters()))
    student.zero_grad(set_to_none=True)
    fake, metrics = critic_loss(critic_fn, x0_hat, updates=2, generator=torch.Generator().manual_seed(2))
    fake.backward()
    assert float(metrics["dmd_critic"]) > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.dit.parameters())
    assert all(p.grad is None for p in (*student.parameters(), *teacher.parameters()))


def test_critic_loss_is_flow_matching_on_the_samples():
    """Averaged over `updates` fresh draws; zero for the exact velocity of a point mass at the samples."""
    samples = torch.randn(3, 2, 4)
    exact = denoiser_to(samples)  # (x_t - samples) / t = noise - samples on the data-noise line
    loss, _ = critic_loss(exact, samples, updates=3, generator=torch.Generator().manual_seed(0))
    assert float(loss) < 1e-8
    calls = []
    critic_loss(lambda x, t: calls.append(t) or torch.zeros_like(x), samples, updates=3,
                generator=torch.Generator().manual_seed(0))
    assert len(calls) == 3 and not torch.equal(calls[0], calls[1])


def gaussian_velocity(mean: torch.Tensor, std: torch.Tensor):
    """The exact flow-matching velocity for 1-d data N(mean, std^2) (x0 prediction E[x0 | x_t])."""
    def fn(x, t):
        t = t.view(-1, 1)
        denoised = mean + (1 - t) * std**2 / ((1 - t) ** 2 * std**2 + t**2) * (x - (1 - t) * mean)
        return (x - denoised) / t
    return fn


def test_dmd_with_a_learned_critic_matches_the_teachers_distribution(one_thread):
    """Toy DMD2: a one-step generator a + b * noise, the teacher N(2, 0.5^2), a Gaussian critic fitted by
    flow matching to the generator's samples; one Adam optimizer updates both at once. The generator's
    distribution reaches the teacher's, spread included (no mode collapse onto the mean); with the critic
    frozen at its start it does not (it stalls near mean 3.7, std 0.36)."""
    torch.manual_seed(0)
    a, log_b = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    c_mean, c_log_std = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    teacher = gaussian_velocity(torch.tensor(2.0), torch.tensor(0.5))
    optim = torch.optim.Adam([a, log_b, c_mean, c_log_std], lr=0.03)
    for _ in range(400):
        x0_hat = a + log_b.exp() * torch.randn(256, 1)
        critic = gaussian_velocity(c_mean, c_log_std.exp())
        gen, _ = dmd_generator_loss(x0_hat, teacher, critic)
        fake, _ = critic_loss(critic, x0_hat, updates=2)
        optim.zero_grad()
        (gen + fake).backward()
        optim.step()
    assert float(a.detach()) == pytest.approx(2.0, abs=0.15)
    assert float(log_b.detach().exp()) == pytest.approx(0.5, abs=0.1)


# -- evaluation helpers --------------------------------------------------------------------------------


def test_ratio_reads_as_share_of_the_teacher():
    assert ratio(0.45, 0.5, higher_is_better=True) == pytest.approx(0.9)
    assert ratio(0.5, 0.45, higher_is_better=False) == pytest.approx(0.9)  # a larger error keeps less
    for student, teacher in ((1.0, 0.0), (-0.1, -0.05), (0.3, -0.2)):  # no share of a score at or below 0
        assert np.isnan(ratio(student, teacher, higher_is_better=True))


def test_video_mse_in_unit_range():
    a = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    b = np.full((2, 4, 4, 3), 255, dtype=np.uint8)
    assert video_mse([a, a], [a, a]) == 0.0
    assert video_mse([a, a], [b, a]) == pytest.approx(2.0)  # (2 ** 2) averaged over two videos


def test_export_is_a_plain_avatar_model(setup):
    teacher = setup[0]
    state = DistillTask.export_state(None, teacher, teacher.state_dict())
    fresh = small_model(1)
    fresh.load_state_dict(state)  # strict: exactly AvatarModel's keys
    assert distill.DistillOptions().sampling()["steps"] == 4


def test_dmd2_exports_the_student_alone():
    pair = StudentCritic(small_model(0), small_model(1))
    state = DistillTask.export_state(None, pair, pair.state_dict())
    small_model(2).load_state_dict(state)  # strict: exactly AvatarModel's keys
    assert all(torch.equal(state[k], v) for k, v in pair.student.state_dict().items())


def test_identities_are_the_sft_stages(monkeypatch):
    from avatarforge.data import index
    from avatarforge.data.config import DataConfig

    config = {"stages": {"sft": {"kind": "personality_sft", "options": {"num_identities": 3}},
                         "ae": {"kind": "autoencoder", "options": {}},
                         "distill": {"kind": "distill", "needs": ["sft", "ae"], "options": {}}}}
    task = DistillTask.__new__(DistillTask)
    task.args, task.data = {"config": config, "stage": "distill"}, DataConfig()
    monkeypatch.setattr(index, "read_index", lambda root, split: {"identities": ["a", "b", "c", "d"]})
    assert task.identities() == ["a", "b", "c"]
    config["stages"]["sft"]["options"]["identities"] = ["d", "a"]
    assert task.identities() == ["d", "a"]


def test_train_identities_choose_the_stream_not_the_eval(identity_streams):
    """train_identities: sft streams the fine-tuned identities' clips; all the whole training split (None);
    the evals stay on the sft identities either way."""
    from avatarforge.data.config import DataConfig

    config = {"stages": {"sft": {"kind": "personality_sft", "options": {"num_identities": 2}},
                         "distill": {"kind": "distill", "needs": ["sft"], "options": {}}}}
    task = DistillTask.__new__(DistillTask)
    task.args, task.data, task.batch_size, task.seed = {"config": config, "stage": "distill"}, DataConfig(), 2, 0
    for choice, streamed in (("sft", ["a", "b"]), ("all", None)):
        task.options = DistillOptions(train_identities=choice)
        next(task.train_batches(rank=0, world_size=1, start_batch=0))
        assert identity_streams[-1] == streamed
        assert task.identities() == ["a", "b"]
    assert DistillOptions(train_identities="some").validate() == [
        "train_identities: must be one of ('sft', 'all'), got 'some'"]


# -- the stage, end to end (real Ray + DeepSpeed) ---------------------------------------------------------

UPSTREAM = ("autoencoder", "t2v", "a2v", "sft")


def stage_model(stage_dir: Path) -> AvatarModel:
    cfg = OmegaConf.to_container(OmegaConf.load(stage_dir / "config.yaml"), resolve=True)["model"]
    return AvatarModel(typed(TextEncoderConfig, cfg["text"]), typed(AvatarDiTConfig, cfg["dit"]),
                       typed(AudioEncoderConfig, cfg["audio"]))


@pytest.mark.slow
@pytest.mark.integration
def test_distill_stage_exports_a_few_step_student(finished_run):
    run_dir, _ = finished_run
    stage_dir = run_dir / "stages" / "distill"
    done = json.loads((stage_dir / "DONE.json").read_text())
    sft = json.loads((run_dir / "stages" / "sft" / "DONE.json").read_text())
    assert done["kind"] == "distill" and done["parents"]["sft"] == sft["config_hash"]
    options = OmegaConf.load(stage_dir / "config.yaml").stages.distill.options
    m = done["metrics"]
    # measured function evaluations: 4 guidance passes per teacher step, one per student step
    assert m["eval/teacher_nfe"] / m["eval/student_nfe"] == pytest.approx(options.teacher_steps * 4 / options.student_steps)
    assert m["eval/nfe_ratio"] == pytest.approx(m["eval/teacher_nfe"] / m["eval/student_nfe"])
    for key in ("lipsync_corr", "identity_error", "behaviour_error"):
        assert f"eval/teacher_{key}" in m and f"eval/student_{key}" in m and f"eval/ratio_{key}" in m
    assert m["eval/teacher_wall_s"] > 0 and m["eval/student_wall_s"] > 0
    assert 0 <= m["eval/student_win_rate"] <= 1
    assert m["eval/student_teacher_video_mse"] >= 0 and m["eval/heldout_step_mse"] >= 0
    assert m["train/phase"] == 2  # the run ended in step distillation
    # the export is a plain AvatarModel, trained away from the sft weights it started from
    student = load_file(done["weights"])
    stage_model(stage_dir).load_state_dict(student)  # strict
    start = load_file(sft["weights"])
    assert any(not torch.equal(student[k], start[k]) for k in start)
    record = read_offline_run(run_dir / "wandb", "distill")
    assert {"train/distill_mse", "eval/teacher_nfe", "eval/ratio_identity_error", "eval/samples/_type"} <= \
        record["history_keys"]


def distill_only(root: Path, finished_run, shared_data: Path, *extra: str) -> list[str]:
    """CLI args for the tiny curriculum cut after distill, writing under `root`, with the finished run's
    upstream stages copied there (so only distill runs)."""
    reference_dir, _ = finished_run
    cfg = OmegaConf.load(TINY)
    for name in list(cfg.stages):
        if name not in (*UPSTREAM, "distill"):
            del cfg.stages[name]
    root.mkdir(parents=True, exist_ok=True)
    config = root / "tiny_distill.yaml"
    OmegaConf.save(cfg, config)
    for name in UPSTREAM:
        shutil.copytree(reference_dir / "stages" / name, root / "tiny" / "stages" / name)
    kept = [o for o in small_overrides(root, shared_data)
            if not o.startswith("stages.") or o.split(".")[1] in (*UPSTREAM, "distill")]
    return ["run", str(config), *kept, *extra]


def kill_and_resume_distill(root: Path, args: list[str]) -> dict:
    """Start the run, SIGKILL the driver after distill's first checkpoint, rerun: distill resumes. Its
    DONE.json."""
    kill_at_checkpoint(args, root / "tiny" / "ray" / "distill")
    assert not (root / "tiny" / "stages" / "distill" / "DONE.json").exists()
    resumed = run_cli(*args, timeout=900)
    assert re.search(r"plan: distill\s+resume", resumed.stdout), resumed.stdout
    assert "[distill] rank 0: resumed at step" in resumed.stdout + resumed.stderr
    return json.loads((root / "tiny" / "stages" / "distill" / "DONE.json").read_text())


@pytest.mark.slow
@pytest.mark.integration
def test_killed_distill_resumes_to_the_uninterrupted_weights(tmp_path, finished_run, shared_data):
    """The finished upstream stages copied, the curriculum cut after distill; distill killed (SIGKILL of the
    driver) after its first checkpoint, rerun: it resumes and exports exactly the uninterrupted run's weights
    (checkpointing more often changes nothing either)."""
    args = distill_only(tmp_path, finished_run, shared_data, "stages.distill.train.checkpoint.every_steps=2")
    got = load_file(kill_and_resume_distill(tmp_path, args)["weights"])
    reference_dir, _ = finished_run
    want = load_file(json.loads((reference_dir / "stages" / "distill" / "DONE.json").read_text())["weights"])
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name} differs after resume"


@pytest.mark.slow
@pytest.mark.integration
def test_dmd2_distill_resumes_and_exports_the_student(tmp_path, finished_run, shared_data):
    """method=dmd2 through Ray + DeepSpeed: student and critic trained as one module, killed after the first
    checkpoint (which holds both) and resumed; the export is a plain AvatarModel (the student), away from the
    sft weights, sampled with the student's budget. (That a resume is exact is the test above's: same
    checkpoint path, and the critic is part of the checkpointed module.)"""
    args = distill_only(tmp_path, finished_run, shared_data, "stages.distill.options.method=dmd2",
                        "stages.distill.options.dmd_critic_updates=2", "stages.distill.train.checkpoint.every_steps=2")
    done = kill_and_resume_distill(tmp_path, args)
    m = done["metrics"]
    assert m["train/phase"] == 2 and m["train/dmd_critic"] > 0 and np.isfinite(m["train/dmd_gen"])
    assert m["eval/teacher_nfe"] / m["eval/student_nfe"] == pytest.approx(4 * 4 / 2)  # the student samples
    student = load_file(done["weights"])
    stage_dir = tmp_path / "tiny" / "stages" / "distill"
    stage_model(stage_dir).load_state_dict(student)  # strict: no critic, no prefix
    start = load_file(json.loads((tmp_path / "tiny" / "stages" / "sft" / "DONE.json").read_text())["weights"])
    assert any(not torch.equal(student[k], start[k]) for k in start)
