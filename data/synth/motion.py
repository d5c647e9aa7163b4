"""Per-frame dynamic behaviour of a clip: blinks and head sway, driven by the identity's habits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .identity import IdentityParams

BLINK_SECONDS = 0.16


@dataclass(frozen=True)
class Motion:
    eye_open: np.ndarray  # float32 [T], 1 = open, 0 = closed
    head_dx: np.ndarray  # float32 [T], fraction of frame size
    head_dy: np.ndarray  # float32 [T]


def clip_motion(identity: IdentityParams, n_frames: int, fps: float, rng: np.random.Generator) -> Motion:
    t = (np.arange(n_frames) + 0.5) / fps
    eye = np.ones(n_frames)
    # blinks as a Poisson process at the identity's rate; each is a smooth close-and-open
    when = float(rng.exponential(1.0 / identity.blink_rate)) - 0.5 * BLINK_SECONDS
    while when < t[-1] + BLINK_SECONDS:
        x = (t - when) / BLINK_SECONDS
        inside = (x >= 0) & (x <= 1)
        eye[inside] = np.minimum(eye[inside], 1.0 - np.sin(np.pi * x[inside]) ** 2)
        when += BLINK_SECONDS + float(rng.exponential(1.0 / identity.blink_rate))
    phase = float(rng.uniform(0, 2 * np.pi))
    dx = identity.sway_amp * np.sin(2 * np.pi * identity.sway_hz * t + phase)
    dy = 0.5 * identity.sway_amp * np.sin(2 * np.pi * 1.7 * identity.sway_hz * t + 2.0 * phase)
    return Motion(
        eye_open=np.round(eye, 4).astype(np.float32),
        head_dx=np.round(dx, 4).astype(np.float32),
        head_dy=np.round(dy, 4).astype(np.float32),
    )
