"""The oracle means something: ground truth scores near perfect; wrong audio, a 5-frame shift, another
identity and degraded renders score as they should; measurements track the json's ground truth."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from avatarforge.data.media import decode_wav, open_video, read_frames
from avatarforge.data.synth import oracle as O
from avatarforge.data.synth.clip import make_record
from avatarforge.data.synth.identity import IdentityParams, sample_identity

SIZE, FPS, SR = 64, 25.0, 16000
IDS = range(6)


@dataclass
class Rec:
    ident: IdentityParams
    meta: dict
    frames: np.ndarray  # decoded from the shard's mp4, as a model or the loader would see it
    audio: np.ndarray


def _record(index: int, clip: int | str, seconds: float, size: int = SIZE) -> Rec:
    ident = sample_identity(0, index)
    sample, _ = make_record(ident, index, clip, seed=0, seconds=seconds, size=size, fps=FPS, sample_rate=SR)
    prefix = "ref." if clip == "reference" else ""
    meta = json.loads(sample[f"{prefix}json"])
    frames = read_frames(open_video(sample[f"{prefix}mp4"]), 0, meta["frames"], FPS)
    return Rec(ident, meta, frames, decode_wav(sample[f"{prefix}wav"])[0])


def degrade(frames: np.ndarray, seed: int, sigma: float = 1.0, noise: float = 6.0) -> np.ndarray:
    """Gaussian blur (sigma in 64-px pixels) + Gaussian noise: what a blurry generator produces."""
    x = O._smooth(frames.astype(np.float32), sigma * frames.shape[1] / 64.0)
    x = x + np.random.default_rng(seed).normal(0.0, noise, x.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def shift(frames: np.ndarray, k: int) -> np.ndarray:
    """The video delayed by k frames against its audio (first frame held)."""
    return np.concatenate([np.repeat(frames[:1], k, axis=0), frames[:-k]])


@pytest.fixture(scope="module")
def recs() -> list[Rec]:
    return [_record(i, 0, 1.6) for i in IDS]


@pytest.fixture(scope="module")
def measured(recs: list[Rec]) -> list[O.Measurements]:
    return [O.analyze_video(r.frames, FPS) for r in recs]


def _score(m: O.Measurements, r: Rec, **kw) -> dict[str, float]:
    return O.score(m, ground_truth_identity=r.meta["identity_params"], phonemes=r.meta["phonemes"], **kw)


def test_measurements_track_the_ground_truth(recs: list[Rec]) -> None:
    for r in recs:
        m = O.analyze_video(r.frames, FPS, identity=r.meta["identity_params"])
        gt_mouth = np.asarray(r.meta["mouth_open"])
        assert np.corrcoef(m.mouth_open, gt_mouth)[0, 1] > 0.85, r.ident.name
        assert np.abs(m.mouth_open - gt_mouth).mean() < 0.12, r.ident.name  # calibrated: renderer units
        head = np.asarray(r.meta["head_offset"])
        if head[:, 0].std() > 0.003:
            assert np.corrcoef(m.head_x, head[:, 0])[0, 1] > 0.9
        assert abs(np.std(m.head_x) - np.std(head[:, 0])) < 0.004
        gt_blinks = [i for i, e in enumerate(r.meta["eye_open"]) if e < 0.5 and (i == 0 or r.meta["eye_open"][i - 1] >= 0.5)]
        assert len(m.blinks()) == len(gt_blinks) and all(min(abs(a - b) for a in gt_blinks) <= 2 for b in m.blinks())
        assert abs(np.median(m.smile) - np.median(r.meta["smile"])) < 0.25
        assert (m.glasses > 0.5) == r.ident.glasses and (m.earrings > 0.5) == r.ident.earrings
        assert abs(m.face_aspect - r.ident.face_aspect) < 0.12
        assert np.abs(m.skin_rgb - np.asarray(r.ident.skin_rgb)).max() < 25


def test_ground_truth_scores_near_perfect(recs: list[Rec], measured: list[O.Measurements]) -> None:
    scores = [_score(m, r) for m, r in zip(measured, recs, strict=True)]
    corr = [s["lipsync_corr"] for s in scores]
    assert min(corr) > 0.8 and np.mean(corr) > 0.9, corr
    assert all(s["lipsync_offset"] == 0 for s in scores)
    assert all(s["identity_error"] < 0.25 for s in scores), [s["identity_error"] for s in scores]
    assert np.mean([s["behaviour_error"] for s in scores]) < 0.3
    assert all(s["jitter"] < 1.0 for s in scores)
    # from the waveform alone (no phoneme timeline): lower, but clearly in sync
    audio = [O.score(m, r.audio, SR) for m, r in zip(measured, recs, strict=True)]
    assert np.mean([s["lipsync_corr"] for s in audio]) > 0.6
    assert all(abs(s["lipsync_offset"]) <= 1 for s in audio) and all(s["lipsync_from_audio"] == 1.0 for s in audio)


def test_another_clips_audio_scores_clearly_worse(recs: list[Rec], measured: list[O.Measurements]) -> None:
    n = len(recs)
    right = np.array([_score(m, r)["lipsync_corr"] for m, r in zip(measured, recs, strict=True)])
    wrong_ph = np.array([O.score(measured[i], phonemes=recs[(i + 1) % n].meta["phonemes"])["lipsync_corr"]
                         for i in range(n)])
    wrong_au = np.array([O.score(measured[i], recs[(i + 2) % n].audio, SR)["lipsync_corr"] for i in range(n)])
    for wrong in (wrong_ph, wrong_au):
        assert wrong.mean() < 0.25 and np.all(right - wrong > 0.4), (right, wrong)


def test_a_five_frame_shift_scores_worse_and_is_found(recs: list[Rec]) -> None:
    for r in recs[:4]:
        m = O.analyze_video(shift(r.frames, 5), FPS)
        s = O.score(m, phonemes=r.meta["phonemes"])
        assert s["lipsync_corr"] < 0.5 and s["lipsync_offset"] == 5 and s["lipsync_best_corr"] > 0.8
        a = O.score(m, r.audio, SR)
        assert a["lipsync_corr"] < 0.5 and abs(a["lipsync_offset"] - 5) <= 1
        early = O.score(O.analyze_video(r.frames[5:], FPS), phonemes=r.meta["phonemes"])
        assert early["lipsync_offset"] == -5  # a video that runs ahead of its audio


def test_another_identity_scores_a_large_identity_error(recs: list[Rec], measured: list[O.Measurements]) -> None:
    own = [_score(m, r)["identity_error"] for m, r in zip(measured, recs, strict=True)]
    for i, r in enumerate(recs):
        for j, other in enumerate(measured):
            if i != j:
                err = O.score(other, ground_truth_identity=r.meta["identity_params"])["identity_error"]
                assert err > 0.35 and err > own[i] + 0.2, (i, j, err, own[i])


def test_degraded_renders_still_score_well(recs: list[Rec]) -> None:
    scores = [_score(O.analyze_video(degrade(r.frames, seed=k), FPS), r) for k, r in enumerate(recs)]
    corr = [s["lipsync_corr"] for s in scores]
    assert min(corr) > 0.7 and np.mean(corr) > 0.8, corr
    assert all(s["lipsync_offset"] == 0 for s in scores)
    assert all(s["identity_error"] < 0.35 for s in scores), [s["identity_error"] for s in scores]
    # heavier blur and a colour cast, as an early generator might produce: degraded but not broken
    r = recs[1]
    cast = np.clip(degrade(r.frames, seed=9, sigma=1.6, noise=10.0).astype(np.float32) * [1.04, 0.98, 0.95], 0, 255)
    heavy = _score(O.analyze_video(cast.astype(np.uint8), FPS), r)
    assert heavy["lipsync_corr"] > 0.5 and heavy["identity_error"] < 0.45


def test_behaviour_separates_identities_given_a_reference() -> None:
    """Dynamic habits from 4 s references: an identity's own habits fit it better than another's."""
    refs = [_record(i, "reference", 4.0) for i in (1, 7, 8)]
    ms = [O.analyze_video(r.frames, FPS) for r in refs]
    for i, r in enumerate(refs):
        own = _score(ms[i], r)["behaviour_error"]
        others = [O.score(ms[j], ground_truth_identity=r.meta["identity_params"],
                          phonemes=refs[j].meta["phonemes"])["behaviour_error"] for j in range(3) if j != i]
        assert own < 0.25 and own < min(others), (i, own, others)
    # against a reference video instead of the ground truth: same identity (other scene) vs another
    clip = O.analyze_video(_record(7, 0, 1.6).frames, FPS)
    same, other = O.score(clip, reference_measurements=ms[1]), O.score(clip, reference_measurements=ms[0])
    assert same["identity_error"] < 0.25 < other["identity_error"]
    assert "behaviour_error" in same


def test_inputs_tensors_sizes_and_garbage(recs: list[Rec]) -> None:
    r = recs[0]
    as_uint8 = O.measure(r.frames, FPS)
    tensor = torch.from_numpy(r.frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0  # a batch sample's layout
    as_tensor = O.measure(tensor, FPS)
    assert np.allclose(as_uint8.raw["mouth"], as_tensor.raw["mouth"], atol=1e-3)
    assert np.allclose(as_uint8.head_x, O.measure(tensor[None], FPS).head_x)
    # other sizes the renderer supports
    for size, floor in ((32, 0.6), (128, 0.9)):
        big = _record(2, 0, 1.6, size=size)
        s = _score(O.analyze_video(big.frames, FPS), big)
        assert s["lipsync_corr"] > floor and s["identity_error"] < 0.3, (size, s)
    # nothing face-like: numbers, not exceptions
    for junk in (np.zeros((6, 64, 64, 3), np.uint8), np.full((6, 64, 64, 3), 255, np.uint8),
                 np.random.default_rng(0).integers(0, 256, (6, 48, 48, 3)).astype(np.uint8),
                 np.zeros((1, 16, 16, 3), np.uint8)):
        s = O.score(O.analyze_video(junk, FPS), np.zeros(SR), SR, ground_truth_identity=r.meta["identity_params"],
                    phonemes=r.meta["phonemes"])
        assert all(np.isfinite(v) for v in s.values()) and s["lipsync_corr"] < 0.5
    with pytest.raises(ValueError, match="4-d"):
        O.analyze_video(np.zeros((64, 64, 3), np.uint8))


def test_score_batch_on_a_loader_shaped_batch(recs: list[Rec]) -> None:
    chosen = recs[:3]
    video = torch.stack([torch.from_numpy(r.frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0 for r in chosen])
    ref = video[:, :, ::4][:, :, :9]  # stand-in for the loader's strided reference frames
    batch = {
        "video": video,
        "audio": torch.stack([torch.from_numpy(r.audio) for r in chosen]),
        "identity_params": [r.meta["identity_params"] for r in chosen],
        "phonemes": [r.meta["phonemes"] for r in chosen],
        "reference": ref,
    }
    scores = O.score_batch(video, batch, sample_rate=SR)
    assert len(scores) == 3 and all(s["lipsync_corr"] > 0.8 and s["identity_error"] < 0.25 for s in scores)
    assert all("identity_error_ref" in s and "behaviour_error_ref" not in s for s in scores)  # 9 strided frames
    # without ground truth (real footage): audio-based lip sync, identity against the reference
    plain = O.score_batch(video, {"audio": batch["audio"], "reference": ref}, sample_rate=SR)
    assert all(s["lipsync_from_audio"] == 1.0 and "identity_error" in s for s in plain)
    summary = O.summarize(scores)
    assert summary["lipsync_corr"] == pytest.approx(np.mean([s["lipsync_corr"] for s in scores]))
    assert json.dumps(O.analyze_video(chosen[0].frames).to_json())  # measurements serialise
