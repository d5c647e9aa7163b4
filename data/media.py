"""Media codecs for samples: H.264 mp4 via PyAV (encode) and decord (decode), 16-bit PCM wav via `wave`.

Everything works on in-memory bytes, so shard members never touch the filesystem.
"""

from __future__ import annotations

import io
import wave
from fractions import Fraction

# Order matters: decord loads its bundled FFmpeg/libvpx with RTLD_GLOBAL; PyAV loaded after it binds
# its libvpx encoders to decord's older libvpx (avcodec_open2 EINVAL). Import av first everywhere.
import av
import decord
import numpy as np


def encode_mp4(frames: np.ndarray, fps: float, *, crf: int = 12, gop: int | None = None) -> bytes:
    """uint8 frames [T, H, W, 3] (RGB) -> H.264 yuv420p mp4 bytes.

    A low crf keeps flat synthetic colours within a few levels after the 4:2:0 round trip; one x264
    thread makes the bytes reproducible (parallelism comes from encoding many clips at once).
    gop sets the keyframe interval (x264's default is 250): long references that are read at random
    positions use a short one, so a seek decodes at most `gop` frames.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 [T, H, W, 3] frames, got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {width}x{height}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        options = {"crf": str(crf), "threads": "1", **({"g": str(gop)} if gop else {})}
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001), options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), "rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def open_video(data: bytes) -> decord.VideoReader:
    """A decord reader over mp4 bytes; one thread because loader workers already run in parallel."""
    return decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)


def read_frames(reader: decord.VideoReader, start: int, count: int, fps: float) -> np.ndarray:
    """`count` frames at the target fps starting at target-frame `start`, resampled from the source fps.

    Frames past the end repeat the last one, so a slightly short clip still yields a full window.
    """
    src_fps = float(reader.get_avg_fps()) or fps
    times = (start + np.arange(count)) / fps
    idx = np.clip(np.round(times * src_fps).astype(np.int64), 0, len(reader) - 1)
    return reader.get_batch(idx.tolist()).asnumpy()


def target_frame_count(reader: decord.VideoReader, fps: float) -> int:
    """How many frames the clip has when resampled to `fps`."""
    src_fps = float(reader.get_avg_fps()) or fps
    return max(1, int(np.floor(len(reader) / src_fps * fps + 1e-6)))


def encode_wav(audio: np.ndarray, sample_rate: int) -> bytes:
    """Mono float audio in [-1, 1] -> 16-bit PCM wav bytes."""
    pcm = (np.clip(np.asarray(audio, dtype=np.float64), -1.0, 1.0) * 32767.0).round().astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """16-bit PCM wav bytes -> (mono float32 in [-1, 1], sample_rate); channels are averaged."""
    with wave.open(io.BytesIO(data), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"only 16-bit PCM wav is supported, got {8 * w.getsampwidth()}-bit")
        channels, rate = w.getnchannels(), w.getframerate()
        raw = w.readframes(w.getnframes())
    pcm = np.frombuffer(raw, dtype="<i2")
    pcm = pcm[: len(pcm) - len(pcm) % channels].reshape(-1, channels)
    return (pcm.astype(np.float32).mean(axis=1) / 32768.0).astype(np.float32), rate


def resample_audio(audio: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Linear-interpolation resampling; enough for the rare off-rate clip (ingest normalises rates)."""
    if src_rate == dst_rate or len(audio) == 0:
        return audio
    n_out = int(round(len(audio) * dst_rate / src_rate))
    t_out = np.arange(n_out) * (src_rate / dst_rate)
    return np.interp(t_out, np.arange(len(audio)), audio).astype(np.float32)
