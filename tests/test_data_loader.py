"""The streaming loader: batch contents, identity references, exact resume, rank/worker split, bad data
handling, eval batches."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import avatarforge.data.loader as loader_mod
from avatarforge.data.config import DataConfig, SynthConfig
from avatarforge.data.index import read_index, shard_paths
from avatarforge.data.loader import build_eval_batches, build_train_loader
from avatarforge.data.media import decode_wav, open_video, read_frames
from avatarforge.data.selection import select_identities
from avatarforge.data.shards import slot_shards, slot_visits
from avatarforge.data.synth import generate_dataset
from avatarforge.data.tokenizer import decode_ids

SIZE, FPS, SR, FRAMES = 32, 25.0, 16000, 9
AUDIO_LEN = int(FRAMES / FPS * SR)
REF_FRAMES, REF_STRIDE = 9, 4  # the DataConfig defaults
REF_AUDIO_LEN = int(REF_FRAMES * REF_STRIDE / FPS * SR)
SYNTH = SynthConfig(
    identities=4, heldout_identities=1, clips_per_identity=2, clip_seconds=0.8, reference_seconds=2.0,
    shard_size=2, workers=1,
)
TRAIN_KEYS = {f"id{i:04d}-{c:04d}" for i in range(4) for c in range(2)}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("loader") / "tiny"
    generate_dataset(str(path), SYNTH, size=SIZE, fps=FPS, sample_rate=SR)
    return path


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(
        **{"root": str(root), "frames": FRAMES, "size": SIZE, "fps": FPS, "sample_rate": SR, **kw}
    )


def _take(loader, n: int, field: str = "key") -> list:
    out = []
    for batch in loader:
        out.append(batch[field])
        if len(out) == n:
            break
    return out


def _members(tar_path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar_path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def _clip_keys(tar_path: Path) -> list[str]:
    """Keys of the clips in a shard (identity reference records, members ref.*, left out)."""
    return sorted({n.split(".")[0] for n, _ in _members(tar_path) if ".ref." not in n})


def _write_members(tar_path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(tar_path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _copy(root: Path, dest: Path) -> Path:
    shutil.copytree(root, dest)
    return dest


def test_batch_contents(root: Path) -> None:
    batch = next(
        iter(build_train_loader(_cfg(root, num_workers=0), batch_size=3, rank=0, world_size=1, seed=0))
    )
    assert batch["video"].shape == (3, 3, FRAMES, SIZE, SIZE) and batch["video"].dtype == torch.float32
    assert -1.0 <= float(batch["video"].min()) and float(batch["video"].max()) <= 1.0
    assert batch["audio"].shape == (3, AUDIO_LEN) and batch["audio"].dtype == torch.float32
    assert batch["text"].shape == (3, 96) and batch["text"].dtype == torch.int64
    assert batch["text_mask"].shape == (3, 96) and batch["text_mask"].dtype == torch.bool
    assert batch["skipped"] == 0 and len(batch["key"]) == len(batch["identity"]) == 3
    for key, ident, ids in zip(batch["key"], batch["identity"], batch["text"], strict=True):
        assert key in TRAIN_KEYS and key.startswith(ident)
        assert decode_ids(ids).startswith("a") and " room" in decode_ids(ids)
    assert float(batch["audio"].abs().max()) > 0.01
    assert batch["reference"].shape == (3, 3, REF_FRAMES, SIZE, SIZE) and batch["reference"].dtype == torch.float32
    assert batch["reference_audio"].shape == (3, REF_AUDIO_LEN)
    assert len(batch["phonemes"]) == len(batch["identity_params"]) == 3
    assert all(p["name"] == i for p, i in zip(batch["identity_params"], batch["identity"], strict=True))
    assert all(0.0 <= ph[0] <= ph[1] <= FRAMES / FPS for phones in batch["phonemes"] for ph in phones)


def test_crop_and_resize_and_audio_alignment(root: Path) -> None:
    """The audio window starts at the video crop's first frame; a smaller cfg.size resizes."""
    loader = build_train_loader(
        _cfg(root, num_workers=0, size=16), batch_size=4, rank=0, world_size=1, seed=3
    )
    batches = [b for _, b in zip(range(2), loader, strict=False)]
    members: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted((root / "train").glob("*.tar")):
        for name, data in _members(tar_path):
            key, ext = name.split(".", 1)
            members.setdefault(key, {})[ext] = data
    starts = set()
    for batch in batches:
        assert batch["video"].shape[-2:] == (16, 16)
        for i, key in enumerate(batch["key"]):
            audio, _ = decode_wav(members[key]["wav"])
            window = batch["audio"][i].numpy()
            hop = int(SR / FPS)
            matches = [
                s
                for s in range(0, 20 - FRAMES + 1)
                if np.allclose(audio[s * hop : s * hop + AUDIO_LEN], window)
            ]
            assert len(matches) == 1, key
            start = matches[0]
            starts.add(start)
            full = read_frames(open_video(members[key]["mp4"]), start, FRAMES, FPS)  # [T, 32, 32, 3]
            pooled = torch.from_numpy(full).float().reshape(FRAMES, 16, 2, 16, 2, 3).mean(dim=(2, 4))
            ref = (pooled / 127.5 - 1.0).permute(3, 0, 1, 2)
            assert (batch["video"][i] - ref).abs().mean() < 0.05
    assert len(starts) > 1  # crops are random, not always at 0


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_resume_continues_exactly(root: Path, workers: int) -> None:
    cfg = _cfg(root, num_workers=workers)
    full = build_train_loader(cfg, batch_size=3, rank=0, world_size=1, seed=7)
    keys = _take(full, 9)
    assert full.position == 9 and full.stats["samples"] == 27
    for k in (1, 4):
        resumed = build_train_loader(cfg, batch_size=3, rank=0, world_size=1, seed=7, start_batch=k)
        assert _take(resumed, 9 - k) == keys[k:]
    # iterating the same loader object again continues where it stopped
    assert _take(full, 2) == _take(
        build_train_loader(cfg, batch_size=3, rank=0, world_size=1, seed=7, start_batch=9), 2
    )


def test_resumed_tensors_are_identical(root: Path) -> None:
    cfg = _cfg(root, num_workers=0)
    full = [
        b
        for _, b in zip(
            range(5), build_train_loader(cfg, batch_size=2, rank=0, world_size=1, seed=1), strict=False
        )
    ]
    resumed = next(iter(build_train_loader(cfg, batch_size=2, rank=0, world_size=1, seed=1, start_batch=4)))
    assert resumed["key"] == full[4]["key"]
    assert torch.equal(resumed["video"], full[4]["video"]) and torch.equal(resumed["audio"], full[4]["audio"])
    assert torch.equal(resumed["reference"], full[4]["reference"])
    assert torch.equal(resumed["reference_audio"], full[4]["reference_audio"])
    assert resumed["phonemes"] == full[4]["phonemes"]


def test_resume_seeks_without_decoding(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = loader_mod.decode_clip
    monkeypatch.setattr(loader_mod, "decode_clip", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    loader = build_train_loader(
        _cfg(root, num_workers=0), batch_size=2, rank=0, world_size=1, seed=0, start_batch=50
    )
    next(iter(loader))
    assert len(calls) == 2  # 100 skipped stream positions cost no decoding


def test_ranks_split_each_epoch(root: Path) -> None:
    # 4 shards x 2 samples, 2 ranks x 1 worker: one epoch = 2 shards = 2 batches of 2 per rank
    seen = []
    for rank in (0, 1):
        loader = build_train_loader(_cfg(root, num_workers=1), batch_size=2, rank=rank, world_size=2, seed=0)
        seen.append({k for batch in _take(loader, 2) for k in batch})
    assert not seen[0] & seen[1] and seen[0] | seen[1] == TRAIN_KEYS


def test_more_slots_than_shards_never_starves(root: Path) -> None:
    for rank in (0, 5):
        loader = build_train_loader(_cfg(root, num_workers=0), batch_size=2, rank=rank, world_size=6, seed=0)
        assert len(_take(loader, 3)) == 3


def test_shard_assignment_partitions_every_epoch() -> None:
    for epoch in range(3):
        dealt = [s for slot in range(3) for s in slot_shards(7, seed=0, epoch=epoch, slot=slot, n_slots=3)]
        assert sorted(dealt) == list(range(7))
    assert slot_shards(7, seed=0, epoch=0, slot=0, n_slots=3) != slot_shards(
        7, seed=0, epoch=1, slot=0, n_slots=3
    )
    counts = [3, 1, 4, 2, 5]

    def positions(skip: int, n: int) -> list[tuple[int, int, int]]:
        out = []
        for v in slot_visits(counts, seed=0, slot=1, n_slots=2, skip=skip):
            out += [(v.epoch, v.shard, i) for i in range(v.offset, v.count)]
            if len(out) >= n:
                return out[:n]
        return out

    whole = positions(0, 60)
    for skip in (1, 5, 17, 33):
        assert positions(skip, 60 - skip) == whole[skip:]


def test_corrupt_samples_are_skipped_and_counted(root: Path, tmp_path: Path) -> None:
    data = _copy(root, tmp_path / "bad")
    first, second = data / "train" / "clips-000000.tar", data / "train" / "clips-000001.tar"
    a, b = _clip_keys(first)
    c, d = _clip_keys(second)
    garbage_mp4 = [(n, b"\x00not an mp4" * 50 if n == f"{a}.mp4" else x) for n, x in _members(first)]
    _write_members(first, garbage_mp4)
    # c: empty json; d: wav missing
    damaged = [(n, b"" if n == f"{c}.json" else x) for n, x in _members(second) if n != f"{d}.wav"]
    _write_members(second, damaged)
    bad_keys = {a, c, d}

    cfg = _cfg(data, num_workers=1, max_bad_fraction=0.5)
    loader = build_train_loader(cfg, batch_size=2, rank=0, world_size=1, seed=0)
    batches = [b for _, b in zip(range(8), loader, strict=False)]  # 16 positions = 2 epochs
    assert all(b["video"].shape == (2, 3, FRAMES, SIZE, SIZE) for b in batches)
    keys = {k for b in batches for k in b["key"]}
    assert not keys & bad_keys and keys == TRAIN_KEYS - bad_keys
    assert sum(b["skipped"] for b in batches) == loader.stats["skipped"] == 6


def test_truncated_shard_counts_missing_samples(root: Path, tmp_path: Path) -> None:
    data = _copy(root, tmp_path / "trunc")
    shard = data / "train" / "clips-000002.tar"
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 2])
    cfg = _cfg(data, num_workers=0, max_bad_fraction=0.5)
    loader = build_train_loader(cfg, batch_size=2, rank=0, world_size=1, seed=0)
    batches = [b for _, b in zip(range(4), loader, strict=False)]  # one epoch
    assert loader.stats["skipped"] >= 1
    # positions are still those of the index, so resume stays exact on damaged data
    assert _take(build_train_loader(cfg, batch_size=2, rank=0, world_size=1, seed=0, start_batch=2), 2) == [
        b["key"] for b in batches[2:]
    ]


@pytest.mark.parametrize("workers", [0, 1])
def test_too_many_bad_samples_raise_naming_the_shard(root: Path, tmp_path: Path, workers: int) -> None:
    data = _copy(root, tmp_path / "broken")
    broken = data / "train" / "clips-000003.tar"
    broken.write_bytes(b"this is not a tar file" * 100)
    loader = build_train_loader(_cfg(data, num_workers=workers), batch_size=2, rank=0, world_size=1, seed=0)
    with pytest.raises(RuntimeError, match="clips-000003.tar"):
        _take(loader, 40)


def test_eval_batches_are_fixed_and_start_at_frame_zero(root: Path) -> None:
    cfg = _cfg(root)
    a = build_eval_batches(cfg, split="train", batch_size=3, max_clips=7)
    b = build_eval_batches(cfg, split="train", batch_size=3, max_clips=7)
    assert (
        [x["key"] for x in a]
        == [x["key"] for x in b]
        == [
            ["id0000-0000", "id0000-0001", "id0001-0000"],
            ["id0001-0001", "id0002-0000", "id0002-0001"],
            ["id0003-0000"],
        ]
    )
    assert all(torch.equal(x["video"], y["video"]) for x, y in zip(a, b, strict=True))
    index = read_index(root, "train")
    with tarfile.open(root / "train" / index["shards"][0]) as tar:
        mp4 = tar.extractfile("id0000-0000.mp4").read()
        wav = tar.extractfile("id0000-0000.wav").read()
        meta = json.loads(tar.extractfile("id0000-0000.json").read())
    first = (
        torch.from_numpy(read_frames(open_video(mp4), 0, FRAMES, FPS)).permute(3, 0, 1, 2).float() / 127.5 - 1
    )
    assert torch.allclose(a[0]["video"][0], first)
    assert np.allclose(a[0]["audio"][0].numpy(), decode_wav(wav)[0][:AUDIO_LEN])
    assert decode_ids(a[0]["text"][0]) == meta["caption"]
    heldout = build_eval_batches(cfg, split="heldout", batch_size=4, max_clips=10)
    assert [x["identity"] for x in heldout] == [["id0004", "id0004"]]


def test_missing_dataset_has_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="generate or ingest"):
        build_train_loader(_cfg(tmp_path), batch_size=1, rank=0, world_size=1, seed=0)


def _reference_members(root: Path, identity: str) -> dict[str, bytes]:
    for tar_path in sorted((root / "train").glob("*.tar")):
        found = {n.split(".", 1)[1]: x for n, x in _members(tar_path) if n.startswith(f"{identity}-reference.")}
        if found:
            return found
    raise AssertionError(f"no reference for {identity}")


def test_references_come_from_the_clips_identity_in_another_scene(root: Path) -> None:
    loader = build_train_loader(_cfg(root, num_workers=0), batch_size=4, rank=0, world_size=1, seed=5)
    starts = set()
    for batch in [b for _, b in zip(range(2), loader, strict=False)]:
        for i, ident in enumerate(batch["identity"]):
            ref = _reference_members(root, ident)
            meta = json.loads(ref["ref.json"])
            assert meta["identity"] == ident and meta["kind"] == "reference" and meta["frames"] == 50
            frames = read_frames(open_video(ref["ref.mp4"]), 0, 50, FPS)
            expected = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0  # [3, 50, S, S]
            got = batch["reference"][i]
            span = (REF_FRAMES - 1) * REF_STRIDE + 1
            matches = [s for s in range(50 - span + 1)
                       if torch.allclose(got, expected[:, s : s + span : REF_STRIDE], atol=1e-5)]
            assert len(matches) == 1, ident
            start = matches[0]
            starts.add(start)
            audio, _ = decode_wav(ref["ref.wav"])
            a0 = int(round(start / FPS * SR))
            window = np.zeros(REF_AUDIO_LEN, np.float32)
            chunk = audio[a0 : a0 + REF_AUDIO_LEN]
            window[: len(chunk)] = chunk
            assert np.allclose(batch["reference_audio"][i].numpy(), window)
            # another scene: the reference's backdrop is not the clip's
            assert (batch["reference"][i][:, 0, 0, 0] - batch["video"][i][:, 0, 0, 0]).abs().max() > 0.05
    assert len(starts) > 1  # random reference windows in training


def test_eval_references_start_at_frame_zero(root: Path) -> None:
    a = build_eval_batches(_cfg(root), split="heldout", batch_size=2, max_clips=2)
    b = build_eval_batches(_cfg(root), split="heldout", batch_size=2, max_clips=2)
    assert torch.equal(a[0]["reference"], b[0]["reference"])
    with tarfile.open(root / "heldout" / "clips-000000.tar") as tar:
        mp4 = tar.extractfile("id0004-reference.ref.mp4").read()
        meta = json.loads(tar.extractfile("id0004-0000.json").read())
    frames = read_frames(open_video(mp4), 0, 50, FPS)
    first = torch.from_numpy(frames[: (REF_FRAMES - 1) * REF_STRIDE + 1 : REF_STRIDE]).permute(3, 0, 1, 2)
    assert torch.allclose(a[0]["reference"][0], first.float() / 127.5 - 1.0, atol=1e-5)
    # eval crops start at frame 0, so the phoneme timeline is the json's, cut at the crop's end
    end = FRAMES / FPS
    assert a[0]["phonemes"][0] == [[p[0], round(min(p[1], end), 5), *p[2:]] for p in meta["phonemes"] if p[0] < end]
    assert a[0]["identity_params"][0] == meta["identity_params"]


def test_no_references_when_not_asked_or_not_there(root: Path, tmp_path: Path) -> None:
    batch = next(iter(build_train_loader(_cfg(root, num_workers=0, reference_frames=0), batch_size=2, rank=0,
                                         world_size=1, seed=0)))
    assert "reference" not in batch and "reference_audio" not in batch
    plain = tmp_path / "plain"
    generate_dataset(str(plain), SynthConfig(**{**SYNTH.__dict__, "reference_seconds": 0.0}), size=SIZE, fps=FPS,
                     sample_rate=SR)
    batch = next(iter(build_train_loader(_cfg(plain, num_workers=0), batch_size=2, rank=0, world_size=1, seed=0)))
    assert "reference" not in batch and batch["video"].shape == (2, 3, FRAMES, SIZE, SIZE)
    with pytest.raises(ValueError, match="reference_stride"):
        build_train_loader(_cfg(root, reference_stride=0), batch_size=1, rank=0, world_size=1, seed=0)


def test_a_clip_whose_reference_is_missing_is_a_bad_sample(root: Path, tmp_path: Path) -> None:
    data = _copy(root, tmp_path / "noref")
    shard = data / "train" / "clips-000001.tar"
    _write_members(shard, [(n, x) for n, x in _members(shard) if ".ref." not in n])
    lost = set(_clip_keys(shard))
    loader = build_train_loader(_cfg(data, num_workers=0, max_bad_fraction=0.5), batch_size=2, rank=0,
                                world_size=1, seed=0)
    batches = [b for _, b in zip(range(4), loader, strict=False)]  # one epoch
    assert not {k for b in batches for k in b["key"]} & lost
    assert loader.stats["skipped"] == len(lost) == 2


# -- identity filter --------------------------------------------------------------------------------------

# 3 clips per shard, 2 per identity: id0000 x2 + id0001 | id0001 + id0002 x2 | id0003 x2 -- shards that mix
# chosen and other identities, and an identity split across two shards
MIXED = SynthConfig(**{**SYNTH.__dict__, "shard_size": 3})
CHOSEN = ["id0001", "id0003"]
CHOSEN_KEYS = {f"{i}-{c:04d}" for i in CHOSEN for c in range(2)}


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mixed") / "tiny"
    generate_dataset(str(path), MIXED, size=SIZE, fps=FPS, sample_rate=SR)
    index = read_index(path, "train")
    assert index["shard_identities"] == [["id0000", "id0001"], ["id0001", "id0002"], ["id0003"]]
    return path


def test_identity_selection_counts_only_chosen_clips(mixed_root: Path) -> None:
    index = read_index(mixed_root, "train")
    urls = shard_paths(mixed_root, "train", index)
    chosen = select_identities(index, urls, CHOSEN)
    assert chosen.urls == tuple(urls) and chosen.counts == (1, 1, 2)
    assert chosen.keys[:2] == (frozenset({"id0001-0000"}), frozenset({"id0001-0001"})) and chosen.keys[2] is None
    assert select_identities(index, urls, ["id0000"]).urls == (urls[0],)


@pytest.mark.parametrize("workers", [0, 2])
def test_identity_filter_keeps_only_chosen_and_resumes_exactly(mixed_root: Path, workers: int) -> None:
    cfg = _cfg(mixed_root, num_workers=workers)
    full = build_train_loader(cfg, batch_size=2, rank=0, world_size=1, seed=3, identities=CHOSEN)
    batches = [b for _, b in zip(range(8), full, strict=False)]  # 16 positions = 4 epochs of 4 clips
    keys = [b["key"] for b in batches]
    assert {k for ks in keys for k in ks} == CHOSEN_KEYS
    assert all(set(b["identity"]) <= set(CHOSEN) and b["skipped"] == 0 for b in batches)
    assert all(b["reference"].shape == (2, 3, REF_FRAMES, SIZE, SIZE) for b in batches)
    for k in (1, 3, 6):
        resumed = build_train_loader(cfg, batch_size=2, rank=0, world_size=1, seed=3, start_batch=k,
                                     identities=CHOSEN)
        assert _take(resumed, 8 - k) == keys[k:]
    again = next(iter(build_train_loader(cfg, batch_size=2, rank=0, world_size=1, seed=3, start_batch=5,
                                         identities=CHOSEN)))
    assert torch.equal(again["video"], batches[5]["video"]) and torch.equal(again["audio"], batches[5]["audio"])


def test_identity_filter_resume_skips_without_decoding(mixed_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = loader_mod.decode_clip
    monkeypatch.setattr(loader_mod, "decode_clip", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    loader = build_train_loader(_cfg(mixed_root, num_workers=0), batch_size=2, rank=0, world_size=1, seed=0,
                                start_batch=40, identities=CHOSEN)
    batch = next(iter(loader))
    assert len(calls) == 2 and set(batch["identity"]) <= set(CHOSEN)


def test_identity_filter_splits_ranks(mixed_root: Path) -> None:
    # 3 selected shards over 2 ranks: each epoch deals every selected shard to exactly one rank
    seen = [set(), set()]
    for rank in (0, 1):
        loader = build_train_loader(_cfg(mixed_root, num_workers=0), batch_size=1, rank=rank, world_size=2,
                                    seed=0, identities=CHOSEN)
        seen[rank] = {k for ks in _take(loader, 2) for k in ks}
    assert seen[0] | seen[1] <= CHOSEN_KEYS and len(seen[0] | seen[1]) >= 3


def test_identity_filter_errors_name_the_missing_identity(mixed_root: Path) -> None:
    cfg = _cfg(mixed_root, num_workers=0)
    with pytest.raises(ValueError, match=r"id0099.*no samples in split 'train'"):
        build_train_loader(cfg, batch_size=1, rank=0, world_size=1, seed=0, identities=["id0001", "id0099"])
    with pytest.raises(ValueError, match="empty"):
        build_train_loader(cfg, batch_size=1, rank=0, world_size=1, seed=0, identities=[])
    # held-out identities are not in the train split
    with pytest.raises(ValueError, match="id0004"):
        build_train_loader(cfg, batch_size=1, rank=0, world_size=1, seed=0, identities=["id0004"])


def test_sft_stream_uses_the_identity_filter(mixed_root: Path) -> None:
    """SFTTask.train_batches: only the chosen identities, and a resumed stream equals the uninterrupted one."""
    from avatarforge.stages.avatar import BATCH_KEYS, SFTOptions, SFTTask

    task = object.__new__(SFTTask)  # the data side only: no autoencoder weights needed
    task.options = SFTOptions(identities=list(CHOSEN))
    task.data, task.batch_size, task.seed = _cfg(mixed_root, num_workers=0), 2, 5
    full = [b for _, b in zip(range(6), task.train_batches(rank=0, world_size=1, start_batch=0), strict=False)]
    assert all(set(b) == set(BATCH_KEYS) and b["video"].shape[0] == 2 for b in full)
    resumed = next(iter(task.train_batches(rank=0, world_size=1, start_batch=4)))
    assert all(torch.equal(resumed[k], full[4][k]) for k in BATCH_KEYS)


def test_video_uint8_defers_the_float_conversion_to_the_trainer(root: Path) -> None:
    from avatarforge.data.pixels import float_video
    from avatarforge.train.runtime import to_device

    def first(**kw):
        return next(iter(build_train_loader(_cfg(root, num_workers=0, **kw), batch_size=3, rank=0,
                                            world_size=1, seed=5)))

    plain, raw = first(), first(video_uint8=True)
    assert raw["video"].dtype == raw["reference"].dtype == torch.uint8 and raw["key"] == plain["key"]
    assert raw["video"].shape == plain["video"].shape and raw["reference"].shape == plain["reference"].shape
    moved = to_device(raw, torch.device("cpu"))  # what the training step does with every batch
    for name in ("video", "reference"):
        assert torch.equal(moved[name], plain[name]) and torch.equal(float_video(raw)[name], plain[name])
    assert torch.equal(moved["audio"], plain["audio"])
    assert first(video_uint8=True, size=16)["video"].dtype == torch.float32  # resized: converted here
    evals = build_eval_batches(_cfg(root, video_uint8=True), split="heldout", batch_size=2, max_clips=2)
    assert evals[0]["video"].dtype == torch.float32  # eval batches are always float


def test_scene_captions_read_the_scene_caption_and_nothing_where_a_record_has_none(root: Path, tmp_path: Path) -> None:
    full = next(iter(build_eval_batches(_cfg(root), split="train", batch_size=2, max_clips=2)))
    scene = next(iter(build_eval_batches(_cfg(root, captions="scene"), split="train", batch_size=2, max_clips=2)))
    assert full["key"] == scene["key"] and torch.equal(full["video"], scene["video"])
    index = read_index(root, "train")
    with tarfile.open(root / "train" / index["shards"][0]) as tar:
        meta = json.loads(tar.extractfile(f"{scene['key'][0]}.json").read())
    assert decode_ids(full["text"][0]) == meta["caption"] != meta["scene_caption"]
    assert decode_ids(scene["text"][0]) == meta["scene_caption"] == f"a person in a {meta['scene']['colour']} room"
    # an ingested record without a scene caption: an empty text (as caption dropout trains), not a bad sample
    copy = tmp_path / "tiny"
    shutil.copytree(root, copy)
    shard = copy / "train" / index["shards"][0]
    members = []
    for name, data in _members(shard):
        if name.endswith(".json"):
            meta = json.loads(data)
            meta.pop("scene_caption")
            data = json.dumps(meta).encode()
        members.append((name, data))
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    batch = next(iter(build_eval_batches(_cfg(copy, captions="scene"), split="train", batch_size=2, max_clips=2)))
    assert batch["key"] == scene["key"] and not batch["text_mask"].any()
    with pytest.raises(ValueError, match="data.captions must be one of"):
        build_eval_batches(_cfg(root, captions="room"), split="train", batch_size=2, max_clips=2)


def test_mixed_captions_train_on_both_and_evaluate_on_the_whole_caption(root: Path) -> None:
    """data.captions mixed: each training crop reads the whole caption or the scene caption at random
    (both occur, each crop's text is one of its record's two), evaluation reads the whole caption."""
    captions = {}
    index = read_index(root, "train")
    for shard in index["shards"]:
        for name, data in _members(root / "train" / shard):
            if name.endswith(".json"):
                meta = json.loads(data)
                captions[name[: -len(".json")]] = (meta["caption"], meta["scene_caption"])
    loader = build_train_loader(_cfg(root, captions="mixed", num_workers=0), batch_size=2, rank=0, world_size=1,
                                seed=0)
    kinds = []
    for _, batch in zip(range(12), loader, strict=False):
        for key, ids in zip(batch["key"], batch["text"], strict=True):
            text = decode_ids(ids)
            assert text in captions[key], (key, text)
            kinds.append(captions[key].index(text))
    assert set(kinds) == {0, 1}, kinds
    evals = next(iter(build_eval_batches(_cfg(root, captions="mixed"), split="train", batch_size=2, max_clips=2)))
    assert [decode_ids(i) for i in evals["text"]] == [captions[k][0] for k in evals["key"]]


def test_word_tokenizer_reaches_the_batches(root: Path) -> None:
    """data.tokenizer words: batch text ids are the hashed words of the record's caption."""
    from avatarforge.data.tokenizer import encode_words

    batch = next(iter(build_eval_batches(_cfg(root, tokenizer="words", word_ids=512), split="train", batch_size=2,
                                         max_clips=2)))
    plain = next(iter(build_eval_batches(_cfg(root), split="train", batch_size=2, max_clips=2)))
    for ids, mask, byte_ids in zip(batch["text"], batch["text_mask"], plain["text"], strict=True):
        expected, expected_mask = encode_words(decode_ids(byte_ids), ids.shape[0], 512)
        assert torch.equal(ids, expected) and torch.equal(mask, expected_mask) and int(ids.max()) < 512
    with pytest.raises(ValueError, match="data.tokenizer must be one of"):
        build_eval_batches(_cfg(root, tokenizer="chars"), split="train", batch_size=2, max_clips=2)
