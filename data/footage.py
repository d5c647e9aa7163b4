"""Real footage -> fixed-length clips: constant-rate square frames and 16 kHz mono audio, via PyAV.

Variable frame rate is the normal case for phone and screen recordings, so frames are never counted:
each output tick (origin + k / fps) takes the decoded frame whose presentation time is nearest. Audio is
decoded first (cheap, and a video without usable audio is rejected before any video decoding); the video
is then streamed, so memory holds one clip of output-size frames whatever the source length.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import av
import numpy as np


class SkipSource(Exception):
    """A source that yields no clips; the message is the one-line reason shown in the ingest report."""


@dataclass(frozen=True)
class CutSpec:
    clip_frames: int
    fps: float
    size: int  # output side in pixels (even, for yuv420p)
    sample_rate: int

    @property
    def clip_seconds(self) -> float:
        return self.clip_frames / self.fps

    @property
    def clip_samples(self) -> int:
        return int(round(self.clip_seconds * self.sample_rate))


@dataclass(frozen=True)
class Box:
    """A crop region in displayed (rotation-applied) source pixels."""

    x: float
    y: float
    w: float
    h: float


@dataclass
class Clip:
    index: int
    start: float  # seconds on the source's timeline
    frames: np.ndarray  # uint8 [clip_frames, size, size, 3] RGB
    audio: np.ndarray  # int16 [clip_samples] mono


@dataclass
class CutStats:
    """Filled in while cutting: what the source held, and what went wrong without stopping it."""

    audio_seconds: float = 0.0
    video_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Audio:
    pcm: np.ndarray  # int16 mono
    start: float  # source time of pcm[0]
    rate: int

    @property
    def end(self) -> float:
        return self.start + len(self.pcm) / self.rate

    def window(self, start: float, n: int) -> np.ndarray:
        """n samples from source time `start`, zero-padded where the audio does not reach."""
        i0 = int(round((start - self.start) * self.rate))
        out = np.zeros(n, dtype=np.int16)
        lo, hi = max(i0, 0), min(i0 + n, len(self.pcm))
        if hi > lo:
            out[lo - i0 : hi - i0] = self.pcm[lo:hi]
        return out


def brief(exn: BaseException) -> str:
    """One line for a report: exception type and the first line of its message."""
    text = str(exn).strip().splitlines()
    return f"{type(exn).__name__}: {text[0][:160]}" if text else type(exn).__name__


def _open(path: str) -> av.container.InputContainer:
    try:
        return av.open(path)
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exn:
        raise SkipSource(f"unreadable container ({brief(exn)})") from exn


def read_audio(path: str, sample_rate: int, stats: CutStats) -> _Audio:
    """The first audio stream as int16 mono at `sample_rate` (FFmpeg's resampler downmixes any layout)."""
    with _open(path) as container:
        if not container.streams.audio:
            raise SkipSource("no audio stream")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
        chunks: list[np.ndarray] = []
        start: float | None = None
        try:
            for frame in container.decode(stream):
                if start is None:
                    start = float(frame.time) if frame.time is not None else 0.0
                chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
        except av.FFmpegError as exn:
            if not chunks:
                raise SkipSource(f"audio undecodable ({brief(exn)})") from exn
            stats.warnings.append(f"audio cut short by a decode error ({brief(exn)})")
        chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    pcm = np.concatenate(chunks).astype(np.int16) if chunks else np.zeros(0, np.int16)
    if start is None or len(pcm) == 0:
        raise SkipSource("audio stream holds no samples")
    audio = _Audio(pcm, start, sample_rate)
    stats.audio_seconds = len(pcm) / sample_rate
    return audio


def square_crop(width: int, height: int, box: Box | None) -> tuple[int, int, int]:
    """(x, y, side) of the square to cut: centred, or around `box` (grown to a square so faces keep their
    aspect ratio, shifted to stay inside the frame)."""
    limit = min(width, height)
    if box is None:
        return (width - limit) // 2, (height - limit) // 2, limit
    cx, cy = box.x + box.w / 2, box.y + box.h / 2
    if not (0 <= cx < width and 0 <= cy < height):
        raise SkipSource(f"crop box centre ({cx:.0f}, {cy:.0f}) lies outside the {width}x{height} frame")
    side = int(min(limit, max(2, round(max(box.w, box.h)))))
    x = int(np.clip(round(cx - side / 2), 0, width - side))
    y = int(np.clip(round(cy - side / 2), 0, height - side))
    return x, y, side


def square_frame(frame: av.VideoFrame, box: Box | None, size: int) -> np.ndarray:
    """A decoded frame -> uint8 [size, size, 3] RGB: display rotation applied, cropped, resized by swscale."""
    rgb = frame.to_ndarray(format="rgb24")
    quarter_turns = int(round((frame.rotation or 0) / 90)) % 4  # counter-clockwise, as np.rot90 turns
    if quarter_turns:
        rgb = np.rot90(rgb, quarter_turns)
    x, y, side = square_crop(rgb.shape[1], rgb.shape[0], box)
    crop = np.ascontiguousarray(rgb[y : y + side, x : x + side])
    if side == size:
        return crop
    resized = av.VideoFrame.from_ndarray(crop, format="rgb24").reformat(
        width=size, height=size, interpolation="AREA" if side > size else "BICUBIC"
    )
    return resized.to_ndarray(format="rgb24")


def _frame_seconds(frame: av.VideoFrame) -> float:
    return float(frame.duration * frame.time_base) if frame.duration and frame.time_base else 0.0


def _timed_frames(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                  stats: CutStats) -> Iterator[tuple[float, av.VideoFrame]]:
    """Decoded frames with strictly increasing presentation times (seconds); duplicates are dropped."""
    rate = stream.average_rate or stream.guessed_rate
    nominal = 1.0 / float(rate) if rate else None
    first = last = None
    duration = 0.0
    n = 0
    try:
        for frame in container.decode(stream):
            t = float(frame.time) if frame.time is not None else n * (nominal or 0.04)
            n += 1
            if last is not None and t <= last:
                continue
            duration = _frame_seconds(frame) or (t - last if last is not None else 0.0)
            first = t if first is None else first
            last = t
            stats.video_seconds = t + (duration or nominal or 0.0) - first
            yield t, frame
    except av.FFmpegError as exn:
        if first is None:
            raise SkipSource(f"video undecodable ({brief(exn)})") from exn
        stats.warnings.append(f"video cut short at {last:.2f}s by a decode error ({brief(exn)})")


def resample_ticks(frames: Iterator[tuple[float, av.VideoFrame]], fps: float, not_before: float,
                   until: float) -> Iterator[tuple[float, av.VideoFrame]]:
    """Constant-rate ticks origin + k / fps (origin = first frame time, or `not_before` if later), each with
    the frame whose time is nearest, while the tick lies inside the video and before `until`."""
    prev: tuple[float, av.VideoFrame] | None = None
    origin, k, step = 0.0, 0, 0.0
    for t, frame in frames:
        if prev is None:
            origin = max(t, not_before)
        else:
            midpoint = (prev[0] + t) / 2  # ticks before it are nearer to prev than to this frame
            while origin + k / fps < midpoint:
                if origin + k / fps >= until:
                    return  # stop decoding: nothing after `until` is used
                yield origin + k / fps, prev[1]
                k += 1
            step = t - prev[0]
        prev = (t, frame)
    if prev is None:
        return
    end = prev[0] + (_frame_seconds(prev[1]) or step or 1 / fps)  # the last frame shows for its duration
    while origin + k / fps < min(end - 1e-9, until):
        yield origin + k / fps, prev[1]
        k += 1


def cut_clips(path: str, spec: CutSpec, *, box: Box | None = None,
              stats: CutStats | None = None) -> Iterator[Clip]:
    """Consecutive clips of spec.clip_frames frames over the time both audio and video cover; a shorter
    tail is dropped. Raises SkipSource (before yielding anything) when the source gives no clip."""
    stats = stats if stats is not None else CutStats()
    audio = read_audio(path, spec.sample_rate, stats)
    with _open(path) as container:
        if not container.streams.video:
            raise SkipSource("no video stream")
        stream = container.streams.video[0]
        # a clip needs audio to its end; half a frame of zero-padding absorbs encoder rounding
        until = audio.end - 0.5 / spec.fps
        ticks = resample_ticks(_timed_frames(container, stream, stats), spec.fps, audio.start, until)
        frames: list[np.ndarray] = []
        start = 0.0
        index = 0
        last_src: av.VideoFrame | None = None
        last_img: np.ndarray | None = None
        for t, src in ticks:
            if src is not last_src:  # a frame held over several ticks is converted once
                last_src, last_img = src, square_frame(src, box, spec.size)
            if not frames:
                start = t
            frames.append(last_img)
            if len(frames) == spec.clip_frames:
                yield Clip(index, start, np.stack(frames), audio.window(start, spec.clip_samples))
                index += 1
                frames = []
    if index == 0:
        raise SkipSource(
            f"shorter than one {spec.clip_seconds:g}s clip "
            f"(video {stats.video_seconds:.2f}s, audio {stats.audio_seconds:.2f}s)"
        )
