"""One synthetic record: identity + scene -> speech, motion, frames -> encoded mp4/wav/json members.

Two kinds share the code: a training clip (members json/mp4/wav, key `{identity}-{clip:04d}`) and an
identity's long reference (members ref.json/ref.mp4/ref.wav, key `{identity}-reference`), rendered in a
scene of its own. The `ref.` prefix keeps reference records out of anything that reads clips.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ..index import SCHEMA_VERSION
from ..media import encode_mp4, encode_wav
from ..seeding import rng_for
from .identity import IdentityParams, Scene, caption, sample_scene, scene_caption
from .motion import Motion, clip_motion, viseme_openness
from .render import render_clip
from .speech import Speech, speak
from .visemes import segments

GENERATOR = "synth-v2"  # v2: json members carry scene_caption
REFERENCE = "reference"
REFERENCE_PREFIX = "ref."  # member prefix of reference records: ref.json, ref.mp4, ref.wav
REFERENCE_GOP = 25  # keyframe every second: the loader reads references at random offsets


def clip_key(identity: str, clip: int) -> str:
    return f"{identity}-{clip:04d}"


def reference_key(identity: str) -> str:
    return f"{identity}-{REFERENCE}"


def metadata(
    identity: IdentityParams,
    scene: Scene,
    speech: Speech,
    motion: Motion,
    *,
    key: str,
    kind: str,
    clip: int | str,
    n_frames: int,
    size: int,
    fps: float,
    caption_room: str = "last",
) -> dict[str, Any]:
    """The json member: everything needed to score a render of this record against the truth."""
    return {
        "schema_version": SCHEMA_VERSION,
        "generator": GENERATOR,
        "kind": kind,
        "key": key,
        "identity": identity.name,
        "clip": clip,
        "caption": caption(identity, scene, room=caption_room),
        "scene_caption": scene_caption(scene),
        "fps": float(fps),
        "frames": n_frames,
        "size": size,
        "sample_rate": speech.sample_rate,
        "audio_samples": len(speech.audio),
        "duration": round(n_frames / fps, 6),
        "scene": scene.to_json(),
        "identity_params": identity.to_json(),
        "text": speech.text,
        "words": [[a, b, w] for a, b, w in speech.words],
        "phonemes": [[a, b, name, seg] for (a, b, name), seg in
                     zip(speech.phones, _first_visemes(speech.phones), strict=True)],
        "viseme_open": [round(float(v), 4) for v in viseme_openness(speech.phones, n_frames, fps)],
        **motion.to_json(),
    }


def _first_visemes(phones: list[tuple[float, float, str]]) -> list[str]:
    return [segments([p])[0].viseme for p in phones]


def make_record(
    identity: IdentityParams,
    index: int,
    clip: int | str,
    *,
    seed: int,
    seconds: float,
    size: int,
    fps: float,
    sample_rate: int,
    caption_room: str = "last",
) -> tuple[dict[str, Any], np.ndarray]:
    """A clip (clip: int) or the identity's reference (clip == "reference").

    Returns (sample with bytes members ready for a TarWriter, the rendered frames for checks). A pure
    function of its arguments.
    """
    kind = REFERENCE if clip == REFERENCE else "clip"
    rng = rng_for("clip", seed, index, clip)
    n_frames = max(1, int(round(seconds * fps)))
    duration = n_frames / fps  # audio covers exactly the video's duration
    scene = sample_scene(seed, index, clip)
    speech = speak(identity, duration, sample_rate, rng)
    motion = clip_motion(identity, speech.phones, n_frames, fps, rng)
    frames = render_clip(identity, scene, motion, size)
    key = reference_key(identity.name) if kind == REFERENCE else clip_key(identity.name, int(clip))
    meta = metadata(identity, scene, speech, motion, key=key, kind=kind, clip=clip, n_frames=n_frames,
                    size=size, fps=fps, caption_room=caption_room)
    prefix = REFERENCE_PREFIX if kind == REFERENCE else ""
    sample = {
        "__key__": key,
        f"{prefix}json": json.dumps(meta, sort_keys=True).encode("utf-8"),
        f"{prefix}mp4": encode_mp4(frames, fps, gop=REFERENCE_GOP if kind == REFERENCE else None),
        f"{prefix}wav": encode_wav(speech.audio, sample_rate),
    }
    return sample, frames


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
    """One training clip (see make_record)."""
    return make_record(identity, index, clip, seed=seed, seconds=seconds, size=size, fps=fps,
                       sample_rate=sample_rate)
