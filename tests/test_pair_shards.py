"""Preference pair shards: round trip, no pickles, atomic writes, clear errors."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from avatarforge.data.pair_shards import ARRAYS, PromptGroupRecord, read_groups, shard_list, write_group_shard


def group(prompt_id: str, g: int = 3) -> PromptGroupRecord:
    rng = np.random.default_rng(len(prompt_id))
    arrays = {
        "latents": rng.standard_normal((g, 4, 2, 3, 3)).astype(np.float32),
        "reference": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "audio": rng.standard_normal(640).astype(np.float32),
        "text": np.arange(8, dtype=np.int64),
        "text_mask": np.ones(8, dtype=bool),
    }
    meta = {"split": "train", "videos": [f"{prompt_id}#v{k}" for k in range(g)],
            "labels": [{"video_a": f"{prompt_id}#v0", "video_b": f"{prompt_id}#v1", "choice": "b"}]}
    return PromptGroupRecord(prompt_id, meta, arrays, {"v0": b"fake-mp4"})


def test_round_trip_keeps_ids_with_dots_and_arrays(tmp_path):
    groups = [group("id-a|clip.0001/x"), group("id-b|clip-2")]
    write_group_shard(tmp_path / "groups-000000.tar", groups)
    back = read_groups(shard_list(tmp_path), with_videos=True)
    assert [g.prompt_id for g in back] == [g.prompt_id for g in groups]
    for before, after in zip(groups, back, strict=True):
        assert after.meta == before.meta
        assert after.videos == {"v0": b"fake-mp4"}
        for name in ARRAYS:
            np.testing.assert_array_equal(after.arrays[name], before.arrays[name])
            assert after.arrays[name].dtype == before.arrays[name].dtype


def test_pickled_arrays_are_refused(tmp_path):
    bad = group("p")
    bad.arrays["latents"] = np.array([{"evil": 1}], dtype=object)
    with pytest.raises(ValueError):  # np.save(allow_pickle=False) refuses object arrays
        write_group_shard(tmp_path / "bad.tar", [bad])
    assert shard_list(tmp_path) == []  # nothing half-written is left as a shard

    # a hand-made shard holding a pickled npy member is refused when read
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in {"p.json": b'{"prompt_id": "p"}', **{f"p.{a}.npy": buf.getvalue() for a in ARRAYS}}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="evil.tar"):
        read_groups([path])


def test_missing_array_is_an_error(tmp_path):
    g = group("p")
    del g.arrays["audio"]
    with pytest.raises(ValueError, match="audio"):
        write_group_shard(tmp_path / "x.tar", [g])


def test_truncated_shard_names_the_file(tmp_path):
    path = write_group_shard(tmp_path / "groups-000000.tar", [group("a"), group("b")])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="groups-000000.tar"):
        read_groups([path])
