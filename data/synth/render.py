"""Numpy rasteriser for the v0 avatar: soft-edged ellipses composited back to front.

Each shape is evaluated only inside its bounding box, so a frame costs a few dozen small array ops.
Soft (about one pixel) edges keep H.264 ringing low, so decoded colours stay close to ground truth.
"""

from __future__ import annotations

import numpy as np

from .identity import IdentityParams, Scene
from .motion import Motion

LENS_RGB = (200, 225, 240)
FRAME_RGB = (30, 30, 36)
MOUTH_RGB = (88, 22, 34)
EYE_WHITE_RGB = (245, 245, 240)

Box = tuple[slice, slice]


class _Canvas:
    def __init__(self, image: np.ndarray) -> None:
        self.image = image  # float32 [H, W, 3], composited in place
        h, w, _ = image.shape
        self.xs = np.arange(w, dtype=np.float32) + 0.5  # pixel centres
        self.ys = np.arange(h, dtype=np.float32) + 0.5

    def box(self, cx: float, cy: float, rx: float, ry: float) -> Box:
        h, w, _ = self.image.shape
        y0, y1 = max(0, int(cy - ry) - 2), min(h, int(cy + ry) + 3)
        x0, x1 = max(0, int(cx - rx) - 2), min(w, int(cx + rx) + 3)
        return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))

    def ellipse(self, box: Box, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        """Coverage in [0, 1] over `box`; the edge ramps over about one pixel."""
        rx, ry = max(rx, 1e-3), max(ry, 1e-3)
        dx = (self.xs[box[1]][None, :] - cx) / rx
        dy = (self.ys[box[0]][:, None] - cy) / ry
        d = np.sqrt(dx * dx + dy * dy)
        return np.clip((1.0 - d) * min(rx, ry) + 0.5, 0.0, 1.0)

    def paint(self, box: Box, alpha: np.ndarray, rgb: tuple[int, ...] | np.ndarray) -> None:
        region = self.image[box]
        region += alpha[..., None] * (np.asarray(rgb, dtype=np.float32) - region)

    def fill_ellipse(self, cx: float, cy: float, rx: float, ry: float, rgb: tuple[int, ...]) -> None:
        box = self.box(cx, cy, rx, ry)
        self.paint(box, self.ellipse(box, cx, cy, rx, ry), rgb)


def background(scene: Scene, size: int) -> np.ndarray:
    top, bottom = np.asarray(scene.top_rgb, np.float32), np.asarray(scene.bottom_rgb, np.float32)
    ramp = (np.arange(size, dtype=np.float32) + 0.5) / size
    if scene.gradient == "flat":
        ramp = np.zeros_like(ramp)
    w = ramp[:, None, None] if scene.gradient == "vertical" else ramp[None, :, None]
    return np.broadcast_to(top + w * (bottom - top), (size, size, 3)).astype(np.float32)


def _shade(rgb: tuple[int, ...], k: float) -> tuple[int, ...]:
    return tuple(int(min(255, c * k)) for c in rgb)


def render_frame(
    identity: IdentityParams, bg: np.ndarray, mouth_open: float, eye_open: float, dx: float, dy: float
) -> np.ndarray:
    """One uint8 [H, W, 3] frame. mouth_open and eye_open are in [0, 1]; dx/dy in frame-size units."""
    size = bg.shape[0]
    c = _Canvas(bg.copy())
    cx, cy = size * (0.5 + dx), size * (0.46 + dy)
    rx = 0.22 * size
    ry = rx * identity.face_aspect
    skin, hair = identity.skin_rgb, identity.hair_rgb

    c.fill_ellipse(size * (0.5 + 0.5 * dx), size * 1.06, 0.40 * size, 0.30 * size, identity.clothes_rgb)
    if identity.hair_style == "long":
        c.fill_ellipse(cx, cy + 0.3 * ry, 1.32 * rx, 1.2 * ry, hair)
    c.fill_ellipse(cx, cy + 0.95 * ry, 0.38 * rx, 0.4 * ry, _shade(skin, 0.9))  # neck
    if identity.hair_style != "bald":
        c.fill_ellipse(cx, cy - 0.1 * ry, 1.1 * rx, 1.0 * ry, hair)
    face_box = c.box(cx, cy, rx, ry)
    face = c.ellipse(face_box, cx, cy, rx, ry)
    c.paint(face_box, face, skin)
    if identity.hair_style != "bald":  # fringe: hair over the top of the face
        line = cy - 0.5 * ry
        below = np.clip(line - c.ys[face_box[0]][:, None] + 0.5, 0.0, 1.0)
        c.paint(face_box, face * below, hair)

    ey, eye_rx, eye_ry = cy - 0.12 * ry, 0.2 * rx, 0.13 * ry
    for side in (-1.0, 1.0):
        ex = cx + side * 0.42 * rx
        box = c.box(ex, ey, eye_rx, eye_ry)
        white = c.ellipse(box, ex, ey, eye_rx, eye_ry * max(eye_open, 0.02))
        c.paint(box, c.ellipse(box, ex, ey, eye_rx * 1.1, 0.2 * eye_ry), _shade(skin, 0.7))  # lid crease
        c.paint(box, white, EYE_WHITE_RGB)
        c.paint(box, white * c.ellipse(box, ex, ey, 0.55 * eye_rx, 0.55 * eye_rx), identity.eye_rgb)
        if identity.glasses:
            gbox = c.box(ex, ey, 1.6 * eye_rx, 1.6 * eye_ry)
            outer = c.ellipse(gbox, ex, ey, 1.55 * eye_rx, 1.7 * eye_ry)
            inner = c.ellipse(gbox, ex, ey, 1.55 * eye_rx - 1.2, 1.7 * eye_ry - 1.2)
            c.paint(gbox, 0.25 * inner, LENS_RGB)
            c.paint(gbox, np.clip(outer - inner, 0.0, 1.0), FRAME_RGB)
    if identity.glasses:
        c.fill_ellipse(cx, ey, 0.16 * rx, 0.6, FRAME_RGB)  # bridge

    c.fill_ellipse(cx, cy + 0.18 * ry, 0.07 * rx, 0.12 * ry, _shade(skin, 0.85))  # nose
    my, mrx = cy + 0.52 * ry, 0.36 * rx
    mry = 0.03 * ry + 0.24 * ry * float(np.clip(mouth_open, 0.0, 1.0))
    c.fill_ellipse(cx, my, mrx + 1.0, mry + 1.0, _shade(skin, 0.72))  # lips
    c.fill_ellipse(cx, my, mrx, mry, MOUTH_RGB)
    return np.clip(c.image + 0.5, 0, 255).astype(np.uint8)


def render_clip(
    identity: IdentityParams, scene: Scene, mouth_open: np.ndarray, motion: Motion, size: int
) -> np.ndarray:
    """uint8 frames [T, size, size, 3]."""
    bg = background(scene, size)
    return np.stack(
        [
            render_frame(identity, bg, float(m), float(e), float(x), float(y))
            for m, e, x, y in zip(mouth_open, motion.eye_open, motion.head_dx, motion.head_dy, strict=True)
        ]
    )
