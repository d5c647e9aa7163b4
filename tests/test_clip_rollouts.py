"""Whole-clip SDE rollouts (stages/clip_rollouts.py): every recorded transition's log-probability is what
the policy gives it when recomputed from the window's own inputs (GRPO's ratio starts at 1 on continuation
windows too), the clip is sampled whole, and the reward sees its longest encodable part."""

from __future__ import annotations

import pytest
import torch

from avatarforge.data.config import DataConfig, SynthConfig
from avatarforge.data.index import read_index
from avatarforge.data.synth import generate_dataset
from avatarforge.model.avatar import AvatarModel
from avatarforge.model.sde import transition_log_prob
from avatarforge.stages.clip_rollouts import (
    clip_prompts,
    clip_rollout,
    prompt_rows,
    whole_clip_latents,
    window_conditions,
)
from avatarforge.stages.common import FrozenAutoencoder
from avatarforge.stages.rlhf import merge_rows
from avatarforge.stages.sampling import WindowPlan, window_wave

SIZE, FPS, SR = 32, 25.0, 16000
SYNTH = SynthConfig(identities=2, heldout_identities=1, clips_per_identity=2, clip_seconds=0.8,
                    reference_seconds=2.0, shard_size=4, workers=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> DataConfig:
    root = tmp_path_factory.mktemp("clips") / "world"
    generate_dataset(str(root), SYNTH, size=SIZE, fps=FPS, sample_rate=SR)
    return DataConfig(root=str(root), frames=9, size=SIZE, fps=FPS, sample_rate=SR, reference_frames=5, synth=SYNTH)


@pytest.fixture(scope="module")
def nets(small_avatar_nets) -> tuple[AvatarModel, FrozenAutoencoder]:
    return small_avatar_nets


def test_recorded_log_probs_equal_the_policy_recomputed_on_every_window(world, nets):
    model, ae = nets
    identities = list(read_index(world.root, world.train_split)["identities"][:1])
    prompts = clip_prompts(world, identities, split=world.train_split, count=2)
    assert [p.identity for p in prompts] == identities * 2 and len({p.key for p in prompts}) == 2
    rows = merge_rows(prompt_rows(prompts, world))
    assert rows["audio"].shape == (2, prompts[0].wave.shape[0]) and rows["reference"].shape[2] == 5
    ref = ae.encode(rows["reference"])
    roll = clip_rollout(model, ae, ref, rows, world, steps=2, noise_level=0.7, reduce="mean", seeds=[3, 4],
                        generator=torch.Generator().manual_seed(0))
    windows = WindowPlan(prompts[0].frames, world.frames).count
    assert windows == 3 and roll.video.shape == (2, 3, prompts[0].frames, SIZE, SIZE)
    assert [(t.window, t.step) for t in roll.transitions] == [(k, i) for k in range(windows) for i in range(2)]
    reference = model.encode_reference(ref)
    with torch.no_grad():
        for tr in roll.transitions:
            cond = window_conditions(model, rows, tr, world, reference)
            log_prob, _, _ = transition_log_prob(model, tr.x, tr.x_next, tr.t, tr.t_next, 0.7, reduce="mean", **cond)
            assert torch.allclose(log_prob, tr.log_prob, atol=1e-5), (tr.window, tr.step)
        # another window's audio is another transition density: the window index matters
        tr = roll.transitions[-1]
        wrong = window_conditions(model, rows, roll.transitions[0], world, reference)
        log_prob, _, _ = transition_log_prob(model, tr.x, tr.x_next, tr.t, tr.t_next, 0.7, reduce="mean", **wrong)
        assert not torch.allclose(log_prob, tr.log_prob, atol=1e-5)
    again = clip_rollout(model, ae, ref, rows, world, steps=2, noise_level=0.7, reduce="mean", seeds=[3, 4],
                         generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.video, roll.video)  # seeded: a resumed stage redraws the same rollouts


def test_whole_clip_latents_cut_to_the_encodable_frames_and_their_audio(world, nets):
    _, ae = nets
    video = torch.rand(2, 3, 20, SIZE, SIZE) * 2 - 1
    wave = torch.randn(2, 20 * 640)
    latents, cut = whole_clip_latents(ae, video, wave, world)
    frames = ae.encodable_frames(20)
    assert latents.shape[2] == ae.latent_shape((2, 3, frames, SIZE, SIZE))[2]
    assert torch.equal(cut, wave[:, : frames * 640])
    _, padded = whole_clip_latents(ae, video, wave[:, :1000], world)
    assert padded.shape == (2, frames * 640) and not padded[:, 1000:].any()


def test_window_wave_is_each_windows_audio_padded_past_the_end():
    wave = torch.arange(20 * 640, dtype=torch.float32)[None]
    assert torch.equal(window_wave(wave, 0, 9, FPS, SR), wave[:, : 9 * 640])
    assert torch.equal(window_wave(wave, 1, 9, FPS, SR), wave[:, 8 * 640: 17 * 640])  # windows share a frame
    last = window_wave(wave, 2, 9, FPS, SR)
    assert last.shape == (1, 9 * 640) and torch.equal(last[:, : 4 * 640], wave[:, 16 * 640:])
    assert not last[:, 4 * 640:].any()


def test_clip_prompts_take_the_asked_reference_length(world):
    from avatarforge.stages.quality import reference_frames_for

    identities = list(read_index(world.root, world.train_split)["identities"][:1])
    default = prompt_rows(clip_prompts(world, identities, split=world.train_split, count=1), world)[0]
    seconds = world.synth.reference_seconds
    longer = prompt_rows(clip_prompts(world, identities, split=world.train_split, count=1,
                                      reference_seconds=seconds), world)[0]
    n = reference_frames_for(seconds, world.fps, world.reference_stride)
    assert default["reference"].shape[2] == world.reference_frames < n == longer["reference"].shape[2]
    assert torch.equal(longer["reference"][:, :, :world.reference_frames], default["reference"])
