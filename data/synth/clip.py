"""One synthetic sample: identity + scene -> speech, motion, frames -> encoded mp4/wav/json members."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ..index import SCHEMA_VERSION
from ..media import encode_mp4, encode_wav
from ..seeding import rng_for
from .identity import IdentityParams, caption, sample_scene
from .motion import clip_motion
from .render import render_clip
from .speech import envelope_at_frames, synth_speech

GENERATOR = "synth-v0"


def clip_key(identity: str, clip: int) -> str:
    return f"{identity}-{clip:04d}"


def make_clip(
    identity: IdentityParams,
    index: int,
    clip: int,
    *,
    seed: int,
    seconds: float,
    size: int,
    fps: float,
    sample_rate: int,
) -> tuple[dict[str, Any], np.ndarray]:
    """Returns (sample with bytes members ready for a TarWriter, the rendered frames for checks)."""
    rng = rng_for("clip", seed, index, clip)
    n_frames = max(1, int(round(seconds * fps)))
    n_samples = int(round(n_frames / fps * sample_rate))  # audio covers exactly the video's duration
    scene = sample_scene(seed, index, clip)
    speech = synth_speech(identity, n_samples, sample_rate, rng)
    # rounded first, then rendered from the rounded values: the json is the exact ground truth
    mouth = np.round(
        identity.articulation * envelope_at_frames(speech.envelope, sample_rate, fps, n_frames), 4
    )
    motion = clip_motion(identity, n_frames, fps, rng)
    frames = render_clip(identity, scene, mouth, motion, size)
    key = clip_key(identity.name, clip)
    meta = {
        "schema_version": SCHEMA_VERSION,
        "generator": GENERATOR,
        "key": key,
        "identity": identity.name,
        "clip": clip,
        "caption": caption(identity, scene),
        "fps": float(fps),
        "frames": n_frames,
        "size": size,
        "sample_rate": sample_rate,
        "audio_samples": n_samples,
        "duration": round(n_frames / fps, 6),
        "scene": scene.to_json(),
        "identity_params": identity.to_json(),
        "syllables": [list(s) for s in speech.syllables],
        "mouth_open": [float(v) for v in mouth],
        "eye_open": [float(v) for v in motion.eye_open],
        "head_offset": [[float(x), float(y)] for x, y in zip(motion.head_dx, motion.head_dy, strict=True)],
    }
    sample = {
        "__key__": key,
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
        "mp4": encode_mp4(frames, fps),
        "wav": encode_wav(speech.audio, sample_rate),
    }
    return sample, frames
