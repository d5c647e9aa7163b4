"""The rlhf stage's reward: the reward model's whole score or only its sync head, on the raw latents or on
what survives the autoencoder's round trip (differentiable, for the reward-gradient algorithm)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from avatarforge.model.audio import AudioEncoderConfig
from avatarforge.model.autoencoder import AutoencoderConfig, VideoAutoencoder
from avatarforge.model.reward import RewardModel, RewardModelConfig, SyncConfig
from avatarforge.stages.common import FrozenAutoencoder
from avatarforge.stages.rlhf import RLHFOptions, RLHFTask

pytestmark = pytest.mark.usefixtures("one_thread")

C = 4


def task(tmp_path, **options) -> RLHFTask:
    torch.manual_seed(0)
    cfg = {"latent_channels": C, "base_channels": 8, "temporal_downsample": [True, False]}  # 2x in time
    save_file(VideoAutoencoder(AutoencoderConfig(**cfg)).state_dict(), str(tmp_path / "ae.safetensors"))
    t = RLHFTask.__new__(RLHFTask)
    t.options = RLHFOptions(**options)
    t.autoencoder = FrozenAutoencoder(cfg, tmp_path / "ae.safetensors")
    t.reward = RewardModel(RewardModelConfig(
        latent_channels=C, dim=32, depth=1, heads=4, n_ref_summary=2, patch_size=[1, 2, 2],
        audio=AudioEncoderConfig(dim=32, layers=1, heads=2, temporal_factor=2),
        sync=SyncConfig(enabled=True, dim=8, hidden=16))).eval().requires_grad_(False)
    return t


def inputs(t: RLHFTask) -> tuple[torch.Tensor, dict, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = t.autoencoder.latent_shape((2, 3, 9, 32, 32))
    return (torch.randn(shape, generator=g), {"audio": torch.randn(2, 5760, generator=g) * 0.1},
            torch.randn(2, C, 1, *shape[3:], generator=g))


def test_reward_terms_pick_the_whole_score_or_the_sync_head(tmp_path):
    full, sync = task(tmp_path), task(tmp_path, reward_terms="sync")
    latents, rows, ref = inputs(full)
    with torch.no_grad():
        assert torch.allclose(full.rewards(latents, rows, ref), full.reward(latents, rows["audio"], ref))
        windows = sync.reward.encode_audio(rows["audio"], latents.shape[2])
        assert torch.allclose(sync.rewards(latents, rows, ref), sync.reward.sync(latents, windows))
        assert not torch.allclose(full.rewards(latents, rows, ref), sync.rewards(latents, rows, ref))


def test_round_trip_reward_scores_the_decoded_video_and_passes_gradient(tmp_path):
    t = task(tmp_path, reward_round_trip=True)
    latents, rows, ref = inputs(t)
    projected = t.autoencoder.encode(t.autoencoder.decode(latents))
    assert torch.allclose(t.autoencoder.round_trip(latents), projected, atol=1e-5)
    assert not torch.allclose(projected, latents, atol=1e-2)  # an untrained autoencoder changes them
    x = latents.clone().requires_grad_(True)
    reward = t.rewards(x, rows, ref)
    assert torch.allclose(reward.detach(), t.reward(projected, rows["audio"], ref), atol=1e-5)
    reward.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_options_refuse_unknown_reward_terms():
    assert "reward_terms" in RLHFOptions(reward_terms="lips").validate()[0]
    assert RLHFOptions(reward_terms="sync", reward_round_trip=True).validate() == []


def test_options_check_the_rollout_reference_length():
    assert RLHFOptions(rollout="clip", rollout_reference_seconds=4.0).validate() == []
    assert "rollout_reference_seconds" in RLHFOptions(rollout="window", rollout_reference_seconds=4.0).validate()[0]
    assert "rollout_reference_seconds" in RLHFOptions(rollout="clip", rollout_reference_seconds=-1).validate()[0]


def test_options_check_the_oracle_reward_source():
    assert RLHFOptions(rollout="clip", reward_source="oracle").validate() == []
    assert "reward_source" in RLHFOptions(rollout="window", reward_source="oracle").validate()[0]
    assert "reward_source" in RLHFOptions(rollout="clip", reward_source="human").validate()[0]


def test_oracle_reward_prefers_the_ground_truth_to_a_frozen_face(tmp_path):
    """reward_source oracle scores each decoded clip against its own prompt's truth: the clip's ground-truth
    render beats the same clip with its first frame held (no lip sync, no habits)."""
    from avatarforge.data.config import DataConfig, SynthConfig
    from avatarforge.data.preferences import UtilityWeights
    from avatarforge.data.synth import generate_dataset
    from avatarforge.stages.quality import make_prompts, read_world, to_float

    synth = SynthConfig(identities=2, heldout_identities=1, clips_per_identity=2, clip_seconds=1.2,
                        reference_seconds=1.0, shard_size=4, workers=1)
    generate_dataset(str(tmp_path / "w"), synth, size=32, fps=25.0, sample_rate=16000)
    data = DataConfig(root=str(tmp_path / "w"), frames=9, size=32, reference_frames=5, synth=synth)
    speeches, records = read_world(data, data.train_split)
    prompts = make_prompts(speeches[:2], records, data)  # each speech for its own speaker: its video is the truth
    t = RLHFTask.__new__(RLHFTask)
    t.data, t.utility = data, UtilityWeights()
    t._truth = {f"{p.identity}|{p.key}": p for p in prompts}
    truth = torch.stack([to_float(s.video) for s in speeches[:2]])
    frozen = truth[:, :, :1].expand_as(truth).contiguous()
    ids = list(t._truth)
    rewards = t.oracle_rewards(torch.cat([truth, frozen]), ids * 2)
    assert rewards.shape == (4,) and bool((rewards[:2] > rewards[2:]).all()), rewards
    swapped = t.oracle_rewards(truth, ids[::-1])  # each clip scored against the other prompt's speech
    assert bool((rewards[:2] > swapped).all()), (rewards, swapped)
