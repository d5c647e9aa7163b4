"""Raw sample bytes -> training tensors: decord video crop, aligned wav window, tokenized caption.

Only our own decoders touch shard bytes (json, wav, mp4); nothing from a shard is ever unpickled.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .media import decode_wav, open_video, read_frames, resample_audio, target_frame_count
from .seeding import derive_seed
from .stream import REFERENCES
from .tokenizer import encode_text

REQUIRED = ("json", "mp4", "wav")


class BadSample(ValueError):
    """A sample that cannot be used (missing member, undecodable media, unusable metadata)."""


@dataclass(frozen=True)
class ClipSpec:
    frames: int
    size: int
    fps: float
    sample_rate: int
    text_max_len: int
    reference_frames: int = 0  # 0: no reference in the sample
    reference_stride: int = 1

    @property
    def audio_len(self) -> int:
        return int(round(self.frames / self.fps * self.sample_rate))

    @property
    def reference_audio_len(self) -> int:
        return int(round(self.reference_frames * self.reference_stride / self.fps * self.sample_rate))


def _metadata(data: bytes) -> dict[str, Any]:
    try:
        meta = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise BadSample(f"json: {exn}") from exn
    if not isinstance(meta, dict) or not isinstance(meta.get("caption"), str):
        raise BadSample("json: not an object with a string 'caption'")
    return meta


def video_tensor(frames: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [3, T, size, size] in [-1, 1]; non-square frames are centre-cropped."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # [T, 3, H, W]
    h, w = x.shape[-2:]
    if h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        x = x[..., top : top + side, left : left + side]
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x / 127.5 - 1.0).clamp_(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()


def decode_clip(raw: dict[str, Any], spec: ClipSpec, *, crop_seed: int | None) -> dict[str, Any]:
    """One sample's tensors. crop_seed=None takes the first `frames` frames (evaluation)."""
    missing = [k for k in REQUIRED if not raw.get(k)]
    if missing:
        raise BadSample(f"missing or empty member(s): {', '.join(missing)}")
    meta = _metadata(raw["json"])  # cheap checks first, video last
    try:
        audio, rate = decode_wav(raw["wav"])
    except Exception as exn:  # wave raises several unrelated types on garbage
        raise BadSample(f"wav: {type(exn).__name__}: {exn}") from exn
    audio = resample_audio(audio, rate, spec.sample_rate)
    try:
        reader = open_video(raw["mp4"])
        n_frames = target_frame_count(reader, spec.fps)
        start = 0
        if crop_seed is not None:
            start = int(np.random.default_rng(crop_seed).integers(0, max(0, n_frames - spec.frames) + 1))
        frames = read_frames(reader, start, spec.frames, spec.fps)
    except Exception as exn:  # decord raises RuntimeError/DECORDError for anything it cannot parse
        raise BadSample(f"mp4: {type(exn).__name__}: {str(exn)[:160]}") from exn
    a0 = int(round(start / spec.fps * spec.sample_rate))
    window = np.zeros(spec.audio_len, dtype=np.float32)  # zero-padded when the wav is short
    chunk = audio[a0 : a0 + spec.audio_len]
    window[: len(chunk)] = chunk
    ids, mask = encode_text(meta["caption"], spec.text_max_len)
    out = {
        "video": video_tensor(frames, spec.size),
        "audio": torch.from_numpy(window),
        "text": ids,
        "text_mask": mask,
        "key": str(raw.get("__key__")),
        "identity": str(meta.get("identity", "")),
    }
    if spec.reference_frames > 0:
        out["reference"], out["reference_audio"] = decode_reference(raw, meta, spec, crop_seed=crop_seed)
    # ground truth for the oracle (synthetic clips): the identity's parameters and the phoneme
    # timeline of this crop (times relative to its first frame); None for clips without them
    out["identity_params"] = meta.get("identity_params") if isinstance(meta.get("identity_params"), dict) else None
    out["phonemes"] = _crop_phonemes(meta.get("phonemes"), start / spec.fps, spec.frames / spec.fps)
    return out


def _crop_phonemes(phonemes: Any, t0: float, duration: float) -> list[list[Any]] | None:
    if not isinstance(phonemes, list):
        return None
    out = []
    for row in phonemes:
        if not isinstance(row, list) or len(row) < 3:
            return None
        a, b = float(row[0]) - t0, float(row[1]) - t0
        if b > 0.0 and a < duration:
            out.append([round(max(a, 0.0), 5), round(min(b, duration), 5), *row[2:]])
    return out


# Decoded references of the last few identities in this process (a worker streams one shard at a time,
# grouped by identity, so consecutive clips share a reference): mp4 parsed and wav decoded once.
_REFERENCE_CACHE: OrderedDict[tuple[str, str, int, int], tuple[Any, int, np.ndarray]] = OrderedDict()
_REFERENCE_CACHE_SIZE = 4
_CACHE_PID = os.getpid()
# A forked DataLoader worker must never use (or free) decord readers its parent opened: decord's
# decoder threads do not survive fork and the call hangs. Such inherited caches are parked here.
_INHERITED_CACHES: list[Any] = []


def _reference_cache() -> OrderedDict:
    global _REFERENCE_CACHE, _CACHE_PID
    if _CACHE_PID != os.getpid():
        _INHERITED_CACHES.append(_REFERENCE_CACHE)
        _REFERENCE_CACHE, _CACHE_PID = OrderedDict(), os.getpid()
    return _REFERENCE_CACHE


def _open_reference(record: dict[str, Any], spec: ClipSpec) -> tuple[Any, int, np.ndarray]:
    mp4, wav = record.get("ref.mp4"), record.get("ref.wav")
    if not mp4 or not wav:
        raise BadSample(f"reference {record.get('__key__')}: missing ref.mp4 or ref.wav")
    key = (str(record.get("__url__")), str(record.get("__key__")), len(mp4), spec.sample_rate)
    cache = _reference_cache()
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
        return hit
    try:
        audio, rate = decode_wav(wav)
    except Exception as exn:
        raise BadSample(f"reference wav: {type(exn).__name__}: {exn}") from exn
    try:
        reader = open_video(mp4)
        n_frames = target_frame_count(reader, spec.fps)
    except Exception as exn:
        raise BadSample(f"reference mp4: {type(exn).__name__}: {str(exn)[:160]}") from exn
    entry = (reader, n_frames, resample_audio(audio, rate, spec.sample_rate))
    cache[key] = entry
    while len(cache) > _REFERENCE_CACHE_SIZE:
        cache.popitem(last=False)
    return entry


def decode_reference(
    raw: dict[str, Any], meta: dict[str, Any], spec: ClipSpec, *, crop_seed: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clip's identity reference: ([3, reference_frames, size, size] in [-1, 1], audio of the span).

    Frames are `reference_stride` apart from a start drawn from crop_seed (0 for eval); the audio covers
    reference_frames * reference_stride frames from the same start, zero-padded past the record's end.
    """
    identity = meta.get("identity")
    record = raw.get(REFERENCES, {}).get(identity) if isinstance(identity, str) else None
    if record is None:
        raise BadSample(f"no reference record for identity {identity!r} in this shard")
    reader, n_frames, audio = _open_reference(record, spec)
    span = (spec.reference_frames - 1) * spec.reference_stride + 1
    start = 0
    if crop_seed is not None and n_frames > span:
        start = int(np.random.default_rng(derive_seed("reference", crop_seed)).integers(0, n_frames - span + 1))
    try:
        src_fps = float(reader.get_avg_fps()) or spec.fps
        times = (start + np.arange(spec.reference_frames) * spec.reference_stride) / spec.fps
        idx = np.clip(np.round(times * src_fps).astype(np.int64), 0, len(reader) - 1)
        frames = reader.get_batch(idx.tolist()).asnumpy()
    except Exception as exn:
        raise BadSample(f"reference mp4: {type(exn).__name__}: {str(exn)[:160]}") from exn
    a0 = int(round(start / spec.fps * spec.sample_rate))
    window = np.zeros(spec.reference_audio_len, dtype=np.float32)
    chunk = audio[a0 : a0 + spec.reference_audio_len]
    window[: len(chunk)] = chunk
    return video_tensor(frames, spec.size), torch.from_numpy(window)


def collate(samples: list[dict[str, Any]], skipped: int) -> dict[str, Any]:
    batch = {
        "video": torch.stack([s["video"] for s in samples]),
        "audio": torch.stack([s["audio"] for s in samples]),
        "text": torch.stack([s["text"] for s in samples]),
        "text_mask": torch.stack([s["text_mask"] for s in samples]),
        "key": [s["key"] for s in samples],
        "identity": [s["identity"] for s in samples],
        "identity_params": [s.get("identity_params") for s in samples],
        "phonemes": [s.get("phonemes") for s in samples],
        "skipped": skipped,
    }
    if all("reference" in s for s in samples):
        batch["reference"] = torch.stack([s["reference"] for s in samples])
        batch["reference_audio"] = torch.stack([s["reference_audio"] for s in samples])
    return batch
