"""Quality of avatar policies on held-out prompts of the synthetic world, measured by its oracle.

A prompt is one held-out clip's speech (audio + phoneme timeline, the whole clip, >= 1.6 s) given to a
target identity: that identity's reference record (any length up to the record's), a caption asking for
the target in the clip's scene, and the ground truth the oracle scores against (phonemes, identity
parameters, the scene asked for). Conditioning inputs can be swapped while the truth stays (another
prompt's audio, another identity's reference), which is how the paired comparisons are made: same
prompt, same noise, one input changed.

    speeches, identities = read_world(data, "heldout", reference_seconds=16)
    prompts = make_prompts(speeches, identities, data, count=32)          # own identity; or targets=[...]
    policy = Policy("a2v", model, scales={"audio": 2, "reference": 1.5})  # or velocity_fn / steps / step_fn
    run = sample_prompts(policy, autoencoder, prompts, data, reference_seconds=4)   # windowed clips
    scores = score_prompts(run.videos, prompts, data)                    # oracle, per prompt
    paired_stats([s["lipsync_corr"] for s in right], [s["lipsync_corr"] for s in other])
    compare_policies(student, teacher, autoencoder, prompts, data)       # win rate, NFE, wall time

Scores per prompt: lipsync_corr / lipsync_conf / lipsync_offset against the prompt's phonemes,
identity_error and behaviour_error against the target's ground truth, jitter, and the scene:
scene_error (background vs the scene the caption asks for) and scene_error_ref (vs the reference's
scene), both colour distances (oracle units: ~1 clearly different, ~0.25 lighting alone).
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch import nn

from avatarforge.data.config import DataConfig
from avatarforge.data.index import read_index, shard_paths
from avatarforge.data.media import decode_wav, open_video, read_frames, resample_audio
from avatarforge.data.synth.identity import IdentityParams, Scene, caption, scene_caption
from avatarforge.data.synth.oracle import (
    analyze_video,
    colour_distance,
    expected_openness,
    lipsync,
    score,
    summarize,
)
from avatarforge.data.synth.render import background, lighting
from avatarforge.data.tokenizer import tokenize
from avatarforge.stages.prompts import personality_identities
from avatarforge.stages.sampling import (
    StepFn,
    VelocityFn,
    WindowPlan,
    euler_step,
    guided_velocity_fn,
    sample_windows,
)

SCORE_KEYS = ("lipsync_corr", "lipsync_conf", "lipsync_offset", "identity_error", "behaviour_error", "jitter",
              "scene_error", "scene_error_ref")
log = logging.getLogger(__name__)
LOWER_IS_BETTER = ("identity_error", "behaviour_error", "jitter", "scene_error", "lipsync_abs_offset")
CORNER = 0.12  # top-corner squares (fraction of the frame) where only the backdrop shows


# ------------------------------------------------------------------------------------- reading the world


@dataclass(frozen=True)
class Speech:
    """One clip's speech, whole, with the clip's truth."""

    key: str
    identity: str
    wave: torch.Tensor  # [S] float in [-1, 1], exactly the clip's duration
    phonemes: list[list[Any]] | None  # [start, end, phoneme, ...] rows, seconds from the clip's start
    frames: int
    scene: dict[str, Any]  # the clip's scene (json)
    video: np.ndarray  # uint8 [frames, S, S, 3]: the ground-truth render (the oracle's ceiling)


@dataclass(frozen=True)
class IdentityRecord:
    """An identity's ground truth and its reference record, read from frame 0 every `stride` frames."""

    identity: str
    params: dict[str, Any]
    reference: torch.Tensor  # [3, Tr, S, S] in [-1, 1]: the longest reference read
    stride: int
    scene: dict[str, Any]  # the reference record's scene


def reference_frames_for(seconds: float, fps: float, stride: int, temporal_factor: int = 4) -> int:
    """Reference frames (1 + temporal_factor * k, as the causal autoencoder needs) whose span, `stride`
    frames apart, fits in `seconds`; at least 1."""
    per = seconds * fps / stride
    return 1 + temporal_factor * max(0, int(math.floor((per - 1) / temporal_factor + 1e-9)))


def _square(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 [T, H, W, 3] -> centre-square uint8 [T, size, size, 3] (resized only when needed)."""
    h, w = frames.shape[1:3]
    side = min(h, w)
    frames = frames[:, (h - side) // 2: (h - side) // 2 + side, (w - side) // 2: (w - side) // 2 + side]
    if side == size:
        return np.ascontiguousarray(frames)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _video(data: bytes, count: int, stride: int, cfg: DataConfig) -> np.ndarray:
    """`count` frames `stride` apart from frame 0 (data.fps), the last one repeated past the end."""
    reader = open_video(data)
    frames = read_frames(reader, 0, (count - 1) * stride + 1, cfg.fps)[::stride]
    return _square(frames, cfg.size)


def _wave(data: bytes, frames: int, cfg: DataConfig) -> torch.Tensor:
    audio, rate = decode_wav(data)
    audio = resample_audio(audio, rate, cfg.sample_rate)
    n = int(round(frames / cfg.fps * cfg.sample_rate))
    out = np.zeros(n, dtype=np.float32)
    out[: min(n, len(audio))] = audio[:n]
    return torch.from_numpy(out)


def to_float(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> [3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def _samples(data: DataConfig, split: str) -> Iterator[dict[str, Any]]:
    """Raw samples (clips and reference records) of a split's shards, in index order."""
    index = read_index(data.root, split)
    if not index.get("references"):
        raise ValueError(f"{data.root}/{split}: the index lists no identity references")
    urls = [{"url": u} for u in shard_paths(data.root, split, index)]
    yield from wds.tarfile_to_samples(handler=wds.warn_and_continue)(iter(urls))


def _skip(raw: dict[str, Any], exn: Exception) -> None:
    log.warning("quality: skipping %s of %s: %s: %s", raw.get("__key__"), raw.get("__url__"),
                type(exn).__name__, str(exn)[:160])


def _record(raw: dict[str, Any], n_ref: int, data: DataConfig) -> IdentityRecord:
    meta = json.loads(raw["ref.json"])
    ref = to_float(_video(raw["ref.mp4"], n_ref, data.reference_stride, data))
    return IdentityRecord(meta["identity"], meta["identity_params"], ref, data.reference_stride, meta["scene"])


def _ref_frames(data: DataConfig, reference_seconds: float | None) -> int:
    return (data.reference_frames if reference_seconds is None
            else reference_frames_for(reference_seconds, data.fps, data.reference_stride))


def read_world(data: DataConfig, split: str, *, reference_seconds: float | None = None,
               max_clips: int | None = None, identities: Iterable[str] | None = None,
               ) -> tuple[list[Speech], dict[str, IdentityRecord]]:
    """The first `max_clips` whole clips of `split` in shard order (speech, phonemes and truth from the
    json, the wav, the render) and their identities' reference records, `reference_seconds` long (default
    data.reference_frames frames) every data.reference_stride frames from the start. `identities`
    restricts both; samples that cannot be read are skipped with a warning."""
    keep = set(identities) if identities is not None else None
    n_ref = _ref_frames(data, reference_seconds)
    speeches: list[Speech] = []
    records: dict[str, IdentityRecord] = {}
    skipped = 0
    for raw in _samples(data, split):
        if max_clips is not None and len(speeches) >= max_clips:
            break
        try:
            if "ref.json" in raw:
                name = json.loads(raw["ref.json"])["identity"]
                if name not in records and (keep is None or name in keep):
                    records[name] = _record(raw, n_ref, data)
                continue
            meta = json.loads(raw["json"])
            if keep is not None and meta.get("identity") not in keep:
                continue
            frames = int(meta["frames"])
            duration = frames / data.fps
            phonemes = [[max(0.0, float(p[0])), min(duration, float(p[1])), *p[2:]]
                        for p in meta.get("phonemes") or [] if float(p[1]) > 0 and float(p[0]) < duration]
            speeches.append(Speech(str(raw["__key__"]), meta["identity"], _wave(raw["wav"], frames, data),
                                   phonemes or None, frames, meta["scene"], _video(raw["mp4"], frames, 1, data)))
        except Exception as exn:  # json, wav and decord errors alike: skip the sample, say which
            skipped += 1
            _skip(raw, exn)
    if not speeches:
        raise ValueError(f"{data.root}/{split}: no usable clips ({skipped} skipped)")
    missing = {s.identity for s in speeches} - set(records)
    if missing:
        raise ValueError(f"{data.root}/{split}: no reference record for {sorted(missing)}")
    return speeches, records


def read_identities(data: DataConfig, split: str, identities: Iterable[str], *,
                    reference_seconds: float | None = None) -> dict[str, IdentityRecord]:
    """Just the reference records (and truth) of `identities` in `split`; reading stops once all are found."""
    wanted = set(identities)
    n_ref = _ref_frames(data, reference_seconds)
    records: dict[str, IdentityRecord] = {}
    for raw in _samples(data, split):
        if "ref.json" not in raw:
            continue
        try:
            name = json.loads(raw["ref.json"])["identity"]
            if name in wanted and name not in records:
                records[name] = _record(raw, n_ref, data)
        except Exception as exn:
            _skip(raw, exn)
        if len(records) == len(wanted):
            break
    missing = wanted - set(records)
    if missing:
        raise ValueError(f"{data.root}/{split}: no reference record for identities {sorted(missing)}")
    return records


def eval_world(data: DataConfig, root: str, *, heldout_identities: int = 8, reference_seconds: float = 16.0,
               workers: int | None = None) -> DataConfig:
    """`data` pointed at a larger copy of its synthetic world under `root`, generated on first use: the
    same seed, so the same identities and training clips (a run's fine-tuned identities are there), more
    held-out identities (enough held-out clips for the prompt sets) and longer reference records.
    Generation spawns processes: call it under `if __name__ == "__main__":`."""
    from avatarforge.data.synth.generate import dataset_exists, generate_dataset

    synth = replace(data.synth, heldout_identities=heldout_identities, reference_seconds=reference_seconds,
                    workers=data.synth.workers if workers is None else workers)
    out = replace(data, root=str(root), synth=synth)
    wanted = {"seed": synth.seed, "clip_seconds": synth.clip_seconds, "reference_seconds": synth.reference_seconds,
              "clips_per_identity": synth.clips_per_identity, "caption_room": synth.caption_room}
    if dataset_exists(root):
        index = read_index(root, data.eval_split)
        have = {k: index["generator"].get(k, "last" if k == "caption_room" else None) for k in wanted}
        if have == wanted and len(index["identities"]) == heldout_identities and index["size"] == data.size:
            return out
    generate_dataset(str(root), synth, size=data.size, fps=data.fps, sample_rate=data.sample_rate)
    return out


# ------------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompt:
    """Conditioning (wave, reference, caption) + truth (phonemes, identity_params, scene) of one prompt."""

    key: str  # the held-out clip whose speech is the truth
    identity: str  # the target identity
    frames: int
    phonemes: list[list[Any]] | None
    identity_params: dict[str, Any]
    scene: dict[str, Any]  # the scene the caption asks for
    caption: str
    wave: torch.Tensor  # [S] the audio given (the clip's own unless swapped)
    audio_key: str  # the clip the given audio came from
    reference: torch.Tensor  # [3, Tr, H, W] the reference given (longest available)
    reference_identity: str
    reference_scene: dict[str, Any]

    def reference_frames(self, n: int | None) -> torch.Tensor:
        if n is not None and n > self.reference.shape[1]:
            raise ValueError(f"{self.reference_identity}: asked for {n} reference frames, "
                             f"{self.reference.shape[1]} were read (raise reference_seconds in read_world)")
        return self.reference if n is None else self.reference[:, :n]


def spread(speeches: Sequence[Speech], n: int) -> list[Speech]:
    """n speeches taking their identities in turn (each identity's clips in order), so a few prompts
    cover several identities."""
    groups: dict[str, list[Speech]] = {}
    for sp in speeches:
        groups.setdefault(sp.identity, []).append(sp)
    out: list[Speech] = []
    depth = max((len(g) for g in groups.values()), default=0)
    for i in range(depth):
        out += [g[i] for g in groups.values() if i < len(g)]
    return out[:n]


def make_prompts(speeches: Sequence[Speech], identities: Mapping[str, IdentityRecord], data: DataConfig, *,
                 count: int | None = None, targets: Sequence[str] | None = None) -> list[Prompt]:
    """The first `count` speeches as prompts: each for its own identity, or, with `targets`, for
    targets[i % len(targets)] (e.g. the fine-tuned identities, whose records `identities` must hold).
    The caption asks for the target in the speech clip's scene."""
    chosen = list(speeches[:count] if count is not None else speeches)
    if count is not None and len(chosen) < count:
        raise ValueError(f"only {len(chosen)} clips for {count} prompts")
    prompts = []
    for i, sp in enumerate(chosen):
        target = targets[i % len(targets)] if targets else sp.identity
        if target not in identities:
            raise ValueError(f"no reference record for identity {target!r}")
        rec = identities[target]
        text = prompt_caption(rec.params, sp.scene, data)
        prompts.append(Prompt(sp.key, target, sp.frames, sp.phonemes, rec.params, sp.scene, text, sp.wave, sp.key,
                              rec.reference, target, rec.scene))
    return prompts


def tuned_identity_prompts(data: DataConfig, config: Mapping[str, Any], count: int, *, heldout_identities: int = 8,
                           reference_seconds: float = 16.0, root: str | None = None
                           ) -> tuple[DataConfig, list[Prompt]]:
    """The quality world next to `data` (eval_world at `root`, default `{data.root}-quality`) and `count`
    of its held-out speeches given to the identities the run's personality_sft stage fine-tuned: how the
    benchmarks compare the later policies (distilled, RLHF) the way `generate` samples them. The prompts'
    references are `reference_seconds` long (sample them with up to that many seconds)."""
    world = eval_world(data, root or f"{data.root}-quality", heldout_identities=heldout_identities,
                       reference_seconds=reference_seconds)
    speeches, _ = read_world(world, world.eval_split)
    targets = personality_identities(dict(config), world)
    tuned = read_identities(world, world.train_split, targets, reference_seconds=reference_seconds)
    return world, make_prompts(spread(speeches, count), tuned, world, count=count, targets=targets)


def with_other_audio(prompts: Sequence[Prompt], shift: int = 1) -> list[Prompt]:
    """Each prompt given the audio of the prompt `shift` places on (cyclically); truth unchanged."""
    n = len(prompts)
    if n < 2:
        raise ValueError("need at least 2 prompts to swap audio")
    out = []
    for i, p in enumerate(prompts):
        other = prompts[(i + shift) % n]
        wave = torch.nn.functional.pad(other.wave, (0, max(0, len(p.wave) - len(other.wave))))[: len(p.wave)]
        out.append(replace(p, wave=wave, audio_key=other.audio_key))
    return out


def with_other_reference(prompts: Sequence[Prompt], identities: Mapping[str, IdentityRecord]) -> list[Prompt]:
    """Each prompt given the reference of another identity (the next one in sorted order); truth and
    caption unchanged, so only the reference says who it should be."""
    names = sorted(identities)
    if len(names) < 2:
        raise ValueError("need at least 2 identities to swap references")
    out = []
    for p in prompts:
        other = identities[names[(names.index(p.identity) + 1) % len(names)] if p.identity in names else names[0]]
        out.append(replace(p, reference=other.reference, reference_identity=other.identity,
                           reference_scene=other.scene))
    return out


def with_caption_scene(prompts: Sequence[Prompt], scenes: Sequence[dict[str, Any]], data: DataConfig) -> list[Prompt]:
    """Each prompt's caption asking for scenes[i] instead (the scene truth follows the caption)."""
    return [replace(p, scene=s, caption=prompt_caption(p.identity_params, s, data))
            for p, s in zip(prompts, scenes, strict=True)]


def prompt_caption(identity_params: dict[str, Any], scene: dict[str, Any], data: DataConfig) -> str:
    """The text a prompt gives: as the world's records would caption `identity_params` in `scene`, the whole
    caption or, with data.captions scene, the scene alone (what the stages trained on; a data.captions mixed
    run trained on both and is prompted with the whole caption unless the data given says scene)."""
    if data.captions == "scene":
        return scene_caption(Scene.from_json(scene))
    return caption(IdentityParams.from_json(identity_params), Scene.from_json(scene), max_bytes=data.text_max_len,
                   room=data.synth.caption_room)


# ------------------------------------------------------------------------------------------- sampling


@dataclass
class Policy:
    """How to sample: a model plus guidance scales (a guided teacher), or any velocity function (a
    distilled student with scales baked in: one pass per step), step count / timesteps, step function
    (an SDE policy)."""

    name: str
    model: nn.Module
    scales: dict[str, float] | None = None  # {"text", "audio", "reference"}; None: all 1
    guidance_intervals: dict[str, tuple[float, float]] | None = None  # {condition: (lo, hi)}: sampling.py
    steps: int = 12
    velocity_fn: VelocityFn | None = None  # overrides `scales`
    step_fn: StepFn = euler_step
    shift: float = 1.0
    timesteps: torch.Tensor | None = None

    def velocity(self) -> VelocityFn:
        return self.velocity_fn or guided_velocity_fn(self.model, self.scales, self.guidance_intervals)


@dataclass
class SampleRun:
    videos: list[np.ndarray]  # uint8 [T, H, W, 3] per prompt
    nfe: float  # network evaluations per video
    seconds_per_video: float  # wall time of batched sampling (encoders and decoding included) per video


def sample_prompts(policy: Policy, autoencoder: Any, prompts: Sequence[Prompt], data: DataConfig, *,
                   reference_seconds: float | None = None, seed: int = 0, batch_size: int = 8,
                   on_batch: Callable[[int, list[np.ndarray]], None] | None = None) -> SampleRun:
    """Windowed clips (windows of data.frames frames) for every prompt. Prompt i's noise comes from
    seed + i whatever the batching, so two runs over variants of the same prompts share their noise.
    References: the first `reference_seconds` of each prompt's reference record (`generate` reads 16 s), or
    by default the training length (data.reference_frames), however long the records read were.
    `on_batch(first_index, videos)` sees each batch as it is done (e.g. to start scoring it)."""
    n_ref = (data.reference_frames if reference_seconds is None
             else reference_frames_for(reference_seconds, data.fps, data.reference_stride))
    model = policy.model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    videos: list[np.ndarray] = []
    nfe = seconds = 0.0
    try:
        for lo in range(0, len(prompts), batch_size):
            chunk = prompts[lo: lo + batch_size]
            frames = {p.frames for p in chunk}
            if len(frames) != 1:
                raise ValueError(f"prompts of one batch must have the same length, got {sorted(frames)}")
            ids = [tokenize(p.caption, data) for p in chunk]
            ref = torch.stack([p.reference_frames(n_ref) for p in chunk]).to(device)
            out = sample_windows(
                model, autoencoder, autoencoder.encode(ref), torch.stack([p.wave for p in chunk]),
                torch.stack([i for i, _ in ids]), torch.stack([m for _, m in ids]), frames_per_window=data.frames,
                size=data.size, fps=data.fps, sample_rate=data.sample_rate, n_frames=frames.pop(),
                velocity_fn=policy.velocity(), steps=policy.steps, shift=policy.shift, timesteps=policy.timesteps,
                step_fn=policy.step_fn, seeds=[seed + lo + i for i in range(len(chunk))],
            )
            batch = [to_uint8(v) for v in out.video]
            videos += batch
            nfe = out.nfe  # per video, the same for every batch
            seconds += out.seconds
            if on_batch is not None:
                on_batch(lo, batch)
    finally:
        model.train(was_training)
    return SampleRun(videos, nfe, seconds / max(1, len(prompts)))


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def autoencode_windows(autoencoder: Any, video: np.ndarray, frames: int, device: str | torch.device = "cpu"
                       ) -> np.ndarray:
    """uint8 [T, S, S, 3] through the autoencoder in windows of `frames` frames sharing one frame, as
    sampling generates them: what a perfect generator would give, so its oracle scores are the floor
    sampling can reach (the last window is padded with the last frame, then cropped)."""
    t, plan = len(video), WindowPlan(len(video), frames)
    padded = np.concatenate([video, np.repeat(video[-1:], plan.start(plan.count) + 1 - t, axis=0)])
    x = torch.stack([to_float(padded[plan.start(w): plan.start(w) + frames]) for w in range(plan.count)]).to(device)
    with torch.no_grad():
        y = autoencoder.decode(autoencoder.encode(x))
    return np.concatenate([to_uint8(v) if w == 0 else to_uint8(v)[1:] for w, v in enumerate(y)])[:t]


# -------------------------------------------------------------------------------------------- scoring


def backdrop_rgb(frames: np.ndarray) -> np.ndarray:
    """Median colour of the top-corner squares of uint8 [T, S, S, 3] frames (only the backdrop shows there)."""
    s = frames.shape[1]
    c = max(1, int(round(CORNER * s)))
    px = np.concatenate([frames[:, :c, :c].reshape(-1, 3), frames[:, :c, -c:].reshape(-1, 3)])
    return np.median(px.astype(np.float64), axis=0)


def scene_backdrop_rgb(scene: dict[str, Any], size: int) -> np.ndarray:
    """What backdrop_rgb measures on a render of `scene` (its gradient and lighting, no person)."""
    sc = Scene.from_json(scene)
    frame = np.clip(background(sc, size) * lighting(sc, size), 0, 255)[None]
    return backdrop_rgb(frame)


def _truth(p: Prompt, other: Prompt | None = None) -> dict[str, Any]:
    return {"phonemes": p.phonemes, "identity_params": p.identity_params, "scene": p.scene,
            "reference_scene": p.reference_scene, "other_phonemes": other.phonemes if other else None}


def score_video(frames: np.ndarray, truth: Mapping[str, Any], fps: float = 25.0,
                sample_rate: int = 16000) -> dict[str, float]:
    """Oracle scores of one generated video (uint8 [T, S, S, 3]) against a prompt's truth (see module
    docstring for the keys); with truth["other_phonemes"] also lipsync_corr_other_audio, the same video
    against another clip's speech (what the oracle sees when the speech does not match)."""
    params = truth["identity_params"]
    m = analyze_video(frames, fps, identity=params)
    out = score(m, None, sample_rate, params, phonemes=truth["phonemes"])
    if truth.get("other_phonemes") is not None:
        expected, _ = expected_openness(m.frames, m.fps, phonemes=truth["other_phonemes"])
        out["lipsync_corr_other_audio"] = lipsync(m, expected)["lipsync_corr"]
    out["lipsync_abs_offset"] = abs(out.get("lipsync_offset", 0.0))
    bg = backdrop_rgb(frames)
    out["scene_error"] = colour_distance(bg, scene_backdrop_rgb(truth["scene"], frames.shape[1]))
    out["scene_error_ref"] = colour_distance(bg, scene_backdrop_rgb(truth["reference_scene"], frames.shape[1]))
    return out


def _score_many(items: list[tuple[np.ndarray, dict[str, Any]]], fps: float, sample_rate: int) -> list[dict]:
    return [score_video(f, t, fps, sample_rate) for f, t in items]


class Scorer:
    """Oracle scoring, inline (workers <= 1) or in spawned processes, so scoring can overlap sampling:
    `submit` returns a handle, `result` the scores in prompt order."""

    def __init__(self, data: DataConfig, workers: int = 1) -> None:
        self.fps, self.rate = float(data.fps), int(data.sample_rate)
        self.pool: Executor | None = None
        if workers > 1:
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        self.workers = max(1, workers)

    def submit(self, videos: Sequence[np.ndarray], prompts: Sequence[Prompt],
               others: Sequence[Prompt] | None = None) -> list[Any]:
        """Score videos[i] against prompts[i] (and lip sync against others[i]'s speech, when given)."""
        others = others if others is not None else [None] * len(prompts)
        items = [(v, _truth(p, o)) for v, p, o in zip(videos, prompts, others, strict=True)]
        if self.pool is None:
            return [_score_many(items, self.fps, self.rate)]
        per = max(1, math.ceil(len(items) / self.workers))
        return [self.pool.submit(_score_many, items[i: i + per], self.fps, self.rate)
                for i in range(0, len(items), per)]

    @staticmethod
    def result(handles: list[Any]) -> list[dict[str, float]]:
        out: list[dict[str, float]] = []
        for h in handles:
            out += h if isinstance(h, list) else h.result()
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def sample_and_score(policy: Policy, autoencoder: Any, prompts: Sequence[Prompt], data: DataConfig,
                     scorer: Scorer, *, reference_seconds: float | None = None, seed: int = 0,
                     batch_size: int = 8, other_audio: bool = False) -> tuple[SampleRun, list[dict[str, float]]]:
    """sample_prompts, each batch scored (by `scorer`'s workers, while the next batch samples);
    other_audio adds lipsync_corr_other_audio against the next prompt's speech."""
    handles: list[Any] = []
    others = _next_prompts(prompts) if other_audio else None

    def submit(lo: int, videos: list[np.ndarray]) -> None:
        hi = lo + len(videos)
        handles.extend(scorer.submit(videos, prompts[lo:hi], others[lo:hi] if others else None))

    run = sample_prompts(policy, autoencoder, prompts, data, reference_seconds=reference_seconds, seed=seed,
                         batch_size=batch_size, on_batch=submit)
    return run, scorer.result(handles)


def _next_prompts(prompts: Sequence[Prompt]) -> list[Prompt] | None:
    n = len(prompts)
    return [prompts[(i + 1) % n] for i in range(n)] if n > 1 else None


def score_prompts(videos: Sequence[np.ndarray], prompts: Sequence[Prompt], data: DataConfig,
                  workers: int = 1, other_audio: bool = False) -> list[dict[str, float]]:
    """Oracle scores per prompt; other_audio adds lipsync_corr_other_audio against the next prompt's speech."""
    others = _next_prompts(prompts) if other_audio else None
    with Scorer(data, workers) as scorer:
        return scorer.result(scorer.submit(videos, prompts, others))


# -------------------------------------------------------------------------------------------- statistics


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact binomial (sign) test of wins vs losses (ties left out) against 1/2."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return float(min(1.0, 2 * tail))


def paired_stats(a: Sequence[float], b: Sequence[float], *, higher_is_better: bool = True, n_boot: int = 2000,
                 seed: int = 0) -> dict[str, float]:
    """Paired comparison of a vs b (one value each per prompt; NaN pairs dropped): means, mean difference
    a - b with a 95% bootstrap (percentile) interval, a's win rate (ties count half) and the sign test's
    two-sided p-value."""
    x, y = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = len(x)
    if n == 0:
        return {"n": 0}
    d = x - y
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    better = d > 0 if higher_is_better else d < 0
    worse = d < 0 if higher_is_better else d > 0
    wins, losses = int(better.sum()), int(worse.sum())
    return {
        "n": n, "mean_a": float(x.mean()), "mean_b": float(y.mean()), "diff": float(d.mean()),
        "ci_low": float(np.percentile(boots, 2.5)), "ci_high": float(np.percentile(boots, 97.5)),
        "win_rate": (wins + 0.5 * (n - wins - losses)) / n, "sign_p": sign_test_p(wins, losses),
    }


def _fallback_oracle_utility(scores: Mapping[str, float]) -> float:
    """Higher is better: lip sync minus identity and behaviour error (each about 0..1), minus a little
    jitter (ground-truth renders sit near 1)."""
    return (float(scores.get("lipsync_corr", 0.0)) - float(scores.get("identity_error", 1.0))
            - float(scores.get("behaviour_error", 1.0)) - 0.05 * float(scores.get("jitter", 0.0)))


def oracle_utility(scores: Mapping[str, float]) -> float:
    """The scalar oracle preference: data/preferences.py's `oracle_utility` (the preference stage's
    definition, so every stage judges policies alike) when that module is there, else the fallback."""
    try:
        from avatarforge.data.preferences import oracle_utility as utility
    except ImportError:
        return _fallback_oracle_utility(scores)
    return float(utility(scores))


def metric_table(a: Sequence[Mapping[str, float]], b: Sequence[Mapping[str, float]],
                 keys: Sequence[str] = ("lipsync_corr", "lipsync_conf", "identity_error", "behaviour_error",
                                        "jitter")) -> dict[str, dict[str, float]]:
    """paired_stats per metric of two score lists over the same prompts (direction from LOWER_IS_BETTER)."""
    return {k: paired_stats([s.get(k, np.nan) for s in a], [s.get(k, np.nan) for s in b],
                            higher_is_better=k not in LOWER_IS_BETTER) for k in keys}


@dataclass
class Comparison:
    a: str
    b: str
    utility_win_rate: float  # share of prompts where a's oracle utility beats b's (ties half)
    utility: dict[str, float]  # paired_stats of the utilities
    metrics: dict[str, dict[str, float]]  # paired_stats per oracle metric
    summary: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> means, nfe, seconds per video
    scores: dict[str, list[dict[str, float]]] = field(default_factory=dict)


def compare_policies(a: Policy, b: Policy, autoencoder: Any, prompts: Sequence[Prompt], data: DataConfig, *,
                     reference_seconds: float | None = None, seed: int = 0, batch_size: int = 8,
                     workers: int = 1, utility: Callable[[Mapping[str, float]], float] | None = None,
                     ) -> Comparison:
    """Both policies on the same prompts and noise: pairwise oracle-preference win rate of a over b (by
    `utility`, default oracle_utility), paired per-metric stats, NFEs and wall time per video for each."""
    utility = utility or oracle_utility
    runs, scores = {}, {}
    with Scorer(data, workers) as scorer:
        for policy in (a, b):
            runs[policy.name], scores[policy.name] = sample_and_score(
                policy, autoencoder, prompts, data, scorer, reference_seconds=reference_seconds, seed=seed,
                batch_size=batch_size)
    ua = [utility(s) for s in scores[a.name]]
    ub = [utility(s) for s in scores[b.name]]
    stats = paired_stats(ua, ub)
    summary = {}
    for name, run in runs.items():
        means = summarize(scores[name])
        summary[name] = {**{k: means[k] for k in SCORE_KEYS if k in means},
                         "utility": float(np.mean([utility(s) for s in scores[name]])),
                         "nfe_per_video": run.nfe, "seconds_per_video": run.seconds_per_video}
    return Comparison(a.name, b.name, stats.get("win_rate", float("nan")), stats,
                      metric_table(scores[a.name], scores[b.name]), summary, scores)


__all__ = [
    "Speech", "IdentityRecord", "Prompt", "Policy", "SampleRun", "Scorer", "Comparison", "SCORE_KEYS",
    "reference_frames_for", "eval_world", "read_world", "read_identities", "make_prompts", "tuned_identity_prompts", "spread", "with_other_audio", "with_other_reference",
    "with_caption_scene", "sample_prompts", "to_uint8", "to_float", "backdrop_rgb", "scene_backdrop_rgb", "score_video",
    "score_prompts", "sample_and_score", "sign_test_p", "paired_stats", "oracle_utility", "metric_table", "compare_policies",
]
