"""Test videos encoded with PyAV: any codec/container, odd sizes, (variable) frame rates, audio layouts."""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

Painter = Callable[[int, float], np.ndarray]  # (frame index, time in s) -> uint8 [H, W, 3]


def grey(width: int, height: int, step: int = 3, base: int = 30) -> Painter:
    """Flat frames whose grey level encodes the frame index (level = base + step * i)."""
    return lambda i, t: np.full((height, width, 3), (base + step * i) % 256, np.uint8)


def tone(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_video(
    path: Path, *, codec: str, width: int, height: int, fps: float, frames: int,
    paint: Painter | None = None, times: Sequence[float] | None = None, audio: np.ndarray | None = None,
    audio_codec: str = "aac", rate: int = 48000, layout: str = "stereo", pix_fmt: str | None = None,
    container: str | None = None,
) -> Path:
    """Encode a video. `times` gives each frame's presentation time (variable frame rate) instead of i/fps;
    `audio` is mono float32 at `rate`, written to every channel of `layout`."""
    paint = paint or grey(width, height)
    with av.open(str(path), "w", format=container) as out:
        video = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        video.width, video.height = width, height
        video.pix_fmt = pix_fmt or ("yuvj420p" if codec == "mjpeg" else "yuv420p")
        if times is not None:
            video.codec_context.time_base = video.time_base = Fraction(1, 1000)
        stream_audio = out.add_stream(audio_codec, rate=rate, layout=layout) if audio is not None else None
        for i in range(frames):
            t = times[i] if times is not None else i / fps
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(paint(i, t)), format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = int(round(t * 1000)), Fraction(1, 1000)
            out.mux(video.encode(frame))
        out.mux(video.encode())
        if stream_audio is not None:
            channels = 1 if layout == "mono" else 2
            for start in range(0, len(audio), 1000):
                chunk = np.ascontiguousarray(np.tile(audio[start : start + 1000], (channels, 1)))
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
                frame.sample_rate, frame.pts = rate, start
                out.mux(stream_audio.encode(frame))
            out.mux(stream_audio.encode())
    return path


def set_mp4_rotation(path: Path) -> None:
    """Give an mp4's first track the display matrix phones write for portrait footage (FFmpeg: -90 deg)."""
    data = bytearray(path.read_bytes())
    at = data.index(b"tkhd")
    version = data[at + 4]
    matrix = at + 8 + (32 if version == 1 else 20) + 16  # past times, ids, duration, layer, volume
    data[matrix : matrix + 36] = struct.pack(">9i", 0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30)
    path.write_bytes(data)
