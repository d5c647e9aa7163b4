"""Reward model: shapes, conditioning (audio and reference change the score), the Bradley-Terry loss, and a
tiny training run that learns a reference-dependent ordering."""

from __future__ import annotations

import math

import pytest
import torch

from avatarforge.model.audio import AudioEncoderConfig
from avatarforge.model.avatar import AvatarDiTConfig, AvatarModel
from avatarforge.model.reward import (
    IdentityHeadConfig,
    RewardModel,
    RewardModelConfig,
    SyncConfig,
    bradley_terry_loss,
    identity_contrastive_loss,
    pair_accuracy,
    sync_contrastive_loss,
)
from avatarforge.model.text_encoder import TextEncoderConfig

pytestmark = pytest.mark.usefixtures("one_thread")

C = 8
SAMPLES = 5760  # 9 frames at 25 fps, 16 kHz


def small_config(**kw) -> RewardModelConfig:
    return RewardModelConfig(latent_channels=C, dim=32, depth=2, heads=4, n_ref_summary=4,
                             audio=AudioEncoderConfig(dim=32, layers=1, heads=2), **kw)


def inputs(b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, C, 3, 8, 8, generator=g), torch.randn(b, SAMPLES, generator=g) * 0.1,
            torch.randn(b, C, 2, 8, 8, generator=g))


def test_scores_shape_and_optional_conditions():
    torch.manual_seed(0)
    model = RewardModel(small_config()).eval()
    video, wave, ref = inputs(3)
    for kwargs in ({}, {"audio": wave}, {"reference": ref}, {"audio": wave, "reference": ref}):
        r = model(video, **kwargs)
        assert r.shape == (3,) and r.dtype == torch.float32 and torch.isfinite(r).all()
    # precomputed windows give the same score as the waveform; a longer reference works too
    windows = model.encode_audio(wave, video.shape[2])
    torch.testing.assert_close(model(video, windows, ref), model(video, wave, ref))
    assert model(video, wave, torch.randn(3, C, 8, 8, 8)).shape == (3,)
    # per-sample scores: a sample's score does not depend on its batch mates
    torch.testing.assert_close(model(video[:1], wave[:1], ref[:1]), model(video, wave, ref)[:1],
                               rtol=1e-5, atol=1e-5)


def test_score_depends_on_audio_and_reference():
    torch.manual_seed(0)
    model = RewardModel(small_config()).eval()
    video, wave, ref = inputs(2)
    base = model(video, wave, ref)
    tone = 0.3 * torch.sin(2 * math.pi * 220.0 * torch.arange(SAMPLES) / 16000.0).expand(2, -1)
    other_audio = model(video, tone, ref)
    other_ref = model(video, wave, torch.randn_like(ref))
    assert (base - other_audio).abs().min() > 1e-4
    assert (base - other_ref).abs().min() > 1e-4
    # and on the video itself
    assert (base - model(torch.randn_like(video), wave, ref)).abs().min() > 1e-4


def test_input_validation():
    model = RewardModel(small_config())
    video, wave, ref = inputs(2)
    with pytest.raises(ValueError, match="video must be"):
        model(torch.randn(2, C + 1, 3, 8, 8))
    with pytest.raises(ValueError, match="not divisible"):
        model(torch.randn(2, C, 3, 7, 8))
    with pytest.raises(ValueError, match="reference batch"):
        model(video, reference=ref[:1])
    windows = model.encode_audio(wave, 6)  # windows for a different clip length
    with pytest.raises(ValueError, match="audio windows"):
        model(video, windows)


def test_audio_encoder_loads_from_avatar_model():
    audio = AudioEncoderConfig(dim=32, layers=1, heads=2)
    avatar = AvatarModel(TextEncoderConfig(dim=32, layers=1, heads=2),
                         AvatarDiTConfig(latent_channels=C, dim=32, depth=1, heads=2, text_dim=32, audio_dim=32),
                         audio)
    model = RewardModel(small_config())
    model.load_audio_encoder(avatar.state_dict())
    for k, v in avatar.audio_encoder.state_dict().items():
        assert torch.equal(model.audio_encoder.state_dict()[k], v)
    with pytest.raises(ValueError, match="no 'audio_encoder"):
        model.load_audio_encoder({"dit.x": torch.zeros(1)})


def test_bradley_terry_loss_value_gradient_and_accuracy():
    rc = torch.tensor([2.0, 0.0, -1.0, 0.5], requires_grad=True)
    rr = torch.tensor([1.0, 0.0, 1.0, 0.5], requires_grad=True)
    loss, m = bradley_terry_loss(rc, rr)
    diff = torch.tensor([1.0, 0.0, -2.0, 0.0])
    expected = -torch.log(torch.sigmoid(diff)).mean()
    torch.testing.assert_close(loss, expected)
    assert m["accuracy"].item() == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert m["margin"].item() == pytest.approx(diff.mean().item())
    loss.backward()
    # descending raises the chosen score and lowers the rejected one, most where the model is wrong
    assert (rc.grad < 0).all() and (rr.grad > 0).all()
    torch.testing.assert_close(rc.grad, -(1 - torch.sigmoid(diff)) / 4)
    assert rc.grad[2].abs() > rc.grad[0].abs()
    assert bradley_terry_loss(torch.tensor([50.0]), torch.tensor([0.0]))[0].item() < 1e-12
    assert pair_accuracy(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 3.0])).item() == 0.5
    with pytest.raises(ValueError, match="differ"):
        bradley_terry_loss(rc, rr[:2])


def identity_pairs(n: int, g: torch.Generator):
    """Toy preference: a reference carries a per-sample colour signature; the chosen video shares it, the
    rejected one carries another sample's. Only a model that compares video with reference can tell."""
    sig = torch.randn(n, C, 1, 1, 1, generator=g)
    other = torch.randn(n, C, 1, 1, 1, generator=g)
    noise = lambda t: 0.3 * torch.randn(n, C, t, 8, 8, generator=g)  # noqa: E731
    return sig + noise(3), other + noise(3), sig + noise(2)


def test_tiny_training_run_learns_a_reference_dependent_ordering():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = RewardModel(small_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    test_chosen, test_rejected, test_ref = identity_pairs(128, torch.Generator().manual_seed(99))
    with torch.no_grad():
        before = pair_accuracy(model(test_chosen, reference=test_ref), model(test_rejected, reference=test_ref))
    for _ in range(100):
        chosen, rejected, ref = identity_pairs(16, g)
        scores = model(torch.cat([chosen, rejected]), reference=torch.cat([ref, ref]))
        loss, _ = bradley_terry_loss(*scores.chunk(2))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        rc, rr = model(test_chosen, reference=test_ref), model(test_rejected, reference=test_ref)
    after = pair_accuracy(rc, rr).item()
    assert after >= 0.85 and before < 0.7, (before.item(), after)
    assert bradley_terry_loss(rc, rr)[0].item() < math.log(2) - 0.2


# -- the sync head ------------------------------------------------------------------------------------------


def sync_model(seed: int = 0) -> RewardModel:
    torch.manual_seed(seed)
    return RewardModel(small_config(patch_size=[1, 2, 2], sync=SyncConfig(enabled=True, dim=8, hidden=16)))


def test_sync_score_is_a_centred_correlation_and_adds_to_the_score():
    model = sync_model().eval()
    video, wave, ref = inputs(2)
    windows = model.encode_audio(wave, video.shape[2])
    v, a = model.sync.features(video, windows)
    assert v.shape == a.shape == (2, 3, 8)
    vc, ac = v - v.mean(1, keepdim=True), a - a.mean(1, keepdim=True)
    assert torch.allclose(model.sync(video, windows), (vc * ac).sum(-1).mean(1), atol=1e-6)
    still = video[:, :, :1].expand_as(video).contiguous()  # a frozen mouth: nothing moves with the audio
    assert torch.allclose(model.sync(still, windows), torch.zeros(2), atol=1e-5)
    plain = RewardModel(small_config(patch_size=[1, 2, 2]))
    plain.load_state_dict({k: w for k, w in model.state_dict().items() if not k.startswith("sync.")})
    with torch.no_grad():
        assert torch.allclose(model(video, wave, ref), plain.eval()(video, wave, ref) + model.sync(video, windows),
                              atol=1e-5)
        assert torch.allclose(model(video, None, ref), plain(video, None, ref))  # no audio: no sync term


def test_cosine_sync_score_is_bounded_and_ignores_amplitude():
    # a policy optimised against the "dot" score can raise it by amplitude alone; the cosine one cannot
    torch.manual_seed(0)
    model = RewardModel(small_config(patch_size=[1, 2, 2], sync=SyncConfig(enabled=True, dim=8, hidden=16,
                                                                            score="cosine", init_scale=5.0))).eval()
    video, wave, _ = inputs(2)
    windows = model.encode_audio(wave, video.shape[2])
    v, a = model.sync.features(video, windows)
    vc, ac = v - v.mean(1, keepdim=True), a - a.mean(1, keepdim=True)
    cosine = (vc * ac).sum((1, 2)) / (vc.flatten(1).norm(dim=1) * ac.flatten(1).norm(dim=1))
    with torch.no_grad():
        score = model.sync(video, windows)
        assert torch.allclose(score, 5.0 * cosine, atol=1e-5) and bool((score.abs() <= 5.0 + 1e-5).all())
        # scaling a feature vector (as a louder mouth does) leaves the cosine as it was
        assert torch.allclose(model.sync.score(3 * v, a), score, atol=1e-5)
        assert not torch.allclose(sync_model().sync.score(3 * v, a), sync_model().sync.score(v, a))
    with pytest.raises(ValueError, match="sync.score"):
        RewardModel(small_config(sync=SyncConfig(enabled=True, score="l2")))


def synced_clips(n: int, frames: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents whose mouth region opens with each clip's audio loudness per latent frame (2 video frames)."""
    g = torch.Generator().manual_seed(seed)
    loud = torch.rand(n, frames, generator=g)
    per_sample = SAMPLES * 2 // 9 // 2  # samples per video frame at 25 fps, 16 kHz (640)
    wave = torch.randn(n, frames * 2 * per_sample, generator=g) * loud.repeat_interleave(2 * per_sample, 1)
    latents = torch.randn(n, C, frames, 8, 8, generator=g) * 0.1
    latents[:, :, :, 4:6, 3:5] += 3 * loud[:, None, :, None, None]
    return latents, wave


@pytest.mark.parametrize("score", ["dot", "cosine"])
def test_sync_contrastive_training_learns_which_audio_fits(score):
    torch.manual_seed(0)
    model = RewardModel(small_config(patch_size=[1, 2, 2], sync=SyncConfig(enabled=True, dim=8, hidden=16,
                                                                            score=score)))
    latents, wave = synced_clips(16, frames=12)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    accuracies = []
    for step in range(100):
        loss, m = sync_contrastive_loss(model, latents, wave, crop=6, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        accuracies.append(float(m["accuracy"]))
    assert sum(accuracies[-20:]) / 20 > 0.8 > 0.7 > sum(accuracies[:5]) / 5
    moved = {k.split(".")[0] for k, p in model.named_parameters() if not torch.equal(p, before[k])}
    assert moved == {"sync", "audio_encoder"}  # the transformer and its heads are left to the pairs
    with pytest.raises(ValueError, match="token-frames"):
        sync_contrastive_loss(model, latents[:, :, :7], wave, crop=6)
    with pytest.raises(ValueError, match="sync.enabled"):
        sync_contrastive_loss(RewardModel(small_config()), latents, wave, crop=6)


def identity_model() -> RewardModel:
    torch.manual_seed(0)
    return RewardModel(small_config(identity=IdentityHeadConfig(enabled=True, dim=8, hidden=16, pool=2)))


def test_identity_head_is_a_scaled_cosine_added_to_the_score():
    model = identity_model().eval()
    video, wave, ref = inputs(2)
    with torch.no_grad():
        term = model.identity(video, ref)
        e_v, e_r = model.identity.embedding(video), model.identity.embedding(ref)
        assert torch.allclose(e_v.norm(dim=-1), torch.ones(2), atol=1e-5)
        assert torch.allclose(term, 10.0 * (e_v * e_r).sum(-1), atol=1e-5)  # init_scale 10
        assert torch.allclose(model.identity(ref[:, :, :1].expand(-1, -1, 3, -1, -1), ref[:, :, :1]),
                              torch.full((2,), 10.0), atol=1e-4)  # a still copy of the reference: cosine 1
        plain = RewardModel(small_config())
        plain.load_state_dict({k: w for k, w in model.state_dict().items() if not k.startswith("identity.")})
        assert torch.allclose(model(video, wave, ref), plain.eval()(video, wave, ref) + term, atol=1e-5)
        assert torch.allclose(model(video, wave, None), plain(video, wave, None))  # no reference: no term


def test_identity_contrastive_training_learns_whose_reference_fits():
    """Clips of 4 identities (each a fixed appearance plus per-clip noise), references of the same
    identities in other noise: the head learns to match a clip to its own identity's reference."""
    model = identity_model()
    g = torch.Generator().manual_seed(1)
    looks = torch.randn(4, C, 1, 8, 8, generator=g)
    ids = torch.arange(16) % 4
    clips = looks[ids].expand(-1, -1, 3, -1, -1) + 1.5 * torch.randn(16, C, 3, 8, 8, generator=g)
    refs = looks[ids].expand(-1, -1, 2, -1, -1) + 1.5 * torch.randn(16, C, 2, 8, 8, generator=g)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    accuracies = []
    for _ in range(60):
        loss, m = identity_contrastive_loss(model, clips, refs, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        accuracies.append(float(m["accuracy"]))
    assert sum(accuracies[-10:]) / 10 > 0.9 and accuracies[0] < 0.8
    # hard negatives: the same clips a little changed must score below them against their own reference
    altered = clips + 0.3 * looks[(ids + 1) % 4].expand(-1, -1, 3, -1, -1)
    _, m = identity_contrastive_loss(model, clips, refs, ids, altered)
    start = float(m["altered_accuracy"])
    for _ in range(60):
        loss, m = identity_contrastive_loss(model, clips, refs, ids, altered)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(m["altered_accuracy"]) > max(0.9, start) and float(m["accuracy"]) > 0.9
    assert {k.split(".")[0] for k, p in model.named_parameters() if not torch.equal(p, before[k])} == {"identity"}
    with pytest.raises(ValueError, match=">= 2 identities"):
        identity_contrastive_loss(model, clips, refs, torch.zeros(16, dtype=torch.long))
    with pytest.raises(ValueError, match="identity.enabled"):
        identity_contrastive_loss(RewardModel(small_config()), clips, refs, ids)


def test_identity_head_on_the_person_region_ignores_the_room():
    from avatarforge.model.avatar import person_prior

    torch.manual_seed(0)
    cfg = dict(enabled=True, dim=8, hidden=16, pool=2)
    person = RewardModel(small_config(identity=IdentityHeadConfig(region="person", **cfg))).identity
    frame = RewardModel(small_config(identity=IdentityHeadConfig(region="frame", **cfg))).identity
    frame.load_state_dict(person.state_dict())
    video = torch.randn(2, C, 3, 8, 8)
    room = video + 2.0 * (1 - person_prior(8, 8)) * torch.randn_like(video)
    with torch.no_grad():
        assert torch.allclose(person.embedding(room), person.embedding(video), atol=1e-6)
        assert not torch.allclose(frame.embedding(room), frame.embedding(video), atol=1e-3)
    with pytest.raises(ValueError, match="identity.region"):
        RewardModel(small_config(identity=IdentityHeadConfig(region="face", **cfg)))
