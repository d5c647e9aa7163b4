"""The distill stage's phase logic and loss targets (fast), and the stage on a finished sft run (slow)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
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
from avatarforge.stages.distill import (
    DistillOptions,
    DistillTask,
    check_options,
    guidance_loss,
    integrate,
    phase_of,
    ratio,
    rollout,
    step_loss,
    step_targets,
    video_mse,
)
from tests.conftest import ROOT, TINY, cli_env, run_cli, small_overrides, wait_for_checkpoint
from tests.wandb_files import read_offline_run

SCALES = {"text": 1.0, "audio": 2.0, "reference": 1.5}


def small_model(seed: int) -> AvatarModel:
    """A tiny avatar model whose zero-initialised gates are opened, so every condition matters."""
    torch.manual_seed(seed)
    model = AvatarModel(TextEncoderConfig(dim=16, layers=1, heads=2, max_len=16),
                        AvatarDiTConfig(dim=32, depth=2, heads=2, text_dim=16, audio_dim=16, identity_dim=32,
                                        ref_block=8, query_block=8, ref_top_k=2),
                        AudioEncoderConfig(dim=16, layers=1, heads=2))
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
                DistillOptions(guidance_batches=-1)):
        with pytest.raises(ValueError, match="distill"):
            check_options(bad)
    assert DistillOptions(student_steps=3).sampling() == {
        "steps": 3, "guidance_text": 1.0, "guidance_audio": 1.0, "guidance_ref": 1.0}


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


@pytest.mark.slow
@pytest.mark.integration
def test_killed_distill_resumes_to_the_uninterrupted_weights(tmp_path, finished_run, shared_data):
    """The finished upstream stages copied, the curriculum cut after distill; distill killed (SIGKILL of the
    driver) after its first checkpoint, rerun: it resumes and exports exactly the uninterrupted run's weights
    (checkpointing more often changes nothing either)."""
    reference_dir, _ = finished_run
    cfg = OmegaConf.load(TINY)
    for name in list(cfg.stages):
        if name not in (*UPSTREAM, "distill"):
            del cfg.stages[name]
    config = tmp_path / "tiny_distill.yaml"
    OmegaConf.save(cfg, config)
    for name in UPSTREAM:
        shutil.copytree(reference_dir / "stages" / name, tmp_path / "tiny" / "stages" / name)
    kept = [o for o in small_overrides(tmp_path, shared_data)
            if not o.startswith("stages.") or o.split(".")[1] in (*UPSTREAM, "distill")]
    args = ["run", str(config), *kept, "stages.distill.train.checkpoint.every_steps=2"]
    proc = subprocess.Popen([sys.executable, "-m", "avatarforge.cluster.cli", *args], cwd=ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_checkpoint(tmp_path / "tiny" / "ray" / "distill", proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the embedded cluster dies with the driver
        except ProcessLookupError:
            pass
    assert not (tmp_path / "tiny" / "stages" / "distill" / "DONE.json").exists()
    resumed = run_cli(*args, timeout=900)
    assert re.search(r"plan: distill\s+resume", resumed.stdout), resumed.stdout
    assert "[distill] rank 0: resumed at step" in resumed.stdout + resumed.stderr
    got = load_file(json.loads((tmp_path / "tiny" / "stages" / "distill" / "DONE.json").read_text())["weights"])
    want = load_file(json.loads((reference_dir / "stages" / "distill" / "DONE.json").read_text())["weights"])
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name} differs after resume"
