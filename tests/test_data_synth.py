"""The synthetic world: index contents, identity-grouped shards with references, determinism, speech-driven
mouths, ground truth in the json, codec round trip, identities, scenes and captions."""

from __future__ import annotations

import io
import json
import shutil
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
from avatarforge.data.synth.identity import (
    HAIR,
    ROOMS,
    SKIN,
    IdentityParams,
    Scene,
    caption,
    sample_identity,
    sample_scene,
)
from avatarforge.data.synth.motion import viseme_openness
from avatarforge.data.synth.render import MOUTH_RGB, background, render_frame
from avatarforge.data.synth.visemes import strip_stress, visemes_of

SIZE, FPS, SR = 32, 25.0, 16000
SYNTH = SynthConfig(
    identities=3, heldout_identities=1, clips_per_identity=2, clip_seconds=0.8, reference_seconds=1.2,
    shard_size=4, workers=1,
)


def _generate(root: Path, synth: SynthConfig = SYNTH) -> dict:
    return generate_dataset(str(root), synth, size=SIZE, fps=FPS, sample_rate=SR)


def _records(root: Path, split: str) -> list[tuple[str, dict[str, bytes]]]:
    """(shard name, record) in shard and tar order, references included (stdlib tarfile: an
    independent reader)."""
    out: list[tuple[str, dict[str, bytes]]] = []
    for name in read_index(root, split)["shards"]:
        with tarfile.open(root / split / name) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                if not out or out[-1][1]["__key__"] != key or out[-1][0] != name:
                    out.append((name, {"__key__": key}))
                out[-1][1][ext] = tar.extractfile(member).read()
    return out


def _samples(root: Path, split: str) -> list[dict[str, bytes]]:
    """The clips (reference records left out)."""
    return [r for _, r in _records(root, split) if "json" in r]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth")
    return root, _generate(root)


def test_index_contents(dataset: tuple[Path, dict]) -> None:
    root, indexes = dataset
    assert set(indexes) == {"train", "heldout"}
    train, heldout = read_index(root, "train"), read_index(root, "heldout")
    assert train == indexes["train"] and heldout == indexes["heldout"]
    # counts are clips only: references are not stream positions
    assert train["shards"] == ["clips-000000.tar", "clips-000001.tar"] and train["counts"] == [4, 2]
    assert train["total"] == 6 and heldout["total"] == 2 and heldout["shards"] == ["clips-000000.tar"]
    assert train["identities"] == ["id0000", "id0001", "id0002"] and heldout["identities"] == ["id0003"]
    assert train["fps"] == FPS and train["size"] == SIZE and train["frames_per_clip"] == 20
    assert train["duration_seconds"] == pytest.approx(6 * 0.8)
    assert train["schema_version"] == 1 and train["generator"]["name"] == "synth-v2"
    assert train["references"] == {f"id{i:04d}": f"id{i:04d}-reference" for i in range(3)}
    assert train["shard_references"] == [["id0000", "id0001"], ["id0002"]]
    assert train["reference_frames"] == 30 and heldout["references"] == {"id0003": "id0003-reference"}
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


def test_shards_group_identities_with_their_reference_first(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    order = [(shard, r["__key__"]) for shard, r in _records(root, "train")]
    assert order == [
        ("clips-000000.tar", "id0000-reference"), ("clips-000000.tar", "id0000-0000"),
        ("clips-000000.tar", "id0000-0001"), ("clips-000000.tar", "id0001-reference"),
        ("clips-000000.tar", "id0001-0000"), ("clips-000000.tar", "id0001-0001"),
        ("clips-000001.tar", "id0002-reference"), ("clips-000001.tar", "id0002-0000"),
        ("clips-000001.tar", "id0002-0001"),
    ]
    for _, r in _records(root, "train"):
        if r["__key__"].endswith("-reference"):
            assert set(r) == {"__key__", "ref.json", "ref.mp4", "ref.wav"}  # never mistaken for a clip
            meta = json.loads(r["ref.json"])
            assert meta["kind"] == "reference" and meta["frames"] == 30 and meta["clip"] == "reference"
            index = int(meta["identity"][2:])
            assert meta["identity_params"] == sample_identity(0, index).to_json()
            assert meta["scene"] == sample_scene(0, index, "reference").to_json()  # a scene of its own
            assert len(open_video(r["ref.mp4"])) == 30
            assert len(decode_wav(r["ref.wav"])[0]) == int(1.2 * SR)


def test_an_identity_split_across_shards_gets_its_reference_in_each(tmp_path: Path) -> None:
    synth = SynthConfig(identities=2, heldout_identities=1, clips_per_identity=3, clip_seconds=0.4,
                        reference_seconds=0.4, shard_size=2, workers=1)
    index = _generate(tmp_path, synth)["train"]
    assert index["counts"] == [2, 2, 2]
    assert index["shard_identities"] == [["id0000"], ["id0000", "id0001"], ["id0001"]]
    assert index["shard_references"] == index["shard_identities"]
    order = [(s, r["__key__"]) for s, r in _records(tmp_path, "train")]
    assert order[:4] == [("clips-000000.tar", "id0000-reference"), ("clips-000000.tar", "id0000-0000"),
                         ("clips-000000.tar", "id0000-0001"), ("clips-000001.tar", "id0000-reference")]
    # no references at all when reference_seconds is 0
    none = _generate(tmp_path / "none", SynthConfig(**{**synth.__dict__, "reference_seconds": 0.0}))["train"]
    assert none["references"] == {} and none["reference_frames"] == 0
    assert all("json" in r for _, r in _records(tmp_path / "none", "train"))


def test_clips_are_well_formed_with_ground_truth(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    samples = _samples(root, "train")
    assert [s["__key__"] for s in samples] == [
        "id0000-0000", "id0000-0001", "id0001-0000", "id0001-0001", "id0002-0000", "id0002-0001"]
    for s in samples:
        assert set(s) == {"__key__", "json", "mp4", "wav"}
        meta = json.loads(s["json"])
        assert meta["identity"] == s["__key__"][:6] and meta["frames"] == 20 and meta["fps"] == FPS
        assert meta["kind"] == "clip" and meta["sample_rate"] == SR and meta["schema_version"] == 1
        for track in ("mouth_open", "mouth_width", "mouth_bite", "smile", "brow", "eye_open", "viseme_open",
                      "head_offset"):
            assert len(meta[track]) == 20, track
        assert meta["identity_params"] == sample_identity(0, int(meta["identity"][2:])).to_json()
        assert IdentityParams.from_json(meta["identity_params"]) == sample_identity(0, int(meta["identity"][2:]))
        assert Scene.from_json(meta["scene"]) == sample_scene(0, int(meta["identity"][2:]), meta["clip"])
        assert meta["text"] and meta["phonemes"] and all(len(p) == 4 for p in meta["phonemes"])
        assert all(0.0 <= p[0] <= p[1] <= 0.8 for p in meta["phonemes"])
        assert all(p[3] == visemes_of(strip_stress(p[2])[0])[0] for p in meta["phonemes"])
        ident = meta["identity_params"]
        assert ident["hair_colour"] in meta["caption"] or ident["hair_style"] == "bald"
        assert meta["scene"]["colour"] in meta["caption"]
        assert meta["scene_caption"] == f"a person in a {meta['scene']['colour']} room"
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


def test_mouth_follows_the_phonemes_not_loudness(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    closed, open_ = [], []
    for s in _samples(root, "train") + _samples(root, "heldout"):
        meta = json.loads(s["json"])
        art = meta["identity_params"]["articulation"]
        phones = [tuple(p[:3]) for p in meta["phonemes"]]
        implied = viseme_openness(phones, meta["frames"], FPS)
        # the json's mouth is exactly the articulation-scaled viseme trajectory
        assert np.allclose(meta["mouth_open"], np.clip(art * implied, 0, 1), atol=1e-4)
        assert np.allclose(meta["viseme_open"], implied, atol=1e-4)
        mouth = np.asarray(meta["mouth_open"]) / art
        for a, b, _name, vis in meta["phonemes"]:
            frame = int((a + b) / 2 * FPS)
            if b - a >= 0.06 and frame < meta["frames"]:
                (closed if vis == "MBP" else open_ if vis == "AA" else []).append(mouth[frame])
        audio, rate = decode_wav(s["wav"])
        assert rate == SR and np.abs(audio).max() > 0.05  # real speech in the wav
    assert closed and open_ and np.mean(closed) < 0.35 < 0.6 < np.mean(open_)  # lips close on m/b/p


def test_decoded_video_matches_rendered_frames(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    sample = _samples(root, "train")[3]  # id0001-0001
    ident = sample_identity(0, 1)
    encoded, frames = make_clip(ident, 1, 1, seed=0, seconds=0.8, size=SIZE, fps=FPS, sample_rate=SR)
    assert encoded["json"] == sample["json"]  # rendering is a pure function of (seed, identity, clip)
    assert encoded["wav"] == sample["wav"]
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
    assert closed < half < wide and wide > 30
    base = render_frame(ident, bg, 0.0, 1.0, 0.0, 0.0).astype(np.int32)
    for kw in ({"smile": 1.0}, {"brow": 1.0}, {"mouth_bite": 1.0}, {"mouth_width": 0.1}):
        assert np.abs(render_frame(ident, bg, 0.0, 1.0, 0.0, 0.0, **kw).astype(np.int32) - base).sum() > 200, kw
    for size in (16, 96, 256):  # any even size renders
        assert render_frame(ident, background(scene, size), 0.5, 1.0, 0.0, 0.0).shape == (size, size, 3)


def test_identities_differ_and_are_deterministic() -> None:
    a, b = sample_identity(0, 0), sample_identity(0, 0)
    assert a == b
    people = [sample_identity(0, i).to_json() for i in range(12)]
    assert (
        len({json.dumps({k: v for k, v in p.items() if k != "name"}, sort_keys=True) for p in people}) == 12
    )
    assert sample_identity(1, 0) != a
    many = [sample_identity(0, i) for i in range(200)]
    for field in ("hair_style", "skin", "voice", "glasses", "earrings", "teeth_gap"):
        assert len({getattr(p, field) for p in many}) > 1, field
    assert all(125 <= p.speech_rate <= 225 and 0.45 <= p.articulation <= 1.0 for p in many)


def test_scenes_are_separate_from_identity_and_never_skin_coloured() -> None:
    assert sample_scene(0, 1, 0) == sample_scene(0, 1, 0) and sample_scene(0, 1, 0) != sample_scene(0, 1, 1)
    assert {sample_scene(0, 1, c).light for c in range(30)} == {"front", "left", "right"}

    def log_dist(a: tuple[int, ...], b: tuple[int, ...]) -> float:
        return float(np.linalg.norm(np.log(np.asarray(a) + 20.0) - np.log(np.asarray(b) + 20.0)))

    for room in ROOMS.values():
        for shade in (0.8, 1.0, 1.12):
            lit = tuple(int(c * shade) for c in room)
            assert min(log_dist(lit, skin) for skin in SKIN.values()) > 0.35
    assert min(log_dist(h, s) for h in HAIR.values() for s in SKIN.values() if h != HAIR["brown"]) > 0.3


def test_captions_fit_default_text_length() -> None:
    captions = [caption(sample_identity(s, i), sample_scene(s, i, 0)) for s in range(3) for i in range(200)]
    assert max(len(c.encode()) for c in captions) <= 96
    for word in ("glasses", "earrings", "bald", "in a bun", "curly", "smiling", "quickly", "slowly"):
        assert any(word in c for c in captions), word


def test_captions_name_the_room_last_or_first() -> None:
    """room="first" puts the room at a fixed place (what the text encoder can learn, README claim d)."""
    for i in range(50):
        ident, scene = sample_identity(0, i), sample_scene(0, i, 1)
        last, first = caption(ident, scene), caption(ident, scene, room="first")
        assert last.startswith("a") and last.endswith(f", in a {scene.colour} room")
        assert first.startswith(f"in a {scene.colour} room: a")
        assert first.endswith(("slowly", "steadily", "quickly")) and "-faced" in first
    with pytest.raises(ValueError, match="room must be one of"):
        caption(sample_identity(0, 0), sample_scene(0, 0, 1), room="middle")


def test_caption_room_reaches_the_records_and_the_index(tmp_path: Path) -> None:
    from dataclasses import replace

    generate_dataset(str(tmp_path), replace(SYNTH, identities=1, heldout_identities=1, clips_per_identity=1,
                                            caption_room="first"), size=SIZE, fps=FPS, sample_rate=SR)
    index = read_index(str(tmp_path), "train")
    assert index["generator"]["caption_room"] == "first"
    with tarfile.open(tmp_path / "train" / index["shards"][0]) as tar:
        metas = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")
                 and ".ref." not in m.name]
    assert metas and all(m["caption"].startswith("in a ") for m in metas)
    with pytest.raises(ValueError, match="caption_room"):
        generate_dataset(str(tmp_path / "x"), replace(SYNTH, caption_room="middle"), size=SIZE, fps=FPS,
                         sample_rate=SR)


def test_sizes_the_loader_cannot_decode_are_refused_up_front(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size 48: decord cannot decode"):
        generate_dataset(str(tmp_path), SYNTH, size=48, fps=FPS, sample_rate=SR)
    with pytest.raises(ValueError, match="even number"):
        generate_dataset(str(tmp_path), SYNTH, size=33, fps=FPS, sample_rate=SR)
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_world_from_an_older_generator_is_regenerated(tmp_path: Path, dataset: tuple[Path, dict]) -> None:
    """Its records lack fields the stages read (synth-v1: no scene_caption); an ingested dataset (no
    generator in its index) is never touched."""
    from omegaconf import OmegaConf

    from avatarforge.data.config import DataConfig
    from avatarforge.stages.data_setup import ensure_dataset, stale_generator

    src, _ = dataset
    root = tmp_path / "world"
    shutil.copytree(src, root)
    splits = ("train", "heldout")
    assert stale_generator(root, splits) is None
    for split in splits:
        index = json.loads((root / split / "index.json").read_text())
        index["generator"]["name"] = "synth-v1"
        (root / split / "index.json").write_text(json.dumps(index))
    assert stale_generator(root, splits) == "synth-v1"
    cfg = OmegaConf.create({"data": OmegaConf.structured(DataConfig(root=str(root), size=SIZE, fps=FPS,
                                                                    sample_rate=SR, synth=SYNTH))})
    ensure_dataset(cfg)
    assert stale_generator(root, splits) is None
    assert read_index(root, "train")["shards"] == read_index(src, "train")["shards"]
    for split in splits:  # ingested: no generator entry
        index = json.loads((root / split / "index.json").read_text())
        index.pop("generator")
        (root / split / "index.json").write_text(json.dumps(index))
    assert stale_generator(root, splits) is None
