"""Raw sample bytes -> training arrays: decord video crop, aligned wav window, tokenized caption.

A decoded sample keeps its frames as decord's uint8 [T, H, W, 3]; `collate` converts a whole batch to
float (crop, resize, scale) in one pass, which costs less than converting clip by clip (or, for a train
loader with data.video_uint8, only crops to channels-first uint8: the trainer converts on its device).
Identity references are decoded once per identity and process (all frames, when they fit a memory budget) and
cached, since every clip of the identity reads a window of the same record.

Only our own decoders touch shard bytes (json, wav, mp4); nothing from a shard is ever unpickled.
"""

from __future__ import annotations

import io
import math
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

# PyAV before decord: decord loads its bundled FFmpeg/libvpx with RTLD_GLOBAL, and PyAV's libvpx
# encoders opened after that bind to the old libvpx and fail (avcodec_open2 EINVAL).
import av  # noqa: F401
import decord
import numpy as np
import torch
import torch.nn.functional as F
from pydantic_core import from_json

from .media import decode_wav, open_video, resample_audio
from .pixels import to_unit
from .seeding import derive_seed
from .stream import REFERENCES, reference_for
from .tokenizer import encode

REQUIRED = ("json", "mp4", "wav")
_CPU = decord.cpu(0)  # one decord context object, not one per clip


class BadSample(ValueError):
    """A sample that cannot be used (missing member, undecodable media, unusable metadata)."""


@dataclass(frozen=True)
class ClipSpec:
    frames: int
    size: int
    fps: float
    sample_rate: int
    text_max_len: int
    reference_frames: int = 0  # 0: no reference in the sample
    reference_stride: int = 1
    # the json field read as the text ("scene_caption": data.captions scene); two: one at random per training
    # crop, the first in evaluation (data.captions mixed)
    caption_keys: tuple[str, ...] = ("caption",)
    tokenizer: str = "bytes"  # data.tokenizer (data/tokenizer.py)
    word_ids: int = 4096  # data.word_ids: ids of the "words" tokenizer

    @property
    def audio_len(self) -> int:
        return int(round(self.frames / self.fps * self.sample_rate))

    @property
    def reference_audio_len(self) -> int:
        return int(round(self.reference_frames * self.reference_stride / self.fps * self.sample_rate))


def _metadata(data: bytes) -> dict[str, Any]:
    try:
        meta = from_json(data)  # pydantic-core's parser: the same values as json.loads, ~4x faster
    except ValueError as exn:
        raise BadSample(f"json: {exn}") from exn
    if not isinstance(meta, dict) or not isinstance(meta.get("caption"), str):
        raise BadSample("json: not an object with a string 'caption'")
    return meta


def _draw(seed: int, n: int) -> int:
    """A uniform draw from range(n) for a derive_seed() value (63 hashed bits, so the modulo bias is
    nil); a numpy Generator per clip would cost more than the rest of the clip's bookkeeping."""
    return seed % n


def _target_frames(n_src: int, src_fps: float, fps: float) -> int:
    """media.target_frame_count from a reader's length and fps already read."""
    return max(1, math.floor(n_src / src_fps * fps + 1e-6))


def _frame_indices(start: int, count: int, stride: int, fps: float, src_fps: float, n_src: int) -> list[int]:
    """Source frame indices of `count` target-fps frames, `stride` apart from target frame `start`;
    frames past the end repeat the last one (see media.read_frames)."""
    # plain floats: numpy's per-call overhead exceeds the arithmetic for a handful of frames; round()
    # rounds half to even like np.round
    return [min(max(round((start + i * stride) / fps * src_fps), 0), n_src - 1) for i in range(count)]


def video_batch(clips: list[np.ndarray], size: int, *, uint8: bool = False) -> torch.Tensor:
    """uint8 clips [T, H, W, 3] -> float32 [B, 3, T, size, size] in [-1, 1]; non-square frames are
    centre-cropped, other sizes resized (bilinear, antialiased).

    uint8=True: the same frames left as uint8 [B, 3, T, size, size] (0..255) for the consumer to convert
    (pixels.float_video), when no clip needs a resize; a batch that does is float as above. Square frames
    come as a channels-first view of the decoded [B, T, size, size, 3] (dense, not contiguous: a copy to
    the device keeps its layout and the conversion there makes it contiguous).
    """
    if uint8 and any(min(c.shape[1:3]) != size for c in clips):
        uint8 = False  # resizing works in float: this batch is delivered converted
    if len({c.shape for c in clips}) > 1:  # mixed geometry (rare): convert clip by clip
        return torch.cat([video_batch([c], size, uint8=uint8) for c in clips])
    t, h, w, _ = clips[0].shape
    if uint8 and h == w:  # nothing to crop: the frames as decoded, viewed channels-first (no transpose copy)
        return torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3)
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    # Per clip, while its bytes are in cache: crop and go channels-first in uint8 (a quarter of the bytes
    # of float), then x / 127.5 - 1 with numpy ufuncs straight into the batch. Measured ~1.5-2x faster than
    # torch's float() / div_ / sub_ over the stacked batch; the values are the same bits.
    x = np.empty((len(clips), 3, t, side, side), dtype=np.uint8 if uint8 else np.float32)
    for i, clip in enumerate(clips):
        planar = clip[:, top : top + side, left : left + side, :].transpose(3, 0, 1, 2)
        if uint8:
            x[i] = planar
        else:
            to_unit(np.ascontiguousarray(planar), x[i])
    if side == size:
        return torch.from_numpy(x)
    y = torch.from_numpy(x).transpose(1, 2).reshape(len(clips) * t, 3, side, side)
    y = F.interpolate(y, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp_(-1.0, 1.0)
    return y.reshape(len(clips), t, 3, size, size).transpose(1, 2).contiguous()


@lru_cache(maxsize=4096)
def _tokens(caption: str, max_len: int, tokenizer: str, word_ids: int) -> tuple[np.ndarray, np.ndarray]:
    """Captions repeat across an identity's clips: tokenise each once (read-only arrays, copied by
    collate's stack)."""
    ids, mask = encode(caption, max_len, tokenizer, word_ids)
    ids_np, mask_np = ids.numpy(), mask.numpy()
    ids_np.flags.writeable = mask_np.flags.writeable = False
    return ids_np, mask_np


def _pcm16_layout(data: bytes) -> tuple[int, int, int, int]:
    """(channels, rate, offset, byte length) of the samples of 16-bit PCM wav bytes. A few slices instead
    of the `wave` module's chunk objects; like `wave` (3.11), only plain PCM is accepted."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE file")
    pos, fmt = 12, None
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        body = pos + 8
        if chunk == b"fmt ":
            if size < 16 or body + 16 > len(data):
                raise ValueError("truncated fmt chunk")
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", data, body)
            if tag != 1 or bits != 16 or channels < 1:
                raise ValueError(f"only 16-bit PCM wav is supported, got format {tag}, {bits}-bit, {channels} ch")
            fmt = (channels, rate)
        elif chunk == b"data":
            if fmt is None:
                raise ValueError("data chunk before fmt chunk")
            return fmt[0], fmt[1], body, min(size, len(data) - body)
        pos = body + size + (size & 1)
    raise ValueError("no data chunk")


def _wav_window(data: bytes, start: int, length: int, sample_rate: int) -> np.ndarray:
    """float32 [length] from sample `start` (at `sample_rate`) of 16-bit PCM wav bytes, zero-padded past
    the end. At the stored rate only the window's frames are converted; other rates go through
    media.decode_wav + resample_audio on the whole signal."""
    channels, rate, offset, nbytes = _pcm16_layout(data)
    frame = 2 * channels
    n = max(0, min(length, nbytes // frame - start))
    window = np.empty(length, dtype=np.float32)
    window[n:] = 0.0  # zero padding past the end (usually nothing)
    if rate != sample_rate:
        audio, rate = decode_wav(data)
        chunk = resample_audio(audio, rate, sample_rate)[start : start + length]
        window[: len(chunk)] = chunk
        window[len(chunk) :] = 0.0
    elif n and channels == 1:
        pcm = np.frombuffer(data, dtype="<i2", count=n, offset=offset + start * frame)
        # the same values as media.decode_wav (dividing by 2**15 is exact), so a window equals its slice
        np.divide(pcm, np.float32(32768.0), out=window[:n], dtype=np.float32)
    elif n:
        pcm = np.frombuffer(data, dtype="<i2", count=n * channels, offset=offset + start * frame)
        window[:n] = (pcm.reshape(-1, channels).astype(np.float32).mean(axis=1) / 32768.0).astype(np.float32)
    return window


def decode_clip(raw: dict[str, Any], spec: ClipSpec, *, crop_seed: int | None) -> dict[str, Any]:
    """One sample's arrays (frames still uint8, see `collate`). crop_seed=None takes the first `frames`
    frames (evaluation)."""
    missing = [k for k in REQUIRED if not raw.get(k)]
    if missing:
        raise BadSample(f"missing or empty member(s): {', '.join(missing)}")
    meta = _metadata(raw["json"])
    try:
        reader = decord.VideoReader(io.BytesIO(raw["mp4"]), ctx=_CPU, num_threads=1)  # as media.open_video
        n_src, src_fps = len(reader), float(reader.get_avg_fps()) or spec.fps
        n_frames = _target_frames(n_src, src_fps, spec.fps)
        start = 0 if crop_seed is None else _draw(crop_seed, max(0, n_frames - spec.frames) + 1)
        frames = reader.get_batch(_frame_indices(start, spec.frames, 1, spec.fps, src_fps, n_src)).asnumpy()
    except Exception as exn:  # decord raises RuntimeError/DECORDError for anything it cannot parse
        raise BadSample(f"mp4: {type(exn).__name__}: {str(exn)[:160]}") from exn
    try:
        audio = _wav_window(raw["wav"], int(round(start / spec.fps * spec.sample_rate)), spec.audio_len,
                            spec.sample_rate)
    except Exception as exn:  # wave raises several unrelated types on garbage
        raise BadSample(f"wav: {type(exn).__name__}: {exn}") from exn
    # a record without the field asked for (ingested footage has no scene caption) gets no text, as in
    # caption dropout, rather than being skipped
    key = spec.caption_keys[0 if crop_seed is None else (crop_seed >> 32) % len(spec.caption_keys)]
    text = meta["caption"] if key == "caption" else meta.get(key) or ""
    if not isinstance(text, str):
        raise BadSample(f"json: {key!r} is not a string")
    ids, mask = _tokens(text, spec.text_max_len, spec.tokenizer, spec.word_ids)
    out = {
        "frames": frames,
        "audio": audio,
        "text": ids,
        "text_mask": mask,
        "key": str(raw.get("__key__")),
        "identity": str(meta.get("identity", "")),
    }
    if spec.reference_frames > 0:
        out["reference_frames"], out["reference_audio"] = decode_reference(raw, meta, spec, crop_seed=crop_seed)
    # ground truth for the oracle (synthetic clips): the identity's parameters and the phoneme
    # timeline of this crop (times relative to its first frame); None for clips without them
    out["identity_params"] = meta.get("identity_params") if isinstance(meta.get("identity_params"), dict) else None
    out["phonemes"] = _crop_phonemes(meta.get("phonemes"), start / spec.fps, spec.frames / spec.fps)
    return out


def _crop_phonemes(phonemes: Any, t0: float, duration: float) -> list[list[Any]] | None:
    if not isinstance(phonemes, list):
        return None
    out = []
    for row in phonemes:
        if type(row) is not list or len(row) < 3:
            return None
        a, b = float(row[0]) - t0, float(row[1]) - t0
        if b > 0.0 and a < duration:
            out.append([round(max(a, 0.0), 5), round(min(b, duration), 5), *row[2:]])
    return out


@dataclass
class _Reference:
    """One identity reference, opened once per process: audio at the loader's rate, and either all frames
    decoded (uint8 [n_src, H, W, 3]) or, past the memory budget, an open reader to seek per clip."""

    n_frames: int  # at the loader's fps
    src_fps: float
    n_src: int
    audio: np.ndarray
    frames: np.ndarray | None
    reader: Any
    nbytes: int


# The decoded references of the identities this process met last. A worker streams one shard at a time
# and a shard groups its identities' clips, so the clips of a reference arrive close together (shuffled
# within the shard): decoding its frames once replaces a keyframe seek per clip. Sized by bytes; the
# entry limit only needs to exceed the identities of one shard.
_REFERENCE_CACHE: OrderedDict[tuple[str, str, int, int], _Reference] = OrderedDict()
_REFERENCE_CACHE_SIZE = 64
_REFERENCE_CACHE_BYTES = 256 << 20  # decoded frames held per process; bigger references are read per clip
_CACHE_PID = os.getpid()
# A forked DataLoader worker must never use (or free) decord readers its parent opened: decord's
# decoder threads do not survive fork and the call hangs. Such inherited caches are parked here.
_INHERITED_CACHES: list[Any] = []


def _reference_cache() -> OrderedDict:
    global _REFERENCE_CACHE, _CACHE_PID
    if _CACHE_PID != os.getpid():
        _INHERITED_CACHES.append(_REFERENCE_CACHE)
        _REFERENCE_CACHE, _CACHE_PID = OrderedDict(), os.getpid()
    return _REFERENCE_CACHE


def _open_reference(record: dict[str, Any], spec: ClipSpec) -> _Reference:
    mp4, wav = record.get("ref.mp4"), record.get("ref.wav")
    if not mp4 or not wav:
        raise BadSample(f"reference {record.get('__key__')}: missing ref.mp4 or ref.wav")
    key = (str(record.get("__url__")), str(record.get("__key__")), len(mp4), spec.sample_rate)
    cache = _reference_cache()
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
        return hit
    try:
        audio, rate = decode_wav(wav)
    except Exception as exn:
        raise BadSample(f"reference wav: {type(exn).__name__}: {exn}") from exn
    try:
        reader = open_video(mp4)
        n_src, src_fps = len(reader), float(reader.get_avg_fps()) or spec.fps
        first = reader.get_batch([0]).asnumpy()
        nbytes = n_src * first.nbytes
        frames = None
        if nbytes <= _REFERENCE_CACHE_BYTES:
            frames, reader = reader.get_batch(list(range(n_src))).asnumpy(), None
    except Exception as exn:
        raise BadSample(f"reference mp4: {type(exn).__name__}: {str(exn)[:160]}") from exn
    entry = _Reference(
        n_frames=_target_frames(n_src, src_fps, spec.fps), src_fps=src_fps, n_src=n_src,
        audio=resample_audio(audio, rate, spec.sample_rate), frames=frames, reader=reader,
        nbytes=nbytes if frames is not None else 0,
    )
    cache[key] = entry
    while len(cache) > _REFERENCE_CACHE_SIZE or (
        len(cache) > 1 and sum(e.nbytes for e in cache.values()) > _REFERENCE_CACHE_BYTES
    ):
        cache.popitem(last=False)
    return entry


def decode_reference(
    raw: dict[str, Any], meta: dict[str, Any], spec: ClipSpec, *, crop_seed: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """The clip's identity reference: (uint8 frames [reference_frames, H, W, 3], audio of the span).

    Frames are `reference_stride` apart from a start drawn from crop_seed (0 for eval); the audio covers
    reference_frames * reference_stride frames from the same start, zero-padded past the record's end.
    """
    identity = meta.get("identity")
    record = reference_for(raw.get(REFERENCES, []), identity) if isinstance(identity, str) else None
    if record is None:
        raise BadSample(f"no reference record for identity {identity!r} in this shard")
    ref = _open_reference(record, spec)
    span = (spec.reference_frames - 1) * spec.reference_stride + 1
    start = 0
    if crop_seed is not None and ref.n_frames > span:
        start = _draw(derive_seed("reference", crop_seed), ref.n_frames - span + 1)
    idx = _frame_indices(start, spec.reference_frames, spec.reference_stride, spec.fps, ref.src_fps, ref.n_src)
    if ref.frames is not None:
        frames = ref.frames[idx]
    else:
        try:
            frames = ref.reader.get_batch(idx).asnumpy()
        except Exception as exn:
            raise BadSample(f"reference mp4: {type(exn).__name__}: {str(exn)[:160]}") from exn
    a0 = int(round(start / spec.fps * spec.sample_rate))
    window = np.zeros(spec.reference_audio_len, dtype=np.float32)
    chunk = ref.audio[a0 : a0 + spec.reference_audio_len]
    window[: len(chunk)] = chunk
    return frames, window


def collate(samples: list[dict[str, Any]], skipped: int, size: int, *, uint8: bool = False) -> dict[str, Any]:
    """Decoded samples -> a batch (video and reference converted to float here, once per batch; or, with
    uint8=True, left as uint8 for the trainer to convert, see video_batch)."""
    batch = {
        "video": video_batch([s["frames"] for s in samples], size, uint8=uint8),
        "audio": torch.from_numpy(np.stack([s["audio"] for s in samples])),
        "text": torch.from_numpy(np.stack([s["text"] for s in samples])),
        "text_mask": torch.from_numpy(np.stack([s["text_mask"] for s in samples])),
        "key": [s["key"] for s in samples],
        "identity": [s["identity"] for s in samples],
        "identity_params": [s.get("identity_params") for s in samples],
        "phonemes": [s.get("phonemes") for s in samples],
        "skipped": skipped,
    }
    if all("reference_frames" in s for s in samples):
        batch["reference"] = video_batch([s["reference_frames"] for s in samples], size, uint8=uint8)
        batch["reference_audio"] = torch.from_numpy(np.stack([s["reference_audio"] for s in samples]))
    return batch
