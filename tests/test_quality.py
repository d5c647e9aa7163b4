"""Windowed sampling (stages/sampling.py) and the quality library (stages/quality.py): prompts read from a
synthetic world, per-sample noise, NFE counting, pluggable steps, scene measures, paired statistics."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from avatarforge.data.config import DataConfig, SynthConfig
from avatarforge.data.synth import generate_dataset
from avatarforge.data.synth.clip import make_record
from avatarforge.data.synth.identity import sample_identity
from avatarforge.model.autoencoder import AutoencoderConfig, VideoAutoencoder
from avatarforge.model.avatar import AvatarModel
from avatarforge.stages import quality as q
from avatarforge.stages.common import FrozenAutoencoder
from avatarforge.stages.sampling import WindowPlan, euler_step, guided_velocity_fn, sample_windows

SIZE, FPS, SR = 32, 25.0, 16000
SYNTH = SynthConfig(identities=2, heldout_identities=2, clips_per_identity=2, clip_seconds=0.8,
                    reference_seconds=2.0, shard_size=4, workers=1)
GUIDED = {"audio": 2.0, "reference": 1.5, "text": 1.0}  # 4 passes per step


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> DataConfig:
    root = tmp_path_factory.mktemp("quality") / "world"
    generate_dataset(str(root), SYNTH, size=SIZE, fps=FPS, sample_rate=SR)
    return DataConfig(root=str(root), frames=9, size=SIZE, fps=FPS, sample_rate=SR, synth=SYNTH)


@pytest.fixture(scope="module")
def nets(small_avatar_nets) -> tuple[AvatarModel, FrozenAutoencoder]:
    return small_avatar_nets


def _inputs(b: int, seconds: float = 0.64):
    gen = torch.Generator().manual_seed(1)
    ref = torch.rand(b, 3, 5, SIZE, SIZE, generator=gen) * 2 - 1
    wave = (torch.randn(b, 2 * SR, generator=gen) * 0.1)[:, : int(seconds * SR)]
    text = torch.randint(1, 200, (b, 96), generator=gen)
    return ref, wave, text, torch.ones(b, 96, dtype=torch.bool)


def _sample(nets, b=2, seconds=0.64, **kw):
    model, ae = nets
    ref, wave, text, mask = _inputs(b, seconds)
    kw.setdefault("steps", 2)
    return sample_windows(model, ae, ae.encode(ref), wave, text, mask, frames_per_window=9, size=SIZE, fps=FPS,
                          sample_rate=SR, **kw)


# ----------------------------------------------------------------------------------------- sampling


def test_window_plan_covers_the_frames_with_one_shared_frame_per_window():
    assert (WindowPlan(40, 9).count, WindowPlan(9, 9).count, WindowPlan(10, 9).count, WindowPlan(1, 9).count) == (5, 1, 2, 1)
    plan = WindowPlan(40, 9)
    assert plan.start(plan.count - 1) + plan.window >= 40 > plan.start(plan.count - 1)


def test_sample_windows_length_nfe_and_per_sample_noise(nets):
    model, _ = nets
    out = _sample(nets, b=2, seconds=0.64, velocity_fn=guided_velocity_fn(model, GUIDED), seeds=[3, 4])
    assert out.video.shape == (2, 3, 16, SIZE, SIZE) and out.windows == 2  # ceil(0.64 s * 25) frames
    assert out.nfe == 2 * 2 * 4  # windows x steps x guidance passes, per video
    assert _sample(nets, b=2, seconds=0.64, seeds=[3, 4]).nfe == 2 * 2  # scales 1: one pass per step
    # a sample's noise does not depend on its batch: sample 1 alone (seed 4) is sample 1 of the pair
    ref, wave, text, mask = _inputs(2, 0.64)
    model, ae = nets
    alone = sample_windows(model, ae, ae.encode(ref[1:]), wave[1:], text[1:], mask[1:], frames_per_window=9,
                           size=SIZE, fps=FPS, sample_rate=SR, steps=2, seeds=[4],
                           velocity_fn=guided_velocity_fn(model, GUIDED))
    torch.testing.assert_close(alone.video[0], out.video[1], atol=1e-4, rtol=0)
    other = _sample(nets, b=2, seconds=0.64, velocity_fn=guided_velocity_fn(model, GUIDED), seeds=[5, 4])
    assert not torch.allclose(other.video[0], out.video[0], atol=1e-3)


def test_later_windows_continue_without_changing_earlier_ones(nets):
    one = _sample(nets, b=1, seconds=9 / FPS, seeds=[7])
    two = _sample(nets, b=1, seconds=17 / FPS, seeds=[7])
    assert two.video.shape[2] == 17 and two.windows == 2
    torch.testing.assert_close(two.video[:, :, :9], one.video, atol=1e-5, rtol=0)


def test_audio_changes_the_video(nets):
    model, ae = nets
    ref, wave, text, mask = _inputs(1, 0.36)
    kw = dict(frames_per_window=9, size=SIZE, fps=FPS, sample_rate=SR, steps=2, seeds=[0])
    a = sample_windows(model, ae, ae.encode(ref), wave, text, mask, **kw)
    b = sample_windows(model, ae, ae.encode(ref), wave.roll(2000, 1) * 3, text, mask, **kw)
    assert (a.video - b.video).abs().max() > 1e-3


def test_step_fn_is_pluggable_and_sees_windows_and_steps(nets):
    seen = []

    def noisy_step(x, v, t, t_next, *, window, step):
        seen.append((window, step))
        g = torch.Generator().manual_seed(100 * window + step)
        return euler_step(x, v, t, t_next, window=window, step=step) + 0.3 * torch.randn(x.shape, generator=g)

    sde = _sample(nets, b=1, seconds=17 / FPS, step_fn=noisy_step, steps=3, seeds=[0])
    ode = _sample(nets, b=1, seconds=17 / FPS, steps=3, seeds=[0])
    assert seen == [(w, s) for w in range(2) for s in range(3)]
    assert (sde.video - ode.video).abs().max() > 1e-2
    four = _sample(nets, b=1, seconds=9 / FPS, timesteps=torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]), seeds=[0])
    assert four.nfe == 4


# ------------------------------------------------------------------------------------------ prompts


def test_reference_frames_fit_the_seconds():
    assert q.reference_frames_for(1, 25, 4) == 5  # 5 frames 4 apart span 17 frames (0.68 s)
    assert q.reference_frames_for(4, 25, 4) == 25
    assert q.reference_frames_for(16, 25, 4) == 97
    for s in (1, 2.5, 4, 16):
        n = q.reference_frames_for(s, 25, 4)
        assert (n - 1) % 4 == 0 and (n - 1) * 4 + 1 <= s * 25


def test_prompts_read_whole_clips_with_their_truth(world):
    speeches, ids = q.read_world(world, "heldout", reference_seconds=2.0)
    assert len(speeches) == 4 and sorted(ids) == ["id0002", "id0003"]
    sp = speeches[0]
    assert sp.frames == 20 and sp.wave.shape == (int(0.8 * SR),) and sp.phonemes  # the whole 0.8 s clip
    assert ids["id0002"].reference.shape == (3, q.reference_frames_for(2.0, FPS, 4), SIZE, SIZE)
    prompts = q.make_prompts(speeches, ids, world, count=4)
    p = prompts[0]
    assert p.identity == sp.identity == p.reference_identity and p.audio_key == p.key == sp.key
    assert p.scene == sp.scene and p.scene["colour"] in p.caption
    assert p.reference_frames(5).shape[1] == 5
    with pytest.raises(ValueError, match="reference frames"):
        p.reference_frames(99)
    swapped = q.with_other_audio(prompts)
    assert [s.audio_key for s in swapped] == [prompts[(i + 1) % 4].key for i in range(4)]
    assert all(s.phonemes == o.phonemes and s.key == o.key for s, o in zip(swapped, prompts, strict=True))
    other = q.with_other_reference(prompts, ids)
    assert all(o.reference_identity != o.identity and o.caption == p.caption for o, p in zip(other, prompts, strict=True))
    # retargeted to a training identity: its reference, truth and caption; the speech stays
    _, train_ids = q.read_world(world, "train", reference_seconds=2.0, identities=["id0001"])
    target = q.make_prompts(speeches, {**ids, **train_ids}, world, count=2, targets=["id0001"])
    assert {t.identity for t in target} == {"id0001"} and target[0].key == sp.key
    assert target[0].identity_params["name"] == "id0001"
    with pytest.raises(ValueError, match="clips for"):
        q.make_prompts(speeches, ids, world, count=5)


def test_prompts_caption_as_the_stages_read_captions(world):
    """data.captions scene: the prompt's text is the scene alone, as the records' scene_caption; a caption
    asking for another scene follows it."""
    speeches, ids = q.read_world(world, "heldout", reference_seconds=2.0)
    full = q.make_prompts(speeches, ids, world, count=2)
    scene = q.make_prompts(speeches, ids, replace(world, captions="scene"), count=2)
    assert all(f.caption != s.caption and f.scene == s.scene for f, s in zip(full, scene, strict=True))
    assert [s.caption for s in scene] == [f"a person in a {s.scene['colour']} room" for s in scene]
    moved = q.with_caption_scene(scene, [full[1].scene, full[0].scene], replace(world, captions="scene"))
    assert [m.caption for m in moved] == [scene[1].caption, scene[0].caption]


def test_scene_measure_tells_the_rooms_apart():
    ident = sample_identity(0, 3)
    _, frames = make_record(ident, 3, 0, seed=0, seconds=0.4, size=64, fps=FPS, sample_rate=SR)
    import json

    meta = json.loads(make_record(ident, 3, 0, seed=0, seconds=0.4, size=64, fps=FPS, sample_rate=SR)[0]["json"])
    ref_meta = json.loads(make_record(ident, 3, "reference", seed=0, seconds=0.4, size=64, fps=FPS,
                                      sample_rate=SR)[0]["ref.json"])
    truth = {"phonemes": meta["phonemes"], "identity_params": meta["identity_params"], "scene": meta["scene"],
             "reference_scene": ref_meta["scene"]}
    assert meta["scene"]["colour"] != ref_meta["scene"]["colour"]
    s = q.score_video(frames, truth, FPS, SR)
    assert s["scene_error"] < 0.25 < 1.0 < s["scene_error_ref"]
    swapped = q.score_video(frames, {**truth, "scene": ref_meta["scene"], "reference_scene": meta["scene"]})
    assert swapped["scene_error"] > 1.0 and swapped["scene_error_ref"] < 0.25


# --------------------------------------------------------------------------------------- statistics


def test_sign_test_and_paired_stats():
    assert q.sign_test_p(10, 0) == pytest.approx(2 / 1024)
    assert q.sign_test_p(5, 5) == 1.0 and q.sign_test_p(0, 0) == 1.0
    rng = np.random.default_rng(0)
    b = rng.normal(size=40)
    s = q.paired_stats(b + 1.0 + 0.1 * rng.normal(size=40), b)
    assert s["n"] == 40 and 0.9 < s["diff"] < 1.1 and s["ci_low"] > 0.8 and s["win_rate"] == 1.0
    assert s["sign_p"] < 1e-6
    lower = q.paired_stats(b + 1.0, b, higher_is_better=False)  # a is worse when lower is better
    assert lower["win_rate"] == 0.0
    noise = q.paired_stats(rng.normal(size=40), rng.normal(size=40))
    assert noise["ci_low"] < 0 < noise["ci_high"] and noise["sign_p"] > 0.01
    nan = q.paired_stats([1.0, np.nan, 3.0], [0.0, 1.0, np.nan])
    assert nan["n"] == 1


def test_compare_policies_same_noise_nfe_and_self_tie(world, nets):
    model, ae = nets
    speeches, ids = q.read_world(world, "heldout", reference_seconds=2.0)
    prompts = q.make_prompts(speeches, ids, world, count=2)
    teacher = q.Policy("teacher", model, scales=GUIDED, steps=2)
    student = q.Policy("student", model, steps=1)
    same = q.compare_policies(teacher, replace(teacher, name="copy"), ae, prompts, world)
    assert same.utility_win_rate == 0.5 and same.utility["diff"] == 0.0  # same noise -> the same videos
    cmp = q.compare_policies(student, teacher, ae, prompts, world)
    assert cmp.summary["teacher"]["nfe_per_video"] == 3 * 2 * 4  # 3 windows (20 frames) x 2 steps x 4
    assert cmp.summary["student"]["nfe_per_video"] == 3 * 1
    assert 0.0 <= cmp.utility_win_rate <= 1.0 and len(cmp.scores["student"]) == 2
    assert set(cmp.metrics) >= {"lipsync_corr", "identity_error"}
    assert cmp.summary["student"]["seconds_per_video"] > 0


def test_prompts_sample_with_the_training_length_reference_by_default(world, nets):
    """Records read long (for the reference-length claim) must not lengthen the other conditions' references:
    by default a prompt is sampled with data.reference_frames frames, the training length."""
    model, ae = nets
    short = replace(world, reference_frames=5)  # 5 frames, 4 apart: 0.8 s; the records were read 2 s long
    speeches, ids = q.read_world(short, "heldout", reference_seconds=2.0)
    prompts = q.make_prompts(speeches, ids, short, count=1)
    assert prompts[0].reference.shape[1] == 9
    policy = q.Policy("p", model, scales=GUIDED, steps=2)
    default, training, whole = (q.sample_prompts(policy, ae, prompts, short, reference_seconds=s).videos[0]
                                for s in (None, 0.8, 2.0))
    assert np.array_equal(default, training)
    assert not np.array_equal(default, whole)


def test_spread_takes_identities_in_turn():
    speeches = [q.Speech(f"{i}-{c}", i, torch.zeros(1), None, 1, {}, np.zeros(1)) for i in "ab" for c in range(3)]
    assert [s.key for s in q.spread(speeches, 4)] == ["a-0", "b-0", "a-1", "b-1"]
    assert len(q.spread(speeches, 10)) == 6


# ------------------------------------------------------------------------------- the in-stage evals


def _task_args(world: DataConfig, nets_path: Path, kind: str, options: dict) -> dict:
    from dataclasses import asdict

    dims = {"text": {"dim": 32, "layers": 1, "heads": 2},
            "dit": {"latent_channels": 4, "dim": 32, "depth": 2, "heads": 2, "text_dim": 32, "audio_dim": 32,
                    "identity_dim": 32},
            "audio": {"dim": 32, "layers": 1, "heads": 2},
            "autoencoder": {"latent_channels": 4, "base_channels": 8}}
    stage = {"kind": kind, "needs": ["ae"], "options": options, "train": {"batch_size": 2, "eval": {"batch_size": 2}}}
    config = {"seed": 0, "data": asdict(world), "model": dims, "stages": {"ae": {"kind": "autoencoder"}, "s": stage}}
    return {"config": config, "stage": "s", "parent_weights": {"ae": str(nets_path)}}


@pytest.mark.parametrize("kind", ["a2v_pretrain", "personality_sft"])
def test_stage_eval_scores_windowed_whole_clips(world, nets, tmp_path, kind):
    from avatarforge.stages.avatar import AvatarTask, SFTTask

    model, ae = nets
    path = tmp_path / "ae.safetensors"
    save_file(ae.model.state_dict(), str(path))
    options = {"eval_clips": 2, "eval_videos": 2, "sample_steps": 1}
    if kind == "personality_sft":
        options["identities"] = ["id0001"]
    task = (SFTTask if kind == "personality_sft" else AvatarTask)(_task_args(world, path, kind, options))
    out = task.evaluate(model)
    prompts = task.eval_prompts()
    assert len(prompts) == 2 and all(p.frames == 20 for p in prompts)  # whole 0.8 s clips, not 9 frames
    if kind == "personality_sft":
        assert {p.identity for p in prompts} == {"id0001"} and {p.reference_identity for p in prompts} == {"id0001"}
    else:
        assert [p.identity for p in prompts] == ["id0002", "id0003"]  # identities in turn
    assert out["samples"].shape == (20, SIZE, 2 * SIZE, 3) and out["samples"].dtype == np.uint8
    for key in ("flow_loss", "oracle/lipsync_corr", "oracle/lipsync_corr_other_audio", "oracle/identity_error",
                "oracle/behaviour_error", "oracle/jitter"):
        assert np.isfinite(out[key]), key


def test_eval_world_is_the_same_world_with_more_heldout_identities(world, tmp_path):
    import tarfile

    big = q.eval_world(world, str(tmp_path / "big"), heldout_identities=3, reference_seconds=3.0, workers=1)
    speeches, ids = q.read_world(big, "heldout", reference_seconds=3.0)
    assert sorted(ids) == ["id0002", "id0003", "id0004"] and len(speeches) == 6
    assert ids["id0002"].reference.shape[1] == q.reference_frames_for(3.0, FPS, 4)

    def members(root: str) -> dict[str, bytes]:
        out = {}
        for path in sorted(Path(root, "train").glob("*.tar")):
            with tarfile.open(path) as tar:
                out.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
        return out

    small, large = members(world.root), members(big.root)
    clips = [k for k in small if not k.split(".", 1)[1].startswith("ref.")]
    assert clips and all(small[k] == large[k] for k in clips)  # the training clips are the run's own
    index = Path(big.root, "heldout", "index.json")
    stamp = index.stat().st_mtime_ns
    assert q.eval_world(world, str(tmp_path / "big"), heldout_identities=3, reference_seconds=3.0).root == big.root
    assert index.stat().st_mtime_ns == stamp  # generated once


def test_tuned_identity_prompts_give_heldout_speech_to_the_fine_tuned_identities(world, tmp_path):
    config = {"stages": {"sft": {"kind": "personality_sft", "options": {"identities": ["id0001", "id0000"]}}}}
    big, prompts = q.tuned_identity_prompts(world, config, 3, heldout_identities=3, reference_seconds=3.0,
                                            root=str(tmp_path / "big"))
    heldout = {sp.key for sp in q.read_world(big, big.eval_split)[0]}
    assert [p.identity for p in prompts] == ["id0001", "id0000", "id0001"]
    assert all(p.key in heldout and p.reference_identity == p.identity for p in prompts)
    assert len({p.key for p in prompts}) == 3


def test_guidance_interval_applies_a_scale_only_inside_it():
    """intervals {"text": (0.5, 1)}: text guidance 3 at t >= 0.5, plain (1) below; other scales at every step."""
    from avatarforge.model.guidance import guided_velocity
    from avatarforge.stages.sampling import guided_velocity_fn

    def model(x, t, drop=None, text=None, text_mask=None, audio=None, reference=None):
        has_text = text is not None and not (drop or {}).get("text", torch.zeros(1, dtype=torch.bool)).all()
        return x + 1.0 * has_text + 10.0 * (audio is not None) + 100.0 * (reference is not None)

    x = torch.zeros(2, 3)
    cond = {"text": torch.ones(2, 4, dtype=torch.long), "text_mask": torch.ones(2, 4, dtype=torch.bool),
            "audio": torch.ones(2), "reference": torch.ones(2)}
    scales = {"text": 3.0, "audio": 2.0, "reference": 1.5}
    fn = guided_velocity_fn(model, scales, {"text": (0.5, 1.0)})
    low = guided_velocity_fn(model, scales, {"text": (0.0, 0.5)})
    for t, text_scale in ((0.9, 3.0), (0.5, 3.0), (0.2, 1.0)):
        tt = torch.full((2,), t)
        assert torch.equal(fn(x, tt, cond), guided_velocity(model, x, tt, cond, {**scales, "text": text_scale}))
        other = 3.0 if t <= 0.5 else 1.0
        assert torch.equal(low(x, tt, cond), guided_velocity(model, x, tt, cond, {**scales, "text": other}))
    assert not torch.equal(fn(x, torch.full((2,), 0.9), cond), fn(x, torch.full((2,), 0.2), cond))
    with pytest.raises(ValueError, match="without a guidance scale"):
        guided_velocity_fn(model, {"audio": 2.0}, {"text": (0.5, 1.0)})
    with pytest.raises(ValueError, match="0 <= lo <= hi <= 1"):
        guided_velocity_fn(model, scales, {"text": (0.8, 0.2)})


def test_autoencode_windows_keeps_every_frame_in_place(tmp_path: Path) -> None:
    """The autoencoder floor reconstructs in sampling's windows (sharing one frame, the last padded): with a
    per-frame autoencoder every output frame is that frame's own reconstruction, whatever the length."""
    torch.manual_seed(0)
    config = {"channel_mult": [1, 2], "num_res_blocks": [0, 1], "temporal_downsample": [False], "temporal_kernel": 1}
    save_file(VideoAutoencoder(AutoencoderConfig(**config)).state_dict(), str(tmp_path / "ae.safetensors"))
    ae = FrozenAutoencoder(config, tmp_path / "ae.safetensors")  # what the benchmark reconstructs with
    rng = np.random.default_rng(0)
    for t in (40, 17, 9, 5):
        video = rng.integers(0, 256, (t, 16, 16, 3), dtype=np.uint8)
        out = q.autoencode_windows(ae, video, 9)
        assert out.shape == video.shape and out.dtype == np.uint8
        with torch.no_grad():
            alone = np.concatenate([q.to_uint8(ae.decode(ae.encode(q.to_float(video[i:i + 1])[None]))[0])
                                    for i in range(t)])
        assert np.abs(out.astype(int) - alone.astype(int)).max() <= 1, t  # batched convs may round apart
