"""Numpy rasteriser for the avatar: soft-edged shapes composited back to front, then scene lighting.

Each shape is evaluated only inside its bounding box, so a frame costs a few dozen small array ops.
Soft (about one pixel) edges keep H.264 ringing low, so decoded colours stay close to ground truth.
All geometry is relative to the frame size, so any (even) size renders the same picture.

Layout, in units of the face half-width rx = 0.22 * size (ry = rx * face_aspect), centred at
(0.5, 0.46) * size plus the head offset: eyes at cy - 0.12 ry, brows above them, mouth at cy + 0.52 ry.
The oracle (oracle.py) measures frames with the same layout in mind.
"""

from __future__ import annotations

import numpy as np

from .identity import IdentityParams, Scene
from .motion import Motion

LENS_RGB = (200, 225, 240)
FRAME_RGB = (30, 30, 36)
MOUTH_RGB = (90, 14, 30)
TEETH_RGB = (238, 234, 222)
EYE_WHITE_RGB = (245, 245, 240)
EARRING_RGB = (250, 196, 20)
LIPS = (0.92, 0.76, 0.78)  # lip colour: the skin's, reddened and darkened

FACE_CX, FACE_CY, FACE_RX = 0.5, 0.46, 0.22  # head centre and face half-width, fractions of the size
EYE_DY, EYE_DX, EYE_RX, EYE_RY = -0.12, 0.42, 0.2, 0.13  # eye centre offset (ry, rx units) and radii
BROW_DY, BROW_LIFT = -0.42, 0.10  # brow centre above the eye centre (ry units) and lift at brow=1
MOUTH_DY = 0.52  # mouth centre below the face centre (ry units)
MOUTH_OPEN_RY = 0.26  # inner half-height at open=1 (ry units)
GLASSES = (2.0, 2.1)  # lens rim radii in eye radii
SMILE_LIFT = 0.10  # mouth corner lift at smile=1 (ry units)
SMILE_LINE_DX, SMILE_LINE_DY = 0.62, 0.4  # smile creases beside the mouth (rx, ry units)
LIGHT_SIDE = 0.08  # brightness ramp across the frame for a side light
FRINGE = {"short": -0.76, "long": -0.78, "curly": -0.76, "bun": -0.9}  # hairline over the face (ry units)

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

    def ellipse(self, box: Box, cx: float, cy: float, rx: float, ry: float, bend: float = 0.0,
                wobble: tuple[float, int] = (0.0, 0)) -> np.ndarray:
        """Coverage in [0, 1] over `box`; the edge ramps over about one pixel.

        bend lifts the ellipse's left/right ends by `bend` pixels (a smile); wobble (amount, lobes)
        makes the outline bumpy (curly hair).
        """
        rx, ry = max(rx, 1e-3), max(ry, 1e-3)
        dx = (self.xs[box[1]][None, :] - cx) / rx
        y = self.ys[box[0]][:, None] - cy
        if bend:
            y = y + bend * np.clip(dx, -1.0, 1.0) ** 2
        dy = y / ry
        d = np.sqrt(dx * dx + dy * dy)
        if wobble[0]:
            d = d / (1.0 + wobble[0] * np.cos(wobble[1] * np.arctan2(dy, dx)))
        return np.clip((1.0 - d) * min(rx, ry) + 0.5, 0.0, 1.0)

    def paint(self, box: Box, alpha: np.ndarray, rgb: tuple[int, ...] | np.ndarray) -> None:
        region = self.image[box]
        region += alpha[..., None] * (np.asarray(rgb, dtype=np.float32) - region)

    def fill_ellipse(self, cx: float, cy: float, rx: float, ry: float, rgb: tuple[int, ...], **kw) -> None:
        box = self.box(cx, cy, rx * 1.2, ry * 1.2)
        self.paint(box, self.ellipse(box, cx, cy, rx, ry, **kw), rgb)


def background(scene: Scene, size: int) -> np.ndarray:
    top, bottom = np.asarray(scene.top_rgb, np.float32), np.asarray(scene.bottom_rgb, np.float32)
    ramp = (np.arange(size, dtype=np.float32) + 0.5) / size
    if scene.gradient == "flat":
        ramp = np.zeros_like(ramp)
    w = ramp[:, None, None] if scene.gradient == "vertical" else ramp[None, :, None]
    return np.broadcast_to(top + w * (bottom - top), (size, size, 3)).astype(np.float32)


def lighting(scene: Scene, size: int) -> np.ndarray:
    """Per-pixel brightness multiplier [1, size, 1] (a horizontal ramp for side lights)."""
    x = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0  # -1 left .. 1 right
    side = {"left": -1.0, "right": 1.0}.get(scene.light, 0.0)
    return (scene.light_gain * (1.0 + side * LIGHT_SIDE * x))[None, :, None]


def _shade(rgb: tuple[int, ...], k: float | tuple[float, float, float]) -> tuple[int, ...]:
    ks = (k, k, k) if isinstance(k, float) else k
    return tuple(int(min(255, c * f)) for c, f in zip(rgb, ks, strict=True))


def _hair_back(c: _Canvas, identity: IdentityParams, cx: float, cy: float, rx: float, ry: float) -> None:
    hair, style = identity.hair_rgb, identity.hair_style
    if style == "long":
        c.fill_ellipse(cx, cy + 0.3 * ry, 1.32 * rx, 1.2 * ry, hair)
        c.fill_ellipse(cx, cy - 0.12 * ry, 1.1 * rx, 1.06 * ry, hair)
    elif style == "curly":
        c.fill_ellipse(cx, cy - 0.08 * ry, 1.3 * rx, 1.16 * ry, hair, wobble=(0.07, 9))
    elif style == "short":
        c.fill_ellipse(cx, cy - 0.12 * ry, 1.1 * rx, 1.06 * ry, hair)
    elif style == "bun":
        c.fill_ellipse(cx, cy - 0.12 * ry, 1.06 * rx, 1.06 * ry, hair)
        c.fill_ellipse(cx, cy - 1.14 * ry, 0.42 * rx, 0.36 * rx, hair)


def _hair_front(c: _Canvas, identity: IdentityParams, face_box: Box, face: np.ndarray, cy: float,
                ry: float) -> None:
    line = FRINGE.get(identity.hair_style)
    if line is None:
        return
    ys = c.ys[face_box[0]][:, None]
    edge = cy + line * ry
    if identity.hair_style == "curly":  # a bumpy fringe
        xs = c.xs[face_box[1]][None, :]
        edge = edge + 0.04 * ry * np.cos(xs * (9.0 / max(ry, 1.0)))
    below = np.clip(edge - ys + 0.5, 0.0, 1.0)
    c.paint(face_box, face * below, identity.hair_rgb)


def render_frame(
    identity: IdentityParams,
    bg: np.ndarray,
    mouth_open: float,
    eye_open: float,
    dx: float,
    dy: float,
    *,
    mouth_width: float = 0.5,
    mouth_bite: float = 0.0,
    smile: float = 0.0,
    brow: float = 0.0,
    light: np.ndarray | None = None,
) -> np.ndarray:
    """One uint8 [H, W, 3] frame. Shape parameters are in [0, 1]; dx/dy in frame-size units."""
    size = bg.shape[0]
    c = _Canvas(bg.copy())
    cx, cy = size * (FACE_CX + dx), size * (FACE_CY + dy)
    rx = FACE_RX * size
    ry = rx * identity.face_aspect
    skin = identity.skin_rgb
    px = max(1.0, size / 64.0)  # one "64-px pixel": minimum stroke widths scale with the frame

    c.fill_ellipse(size * (0.5 + 0.5 * dx), size * 1.06, 0.40 * size, 0.30 * size, identity.clothes_rgb)
    _hair_back(c, identity, cx, cy, rx, ry)
    c.fill_ellipse(cx, cy + 0.95 * ry, 0.38 * rx, 0.4 * ry, _shade(skin, 0.8))  # neck, in shadow
    face_box = c.box(cx, cy, rx, ry)
    face = c.ellipse(face_box, cx, cy, rx, ry)
    c.paint(face_box, face, skin)
    _hair_front(c, identity, face_box, face, cy, ry)
    if identity.earrings:
        for side in (-1.0, 1.0):
            r = max(0.9 * px, 0.1 * rx)
            c.fill_ellipse(cx + side * 0.99 * rx, cy + 0.34 * ry, r, r, EARRING_RGB)

    ey, eye_rx, eye_ry = cy + EYE_DY * ry, EYE_RX * rx, EYE_RY * ry
    # brows: hair-coloured but always clearly darker than the skin
    brow_rgb = tuple(min(h, s) for h, s in zip(_shade(identity.hair_rgb, 0.7), _shade(skin, 0.55), strict=True))
    if identity.hair_style == "bald":
        brow_rgb = _shade(skin, 0.5)
    for side in (-1.0, 1.0):
        ex = cx + side * EYE_DX * rx
        by = ey + (BROW_DY - BROW_LIFT * float(np.clip(brow, 0.0, 1.0))) * ry
        c.fill_ellipse(ex, by, 0.24 * rx, max(0.55 * px, 0.05 * ry), brow_rgb)
        box = c.box(ex, ey, eye_rx, eye_ry)
        white = c.ellipse(box, ex, ey, eye_rx, eye_ry * max(eye_open, 0.02))
        c.paint(box, c.ellipse(box, ex, ey, eye_rx * 1.1, 0.2 * eye_ry), _shade(skin, 0.7))  # lid crease
        c.paint(box, white, EYE_WHITE_RGB)
        c.paint(box, white * c.ellipse(box, ex, ey, 0.55 * eye_rx, 0.55 * eye_rx), identity.eye_rgb)
        if identity.glasses:
            gbox = c.box(ex, ey, GLASSES[0] * eye_rx + 1, GLASSES[1] * eye_ry + 1)
            ring = 0.9 * px
            outer = c.ellipse(gbox, ex, ey, GLASSES[0] * eye_rx, GLASSES[1] * eye_ry)
            inner = c.ellipse(gbox, ex, ey, GLASSES[0] * eye_rx - ring, GLASSES[1] * eye_ry - ring)
            c.paint(gbox, 0.08 * inner, LENS_RGB)
            c.paint(gbox, np.clip(outer - inner, 0.0, 1.0), FRAME_RGB)
    if identity.glasses:
        c.fill_ellipse(cx, ey, 0.16 * rx, 0.45 * px, FRAME_RGB)  # bridge

    c.fill_ellipse(cx, cy + 0.18 * ry, 0.07 * rx, 0.12 * ry, _shade(skin, 0.85))  # nose
    if smile > 0.02:  # smile lines: creases beside the mouth that deepen with the smile
        for side in (-1.0, 1.0):
            box = c.box(cx + side * SMILE_LINE_DX * rx, cy + SMILE_LINE_DY * ry, 0.1 * rx + px, 0.16 * ry)
            line = c.ellipse(box, cx + side * SMILE_LINE_DX * rx, cy + SMILE_LINE_DY * ry, 0.03 * rx + 0.45 * px,
                             0.14 * ry)
            c.paint(box, 0.75 * float(min(smile, 1.0)) * line, _shade(skin, 0.68))
    _mouth(c, identity, cx, cy, rx, ry, px, mouth_open, mouth_width, mouth_bite, smile)
    image = c.image if light is None else c.image * light
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def _mouth(c: _Canvas, identity: IdentityParams, cx: float, cy: float, rx: float, ry: float, px: float,
           mouth_open: float, width: float, bite: float, smile: float) -> None:
    o = float(np.clip(mouth_open, 0.0, 1.0))
    my = cy + MOUTH_DY * ry
    mrx = 0.36 * rx * (0.62 + 0.6 * float(np.clip(width, 0.0, 1.0)))
    mry = MOUTH_OPEN_RY * ry * o
    lip = max(0.8 * px, 0.07 * ry)
    bend = SMILE_LIFT * ry * float(np.clip(smile, 0.0, 1.0))
    lips_rgb = _shade(identity.skin_rgb, LIPS)
    box = c.box(cx, my - 0.5 * bend, mrx + lip + 1, mry + lip + bend + 1)
    outer = c.ellipse(box, cx, my, mrx + 0.4 * lip, mry + lip, bend=bend)
    c.paint(box, outer, lips_rgb)
    if mry > 0.05:
        inner = c.ellipse(box, cx, my, mrx, mry, bend=bend)
        c.paint(box, inner, MOUTH_RGB)
        # upper teeth: a band along the top of the opening
        ys = c.ys[box[0]][:, None]
        xs = c.xs[box[1]][None, :]
        top = my - mry - bend * np.clip((xs - cx) / mrx, -1, 1) ** 2
        band = np.clip(top + min(0.09 * ry, 0.8 * mry) - ys + 0.5, 0.0, 1.0)
        teeth = inner * band * np.clip(1.0 - np.abs(xs - cx) / (0.8 * mrx) + 0.5, 0.0, 1.0)
        if identity.teeth_gap:
            gap = np.clip(np.abs(xs - cx) / (0.35 * px) - 0.5, 0.0, 1.0)
            teeth = teeth * gap
        c.paint(box, teeth, TEETH_RGB)
    if bite > 0.02:  # f/v: the upper teeth rest on the lower lip
        c.paint(box, bite * c.ellipse(box, cx, my + 0.3 * lip, 0.55 * mrx, 0.45 * lip + 0.3 * px), TEETH_RGB)


def render_clip(identity: IdentityParams, scene: Scene, motion: Motion, size: int) -> np.ndarray:
    """uint8 frames [T, size, size, 3]."""
    bg = background(scene, size)
    light = lighting(scene, size)
    return np.stack([
        render_frame(
            identity, bg, float(motion.mouth_open[i]), float(motion.eye_open[i]),
            float(motion.head_dx[i]), float(motion.head_dy[i]),
            mouth_width=float(motion.mouth_width[i]), mouth_bite=float(motion.mouth_bite[i]),
            smile=float(motion.smile[i]), brow=float(motion.brow[i]), light=light,
        )
        for i in range(len(motion.mouth_open))
    ])
