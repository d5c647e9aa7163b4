"""Manifests and atomic writes: a crash mid-write leaves the previous file intact."""

import json

import pytest

from avatarforge.atomic import atomic_write, atomic_write_json
from avatarforge.stages import manifest as mf


def make(stage="t2v", digest="abc"):
    return mf.Manifest(stage=stage, kind="t2v_pretrain", config_hash=digest, parents={"autoencoder": "p"},
                       final_checkpoint="/x/ckpt", weights="/x/w.safetensors", metrics={"loss": 1.0},
                       wandb_run_id="t2v-1", started_at=1.0, finished_at=2.0, git_commit="deadbeef")


def test_done_round_trip(tmp_path):
    mf.write_done(tmp_path, make())
    assert mf.read_done(tmp_path) == make()
    assert mf.read_done(tmp_path / "missing") is None


def test_crash_mid_write_keeps_previous(tmp_path):
    path = tmp_path / "DONE.json"
    atomic_write_json(path, {"v": 1})

    def explode(tmp):
        with open(tmp, "w") as f:
            f.write('{"v": 2')  # half written
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, explode)
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["DONE.json"]  # no temp file left behind


def test_unreadable_manifest_is_a_clear_error(tmp_path):
    (tmp_path / mf.DONE).write_text("{not json")
    with pytest.raises(ValueError, match="--rerun"):
        mf.read_done(tmp_path)


def test_started_round_trip(tmp_path):
    mf.write_started(tmp_path, "h1", 5.0)
    assert mf.read_started(tmp_path) == {"config_hash": "h1", "started_at": 5.0}
