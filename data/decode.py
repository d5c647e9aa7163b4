"""Raw sample bytes -> training tensors: decord video crop, aligned wav window, tokenized caption.

Only our own decoders touch shard bytes (json, wav, mp4); nothing from a shard is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .media import decode_wav, open_video, read_frames, resample_audio, target_frame_count
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

    @property
    def audio_len(self) -> int:
        return int(round(self.frames / self.fps * self.sample_rate))


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
    return {
        "video": video_tensor(frames, spec.size),
        "audio": torch.from_numpy(window),
        "text": ids,
        "text_mask": mask,
        "key": str(raw.get("__key__")),
        "identity": str(meta.get("identity", "")),
    }


def collate(samples: list[dict[str, Any]], skipped: int) -> dict[str, Any]:
    return {
        "video": torch.stack([s["video"] for s in samples]),
        "audio": torch.stack([s["audio"] for s in samples]),
        "text": torch.stack([s["text"] for s in samples]),
        "text_mask": torch.stack([s["text_mask"] for s in samples]),
        "key": [s["key"] for s in samples],
        "identity": [s["identity"] for s in samples],
        "skipped": skipped,
    }
