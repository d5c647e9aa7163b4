"""The oracle: measures any video of the synthetic world and scores it against the truth.

It works on ground-truth renders and generated videos alike (uint8 [T, H, W, 3] frames, or float
tensors in [-1, 1] laid out [3, T, H, W] as in batches), at any size the renderer supports, and is
built to survive what generators do to videos: blur, noise, colour shifts.

Measuring (`analyze_video`) is model-based inverse rendering, built from linear (blur-preserving) sums:
  1. skin colour (the face's dominant surface); a skin mask, row-filled so eyes, mouth and glasses
     count as face; per frame the head position (mask centroid) and, from the parabola the mask's row
     widths trace, the face's centre and radii;
  2. in face-relative regions: mouth opening as the height of mouth interior + teeth along the
     mouth's centre line, found by unmixing every pixel into the renderer's colours (skin, lips,
     interior, teeth); eye opening as non-skin mass in the eye boxes; brow height as the centroid of
     non-skin mass above the eyes, measured from the eyes; smile as the depth of the smile creases;
     static colours (skin, hair, clothes), hair layout (crown, forehead, sides, bun), and glasses /
     earrings evidence at their places;
  3. calibration by synthesis: the same measurements on frames rendered from an identity (one fitted
     to what was measured, or the ground truth when given) in calibration poses, passed through the
     dataset's H.264 round trip, map raw values to the renderer's units (mouth_open, eye_open, brow,
     smile in 0..1; glasses / earrings evidence about 0 absent .. 1 present).

Scoring (`score`) compares against the audio (lip sync: correlation of mouth opening with the opening
the phonemes imply, from the json's phoneme timeline or estimated from the waveform, over a range of
audio-video offsets, like SyncNet's offset and confidence), against a ground-truth identity and/or a
reference video's measurements (identity error: static appearance; behaviour error: dynamic habits),
and on its own (temporal jitter).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import numpy as np

from .identity import FACE_SHAPES, NEUTRAL_SCENE, IdentityParams
from .motion import stress_brow, viseme_openness
from .render import (
    BROW_DY,
    EARRING_RGB,
    EYE_DX,
    EYE_DY,
    FACE_CY,
    FACE_RX,
    LIPS,
    MOUTH_DY,
    MOUTH_RGB,
    SMILE_LINE_DX,
    SMILE_LINE_DY,
    TEETH_RGB,
    background,
    lighting,
    render_frame,
)

MAX_OFFSET = 8  # frames searched either side for the best audio-video offset
UNMIX_RIDGE = 0.005
EYE_BOX = (0.27, 0.18)  # eye box half-size (rx, ry units): the eye, not the glasses' rims
MIN_BEHAVIOUR_FRAMES = 25  # a reference shorter than this (e.g. strided batch frames) gives no habits
MOUTH_STRIP = 0.14  # width (sigma, rx units) of the column window the mouth opening is read in
# hair layout features: has hair at all; share of hair over the forehead, beside the face at eye
# level and beside the neck; how much taller the hair stands at the crown than off-centre (a bun)
HAIR_ZONES = ("hair", "forehead", "side", "side_low", "crown")
# identity error: weights of the static feature groups
IDENTITY_WEIGHTS = {"skin": 2.0, "hair": 1.5, "hair_layout": 1.5, "clothes": 1.0, "glasses": 1.0,
                    "earrings": 0.75, "face_aspect": 0.75}
# behaviour error: (weight, scale) per habit; errors are |estimate - truth| / scale, capped at 1
BEHAVIOUR = {"articulation": (1.5, 0.5), "smile": (1.0, 0.6), "brow_raise": (1.0, 0.6),
             "sway_amp": (1.0, 0.04), "sway_hz": (0.5, 0.6), "blink_rate": (0.5, 0.45)}


# ----------------------------------------------------------------------------------------------- input


def as_frames(video: Any, layout: str | None = None) -> np.ndarray:
    """Any supported video -> float32 [T, S, S, 3] in 0..255 (non-square frames are centre-cropped).

    uint8 arrays are [T, H, W, 3]; float arrays/tensors are in [-1, 1], laid out [3, T, H, W] (a batch
    sample) unless `layout` says "thwc" or "tchw"; a leading batch dimension of 1 is dropped.
    """
    try:  # torch tensors without importing torch here
        video = video.detach().cpu().numpy()
    except AttributeError:
        pass
    x = np.asarray(video)
    if x.ndim == 5 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 4:
        raise ValueError(f"expected a 4-d video, got shape {x.shape}")
    if x.dtype == np.uint8:
        frames = x.astype(np.float32)
        layout = layout or "thwc"
    else:
        frames = (x.astype(np.float32) + 1.0) * 127.5
        layout = layout or ("cthw" if x.shape[0] == 3 and x.shape[-1] != 3 else "thwc")
    if layout == "cthw":
        frames = frames.transpose(1, 2, 3, 0)
    elif layout == "tchw":
        frames = frames.transpose(0, 2, 3, 1)
    elif layout != "thwc":
        raise ValueError(f"unknown layout {layout!r}")
    if frames.shape[-1] != 3:
        raise ValueError(f"expected 3 colour channels, got frames of shape {frames.shape}")
    h, w = frames.shape[1:3]
    if h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        frames = frames[:, top : top + side, left : left + side]
    return np.clip(np.nan_to_num(frames), 0.0, 255.0)


def _smooth(frames: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over H and W (for masks only: the unmixing sums are blur-invariant)."""
    if sigma <= 0.1:
        return frames
    radius = max(1, int(round(2.5 * sigma)))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(frames, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    h, w = frames.shape[1:3]
    tmp = sum(k[i] * pad[:, i : i + h, :, :] for i in range(len(k)))
    return sum(k[i] * tmp[:, :, i : i + w, :] for i in range(len(k)))


# -------------------------------------------------------------------------------------- measurements


@dataclass
class Geometry:
    """Per-frame face placement in pixels: centre (cx, cy) and video-level radii (rx, ry)."""

    cx: np.ndarray
    cy: np.ndarray
    rx: float
    ry: float


@dataclass
class Measurements:
    """What the oracle sees in one video. Tracks are [T]; positions and sizes are frame fractions."""

    size: int
    fps: float
    frames: int
    head_x: np.ndarray  # head position (mask centroid), frame fractions
    head_y: np.ndarray
    face_rx: float  # face half-width, frame fraction
    face_aspect: float  # face height / width
    raw: dict[str, np.ndarray]  # uncalibrated tracks: mouth, eye, brow, smile, skin_track
    skin_rgb: np.ndarray  # [3]
    hair_rgb: np.ndarray  # [3] (the skin colour for a bald head)
    clothes_rgb: np.ndarray  # [3]
    hair_layout: np.ndarray  # [len(HAIR_ZONES)], 0 = background/skin .. 1 = hair, per zone
    glasses_raw: float
    earrings_raw: float
    # calibrated (renderer units), filled by calibrate()
    mouth_open: np.ndarray = field(default_factory=lambda: np.zeros(0))
    eye_open: np.ndarray = field(default_factory=lambda: np.zeros(0))
    brow: np.ndarray = field(default_factory=lambda: np.zeros(0))
    smile: np.ndarray = field(default_factory=lambda: np.zeros(0))
    glasses: float = 0.0  # evidence, about 0 (none) .. 1 (as rendered)
    earrings: float = 0.0
    calibrated_with: str = ""  # "fitted" or "ground_truth"

    @property
    def duration(self) -> float:
        return self.frames / self.fps

    def blinks(self, threshold: float = 0.5) -> list[int]:
        """Frame indices where a blink starts: the eye opening drops below `threshold` of its usual
        (median) level, by clearly more than its frame-to-frame noise."""
        if self.frames == 0:
            return []
        level = float(np.median(self.eye_open))
        noise = 1.4826 * float(np.median(np.abs(np.diff(self.eye_open)))) if self.frames > 2 else 0.0
        closed = (self.eye_open < threshold * level) & (level - self.eye_open > 4.0 * noise)
        return [int(i) for i in np.flatnonzero(closed & ~np.concatenate([[False], closed[:-1]]))]

    def to_json(self) -> dict[str, Any]:
        def arr(x: np.ndarray) -> list[float]:
            return [round(float(v), 5) for v in np.asarray(x).reshape(-1)]

        return {
            "size": self.size, "fps": self.fps, "frames": self.frames,
            "head_x": arr(self.head_x), "head_y": arr(self.head_y),
            "face_rx": round(self.face_rx, 5), "face_aspect": round(self.face_aspect, 4),
            "mouth_open": arr(self.mouth_open), "eye_open": arr(self.eye_open), "brow": arr(self.brow),
            "smile": arr(self.smile), "blinks": self.blinks(),
            "skin_rgb": arr(self.skin_rgb), "hair_rgb": arr(self.hair_rgb), "clothes_rgb": arr(self.clothes_rgb),
            "hair_layout": dict(zip(HAIR_ZONES, arr(self.hair_layout), strict=True)),
            "glasses": round(self.glasses, 4), "earrings": round(self.earrings, 4),
            "calibrated_with": self.calibrated_with,
        }


def _patch(frames: np.ndarray, x: np.ndarray | float, y: np.ndarray | float, half: float) -> np.ndarray:
    """Pixels of a square patch per frame, centred at (x, y) pixels: [T, n, 3] (edge-clamped)."""
    t, s = frames.shape[:2]
    x = np.broadcast_to(np.asarray(x, dtype=np.float64), (t,))
    y = np.broadcast_to(np.asarray(y, dtype=np.float64), (t,))
    h = max(1, int(round(half)))
    offs = np.arange(-h, h + 1)
    xi = np.clip(np.round(x - 0.5).astype(np.int64)[:, None] + offs[None, :], 0, s - 1)  # [T, k]
    yi = np.clip(np.round(y - 0.5).astype(np.int64)[:, None] + offs[None, :], 0, s - 1)
    tt = np.arange(t)[:, None, None]
    return frames[tt, yi[:, :, None], xi[:, None, :]].reshape(t, -1, 3)


def _skin_mask(frames: np.ndarray, skin: np.ndarray) -> np.ndarray:
    """Soft skin likelihood [T, S, S] from log-colour distance (robust to shading and lighting)."""
    return _likeness(frames, skin)


def _box_mean(x: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)^2 box of the last two axes (edge-padded)."""
    if r <= 0:
        return x
    pad = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(r, r), (r, r)], mode="edge")
    h, w = x.shape[-2:]
    rows = sum(pad[..., i : i + h, :] for i in range(2 * r + 1)) / (2 * r + 1)
    return sum(rows[..., :, i : i + w] for i in range(2 * r + 1)) / (2 * r + 1)


def _row_fill(mask: np.ndarray) -> np.ndarray:
    """Fill holes along rows: a pixel counts as face if there is face to its left and to its right."""
    left = np.maximum.accumulate(mask, axis=-1)
    right = np.maximum.accumulate(mask[..., ::-1], axis=-1)[..., ::-1]
    return np.maximum(mask, np.minimum(left, right))


def _geometry(frames: np.ndarray, skin: np.ndarray) -> tuple[Geometry, np.ndarray, np.ndarray]:
    """Face geometry per frame and the head track (centroid of the filled skin mask), in pixels."""
    t, s = frames.shape[:2]
    mask = _skin_mask(_smooth(frames, 0.6 * s / 64.0), skin)
    # keep only solid skin: thin lines of skin-like colour (anti-aliased edges between other colours)
    # must not become face when rows are filled
    mask = np.clip((_box_mean(mask, max(1, int(round(s / 64.0)))) - 0.35) / 0.4, 0.0, 1.0)
    # search window around where the renderer puts heads (sway is at most 5% of the frame)
    y0, y1, x0, x1 = int(0.06 * s), int(0.84 * s), int(0.1 * s), int(0.9 * s)
    win = np.zeros_like(mask)
    win[:, y0:y1, x0:x1] = mask[:, y0:y1, x0:x1]
    filled = _row_fill(win)
    ys = np.arange(s, dtype=np.float64) + 0.5
    xs = ys
    widths = filled.sum(axis=2)  # [T, S]
    mass = widths.sum(axis=1) + 1e-6
    head_y = (widths * ys[None, :]).sum(axis=1) / mass
    head_x = (filled.sum(axis=1) * xs[None, :]).sum(axis=1) / mass
    nominal_rx, nominal_ry = FACE_RX * s, FACE_RX * s * 1.2
    cx = head_x.copy()
    cy_fit = np.full(t, np.nan)
    rx_fit, ry_fit = np.full(t, np.nan), np.full(t, np.nan)
    for i in range(t):
        w = widths[i]
        top = w.max()
        if top < 0.15 * s:
            continue
        rows = np.flatnonzero(w > 0.55 * top)
        if len(rows) < 4:
            continue
        # ellipse rows: w^2 = 4 rx^2 (1 - (y - cy)^2 / ry^2), a parabola in y
        c2, c1, c0 = np.polyfit(ys[rows], w[rows] ** 2, 2)
        if c2 >= 0:
            continue
        vertex = -c1 / (2 * c2)
        peak = c0 - c1 * c1 / (4 * c2)
        if peak <= 0:
            continue
        rx_i = 0.5 * np.sqrt(peak)
        cy_fit[i], rx_fit[i], ry_fit[i] = vertex, rx_i, 2 * rx_i / np.sqrt(-c2)
    ok = np.isfinite(cy_fit) & (rx_fit > 0.3 * nominal_rx) & (rx_fit < 2.0 * nominal_rx)
    if ok.any():
        rx = float(np.median(rx_fit[ok]))
        ry = float(np.clip(np.median(ry_fit[ok]), 0.8 * rx, 1.8 * rx))
        dy = float(np.median(cy_fit[ok] - head_y[ok]))
    else:  # nothing face-like: fall back on the renderer's nominal layout
        rx, ry, dy = nominal_rx, nominal_ry, FACE_CY * s - float(np.median(head_y))
    # whatever was found, keep the face where faces can be (garbage in must not crash what follows)
    rx = float(np.clip(rx, 0.5 * nominal_rx, 1.6 * nominal_rx))
    ry = float(np.clip(ry, 0.8 * rx, 1.8 * rx))
    cy = np.clip(head_y + dy, 0.3 * s, 0.65 * s)
    cx = np.clip(cx, 0.3 * s, 0.7 * s)
    return Geometry(cx=cx, cy=cy, rx=rx, ry=ry), head_x, head_y


def _box(geo: Geometry, i: int, ox: float, oy: float, hx: float, hy: float, s: int) -> tuple[slice, slice,
                                                                                              float, float]:
    """Pixel slices of a box centred ox*rx, oy*ry from frame i's face centre, half-size hx*rx, hy*ry."""
    x, y = geo.cx[i] + ox * geo.rx, geo.cy[i] + oy * geo.ry
    x0, x1 = int(np.floor(x - hx * geo.rx)), int(np.ceil(x + hx * geo.rx))
    y0, y1 = int(np.floor(y - hy * geo.ry)), int(np.ceil(y + hy * geo.ry))
    x0, y0 = min(max(0, x0), s - 1), min(max(0, y0), s - 1)
    x1, y1 = min(max(x1, x0 + 1), s), min(max(y1, y0 + 1), s)
    return slice(y0, y1), slice(x0, x1), x, y


def _mouth_endmembers(skin: np.ndarray) -> np.ndarray:
    """[3 colour rows + a sum-to-one row] x 4: skin, lips, mouth interior, teeth (the renderer's colours)."""
    lips = skin * np.asarray(LIPS)
    cols = np.stack([skin, lips, np.asarray(MOUTH_RGB, float), np.asarray(TEETH_RGB, float)], axis=1)
    return np.vstack([cols / 255.0, np.ones((1, 4))])


def _unmix(pixels: np.ndarray, a: np.ndarray, lam: float | None = None) -> np.ndarray:
    """Fractions [n, k] of the k endmember colours (columns of `a`) in each pixel: least squares with a
    little ridge toward the first endmember (the surround), which keeps close colours from exploding
    under noise. Linear in the pixels, so sums over a region survive blur."""
    k = a.shape[1]
    lam = UNMIX_RIDGE if lam is None else lam
    b = np.concatenate([pixels.reshape(-1, 3) / 255.0, np.ones((pixels.reshape(-1, 3).shape[0], 1))], axis=1)
    prior = np.zeros(k)
    prior[0] = 1.0
    lhs = a.T @ a + lam * np.eye(k)
    rhs = b @ a + lam * prior[None, :]
    return np.linalg.solve(lhs, rhs.T).T


def _centroid_y(mass: np.ndarray, ys: np.ndarray) -> tuple[float, float]:
    """(mass-weighted mean of ys over rows, total mass) for a [rows, cols] mass map."""
    rows = mass.sum(axis=1)
    total = float(rows.sum())
    return (float((rows * ys).sum()) / total if total > 1e-6 else float(np.mean(ys))), total


def _raw_tracks(frames: np.ndarray, geo: Geometry, skin: np.ndarray) -> dict[str, np.ndarray]:
    t, s = frames.shape[:2]
    a = _mouth_endmembers(skin)
    face_area = np.pi * geo.rx * geo.ry
    out = {k: np.zeros(t) for k in ("mouth", "eye", "brow", "smile", "skin_track")}
    for i in range(t):
        f = frames[i]
        # mouth: the opening's height at the mouth's centre line (where width and smile barely matter),
        # from the interior + teeth fractions of each pixel, in units of the face height. Teeth count
        # only up to what an open mouth shows with its interior: f/v put teeth on a closed lip.
        ys_, xs_, _, _ = _box(geo, i, 0.0, MOUTH_DY, 0.6, 0.45, s)
        frac = _unmix(f[ys_, xs_], a).reshape(ys_.stop - ys_.start, xs_.stop - xs_.start, 4)
        cols = np.arange(xs_.start, xs_.stop) + 0.5
        lips = np.clip(1.0 - frac[..., 0], 0.0, 1.5).sum(axis=0)
        mx = float((lips * cols).sum() / lips.sum()) if lips.sum() > 1e-3 else geo.cx[i]
        weight = np.exp(-0.5 * ((cols - mx) / max(0.6, MOUTH_STRIP * geo.rx)) ** 2)
        weight /= weight.sum()
        interior = (np.clip(frac[..., 2], -0.5, 1.5).sum(axis=0) * weight).sum()
        teeth = (np.clip(frac[..., 3], -0.5, 1.5).sum(axis=0) * weight).sum()
        out["mouth"][i] = (interior + float(np.clip(teeth, 0.0, 0.7 * max(interior, 0.0)))) / geo.ry
        # eyes: non-skin mass in both eye boxes (white and iris both count) and its height
        eye = 0.0
        eye_y, eye_w = [], []
        for side in (-1.0, 1.0):
            ys_, xs_, _, _ = _box(geo, i, side * EYE_DX, EYE_DY, EYE_BOX[0], EYE_BOX[1], s)
            d = np.abs(f[ys_, xs_] - skin).sum(axis=-1) / 255.0
            eye += d.sum()
            y, w = _centroid_y(d, np.arange(ys_.start, ys_.stop) + 0.5)
            eye_y.append(y)
            eye_w.append(w)
        out["eye"][i] = eye / face_area
        eye_line = float(np.average(eye_y, weights=np.asarray(eye_w) + 1e-6))
        # brows: height of the non-skin mass above each eye, measured from the eyes (so errors in the
        # face's vertical position cancel)
        brow_y, brow_w = [], []
        for side in (-1.0, 1.0):
            ys_, xs_, _, _ = _box(geo, i, side * EYE_DX, EYE_DY + BROW_DY - 0.06, 0.2, 0.115, s)
            d = np.abs(f[ys_, xs_] - skin).sum(axis=-1)
            y, w = _centroid_y(d, np.arange(ys_.start, ys_.stop) + 0.5)
            brow_y.append(y)
            brow_w.append(w)
        out["brow"][i] = (eye_line - float(np.average(brow_y, weights=np.asarray(brow_w) + 1e-6))) / geo.ry
        # smile: darkness of the smile creases beside the mouth
        crease = 0.0
        for side in (-1.0, 1.0):
            ys_, xs_, _, _ = _box(geo, i, side * SMILE_LINE_DX, SMILE_LINE_DY, 0.09, 0.17, s)
            crease += np.clip(skin.sum() - f[ys_, xs_].sum(axis=-1), 0.0, None).sum() / 255.0
        out["smile"][i] = crease / face_area
        # face brightness (for flicker): mean over the clearly-skin pixels of the face
        ys_, xs_, _, _ = _box(geo, i, 0.0, 0.0, 0.8, 0.8, s)
        face = f[ys_, xs_]
        w = _likeness(face, skin) ** 2
        out["skin_track"][i] = float((face.mean(axis=-1) * w).sum() / (w.sum() + 1e-6)) if w.sum() > 1 else 0.0
    return out


def _likeness(frames: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Soft 'this is that surface' map from log-colour distance (shading and lighting tolerant)."""
    d = np.sqrt(((np.log(frames + 20.0) - np.log(np.asarray(colour, float) + 20.0)) ** 2).sum(axis=-1))
    return np.clip((0.34 - d) / 0.14, 0.0, 1.0)


def _box_mean_track(values: np.ndarray, geo: Geometry, ox: float, oy: float, hx: float, hy: float) -> float:
    """Median over frames of the mean of a [T, S, S] map in a face-relative box (both sides if ox)."""
    s = values.shape[1]
    out = []
    for i in range(values.shape[0]):
        parts = []
        for side in ((-1.0, 1.0) if ox else (1.0,)):
            ys_, xs_, _, _ = _box(geo, i, side * ox, oy, hx, hy, s)
            parts.append(values[i, ys_, xs_].reshape(-1))
        out.append(float(np.concatenate(parts).mean()))
    return float(np.median(out))


def _hair(frames: np.ndarray, geo: Geometry, skin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hair colour, layout features); a bald head has the skin's colour and an all-zero layout."""
    # just above the top of the face: the hair cap of every hairstyle, background above a bald head
    # (the same colour as the background beside the head at that height)
    y = geo.cy - 1.09 * geo.ry
    crown = np.median(_patch(frames, geo.cx, y, 0.08 * geo.rx).reshape(-1, 3), axis=0)
    beside = np.median(np.concatenate([_patch(frames, geo.cx + side * 1.7 * geo.rx, y, 0.08 * geo.rx)
                                       for side in (-1.0, 1.0)], axis=1).reshape(-1, 3), axis=0)

    def like(a: np.ndarray, b: np.ndarray) -> float:
        return float(_likeness(a[None, None, None, :], b).reshape(-1)[0])

    # bald: the crown is skin, background, or a blur of the two
    span = beside - skin
    t = float(np.clip((crown - skin) @ span / max(float(span @ span), 1e-6), 0.0, 1.0))
    if like(crown, beside) > 0.5 or like(crown, skin) > 0.5 or np.linalg.norm(crown - skin - t * span) < 24.0:
        return skin.copy(), np.zeros(len(HAIR_ZONES))
    hair = _likeness(frames, crown) * (1.0 - _likeness(frames, skin))  # [T, S, S]
    forehead = _box_mean_track(hair, geo, 0.0, -0.8, 0.3, 0.1)
    side = _box_mean_track(hair, geo, 1.2, 0.0, 0.1, 0.2)
    side_low = _box_mean_track(hair, geo, 1.16, 0.7, 0.1, 0.15)
    # hair standing above the head's centre line vs 0.6 rx off-centre, in face heights
    heights = []
    s = frames.shape[1]
    for i in range(frames.shape[0]):
        col = []
        for ox in (0.0, -0.6, 0.6):
            ys_, xs_, _, _ = _box(geo, i, ox, -1.25, 0.08, 0.4, s)
            col.append(hair[i, ys_, xs_].mean(axis=1).sum() / geo.ry)
        heights.append(col[0] - 0.5 * (col[1] + col[2]))
    return crown, np.array([1.0, forehead, side, side_low, float(np.median(heights))])


def _static(frames: np.ndarray, geo: Geometry, skin: np.ndarray) -> dict[str, Any]:
    """Colours, hair layout and accessory evidence, pooled over frames (medians: robust to blinks etc.)."""
    s = frames.shape[1]
    hair, layout = _hair(frames, geo, skin)
    clothes = np.median(_patch(frames, 0.5 * s, 0.93 * s, 0.04 * s).reshape(-1, 3), axis=0)
    # glasses: dark frame at the bridge between the eyes and at the rims' outer sides
    dark = []
    for ox, hx in ((0.0, 0.1), (0.82, 0.12), (-0.82, 0.12)):
        vals = []
        for i in range(frames.shape[0]):
            ys_, xs_, _, _ = _box(geo, i, ox, EYE_DY, hx, 0.2, s)
            lum_skin = skin @ np.array([0.3, 0.59, 0.11])
            lum = frames[i, ys_, xs_] @ np.array([0.3, 0.59, 0.11])
            vals.append(np.clip(lum_skin - lum, 0.0, None).sum() / 255.0)
        dark.append(np.median(vals))
    glasses_raw = float(sum(dark) / (geo.rx * geo.ry) * 100.0)
    # earrings: gold found by unmixing each lobe box into skin, whatever lies beyond the face there
    # (hair or background) and the earring colour
    spot = []
    for side in (-1.0, 1.0):
        outer = np.median(np.concatenate([
            _patch(frames, geo.cx + side * 1.15 * geo.rx, geo.cy + dy * geo.ry, 0.04 * geo.rx)
            for dy in (0.05, 0.15, 0.55, 0.65)], axis=1).reshape(-1, 3), axis=0)
        a = np.vstack([np.stack([skin, outer, np.asarray(EARRING_RGB, float)], axis=1) / 255.0, np.ones((1, 3))])
        vals = []
        for i in range(frames.shape[0]):
            ys_, xs_, _, _ = _box(geo, i, side * 0.99, 0.34, 0.2, 0.14, s)
            vals.append(np.clip(_unmix(frames[i, ys_, xs_], a, 0.02)[:, 2], -0.2, 1.2).sum())
        spot.append(np.median(vals))
    earrings_raw = float(sum(spot) / (geo.rx * geo.ry) * 100.0)
    return {"hair_rgb": hair, "clothes_rgb": clothes, "hair_layout": layout,
            "glasses_raw": glasses_raw, "earrings_raw": earrings_raw}


def _skin_colour(frames: np.ndarray) -> np.ndarray:
    s = frames.shape[1]
    px = np.concatenate([_patch(frames, (0.5 + dx) * s, 0.52 * s, 0.022 * s) for dx in (-0.11, 0.11)], axis=1)
    return np.median(px.reshape(-1, 3), axis=0)


def measure(video: Any, fps: float = 25.0, layout: str | None = None) -> Measurements:
    """Uncalibrated measurements (see analyze_video, which also calibrates)."""
    frames = as_frames(video, layout)
    t, s = frames.shape[:2]
    skin = _skin_colour(frames)
    geo, head_x, head_y = _geometry(frames, skin)
    # refine the skin colour over the whole face: the median of the pixels that are clearly this
    # surface (features, their blurred edges and shadows drop out), then re-measure the geometry
    pick = np.unique(np.linspace(0, t - 1, min(t, 8)).round().astype(int))
    face = []
    for i in pick:
        ys_, xs_, _, _ = _box(geo, int(i), 0.0, 0.1, 0.75, 0.7, s)
        face.append(frames[i, ys_, xs_].reshape(-1, 3))
    pixels = np.concatenate(face)
    refined = skin
    for _ in range(3):
        d = np.sqrt(((np.log(pixels + 20.0) - np.log(refined + 20.0)) ** 2).sum(axis=1))
        close = pixels[d < 0.2]
        if len(close) < 10:
            break
        refined = np.median(close, axis=0)
    if np.linalg.norm(np.log(refined + 20.0) - np.log(skin + 20.0)) < 0.25:  # same surface, better estimate
        skin = refined
        geo, head_x, head_y = _geometry(frames, skin)
    raw = _raw_tracks(frames, geo, skin)
    static = _static(frames, geo, skin)
    return Measurements(
        size=s, fps=float(fps), frames=t,
        head_x=head_x / s, head_y=head_y / s, face_rx=geo.rx / s, face_aspect=geo.ry / geo.rx,
        raw=raw, skin_rgb=skin, hair_rgb=static["hair_rgb"], clothes_rgb=static["clothes_rgb"],
        hair_layout=static["hair_layout"], glasses_raw=static["glasses_raw"],
        earrings_raw=static["earrings_raw"],
    )


# -------------------------------------------------------------------------------- calibration


def fitted_identity(m: Measurements) -> IdentityParams:
    """An identity that looks like what was measured (for calibrating a video without ground truth)."""
    shape = min(FACE_SHAPES, key=lambda k: abs(FACE_SHAPES[k] - m.face_aspect))
    rgb = tuple(int(np.clip(round(float(c)), 0, 255)) for c in m.skin_rgb)
    hair = tuple(int(np.clip(round(float(c)), 0, 255)) for c in m.hair_rgb)
    bald = float(m.hair_layout[0]) < 0.5
    return IdentityParams(
        name="fitted", face_shape=shape, face_aspect=FACE_SHAPES[shape], skin="fitted", skin_rgb=rgb,  # type: ignore[arg-type]
        hair_colour="fitted", hair_rgb=hair, hair_style="bald" if bald else "short",  # type: ignore[arg-type]
        eye_colour="brown", eye_rgb=(92, 54, 28), teeth_gap=False, glasses=m.glasses_raw > 2.0,
        earrings=False, clothes="fitted", clothes_rgb=(120, 120, 124), voice="en-us", pitch=50,
        pitch_range=50, speech_rate=170, articulation=1.0, blink_rate=0.3, sway_amp=0.0, sway_hz=0.5,
        smile=0.0, brow_raise=0.0,
    )


# calibration poses: (mouth_open, mouth_width, eye_open, brow, smile)
_POSES = [(o, w, 1.0, 0.0, 0.0) for o in (0.0, 0.25, 0.5, 0.75, 1.0) for w in (0.2, 0.55, 0.9)]
_POSES += [(0.0, 0.5, 0.0, 0.0, 0.0), (0.0, 0.5, 1.0, 1.0, 0.0), (0.0, 0.5, 1.0, 0.0, 1.0),
           (0.5, 0.6, 1.0, 0.0, 1.0), (0.0, 0.5, 1.0, 0.5, 0.5)]


def _render_poses(identity: IdentityParams, size: int, codec: bool = True) -> np.ndarray:
    """The identity in the calibration poses, in the neutral scene; through the dataset's H.264 round
    trip by default, because 4:2:0 chroma blurs small coloured regions (lips, mouth) in a way raw
    renders do not show, and both dataset clips and models trained on them carry that blur."""
    bg = background(NEUTRAL_SCENE, size)
    light = lighting(NEUTRAL_SCENE, size)
    frames = np.stack([
        render_frame(identity, bg, o, e, 0.0, 0.0, mouth_width=w, smile=sm, brow=b, light=light)
        for o, w, e, b, sm in _POSES
    ])
    return _codec_round_trip(frames) if codec and size % 2 == 0 else frames


def _codec_round_trip(frames: np.ndarray) -> np.ndarray:
    """Encode like the dataset (media.encode_mp4) and decode with PyAV (decord rejects some sizes)."""
    import io

    import av

    from ..media import encode_mp4

    with av.open(io.BytesIO(encode_mp4(frames, 25.0))) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack(decoded[: len(frames)]) if len(decoded) >= len(frames) else frames


def _fit_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    if np.ptp(x) < 1e-9:
        return 0.0, float(np.mean(y))
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def _span(span: float, floor: float) -> float:
    """A calibration span kept away from zero (an effect the calibration render barely shows)."""
    return float(np.sign(span) or 1.0) * max(abs(float(span)), floor)


@dataclass(frozen=True)
class Calibration:
    """Linear maps raw -> renderer units, measured on renders of one identity at one size."""

    mouth: tuple[float, float]  # slope, intercept
    eye: tuple[float, float]  # closed level, open - closed
    brow: tuple[float, float]  # neutral level, span to brow = 1
    smile: tuple[float, float]
    glasses: tuple[float, float]  # evidence without, with - without
    earrings: tuple[float, float]


@lru_cache(maxsize=512)
def calibration(identity: IdentityParams, size: int) -> Calibration:
    """Render `identity` in calibration poses at `size` and measure them (cached: it is deterministic)."""
    r = measure(_render_poses(identity, size)).raw
    poses = np.asarray(_POSES)
    mouth_rows = (poses[:, 2] == 1.0) & (poses[:, 3] == 0.0) & (poses[:, 4] == 0.0)
    k, b = _fit_line(r["mouth"][mouth_rows], poses[mouth_rows, 0])
    open_level = float(np.median(r["eye"][mouth_rows]))
    closed_level = float(r["eye"][np.flatnonzero(poses[:, 2] == 0.0)[0]])
    neutral = int(np.flatnonzero(mouth_rows & (poses[:, 0] == 0.0) & (poses[:, 1] == 0.55))[0])
    brow_hi = int(np.flatnonzero(poses[:, 3] == 1.0)[0])
    smile_hi = int(np.flatnonzero((poses[:, 4] == 1.0) & (poses[:, 0] == 0.0))[0])

    def evidence(field_name: str, attr: str) -> tuple[float, float]:
        on = getattr(measure(_render_poses(replace(identity, **{field_name: True}), size)[:3]), attr)
        off = getattr(measure(_render_poses(replace(identity, **{field_name: False}), size)[:3]), attr)
        return float(off), max(float(on - off), 1e-3)

    return Calibration(
        mouth=(k, b),
        eye=(closed_level, _span(open_level - closed_level, 0.2 * abs(open_level) + 1e-3)),
        brow=(float(r["brow"][neutral]), _span(r["brow"][brow_hi] - r["brow"][neutral], 0.02)),
        smile=(float(r["smile"][neutral]), _span(r["smile"][smile_hi] - r["smile"][neutral], 0.0005)),
        glasses=evidence("glasses", "glasses_raw"),
        earrings=evidence("earrings", "earrings_raw"),
    )


def calibrate(m: Measurements, identity: IdentityParams | None = None) -> Measurements:
    """Map raw tracks to renderer units using renders of `identity` (default: one fitted to `m`)."""
    cal = calibration(identity or fitted_identity(m), m.size)
    return replace(
        m,
        mouth_open=np.clip(cal.mouth[0] * m.raw["mouth"] + cal.mouth[1], -0.5, 1.5),
        eye_open=np.clip((m.raw["eye"] - cal.eye[0]) / cal.eye[1], -0.5, 1.5),
        brow=np.clip((m.raw["brow"] - cal.brow[0]) / cal.brow[1], -1.0, 2.0),
        smile=np.clip((m.raw["smile"] - cal.smile[0]) / cal.smile[1], -1.0, 2.0),
        glasses=float((m.glasses_raw - cal.glasses[0]) / cal.glasses[1]),
        earrings=float((m.earrings_raw - cal.earrings[0]) / cal.earrings[1]),
        calibrated_with="ground_truth" if identity is not None else "fitted",
    )


def analyze_video(video: Any, fps: float = 25.0, *, identity: IdentityParams | dict | None = None,
                  layout: str | None = None) -> Measurements:
    """Measure a video of the synthetic world (see module docstring); calibrated with `identity` when
    given (an IdentityParams or its json), else with an identity fitted to the measurements."""
    if isinstance(identity, dict):
        identity = IdentityParams.from_json(identity)
    return calibrate(measure(video, fps, layout), identity)


# ------------------------------------------------------------------------------------------- scoring


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.std(a) < 1e-9 or np.std(b) < 1e-9:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def sync_curve(mouth: np.ndarray, expected: np.ndarray, max_offset: int = MAX_OFFSET) -> dict[int, float]:
    """Correlation of mouth opening with the expected opening, for video delayed by k frames."""
    n = min(len(mouth), len(expected))
    out = {}
    max_offset = max(0, min(max_offset, n - 3))
    for k in range(-max_offset, max_offset + 1):
        if k >= 0:
            a, b = mouth[k:n], expected[: n - k]
        else:
            a, b = mouth[: n + k], expected[-k:n]
        out[k] = _corr(a, b)
    return out


def expected_openness(
    n_frames: int, fps: float, *, phonemes: Sequence[Sequence[Any]] | None = None,
    audio: np.ndarray | None = None, sample_rate: int = 16000,
) -> tuple[np.ndarray, str]:
    """The mouth opening the speech implies, per frame: from a phoneme timeline ([start, end, phoneme,
    ...] rows, as in the json) when given, else estimated from the waveform."""
    if phonemes is not None:
        phones = [(float(p[0]), float(p[1]), str(p[2])) for p in phonemes]
        return viseme_openness(phones, n_frames, fps), "phonemes"
    if audio is None:
        raise ValueError("need phonemes or audio to know what the mouth should do")
    from .audio_openness import predict

    return predict(np.asarray(audio, dtype=np.float64).reshape(-1), sample_rate, n_frames, fps), "audio"


def lipsync(m: Measurements, expected: np.ndarray, max_offset: int = MAX_OFFSET) -> dict[str, float]:
    curve = sync_curve(m.mouth_open, expected, max_offset)
    values = np.array(list(curve.values()))
    best = max(curve, key=lambda k: (curve[k], -abs(k)))  # ties (e.g. a still mouth) -> offset 0
    return {
        "lipsync_corr": curve[0],  # at the true alignment
        "lipsync_best_corr": curve[best],
        "lipsync_offset": float(best),  # frames; > 0: the video lags the audio
        "lipsync_conf": float(curve[best] - np.median(values)),  # SyncNet-style confidence
    }


def _slope(x: np.ndarray | None, y: np.ndarray) -> float | None:
    if x is None or len(x) != len(y) or len(y) < 3 or np.std(x) < 1e-6:
        return None
    return float(np.polyfit(x, y, 1)[0])


def behaviour(m: Measurements, expected: np.ndarray | None = None,
              expected_brow: np.ndarray | None = None) -> dict[str, float]:
    """Estimates of the dynamic habits (identity units) from one video.

    With the opening the speech implies (`expected`) articulation is the slope of the measured
    opening on it; with the brow lift the stressed syllables imply (`expected_brow`, from a phoneme
    timeline) brow_raise is a slope too. Without them both come from percentiles of the tracks.
    """
    t = m.frames
    mouth = m.mouth_open
    articulation = _slope(expected, mouth)
    if articulation is None:
        articulation = float(np.percentile(mouth, 95) / 0.8) if t else 0.0
    x = m.head_x - np.mean(m.head_x) if t else np.zeros(0)
    if t > 2:
        xs = np.convolve(x, np.ones(3) / 3, mode="valid")  # light smoothing against measurement noise
        sway_amp = float(np.sqrt(2.0) * np.std(xs))
        vel = np.diff(xs) * m.fps
        sway_hz = float(np.sqrt(np.var(vel) / max(np.var(xs), 1e-10)) / (2 * np.pi)) if sway_amp > 0.002 else 0.0
    else:
        sway_amp, sway_hz = 0.0, 0.0
    brow_raise = _slope(expected_brow, m.brow)
    if brow_raise is None:
        brow = np.convolve(m.brow, np.ones(3) / 3, mode="same") if t > 2 else m.brow
        brow_raise = float(np.percentile(brow, 95) - min(0.0, np.percentile(brow, 5))) if t else 0.0
    return {
        "articulation": articulation,
        "smile": float(np.median(m.smile)) if t else 0.0,
        "brow_raise": brow_raise,
        "sway_amp": sway_amp,
        "sway_hz": min(sway_hz, 2.0),
        "blink_rate": len(m.blinks()) / max(m.duration, 1e-6),
    }


def behaviour_error(estimate: dict[str, float], truth: dict[str, float]) -> float:
    num = den = 0.0
    for k, (w, scale) in BEHAVIOUR.items():
        if k in estimate and k in truth:
            num += w * min(1.0, abs(estimate[k] - float(truth[k])) / scale)
            den += w
    return num / den if den else float("nan")


def static_features(m: Measurements) -> dict[str, np.ndarray]:
    return {
        "skin": np.asarray(m.skin_rgb, float),
        "hair": np.asarray(m.hair_rgb, float),
        "hair_layout": np.asarray(m.hair_layout, float),
        "clothes": np.asarray(m.clothes_rgb, float),
        "glasses": np.array([m.glasses]),
        "earrings": np.array([m.earrings]),
        "face_aspect": np.array([m.face_aspect]),
    }


def colour_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Colour distance in log space (relative, like perception; dark colours do not flip around):
    about 1 = clearly different colours, 0.25 = what scene lighting alone can cause."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.linalg.norm(np.log(a + 40.0) - np.log(b + 40.0)) / 0.35)


def identity_error(a: Measurements, b: Measurements) -> float:
    """0 = same appearance .. 1 = nothing in common (weighted, each term capped at 1)."""
    terms = identity_terms(a, b)
    total = sum(IDENTITY_WEIGHTS.values())
    return float(sum(IDENTITY_WEIGHTS[k] * v for k, v in terms.items()) / total)


def identity_terms(a: Measurements, b: Measurements) -> dict[str, float]:
    """Per-feature static differences, each scaled so 1 means clearly different (and capped there)."""
    fa, fb = static_features(a), static_features(b)
    layout_scale = np.array([1.0, 0.5, 0.5, 0.5, 0.25])  # crown: face heights
    terms = {
        "skin": colour_distance(fa["skin"], fb["skin"]),
        "hair": colour_distance(fa["hair"], fb["hair"]),
        "hair_layout": (np.abs(fa["hair_layout"] - fb["hair_layout"]) / layout_scale).mean(),
        "clothes": colour_distance(fa["clothes"], fb["clothes"]),
        "glasses": abs(float(np.clip(fa["glasses"][0], 0, 1) - np.clip(fb["glasses"][0], 0, 1))),
        "earrings": abs(float(np.clip(fa["earrings"][0], 0, 1) - np.clip(fb["earrings"][0], 0, 1))),
        "face_aspect": abs(float(fa["face_aspect"][0] - fb["face_aspect"][0])) / 0.3,
    }
    return {k: min(1.0, float(v)) for k, v in terms.items()}


def jitter(m: Measurements) -> float:
    """Frame-to-frame instability no smooth motion explains: RMS second differences (per frame^2) of
    the head track (percent of the frame size) plus those of the face's brightness (percent of full
    scale). Ground-truth renders sit at measurement noise (well under 1)."""
    if m.frames < 3:
        return 0.0
    pos = np.sqrt(np.mean(np.diff(m.head_x, 2) ** 2 + np.diff(m.head_y, 2) ** 2))
    colour = np.sqrt(np.mean(np.diff(m.raw["skin_track"], 2) ** 2)) / 255.0
    return float(100.0 * (pos + colour))


def ground_truth_measurements(identity: IdentityParams | dict, size: int, fps: float = 25.0) -> Measurements:
    """What the oracle measures on the identity itself rendered neutrally (the static ground truth)."""
    if isinstance(identity, dict):
        identity = IdentityParams.from_json(identity)
    return _ground_truth_measurements(identity, size, float(fps))


@lru_cache(maxsize=512)
def _ground_truth_measurements(identity: IdentityParams, size: int, fps: float) -> Measurements:
    frames = _render_poses(identity, size)[1 : 5 * 3 : 3]  # mouth poses at neutral width, eyes open
    return calibrate(measure(frames, fps), identity)


def score(
    measurements: Measurements,
    audio: np.ndarray | None = None,
    sample_rate: int = 16000,
    ground_truth_identity: IdentityParams | dict | None = None,
    reference_measurements: Measurements | None = None,
    *,
    phonemes: Sequence[Sequence[Any]] | None = None,
    max_offset: int = MAX_OFFSET,
) -> dict[str, float]:
    """Scores of one measured video.

    lipsync_* need `phonemes` (the json's timeline) or `audio`; identity_error and behaviour_error need
    `ground_truth_identity` (its json or IdentityParams) and/or `reference_measurements` (another video
    of the intended identity, e.g. its reference record): against the ground truth when given,
    otherwise against the reference (both are reported, *_ref for the reference, when both are given;
    behaviour needs a reference of at least MIN_BEHAVIOUR_FRAMES consecutive frames).
    jitter is always there; est_* are the habits estimated from this video. Lower is better for errors
    and jitter; higher for lipsync_corr / lipsync_conf; lipsync_offset (frames, > 0: video late) should
    be 0.
    """
    m = measurements
    out: dict[str, float] = {"jitter": jitter(m)}
    truth = None
    if ground_truth_identity is not None:
        truth = (IdentityParams.from_json(ground_truth_identity) if isinstance(ground_truth_identity, dict)
                 else ground_truth_identity)
        if m.calibrated_with != "ground_truth":
            m = calibrate(m, truth)
    expected = expected_brow = None
    if phonemes is not None or audio is not None:
        expected, source = expected_openness(m.frames, m.fps, phonemes=phonemes, audio=audio,
                                             sample_rate=sample_rate)
        out.update(lipsync(m, expected, max_offset))
        out["lipsync_from_audio"] = float(source == "audio")
    if phonemes is not None:
        expected_brow = stress_brow([(float(p[0]), float(p[1]), str(p[2])) for p in phonemes], m.frames, m.fps)
    habits = behaviour(m, expected, expected_brow)
    out.update({f"est_{k}": v for k, v in habits.items()})
    if truth is not None:
        gt = ground_truth_measurements(truth, m.size, m.fps)
        out["identity_error"] = identity_error(m, gt)
        out["behaviour_error"] = behaviour_error(habits, {k: getattr(truth, k) for k in BEHAVIOUR})
    if reference_measurements is not None:
        ref = reference_measurements
        keys = ("identity_error_ref", "behaviour_error_ref") if truth is not None else (
            "identity_error", "behaviour_error")
        out[keys[0]] = identity_error(m, ref)
        if ref.frames >= MIN_BEHAVIOUR_FRAMES:  # habits need a stretch of consecutive frames
            # no phonemes for the reference: compare percentile estimates with percentile estimates
            mine = behaviour(m)
            out[keys[1]] = behaviour_error(mine, behaviour(ref))
    return out


def score_batch(
    videos: Any,
    batch: dict[str, Any],
    *,
    sample_rate: int = 16000,
    fps: float = 25.0,
    use_references: bool = True,
) -> list[dict[str, float]]:
    """Score videos [B, 3, T, H, W] in [-1, 1] (generated ones, or batch["video"] itself) against a loader
    batch: its audio, and for synthetic clips its phoneme timelines and identity parameters; its
    references (identity_error against the reference, *_ref when the ground truth is there too)."""
    try:
        videos = videos.detach().cpu().numpy()
    except AttributeError:
        videos = np.asarray(videos)
    out = []
    for i in range(len(videos)):
        truth = (batch.get("identity_params") or [None] * len(videos))[i]
        phonemes = (batch.get("phonemes") or [None] * len(videos))[i]
        audio = None
        if phonemes is None and "audio" in batch:
            audio = np.asarray(batch["audio"][i].detach().cpu().numpy() if hasattr(batch["audio"][i], "detach")
                               else batch["audio"][i])
        m = analyze_video(videos[i], fps, identity=truth)
        ref = None
        if use_references and batch.get("reference") is not None:
            ref = analyze_video(batch["reference"][i], fps)
        out.append(score(m, audio, sample_rate, truth, ref, phonemes=phonemes))
    return out


def summarize(scores: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of every score over videos (NaN-skipping), e.g. for logging one number per metric."""
    keys = sorted({k for s in scores for k in s})
    out = {}
    for k in keys:
        vals = np.array([s[k] for s in scores if k in s], dtype=float)
        vals = vals[np.isfinite(vals)]
        out[k] = float(vals.mean()) if len(vals) else float("nan")
    return out
