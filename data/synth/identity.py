"""Ground truth of a synthetic identity (static appearance, dynamic habits, voice) and of a scene.

Identity and scene are drawn from independent random streams, so any identity can be rendered in any
scene (cross-scene generation). Floats are rounded before use, so the json is the exact truth.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from ..seeding import rng_for

RGB = tuple[int, int, int]

FACE_SHAPES: dict[str, float] = {"round": 1.0, "oval": 1.2, "long": 1.4}  # face height / width
SKIN: dict[str, RGB] = {
    "pale": (242, 214, 196),
    "light": (226, 184, 148),
    "tan": (196, 144, 104),
    "brown": (140, 94, 62),
    "dark": (90, 58, 40),
}
HAIR: dict[str, RGB] = {
    "black": (28, 24, 22),
    "brown": (100, 62, 34),
    "blonde": (236, 206, 96),
    "red": (178, 64, 30),
    "grey": (150, 150, 162),
    "blue": (48, 92, 204),
}
HAIR_STYLES = ("short", "long", "curly", "bun", "bald")
EYES: dict[str, RGB] = {"brown": (92, 54, 28), "blue": (52, 110, 200), "green": (54, 140, 70)}
CLOTHES: dict[str, RGB] = {
    "red": (196, 48, 48),
    "orange": (230, 130, 40),
    "yellow": (232, 208, 60),
    "green": (60, 160, 80),
    "teal": (40, 150, 150),
    "blue": (50, 90, 200),
    "purple": (130, 70, 180),
    "pink": (230, 130, 170),
    "white": (236, 236, 232),
    "grey": (120, 120, 124),
}
# Scene colours are kept far from every skin tone (see tests), so a face never melts into its room.
ROOMS: dict[str, RGB] = {
    "blue": (58, 96, 200),
    "teal": (36, 146, 150),
    "green": (64, 156, 76),
    "purple": (120, 72, 176),
    "navy": (32, 44, 108),
    "grey": (112, 118, 130),
    "lime": (150, 206, 70),
    "magenta": (186, 56, 150),
    "cyan": (96, 196, 220),
}
LIGHTS = ("front", "left", "right")
COLOURS = CLOTHES  # v0 name, kept for importers

VOICE_BASES = ("en-us", "en")
VOICE_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")


def identity_name(index: int) -> str:
    # no dots: webdataset splits member names at the first dot
    return f"id{index:04d}"


@dataclass(frozen=True)
class IdentityParams:
    """Static appearance, voice and dynamic habits of one identity."""

    name: str
    # static
    face_shape: str
    face_aspect: float
    skin: str
    skin_rgb: RGB
    hair_colour: str
    hair_rgb: RGB
    hair_style: str  # short | long | curly | bun | bald
    eye_colour: str
    eye_rgb: RGB
    teeth_gap: bool
    glasses: bool
    earrings: bool
    clothes: str
    clothes_rgb: RGB
    # voice (eSpeak NG)
    voice: str  # eSpeak voice name, e.g. "en-us+f3"
    pitch: int  # eSpeak pitch 0..100
    pitch_range: int  # eSpeak intonation range 0..100
    speech_rate: int  # words per minute
    # dynamic habits
    articulation: float  # how wide the mouth opens on open vowels, 0..1
    blink_rate: float  # blinks per second
    sway_amp: float  # head sway amplitude, fraction of the frame size
    sway_hz: float  # head sway frequency
    smile: float  # habitual smile, 0..1
    brow_raise: float  # brow lift on stressed syllables, 0..1

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IdentityParams:
        values = {}
        for f in fields(cls):
            v = data[f.name]
            values[f.name] = tuple(int(c) for c in v) if isinstance(v, list) else v
        return cls(**values)


STATIC_FIELDS = ("face_shape", "skin", "hair_colour", "hair_style", "eye_colour", "teeth_gap", "glasses",
                 "earrings", "clothes")
DYNAMIC_FIELDS = ("articulation", "blink_rate", "sway_amp", "sway_hz", "smile", "brow_raise", "speech_rate")


@dataclass(frozen=True)
class Scene:
    """Per-clip backdrop and lighting, independent of identity."""

    colour: str
    top_rgb: RGB
    bottom_rgb: RGB
    gradient: str  # vertical | horizontal | flat
    light: str  # front | left | right: where the key light comes from (a gentle horizontal ramp)
    light_gain: float  # overall brightness multiplier

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Scene:
        return cls(**{f.name: tuple(data[f.name]) if isinstance(data[f.name], list) else data[f.name]
                      for f in fields(cls)})


NEUTRAL_SCENE = Scene("grey", (112, 118, 130), (112, 118, 130), "flat", "front", 1.0)


def _pick(rng: np.random.Generator, table: dict[str, RGB]) -> tuple[str, RGB]:
    name = list(table)[int(rng.integers(len(table)))]
    return name, table[name]


def _jitter(rng: np.random.Generator, rgb: RGB, amount: int) -> RGB:
    # small per-identity variation so two "red-haired" people are not pixel-identical
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)  # type: ignore[return-value]


def sample_identity(seed: int, index: int) -> IdentityParams:
    """Deterministic in (seed, index)."""
    rng = rng_for("identity", seed, index)
    shape = list(FACE_SHAPES)[int(rng.integers(len(FACE_SHAPES)))]
    skin, skin_rgb = _pick(rng, SKIN)
    hair, hair_rgb = _pick(rng, HAIR)
    eyes, eye_rgb = _pick(rng, EYES)
    clothes, clothes_rgb = _pick(rng, CLOTHES)
    style = HAIR_STYLES[int(rng.integers(len(HAIR_STYLES)))]
    base = VOICE_BASES[int(rng.integers(len(VOICE_BASES)))]
    variant = VOICE_VARIANTS[int(rng.integers(len(VOICE_VARIANTS)))]
    return IdentityParams(
        name=identity_name(index),
        face_shape=shape,
        face_aspect=FACE_SHAPES[shape],
        skin=skin,
        skin_rgb=_jitter(rng, skin_rgb, 8),
        hair_colour=hair,
        hair_rgb=_jitter(rng, hair_rgb, 10),
        hair_style=style,
        eye_colour=eyes,
        eye_rgb=eye_rgb,
        teeth_gap=bool(rng.random() < 0.3),
        glasses=bool(rng.random() < 0.35),
        earrings=bool(rng.random() < 0.35),
        clothes=clothes,
        clothes_rgb=_jitter(rng, clothes_rgb, 10),
        voice=f"{base}+{variant}",
        pitch=int(rng.integers(25, 76)),
        pitch_range=int(rng.integers(30, 91)),
        speech_rate=int(rng.integers(125, 226)),
        articulation=round(float(rng.uniform(0.45, 1.0)), 3),
        blink_rate=round(float(rng.uniform(0.15, 0.6)), 3),
        sway_amp=round(float(rng.uniform(0.0, 0.05)), 4),
        sway_hz=round(float(rng.uniform(0.2, 0.9)), 3),
        smile=round(float(rng.uniform(0.0, 1.0)), 3),
        brow_raise=round(float(rng.uniform(0.0, 1.0)), 3),
    )


def sample_scene(seed: int, index: int, clip: int | str) -> Scene:
    """Deterministic in (seed, identity index, clip); drawn separately from the identity."""
    rng = rng_for("scene", seed, index, clip)
    colour, rgb = _pick(rng, ROOMS)
    top = _jitter(rng, rgb, 10)
    # the far end of the gradient is a darker/lighter shade of the same colour, so the name stays true
    shade = float(rng.uniform(0.8, 1.12))
    bottom = tuple(int(np.clip(c * shade, 0, 255)) for c in top)
    gradient = ("vertical", "horizontal", "flat")[int(rng.integers(3))]
    light = LIGHTS[int(rng.integers(len(LIGHTS)))]
    gain = round(float(rng.uniform(0.94, 1.06)), 3)
    return Scene(colour=colour, top_rgb=top, bottom_rgb=bottom, gradient=gradient, light=light,  # type: ignore[arg-type]
                 light_gain=gain)


def pace(identity: IdentityParams) -> str:
    if identity.speech_rate < 155:
        return "slowly"
    return "steadily" if identity.speech_rate < 195 else "quickly"


ROOM_PLACES = ("last", "first")


def scene_caption(scene: Scene) -> str:
    """The caption's scene alone, e.g. 'a person in a blue room': what an avatar stage's text says when the
    reference video, not the text, says who (`data.captions: scene`)."""
    return f"a person in a {scene.colour} room"


def caption(identity: IdentityParams, scene: Scene, max_bytes: int = 96, room: str = "last") -> str:
    """E.g. 'a round-faced person with curly red hair and glasses, speaking quickly, in a blue room'
    (room="first": 'in a blue room: a round-faced person ..., speaking quickly').

    Room, face shape, hair and pace always; glasses, earrings and a habitual smile as long as the caption
    stays within `max_bytes` (the default text_max_len), so nothing is cut off mid-word. Skin, eyes,
    teeth, clothes, voice and the finer habits are ground truth in the json, not caption words.
    The byte-level text encoder, trained from scratch on a few dozen captions, learns the room word at a
    fixed place (first) but not after a description of varying length (last): README, claim d.
    """
    if room not in ROOM_PLACES:
        raise ValueError(f"room must be one of {ROOM_PLACES}, got {room!r}")
    article = "an" if identity.face_shape[0] in "aeiou" else "a"
    if identity.hair_style == "bald":
        who = f"{article} {identity.face_shape}-faced bald person"
    elif identity.hair_style == "bun":
        who = f"{article} {identity.face_shape}-faced person with {identity.hair_colour} hair in a bun"
    else:
        who = f"{article} {identity.face_shape}-faced person with {identity.hair_style} {identity.hair_colour} hair"
    wanted = [w for w, on in (("glasses", identity.glasses), ("earrings", identity.earrings)) if on]

    def build(extras: list[str], smiling: bool) -> str:
        text = who
        if extras:
            joiner = " with " if identity.hair_style == "bald" else (", " if len(extras) > 1 else " and ")
            text += joiner + " and ".join(extras)
        text += ", smiling," if smiling else ","
        if room == "first":
            return f"in a {scene.colour} room: {text} speaking {pace(identity)}"
        return f"{text} speaking {pace(identity)}, in a {scene.colour} room"

    extras: list[str] = []
    for item in wanted:
        if len(build([*extras, item], False).encode()) <= max_bytes:
            extras.append(item)
    smiling = identity.smile > 0.75 and len(build(extras, True).encode()) <= max_bytes
    return build(extras, smiling)
