"""Contact sheets: rows of video frames tiled into one image, written as PNG by PyAV's encoder."""

from __future__ import annotations

import av
import numpy as np

GUTTER = 2  # pixels between tiles
BACKGROUND = 24  # grey level of gutters and of the tiles a short row leaves empty


def thumbnails(frames: np.ndarray, side: int) -> np.ndarray:
    """uint8 [T, H, W, 3] -> [T, side, side, 3] (swscale area resampling; non-square frames are squashed)."""
    if frames.shape[1:3] == (side, side):
        return frames
    return np.stack([
        av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
        .reformat(width=side, height=side, interpolation="AREA").to_ndarray(format="rgb24")
        for f in frames
    ])


def tile(rows: list[np.ndarray]) -> np.ndarray:
    """Rows of equally sized frames [T_i, S, S, 3] -> one uint8 image, a row per entry, a column per frame."""
    if not rows:
        raise ValueError("a contact sheet needs at least one row")
    side = rows[0].shape[1]
    cols = max(len(r) for r in rows)
    height = len(rows) * side + (len(rows) + 1) * GUTTER
    width = cols * side + (cols + 1) * GUTTER
    sheet = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    for i, row in enumerate(rows):
        y = GUTTER + i * (side + GUTTER)
        for j, frame in enumerate(row):
            x = GUTTER + j * (side + GUTTER)
            sheet[y : y + side, x : x + side] = frame
    return sheet


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] RGB -> PNG file bytes."""
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = image.shape[1], image.shape[0], "rgb24"
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
    packets = codec.encode(frame) + codec.encode(None)
    return b"".join(bytes(p) for p in packets)
