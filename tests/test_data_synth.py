"""The v0 synthetic world: index contents, determinism, lip sync of the ground truth, codec round trip."""

from __future__ import annotations

import io
import json
import tarfile
import wave
from pathlib import Path

import numpy as np
import pytest

from avatarforge.data.config import SynthConfig
from avatarforge.data.index import read_index
from avatarforge.data.media import decode_wav, open_video, read_frames
from avatarforge.data.synth import dataset_exists, generate_dataset
from avatarforge.data.synth.clip import make_clip
from avatarforge.data.synth.identity import caption, sample_identity, sample_scene
from avatarforge.data.synth.render import MOUTH_RGB, background, render_frame

SIZE, FPS, SR = 32, 25.0, 16000
SYNTH = SynthConfig(
    identities=3, heldout_identities=1, clips_per_identity=2, clip_seconds=0.8, shard_size=4, workers=1
)


def _generate(root: Path, synth: SynthConfig = SYNTH) -> dict:
    return generate_dataset(str(root), synth, size=SIZE, fps=FPS, sample_rate=SR)


def _samples(root: Path, split: str) -> list[dict[str, bytes]]:
    """Members of every shard, grouped per key, in shard and tar order (stdlib tarfile: an independent reader)."""
    out: dict[str, dict[str, bytes]] = {}
    for name in read_index(root, split)["shards"]:
        with tarfile.open(root / split / name) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                out.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    return list(out.values())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth")
    return root, _generate(root)


def test_index_contents(dataset: tuple[Path, dict]) -> None:
    root, indexes = dataset
    assert set(indexes) == {"train", "heldout"}
    train, heldout = read_index(root, "train"), read_index(root, "heldout")
    assert train == indexes["train"] and heldout == indexes["heldout"]
    assert train["shards"] == ["clips-000000.tar", "clips-000001.tar"] and train["counts"] == [4, 2]
    assert train["total"] == 6 and heldout["total"] == 2 and heldout["shards"] == ["clips-000000.tar"]
    assert train["identities"] == ["id0000", "id0001", "id0002"] and heldout["identities"] == ["id0003"]
    assert train["fps"] == FPS and train["size"] == SIZE and train["frames_per_clip"] == 20
    assert train["duration_seconds"] == pytest.approx(6 * 0.8)
    assert train["schema_version"] == 1
    assert all((root / "train" / s).is_file() for s in train["shards"])
    assert dataset_exists(str(root))


def test_dataset_exists_detects_missing_pieces(tmp_path: Path, dataset: tuple[Path, dict]) -> None:
    assert not dataset_exists(str(tmp_path))
    root, _ = dataset
    copy = tmp_path / "copy"
    for split in ("train", "heldout"):
        (copy / split).mkdir(parents=True)
        for f in (root / split).iterdir():
            (copy / split / f.name).write_bytes(f.read_bytes())
    assert dataset_exists(str(copy))
    (copy / "train" / "clips-000001.tar").unlink()
    assert not dataset_exists(str(copy))


def test_samples_are_well_formed_and_grouped_by_identity(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    samples = _samples(root, "train")
    keys = [s["__key__"] for s in samples]
    assert keys == ["id0000-0000", "id0000-0001", "id0001-0000", "id0001-0001", "id0002-0000", "id0002-0001"]
    for s in samples:
        assert set(s) == {"__key__", "json", "mp4", "wav"}
        meta = json.loads(s["json"])
        assert meta["identity"] == s["__key__"][:6] and meta["frames"] == 20 and meta["fps"] == FPS
        assert meta["sample_rate"] == SR and len(meta["mouth_open"]) == 20 and meta["schema_version"] == 1
        assert meta["identity_params"] == sample_identity(0, int(meta["identity"][2:])).to_json()
        ident = meta["identity_params"]
        assert ident["hair_colour"] in meta["caption"] or ident["hair_style"] == "bald"
        assert meta["scene"]["colour"] in meta["caption"]
        with wave.open(io.BytesIO(s["wav"])) as w:
            assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, SR, 12800)
        reader = open_video(s["mp4"])
        assert len(reader) == 20 and reader.get_avg_fps() == pytest.approx(FPS)
        assert reader[0].shape == (SIZE, SIZE, 3)


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    again = tmp_path / "again"
    _generate(again)
    for split in ("train", "heldout"):
        for shard in read_index(root, split)["shards"]:
            assert (again / split / shard).read_bytes() == (root / split / shard).read_bytes()
        assert (again / split / "index.json").read_bytes() == (root / split / "index.json").read_bytes()
    other = tmp_path / "other"
    _generate(other, SynthConfig(**{**SYNTH.__dict__, "seed": 1}))
    assert _samples(other, "train")[0]["json"] != _samples(root, "train")[0]["json"]


def test_parallel_generation_matches_serial(tmp_path: Path, dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    _generate(tmp_path, SynthConfig(**{**SYNTH.__dict__, "workers": 2}))
    for split in ("train", "heldout"):
        for shard in read_index(root, split)["shards"]:
            assert (tmp_path / split / shard).read_bytes() == (root / split / shard).read_bytes()


def test_mouth_follows_audio_envelope(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    hop = int(SR / FPS)
    for s in _samples(root, "train") + _samples(root, "heldout"):
        meta = json.loads(s["json"])
        audio, rate = decode_wav(s["wav"])
        assert rate == SR
        rms = np.sqrt((audio[: 20 * hop].reshape(20, hop) ** 2).mean(axis=1))
        mouth = np.asarray(meta["mouth_open"])
        assert mouth.max() > 0.2 and mouth.min() < 0.1  # it actually opens and closes
        assert np.corrcoef(rms, mouth)[0, 1] > 0.8, s["__key__"]


def test_decoded_video_matches_rendered_frames(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    sample = _samples(root, "train")[3]  # id0001-0001
    ident = sample_identity(0, 1)
    encoded, frames = make_clip(ident, 1, 1, seed=0, seconds=0.8, size=SIZE, fps=FPS, sample_rate=SR)
    assert encoded["json"] == sample["json"]  # rendering is a pure function of (seed, identity, clip)
    decoded = read_frames(open_video(sample["mp4"]), 0, 20, FPS)
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(np.float32) - frames.astype(np.float32)).mean() < 10.0


def test_rendered_mouth_opens_with_mouth_parameter() -> None:
    ident, scene = sample_identity(0, 2), sample_scene(0, 2, 0)
    bg = background(scene, 64)

    def mouth_pixels(opening: float) -> int:
        frame = render_frame(ident, bg, opening, 1.0, 0.0, 0.0).astype(np.int32)
        return int((np.abs(frame - np.asarray(MOUTH_RGB)).sum(axis=-1) < 40).sum())

    closed, half, wide = mouth_pixels(0.0), mouth_pixels(0.5), mouth_pixels(1.0)
    assert closed < half < wide and wide > 40


def test_identities_differ_and_are_deterministic() -> None:
    a, b = sample_identity(0, 0), sample_identity(0, 0)
    assert a == b
    people = [sample_identity(0, i).to_json() for i in range(12)]
    assert (
        len({json.dumps({k: v for k, v in p.items() if k != "name"}, sort_keys=True) for p in people}) == 12
    )
    assert sample_identity(1, 0) != a


def test_captions_fit_default_text_length() -> None:
    captions = [caption(sample_identity(s, i), sample_scene(s, i, 0)) for s in range(3) for i in range(200)]
    assert max(len(c.encode()) for c in captions) <= 96
    assert any("glasses" in c for c in captions) and any("bald" in c for c in captions)
