"""The reward stage's batch stream (sync pretraining batches, then preference pairs; resumable) and its loss
on both kinds of batch."""

from __future__ import annotations

from itertools import islice

import pytest
import torch

from avatarforge.model.audio import AudioEncoderConfig
from avatarforge.model.reward import IdentityHeadConfig, RewardModel, RewardModelConfig, SyncConfig
from avatarforge.stages.reward import PairSet, RewardOptions, RewardTask

pytestmark = pytest.mark.usefixtures("one_thread")

C, SAMPLES = 8, 7680  # 12 frames at 25 fps, 16 kHz


def task(sync_steps: int = 3, identity: bool = False) -> RewardTask:
    g = torch.Generator().manual_seed(0)
    t = RewardTask.__new__(RewardTask)
    model = RewardModelConfig(latent_channels=C, dim=32, depth=1, heads=4, n_ref_summary=2, patch_size=[1, 2, 2],
                              audio=AudioEncoderConfig(dim=32, layers=1, heads=2),
                              sync=SyncConfig(enabled=True, dim=8, hidden=16),
                              identity=IdentityHeadConfig(enabled=identity, dim=8, hidden=16, pool=2))
    t.options = RewardOptions(model=model, sync_pretrain_steps=sync_steps, sync_batch_size=3, sync_crop=4)
    t.seed, t.batch_size = 0, 2
    t.train = PairSet(latents=torch.randn(8, C, 12, 4, 4, generator=g), reference=torch.randn(2, C, 2, 4, 4, generator=g),
                      audio=torch.randn(2, SAMPLES, generator=g) * 0.1, text=torch.zeros(2, 4, dtype=torch.long),
                      text_mask=torch.ones(2, 4, dtype=torch.bool), chosen=torch.tensor([0, 2, 4, 6]),
                      rejected=torch.tensor([1, 3, 5, 7]), group=torch.tensor([0, 0, 1, 1]),
                      oracle_agrees=torch.ones(4, dtype=torch.bool), oracle_known=torch.ones(4, dtype=torch.bool))
    t._truth = {"latents": torch.randn(5, C, 12, 4, 4, generator=g), "wave": torch.randn(5, SAMPLES, generator=g) * 0.1}
    if identity:
        t._truth |= {"references": torch.randn(5, C, 2, 4, 4, generator=g), "identities": torch.tensor([0, 1, 0, 1, 2]),
                     "recoloured": torch.randn(5, C, 12, 4, 4, generator=g)}
    return t


def kinds(batches) -> list[str]:
    return ["sync" if "sync_latents" in b else "pairs" for b in batches]


def test_sync_batches_come_first_and_resume_exactly():
    t = task()
    whole = list(islice(t.train_batches(rank=0, world_size=1, start_batch=0), 6))
    assert kinds(whole) == ["sync"] * 3 + ["pairs"] * 3
    assert whole[0]["sync_latents"].shape == (3, C, 12, 4, 4) and whole[0]["sync_wave"].shape == (3, SAMPLES)
    for start in (2, 4):
        resumed = list(islice(t.train_batches(rank=0, world_size=1, start_batch=start), 6 - start))
        for a, b in zip(resumed, whole[start:], strict=True):
            assert a.keys() == b.keys() and all(
                torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)
    other_rank = next(t.train_batches(rank=1, world_size=2, start_batch=0))
    assert other_rank["sync_seed"] != whole[0]["sync_seed"]
    assert kinds(islice(task(sync_steps=0).train_batches(rank=0, world_size=1, start_batch=0), 2)) == ["pairs"] * 2


def test_loss_on_both_kinds_of_batch():
    t = task()
    torch.manual_seed(0)
    model = RewardModel(t.options.model)
    sync_batch, _, _, pair_batch = islice(t.train_batches(rank=0, world_size=1, start_batch=0), 4)
    loss, metrics = t.loss(model, sync_batch)
    assert set(metrics) == {"train/sync_accuracy"} and torch.isfinite(loss)
    assert t.batch_stats(sync_batch) == (3, 0) and t.batch_stats(pair_batch) == (2, 0)
    loss, metrics = t.loss(model, pair_batch)
    assert {"train/accuracy", "train/margin"} <= set(metrics) and torch.isfinite(loss)


def test_identity_head_trains_on_the_sync_batches():
    t = task(identity=True)
    torch.manual_seed(0)
    model = RewardModel(t.options.model)
    batch = next(t.train_batches(rank=0, world_size=1, start_batch=0))
    assert batch["sync_references"].shape == (3, C, 2, 4, 4) and batch["sync_identities"].shape == (3,)
    picked = [int(i) for i in batch["sync_identities"]]
    assert all(torch.equal(batch["sync_references"][k], t._truth["references"][i])
               for k, i in enumerate(torch.randperm(5, generator=torch.Generator().manual_seed(0))[:3]))
    assert len(set(picked)) > 1  # the first batch holds several identities (seed 0)
    loss, metrics = t.loss(model, batch)
    assert {"train/sync_accuracy", "train/identity_accuracy", "train/identity_altered_accuracy"} <= set(metrics)
    sync_only, _ = task().loss(model, {k: v for k, v in batch.items()
                                       if k not in ("sync_references", "sync_identities", "sync_recoloured")})
    assert torch.isfinite(loss) and not torch.equal(loss, sync_only)


def test_options_validate_the_sync_settings():
    assert RewardOptions().validate() == []
    assert "needs model.sync.enabled" in RewardOptions(sync_pretrain_steps=5).validate()[0]
    assert RewardOptions(sync_crop=1).validate()
    identity = RewardModelConfig(identity=IdentityHeadConfig(enabled=True))
    assert "needs sync_pretrain_steps" in RewardOptions(model=identity).validate()[0]
    face = RewardModelConfig(identity=IdentityHeadConfig(region="face"))
    assert "identity.region" in RewardOptions(model=face).validate()[0]


def test_encode_clips_cuts_to_the_shortest_encodable_length(tmp_path):
    import numpy as np
    from safetensors.torch import save_file

    from avatarforge.data.config import DataConfig
    from avatarforge.model.autoencoder import AutoencoderConfig, VideoAutoencoder
    from avatarforge.stages.common import FrozenAutoencoder
    from avatarforge.stages.quality import Speech
    from avatarforge.stages.reward import encode_clips

    cfg = {"latent_channels": 4, "base_channels": 8, "temporal_downsample": [True, True]}  # 4x in time
    save_file(VideoAutoencoder(AutoencoderConfig(**cfg)).state_dict(), str(tmp_path / "ae.safetensors"))
    ae = FrozenAutoencoder(cfg, tmp_path / "ae.safetensors")
    assert [ae.encodable_frames(t) for t in (1, 4, 5, 12, 13)] == [1, 1, 5, 9, 13]
    data = DataConfig(fps=25, sample_rate=16000)
    rng = np.random.default_rng(0)
    speeches = [Speech(f"c{t}", "id", torch.ones(samples), None, t, {},
                       rng.integers(0, 255, (t, 32, 32, 3), dtype=np.uint8)) for t, samples in ((12, 3000), (15, 9600))]
    latents, wave = encode_clips(ae, speeches, data)
    assert latents.shape[:3] == (2, 4, 3) and wave.shape == (2, 9 * 640)  # 9 frames: 1 + 2 * 4 of the 12
    assert wave[0, -1] == 0 and wave[1, -1] == 1  # the short clip's missing audio is padded with silence


def test_person_recoloured_changes_the_person_not_the_room():
    from avatarforge.model.avatar import person_prior
    from avatarforge.stages.reward import person_recoloured

    video = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    out = person_recoloured(video, torch.Generator().manual_seed(0))
    room = person_prior(16, 16) == 0
    assert torch.equal(out[..., room], video[..., room])
    assert not torch.allclose(out[..., ~room], video[..., ~room], atol=1e-3)
    assert out.min() >= -1 and out.max() <= 1
