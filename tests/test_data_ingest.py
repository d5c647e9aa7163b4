"""Real footage ingest on videos encoded here: codecs, odd sizes, frame rates (variable too), audio layouts,
sidecars, bad inputs, resume after a crash, and the loader reading the result."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import wave
from pathlib import Path

import av
import numpy as np
import pytest

import avatarforge.data.ingest as ingest_mod
from avatarforge.cluster.cli import main as cli_main
from avatarforge.data.config import DataConfig
from avatarforge.data.index import read_index
from avatarforge.data.ingest import IngestError, IngestOptions, ingest
from avatarforge.data.ingest_state import STATE_NAME, IngestState
from avatarforge.data.loader import build_eval_batches, build_train_loader
from avatarforge.data.sources import discover
from tests.videos import grey, set_mp4_rotation, tone, write_video

SIZE, CLIP_S, FPS, SR = 32, 0.8, 25.0, 16000
CLIP_FRAMES, CLIP_SAMPLES = 20, 12800
OPTIONS = IngestOptions(clip_seconds=CLIP_S, size=SIZE, shard_size=4, workers=2)
VFR_TIMES = np.round(np.cumsum(np.r_[0.0, np.random.default_rng(0).uniform(0.02, 0.07, 59)]), 3)
EXPECTED_CLIPS = {  # identity -> clips: floor(seconds / 0.8)
    "h264_odd": 3, "vp9": 2, "vp8_odd": 2, "mjpeg": 2, "mpeg4": 3, "vfr": 3, "alice": 1, "rotated": 1,
    "listed": 1,
}


def _sync_audio(seconds: float, rate: int, at: float) -> np.ndarray:
    audio = np.zeros(int(seconds * rate), np.float32)
    i = int(at * rate)
    audio[i : i + rate // 50] = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(rate // 50) / rate)
    return audio


def make_sources(base: Path) -> dict[str, Path]:
    src, more, lists = base / "src", base / "more", base / "lists"
    for d in (src, more, lists):
        d.mkdir(parents=True)
    v = {}
    v["h264_odd"] = write_video(src / "h264_odd.mp4", codec="libx264", pix_fmt="yuv444p", width=97, height=61,
                                fps=24, frames=60, audio=tone(2.5, 44100), rate=44100, layout="stereo")
    (src / "h264_odd.txt").write_text("a person in an odd-sized video\n")
    v["vp9"] = write_video(src / "vp9.webm", codec="libvpx-vp9", width=80, height=64, fps=30, frames=50,
                           audio=tone(50 / 30, 48000), audio_codec="libopus", layout="mono")
    v["vp8_odd"] = write_video(src / "vp8_odd.webm", codec="libvpx", width=75, height=53, fps=29.97,
                               frames=60, audio=tone(2.002, 48000), audio_codec="libopus", layout="stereo")
    flash = lambda i, t: np.full((96, 64, 3), 255 if i == 30 else 60, np.uint8)  # noqa: E731 - t = 1.2 s
    v["mjpeg"] = write_video(src / "mjpeg.mov", codec="mjpeg", width=64, height=96, fps=25, frames=50,
                             paint=flash, audio=_sync_audio(2.0, 48000, 1.2), audio_codec="pcm_s16le")
    v["mpeg4"] = write_video(src / "mpeg4.mkv", codec="mpeg4", width=66, height=50, fps=30, frames=75,
                             audio=tone(2.5, 44100), audio_codec="mp3", rate=44100, layout="mono",
                             container="matroska")
    v["vfr"] = write_video(src / "vfr.mp4", codec="libx264", width=64, height=64, fps=30, frames=60,
                           times=VFR_TIMES, paint=grey(64, 64, step=4, base=10),
                           audio=tone(VFR_TIMES[-1] + 0.05, 48000), layout="mono")

    def halves(i: int, t: float) -> np.ndarray:
        img = np.zeros((64, 128, 3), np.uint8)
        img[:, :64, 0] = 220  # red left, blue right
        img[:, 64:, 2] = 220
        return img

    v["alice"] = write_video(src / "boxed.mp4", codec="libx264", width=128, height=64, fps=25, frames=25,
                             paint=halves, audio=tone(1.0, 48000))
    (src / "boxed.json").write_text(json.dumps({"identity": "alice", "caption": "alice, boxed"}))
    (src / "boxed.box.json").write_text(json.dumps({"x": 72, "y": 8, "w": 48, "h": 48}))

    def left_white(i: int, t: float) -> np.ndarray:
        img = np.zeros((48, 64, 3), np.uint8)
        img[:, :32] = 255
        return img

    v["rotated"] = write_video(src / "rotated.mp4", codec="libx264", width=64, height=48, fps=25, frames=25,
                               paint=left_white, audio=tone(1.0, 16000), rate=16000, layout="mono")
    set_mp4_rotation(v["rotated"])
    write_video(src / "silent.mp4", codec="libx264", width=32, height=32, fps=25, frames=30)
    (src / "corrupt.mp4").write_bytes(np.random.default_rng(1).bytes(5000))
    write_video(src / "short.webm", codec="libvpx", width=32, height=32, fps=25, frames=10,
                audio=tone(0.4, 48000), audio_codec="libopus")
    write_video(src / "badside.mp4", codec="libx264", width=32, height=32, fps=25, frames=25,
                audio=tone(1.0, 48000))
    (src / "badside.json").write_text("{not json")
    (src / "readme.md").write_text("not a video")
    v["listed"] = write_video(more / "listed.mkv", codec="mjpeg", width=48, height=48, fps=25, frames=25,
                              audio=tone(1.0, 22050), audio_codec="pcm_s16le", rate=22050, layout="mono",
                              container="matroska")
    (lists / "list.txt").write_text("# sources kept elsewhere\n../more/listed.mkv\n\nmissing.mov\n")
    return v


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("ingest")
    videos = make_sources(base)
    out = base / "out"
    report = ingest([base / "src", base / "lists" / "list.txt", base / "src" / "readme.md"], out,
                    options=OPTIONS, progress=False)
    return {"base": base, "out": out, "report": report, "videos": videos, "samples": _samples(out / "train")}


def _samples(split_dir: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(split_dir.glob("clips-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def _by_identity(samples: dict[str, dict[str, bytes]]) -> dict[str, list[tuple[dict, dict[str, bytes]]]]:
    out: dict[str, list] = {}
    for key in sorted(samples):
        meta = json.loads(samples[key]["json"])
        out.setdefault(meta["identity"], []).append((meta, samples[key]))
    return out


def _frames(mp4: bytes) -> tuple[np.ndarray, list[int], av.video.stream.VideoStream]:
    with av.open(io.BytesIO(mp4)) as c:
        stream = c.streams.video[0]
        decoded = list(c.decode(stream))
        return np.stack([f.to_ndarray(format="rgb24") for f in decoded]), [f.pts for f in decoded], stream


def test_clip_counts_and_skip_reasons(ingested: dict) -> None:
    report, by_id = ingested["report"], _by_identity(ingested["samples"])
    assert {k: len(v) for k, v in by_id.items()} == EXPECTED_CLIPS
    assert report.clips_total == report.clips_new == sum(EXPECTED_CLIPS.values())
    reasons = {Path(s["source"]).name: s["reason"] for s in report.skipped}
    assert reasons["silent.mp4"] == "no audio stream"
    assert reasons["corrupt.mp4"].startswith("unreadable container")
    assert reasons["short.webm"].startswith("shorter than one 0.8s clip")
    assert reasons["badside.mp4"].startswith("sidecar: badside.json: not valid JSON")
    assert reasons["missing.mov"].startswith("not found (listed in")
    assert reasons["readme.md"].startswith("not a folder, a video")
    assert len(reasons) == 6
    written = json.loads((ingested["out"] / "train" / "ingest_report.json").read_text())
    assert written["clips_total"] == report.clips_total and len(written["skipped"]) == 6
    assert "silent.mp4: no audio stream" in report.summary()


def test_every_clip_is_25fps_square_h264_with_16k_mono(ingested: dict) -> None:
    for key, members in ingested["samples"].items():
        frames, pts, stream = _frames(members["mp4"])
        assert stream.codec_context.name == "h264" and stream.average_rate == FPS, key
        assert frames.shape == (CLIP_FRAMES, SIZE, SIZE, 3), key
        assert len(set(np.diff(pts))) == 1, key  # constant frame rate
        with wave.open(io.BytesIO(members["wav"])) as w:
            assert (w.getnchannels(), w.getframerate(), w.getsampwidth(), w.getnframes()) == (1, SR, 2,
                                                                                             CLIP_SAMPLES)
        meta = json.loads(members["json"])
        assert meta["fps"] == FPS and meta["frames"] == CLIP_FRAMES and meta["sample_rate"] == SR
        assert meta["schema_version"] == 1 and Path(meta["source"]).is_file() and "." not in key
    for ident, clips in _by_identity(ingested["samples"]).items():
        starts = [m["start"] for m, _ in clips]
        assert starts == pytest.approx([i * CLIP_S for i in range(len(clips))], abs=0.02), ident
        assert all(m["clip"] == i for i, (m, _) in enumerate(clips)), ident


def test_audio_is_resampled_not_garbled(ingested: dict) -> None:
    """Every tone source (44.1/48/22.05/16 kHz, mono/stereo, aac/opus/mp3/pcm) keeps its 440 Hz pitch."""
    for ident, clips in _by_identity(ingested["samples"]).items():
        if ident == "mjpeg":
            continue  # the sync source carries a click, not a tone
        with wave.open(io.BytesIO(clips[0][1]["wav"])) as w:
            pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32)
        spectrum = np.abs(np.fft.rfft(pcm))
        assert abs(np.argmax(spectrum) * SR / len(pcm) - 440) < 5, ident
        assert 0.15 < np.abs(pcm).max() / 32767 < 0.5, ident  # a 0.3 tone, give or take codec ringing


def test_variable_frame_rate_takes_the_nearest_frame(ingested: dict) -> None:
    with av.open(str(ingested["videos"]["vfr"])) as c:  # source frame i is flat grey, 4 levels apart
        levels = np.array([f.to_ndarray(format="rgb24").mean() for f in c.decode(video=0)])
    assert len(levels) == len(VFR_TIMES) and np.diff(levels).min() > 2
    for meta, members in _by_identity(ingested["samples"])["vfr"]:
        frames, _, _ = _frames(members["mp4"])
        for k, frame in enumerate(frames):
            tick = meta["start"] + k / FPS
            dist = np.abs(VFR_TIMES - tick)
            allowed = set(np.flatnonzero(dist <= dist.min() + 2e-3))  # a tick on a midpoint may go either way
            shown = int(np.argmin(np.abs(levels - frame.mean())))
            assert shown in allowed, (meta["clip"], k, shown, sorted(allowed))


def test_audio_and_video_stay_in_sync(ingested: dict) -> None:
    """The source flashes and clicks at 1.2 s: clip 1 (from 0.8 s) has both 0.4 s in."""
    meta, members = _by_identity(ingested["samples"])["mjpeg"][1]
    frames, _, _ = _frames(members["mp4"])
    with wave.open(io.BytesIO(members["wav"])) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    assert meta["start"] == pytest.approx(0.8)
    assert int(np.argmax(frames.mean(axis=(1, 2, 3)))) == 10
    onset = int(np.flatnonzero(np.abs(pcm) > 3000)[0])
    assert abs(onset - 0.4 * SR) < 0.25 * SR / FPS


def test_crops_sidecars_and_rotation(ingested: dict) -> None:
    by_id = _by_identity(ingested["samples"])
    meta, members = by_id["alice"][0]  # sidecar identity, caption and box (inside the blue half)
    assert meta["caption"] == "alice, boxed"
    frame = _frames(members["mp4"])[0][0].astype(float)
    assert frame[..., 2].mean() > 180 and frame[..., 0].mean() < 30
    meta, members = by_id["h264_odd"][0]
    assert meta["caption"] == "a person in an odd-sized video"
    assert by_id["vp9"][0][0]["caption"] == ""
    rotated = _frames(by_id["rotated"][0][1]["mp4"])[0][0].astype(float)  # left stripe turns to the top
    assert rotated[: SIZE // 2].mean() > 200 and rotated[SIZE // 2 :].mean() < 40


def test_loader_reads_ingested_clips(ingested: dict) -> None:
    cfg = DataConfig(root=str(ingested["out"]), frames=9, size=SIZE, num_workers=0)
    index = read_index(cfg.root, "train")
    assert index["total"] == sum(EXPECTED_CLIPS.values()) and index["generator"]["name"] == "ingest"
    assert set(index["identities"]) == set(EXPECTED_CLIPS)
    loader = build_train_loader(cfg, batch_size=4, rank=0, world_size=1, seed=0)
    batches = [b for _, b in zip(range(3), loader, strict=False)]
    for batch in batches:
        assert batch["video"].shape == (4, 3, 9, SIZE, SIZE) and batch["audio"].shape == (4, 5760)
        assert batch["skipped"] == 0 and set(batch["key"]) <= set(ingested["samples"])
    evals = build_eval_batches(cfg, split="train", batch_size=4, max_clips=8)
    assert [len(b["key"]) for b in evals] == [4, 4] and all(b["skipped"] == 0 for b in evals)


def test_resume_skips_done_sources_and_adds_new_ones(ingested: dict) -> None:
    out, split = ingested["out"], ingested["out"] / "train"
    before = {p.name: p.read_bytes() for p in split.glob("clips-*.tar")}
    again = ingest([ingested["base"] / "src", ingested["base"] / "lists" / "list.txt"], out,
                   options=IngestOptions(clip_seconds=CLIP_S, size=SIZE, workers=1), progress=False)
    assert again.new == 0 and again.clips_new == 0 and again.resumed == 13
    assert {p.name: p.read_bytes() for p in split.glob("clips-*.tar")} == before

    extra = ingested["base"] / "extra"
    extra.mkdir()
    write_video(extra / "late.mp4", codec="libx264", width=40, height=40, fps=25, frames=40,
                audio=tone(1.6, 48000))
    options = IngestOptions(clip_seconds=CLIP_S, size=SIZE, workers=1)
    grown = ingest([extra], out, options=options, progress=False)
    assert grown.new == 1 and grown.clips_new == 2
    assert grown.clips_total == sum(EXPECTED_CLIPS.values()) + 2
    after = {p.name: p.read_bytes() for p in split.glob("clips-*.tar")}
    assert {k: after[k] for k in before} == before and len(after) == len(before) + 1
    assert read_index(out, "train")["total"] == grown.clips_total


def test_interrupted_run_resumes_without_duplicates(tmp_path: Path, ingested: dict,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    src = ingested["base"] / "src"
    options = IngestOptions(clip_seconds=CLIP_S, size=SIZE, shard_size=2, workers=1)
    calls = []
    real = ingest_mod.cut_source

    def dies_on_fourth(job):
        calls.append(job.identity)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(ingest_mod, "cut_source", dies_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        ingest([src], tmp_path, options=options, progress=False)
    split = tmp_path / "train"
    state = json.loads((split / STATE_NAME).read_text())
    assert 0 < len(state["sources"]) < 10  # some sources committed before the crash
    (split / "clips-000099.tar").write_bytes(b"half-written")  # as if a shard was being written
    monkeypatch.setattr(ingest_mod, "cut_source", real)
    report = ingest([src], tmp_path, options=options, progress=False)
    assert report.resumed == len(state["sources"]) and not (split / "clips-000099.tar").exists()
    samples = _samples(split)
    expected = {k: v for k, v in EXPECTED_CLIPS.items() if k != "listed"}
    assert {k: len(v) for k, v in _by_identity(samples).items()} == expected
    assert read_index(tmp_path, "train")["total"] == len(samples) == sum(expected.values())


def test_bad_settings_and_foreign_folders_are_one_line_errors(tmp_path: Path, ingested: dict) -> None:
    src = ingested["base"] / "src" / "vp9.webm"
    with pytest.raises(IngestError, match="was ingested with size=32 \\(now 48\\)"):
        ingest([src], ingested["out"], options=IngestOptions(clip_seconds=CLIP_S, size=48, workers=1))
    foreign = tmp_path / "synth" / "train"
    foreign.mkdir(parents=True)
    (foreign / "index.json").write_text("{}")
    with pytest.raises(IngestError, match="holds a dataset that ingest did not write"):
        ingest([src], tmp_path / "synth", options=OPTIONS)
    assert sorted(p.name for p in foreign.iterdir()) == ["index.json"]  # left untouched
    held = IngestState.open(tmp_path / "busy" / "train", {"size": SIZE})
    try:
        with pytest.raises(IngestError, match="another ingest is writing"):
            ingest([src], tmp_path / "busy", options=OPTIONS)
    finally:
        held.close()
    with pytest.raises(IngestError, match="even number"):
        ingest([src], tmp_path / "x", options=IngestOptions(size=33))


def test_cli(tmp_path: Path, ingested: dict, capsys: pytest.CaptureFixture[str]) -> None:
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(ingested["base"] / "src" / "vp9.webm", one)
    shutil.copy(ingested["base"] / "src" / "silent.mp4", one)
    args = ["data", "ingest", str(one), "--out", str(tmp_path / "ds"), "--split", "heldout",
            "--clip-seconds", "0.8", "--size", "32", "--workers", "1"]
    assert cli_main([*args, "--identity-from", "folder"]) == 0
    out = capsys.readouterr().out
    assert "-> 2 clips" in out and "silent.mp4: no audio stream" in out
    index = read_index(tmp_path / "ds", "heldout")
    assert index["total"] == 2 and index["identities"] == ["one"]
    assert cli_main(args[:-4] + ["--size", "31"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("avatarforge: error: --size must be an even number") and "\n" not in err


def test_discover_folders_lists_and_bad_entries(tmp_path: Path) -> None:
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ("a/x.MP4", "a/deep/y.mkv", "a/notes.txt", "a/.hidden.mp4", "b.webm"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "list.txt").write_text(f"# c\nb.webm\n{tmp_path / 'a'}\nnope.mov\n")
    videos, skipped = discover([tmp_path / "a", tmp_path / "list.txt", tmp_path / "a" / "notes.txt"])
    assert [p.name for p in videos] == ["y.mkv", "x.MP4", "b.webm"]  # input order, duplicates dropped
    assert [(Path(s.source).name, s.reason.split(" (")[0]) for s in skipped] == [("nope.mov", "not found")]
    # notes.txt named directly is a list; its (empty) entries add nothing
