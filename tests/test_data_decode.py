"""Decoding helpers of the loader against the plain reference computations they replace for speed."""

from __future__ import annotations

import io
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avatarforge.data.decode import _frame_indices, _wav_window, video_batch
from avatarforge.data.media import decode_wav, resample_audio


def _wav(audio: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(audio.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((audio * 32767).round().astype("<i2").tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("rate", [16000, 22050])
def test_wav_window_equals_a_slice_of_the_decoded_signal(channels: int, rate: int) -> None:
    data = _wav(np.random.default_rng(0).uniform(-1, 1, size=(8000, channels)), rate)
    audio, src = decode_wav(data)
    audio = resample_audio(audio, src, 16000)
    for start in (0, 123, len(audio) - 500, len(audio), len(audio) + 1000):
        expected = np.zeros(2000, np.float32)
        chunk = audio[start : start + 2000]
        expected[: len(chunk)] = chunk
        assert np.array_equal(_wav_window(data, start, 2000, 16000), expected), start


def test_wav_window_rejects_what_is_not_16_bit_pcm() -> None:
    with pytest.raises(ValueError, match="RIFF"):
        _wav_window(b"not a wav at all" * 10, 0, 10, 16000)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)  # 8-bit
        w.setframerate(16000)
        w.writeframes(bytes(100))
    with pytest.raises(ValueError, match="16-bit"):
        _wav_window(buf.getvalue(), 0, 10, 16000)


def _reference(frames: np.ndarray, size: int) -> torch.Tensor:
    """The per-clip conversion the loader used before batching it: [3, T, size, size] in [-1, 1]."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    side = min(h, w)
    x = x[..., (h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
    if side != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x / 127.5 - 1.0).clamp_(-1.0, 1.0).permute(1, 0, 2, 3)


def test_video_batch_matches_the_per_clip_conversion() -> None:
    rng = np.random.default_rng(1)
    square = [rng.integers(0, 256, size=(5, 16, 16, 3), dtype=np.uint8) for _ in range(3)]
    square[0][0, 0, 0] = (0, 255, 128)
    batch = video_batch(square, 16)
    assert batch.shape == (3, 3, 5, 16, 16) and batch.dtype == torch.float32 and batch.is_contiguous()
    assert torch.equal(batch, torch.stack([_reference(c, 16) for c in square]))  # the same bits
    assert float(batch.min()) == -1.0 and float(batch.max()) == 1.0
    wide = [rng.integers(0, 256, size=(4, 12, 20, 3), dtype=np.uint8) for _ in range(2)]
    assert torch.equal(video_batch(wide, 12), torch.stack([_reference(c, 12) for c in wide]))  # centre crop
    resized = video_batch(wide, 8)
    assert resized.shape == (2, 3, 4, 8, 8)
    assert torch.allclose(resized, torch.stack([_reference(c, 8) for c in wide]), atol=1e-5)
    mixed = video_batch([square[0][:4], wide[0]], 8)  # different geometries in one batch
    assert mixed.shape == (2, 3, 4, 8, 8)
    assert torch.allclose(mixed[1], _reference(wide[0], 8), atol=1e-5)


def test_frame_indices_match_numpy_rounding() -> None:
    rng = np.random.default_rng(2)
    for _ in range(2000):
        start, count, stride = int(rng.integers(0, 300)), int(rng.integers(1, 12)), int(rng.integers(1, 5))
        fps, src = float(rng.choice([25.0, 24.0, 12.5])), float(rng.choice([25.0, 29.97, 30.0, 60.0, 23.976]))
        n_src = int(rng.integers(1, 600))
        times = (start + np.arange(count) * stride) / fps
        expected = np.clip(np.round(times * src).astype(np.int64), 0, n_src - 1).tolist()
        assert _frame_indices(start, count, stride, fps, src, n_src) == expected


def test_pyav_libvpx_encoders_still_open_after_the_loader_is_imported(tmp_path) -> None:
    # decord's bundled libvpx is loaded RTLD_GLOBAL; if it comes first, PyAV's VP9 encoder fails to open.
    # A fresh interpreter, because this process may already have imported both in either order.
    code = (
        "import sys; from pathlib import Path; import avatarforge.data.decode; "
        "from tests.videos import write_video; "
        "write_video(Path(sys.argv[1]), codec='libvpx-vp9', width=80, height=64, fps=25, frames=3)"
    )
    out = tmp_path / "a.webm"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.stat().st_size > 0


def test_uint8_video_converts_later_to_the_same_bits() -> None:
    from avatarforge.data.pixels import _looked_up, float_video, unit_video

    every = torch.arange(256, dtype=torch.uint8)
    expected = (every.float() / 127.5 - 1.0)  # what video_batch's float path gives (see above)
    assert torch.equal(unit_video(every), expected) and torch.equal(_looked_up(every), expected)  # cpu, table
    rng = np.random.default_rng(3)
    square = [rng.integers(0, 256, size=(5, 16, 20, 3), dtype=np.uint8) for _ in range(3)]
    raw = video_batch(square, 16, uint8=True)  # centre crop, no resize: stays uint8, channels-first
    assert raw.dtype == torch.uint8 and raw.shape == (3, 3, 5, 16, 16) and raw.is_contiguous()
    assert torch.equal(unit_video(raw), video_batch(square, 16))
    cropped = [c[:, :, 2:18] for c in square]  # square frames: a channels-first view of the decoded ones
    view = video_batch(cropped, 16, uint8=True)
    assert view.shape == (3, 3, 5, 16, 16) and not view.is_contiguous()
    for convert in (unit_video, _looked_up):
        assert convert(view).is_contiguous() and torch.equal(convert(view), video_batch(square, 16))
    assert video_batch(square, 8, uint8=True).dtype == torch.float32  # a resize works in float
    mixed = video_batch([square[0][:, :, 2:18], square[1]], 16, uint8=True)  # one pre-cropped
    assert mixed.dtype == torch.uint8 and torch.equal(unit_video(mixed), video_batch([square[0], square[1]], 16))
    batch = {"video": raw, "reference": raw[:, :, :2], "audio": torch.zeros(3, 4), "key": ["a", "b", "c"]}
    out = float_video(batch)
    assert out["video"].dtype == out["reference"].dtype == torch.float32 and out["audio"] is batch["audio"]
    assert float_video(out) is out  # float batches (and anything else) pass through
