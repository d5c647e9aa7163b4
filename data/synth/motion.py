"""Per-frame behaviour of a clip, driven by the identity's habits and the speech's phoneme timeline.

mouth: coarticulated viseme trajectory (visemes.py) scaled by the identity's articulation; smile and
brow on top; blinks as a Poisson process; head sway as two slow sinusoids. Every track is rounded to
4 decimals before rendering, so the json holds exactly what was drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .identity import IdentityParams
from .visemes import frame_trajectory, segments, stressed_onsets

BLINK_SECONDS = 0.16
BROW_RISE, BROW_DECAY = 0.08, 0.35  # seconds: a stressed syllable lifts the brows, then they settle


@dataclass(frozen=True)
class Motion:
    mouth_open: np.ndarray  # float32 [T], 0 closed .. 1 (articulation included)
    mouth_width: np.ndarray  # float32 [T], 0 rounded .. 0.5 neutral .. 1 spread (smile included)
    mouth_bite: np.ndarray  # float32 [T], upper teeth on the lower lip (f/v)
    smile: np.ndarray  # float32 [T], corner lift 0..1
    brow: np.ndarray  # float32 [T], brow lift 0..1
    eye_open: np.ndarray  # float32 [T], 1 = open, 0 = closed
    head_dx: np.ndarray  # float32 [T], fraction of frame size
    head_dy: np.ndarray  # float32 [T]
    blinks: list[float]  # blink start times (s)

    def to_json(self) -> dict[str, list]:
        def r(x: np.ndarray) -> list[float]:
            # the 4 decimals the track was drawn with (see _round), not float32 noise digits
            # (0.0146 rather than 0.014600000344216824): a third of the json, cheaper to parse, and each
            # value still converts back to exactly the float32 that was rendered
            return np.round(x.astype(np.float64), 4).tolist()

        return {
            "mouth_open": r(self.mouth_open),
            "mouth_width": r(self.mouth_width),
            "mouth_bite": r(self.mouth_bite),
            "smile": r(self.smile),
            "brow": r(self.brow),
            "eye_open": r(self.eye_open),
            "head_offset": np.stack([r(self.head_dx), r(self.head_dy)], axis=1).tolist(),
            "blinks": [round(b, 4) for b in self.blinks],
        }


def _round(x: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(x, dtype=np.float64), 4).astype(np.float32)


def viseme_openness(phones: Sequence[tuple[float, float, str]], n_frames: int, fps: float) -> np.ndarray:
    """The mouth opening the phonemes imply (before the identity's articulation scale), per frame."""
    return frame_trajectory(segments(phones), n_frames, fps)[:, 0]


def stress_brow(phones: Sequence[tuple[float, float, str]], n_frames: int, fps: float) -> np.ndarray:
    """Brow lift (for brow_raise = 1) the stressed syllables imply, per frame."""
    t = (np.arange(n_frames) + 0.5) / fps
    brow = np.zeros(n_frames)
    for onset in stressed_onsets(phones):
        x = t - onset
        bump = np.where(x < 0, np.exp(-((x / BROW_RISE) ** 2)), np.exp(-x / BROW_DECAY))
        brow = np.maximum(brow, bump)
    return brow


def clip_motion(
    identity: IdentityParams,
    phones: Sequence[tuple[float, float, str]],
    n_frames: int,
    fps: float,
    rng: np.random.Generator,
) -> Motion:
    t = (np.arange(n_frames) + 0.5) / fps
    shape = frame_trajectory(segments(phones), n_frames, fps)  # [T, 3] open, width, bite
    # habitual smile: a slow wander around the identity's level
    wander = np.sin(2 * np.pi * float(rng.uniform(0.05, 0.15)) * t + float(rng.uniform(0, 2 * np.pi)))
    smile = np.clip(identity.smile * (0.85 + 0.15 * wander), 0.0, 1.0)
    mouth_open = np.clip(identity.articulation * shape[:, 0], 0.0, 1.0)
    mouth_width = np.clip(shape[:, 1] + 0.2 * smile, 0.0, 1.0)
    mouth_bite = np.clip(shape[:, 2], 0.0, 1.0)

    brow = identity.brow_raise * stress_brow(phones, n_frames, fps)

    eye = np.ones(n_frames)
    blinks = []
    # blinks as a Poisson process at the identity's rate; each is a smooth close-and-open
    when = float(rng.exponential(1.0 / identity.blink_rate)) - 0.5 * BLINK_SECONDS
    while when < t[-1] + BLINK_SECONDS:
        x = (t - when) / BLINK_SECONDS
        inside = (x >= 0) & (x <= 1)
        eye[inside] = np.minimum(eye[inside], 1.0 - np.sin(np.pi * x[inside]) ** 2)
        blinks.append(when)
        when += BLINK_SECONDS + float(rng.exponential(1.0 / identity.blink_rate))
    phase = float(rng.uniform(0, 2 * np.pi))
    dx = identity.sway_amp * np.sin(2 * np.pi * identity.sway_hz * t + phase)
    dy = 0.5 * identity.sway_amp * np.sin(2 * np.pi * 1.7 * identity.sway_hz * t + 2.0 * phase)
    return Motion(
        mouth_open=_round(mouth_open),
        mouth_width=_round(mouth_width),
        mouth_bite=_round(mouth_bite),
        smile=_round(smile),
        brow=_round(brow),
        eye_open=_round(eye),
        head_dx=_round(dx),
        head_dy=_round(dy),
        blinks=blinks,
    )
