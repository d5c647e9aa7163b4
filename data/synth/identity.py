"""Ground-truth parameters of a synthetic identity and of a clip's scene, and the caption they imply."""

from __future__ import annotations

from dataclasses import asdict, dataclass
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
    "blonde": (224, 192, 112),
    "red": (178, 64, 30),
    "grey": (168, 168, 164),
    "blue": (48, 92, 204),
}
HAIR_STYLES = ("short", "long", "bald")
EYES: dict[str, RGB] = {"brown": (92, 54, 28), "blue": (52, 110, 200), "green": (54, 140, 70)}
COLOURS: dict[str, RGB] = {
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


def identity_name(index: int) -> str:
    # no dots: webdataset splits member names at the first dot
    return f"id{index:04d}"


@dataclass(frozen=True)
class IdentityParams:
    """Static appearance and dynamic habits of one identity; floats are rounded so json is exact truth."""

    name: str
    face_shape: str
    face_aspect: float
    skin: str
    skin_rgb: RGB
    hair_colour: str
    hair_rgb: RGB
    hair_style: str
    eye_colour: str
    eye_rgb: RGB
    glasses: bool
    clothes: str
    clothes_rgb: RGB
    pitch_hz: float  # mean voice fundamental
    speech_rate: float  # syllables per second
    articulation: float  # mouth opening at full loudness, 0..1
    blink_rate: float  # blinks per second
    sway_amp: float  # head sway amplitude as a fraction of the frame size
    sway_hz: float

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Scene:
    """Per-clip backdrop, independent of identity: a named colour with a gentle gradient."""

    colour: str
    top_rgb: RGB
    bottom_rgb: RGB
    gradient: str  # vertical | horizontal | flat

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


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
    clothes, clothes_rgb = _pick(rng, COLOURS)
    return IdentityParams(
        name=identity_name(index),
        face_shape=shape,
        face_aspect=FACE_SHAPES[shape],
        skin=skin,
        skin_rgb=_jitter(rng, skin_rgb, 8),
        hair_colour=hair,
        hair_rgb=_jitter(rng, hair_rgb, 10),
        hair_style=HAIR_STYLES[int(rng.integers(len(HAIR_STYLES)))],
        eye_colour=eyes,
        eye_rgb=eye_rgb,
        glasses=bool(rng.random() < 0.35),
        clothes=clothes,
        clothes_rgb=_jitter(rng, clothes_rgb, 10),
        pitch_hz=round(float(rng.uniform(95.0, 240.0)), 2),
        speech_rate=round(float(rng.uniform(2.5, 6.0)), 3),
        articulation=round(float(rng.uniform(0.45, 1.0)), 3),
        blink_rate=round(float(rng.uniform(0.15, 0.6)), 3),
        sway_amp=round(float(rng.uniform(0.0, 0.05)), 4),
        sway_hz=round(float(rng.uniform(0.2, 0.9)), 3),
    )


def sample_scene(seed: int, index: int, clip: int) -> Scene:
    """Deterministic in (seed, identity index, clip); drawn separately from the identity."""
    rng = rng_for("scene", seed, index, clip)
    colour, rgb = _pick(rng, COLOURS)
    top = _jitter(rng, rgb, 12)
    # the far end of the gradient is a darker/lighter shade of the same colour, so the name stays true
    shade = float(rng.uniform(0.7, 1.15))
    bottom = tuple(int(np.clip(c * shade, 0, 255)) for c in top)
    gradient = ("vertical", "horizontal", "flat")[int(rng.integers(3))]
    return Scene(colour=colour, top_rgb=top, bottom_rgb=bottom, gradient=gradient)  # type: ignore[arg-type]


def caption(identity: IdentityParams, scene: Scene) -> str:
    """E.g. 'a round-faced person with short red hair and glasses, speaking quickly, in a blue room'.

    Kept under 96 bytes (the default text_max_len) so no attribute is cut off; skin, eyes, clothes and
    voice are ground truth in the json for the oracle, not caption words.
    """
    article = "an" if identity.face_shape[0] in "aeiou" else "a"
    if identity.hair_style == "bald":
        who = f"{article} {identity.face_shape}-faced bald person" + (
            " with glasses" if identity.glasses else ""
        )
    else:
        who = f"{article} {identity.face_shape}-faced person with {identity.hair_style} {identity.hair_colour} hair"
        who += " and glasses" if identity.glasses else ""
    if identity.speech_rate < 3.5:
        pace = "slowly"
    elif identity.speech_rate < 4.8:
        pace = "steadily"
    else:
        pace = "quickly"
    return f"{who}, speaking {pace}, in a {scene.colour} room"
