"""Ingest real footage: videos -> fixed-length clips with audio -> WebDataset shards + index, resumably.

`avatarforge data ingest SRC... --out DIR` writes `{DIR}/{split}/clips-%06d.tar` in the synthetic world's
sample format (mp4 H.264 square at the target fps, wav 16-bit mono, json metadata), so
`build_train_loader` / `build_eval_batches` read it unchanged. Workers (spawned processes) cut one source
each into a part tar; the main process packs parts into shards in source order and commits them through
`ingest_state.json` (see ingest_state.py), so a rerun skips recorded sources and survives a crash.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .footage import Box, CutSpec, CutStats, SkipSource, brief, cut_clips
from .index import SCHEMA_VERSION, split_dir, write_index
from .ingest_state import PARTS_DIR, IngestError, IngestState, ShardPacker, write_shared_json
from .media import encode_mp4, encode_wav
from .sources import SidecarError, Skipped, discover, read_sidecar, source_id

REPORT_NAME = "ingest_report.json"
IDENTITY_FROM = ("stem", "folder")


@dataclass
class IngestOptions:
    clip_seconds: float = 2.0
    size: int = 64  # output frame side; even (yuv420p)
    fps: float = 25.0
    sample_rate: int = 16000
    shard_size: int = 32  # clips per shard (a long source may fill several)
    workers: int = 0  # processes; 0 = one per CPU
    crf: int = 18  # x264 quality of the re-encoded clips
    retry_skipped: bool = False  # try sources an earlier run skipped again
    identity_from: str = "stem"  # identity without a sidecar: the file's stem, or its "folder" name

    def cut_spec(self) -> CutSpec:
        if self.size < 16 or self.size % 2:
            raise IngestError(f"--size must be an even number >= 16, got {self.size}")
        if self.fps <= 0 or self.sample_rate <= 0:
            raise IngestError(f"fps and sample rate must be positive, got {self.fps} and {self.sample_rate}")
        frames = int(round(self.clip_seconds * self.fps))
        if frames < 1:
            raise IngestError(f"--clip-seconds {self.clip_seconds} is under one frame at {self.fps} fps")
        return CutSpec(clip_frames=frames, fps=float(self.fps), size=int(self.size),
                       sample_rate=int(self.sample_rate))


@dataclass
class IngestReport:
    split: str
    directory: str
    sources: int  # videos found this run
    new: int  # processed this run
    resumed: int  # already recorded by an earlier run, not touched
    clips_new: int
    clips_total: int
    seconds_total: float
    shards: int
    skipped: list[dict[str, str]] = field(default_factory=list)  # every skipped input, this and earlier runs
    warnings: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"ingest {self.split}: {self.sources} videos ({self.new} new, {self.resumed} already done) -> "
            f"{self.clips_total} clips ({self.clips_new} new), {self.seconds_total:.1f} s, "
            f"{self.shards} shards in {self.directory}"
        ]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)}:")
            lines += [f"  {s['source']}: {s['reason']}" for s in self.skipped]
        if self.warnings:
            lines.append(f"warnings {len(self.warnings)}:")
            lines += [f"  {w['source']}: {w['warning']}" for w in self.warnings]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Job:
    """One source for a worker process: plain values only (pickled into a spawned process)."""

    path: str
    source_id: str
    identity: str
    caption: str
    box: Box | None
    spec: CutSpec
    crf: int
    part: str  # the tar this worker writes the source's samples to


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    tar.addfile(info, io.BytesIO(data))


def cut_source(job: _Job) -> dict[str, Any]:
    """Worker: cut one source into its part tar; returns its record (status done or skipped, with why).

    Never raises for a bad source: one unreadable file must not stop the run.
    """
    stats = CutStats()
    record: dict[str, Any] = {"source": job.path, "source_id": job.source_id, "identity": job.identity,
                              "status": "skipped", "reason": "", "clips": 0, "seconds": 0.0, "shards": []}
    spec = job.spec
    clips = 0
    try:
        with tarfile.open(job.part, "w", format=tarfile.USTAR_FORMAT) as tar:
            for clip in cut_clips(job.path, spec, box=job.box, stats=stats):
                key = f"{job.source_id}-{clip.index:05d}"
                meta = {
                    "schema_version": SCHEMA_VERSION, "kind": "ingest", "identity": job.identity,
                    "caption": job.caption, "fps": spec.fps, "frames": spec.clip_frames, "size": spec.size,
                    "sample_rate": spec.sample_rate, "source": job.path, "start": round(clip.start, 4),
                    "clip": clip.index,
                }
                _add_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
                _add_member(tar, f"{key}.mp4", encode_mp4(clip.frames, spec.fps, crf=job.crf))
                _add_member(tar, f"{key}.wav", encode_wav(clip.audio / 32767.0, spec.sample_rate))
                clips += 1
        record.update(status="done", clips=clips, seconds=round(clips * spec.clip_seconds, 4))
    except SkipSource as exn:
        record["reason"] = str(exn)
    except Exception as exn:  # a bug or an FFmpeg surprise: report it against this source, keep going
        record["reason"] = f"failed: {brief(exn)}"
    if record["status"] != "done":
        Path(job.part).unlink(missing_ok=True)
    record["warnings"] = stats.warnings
    return record


def _run_jobs(jobs: list[_Job], workers: int) -> Iterator[dict[str, Any]]:
    """Records in job order (so shard layout does not depend on which worker finishes first)."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(cut_source, jobs)
        return
    # spawn, not fork: ingest may run inside threaded processes (Ray workers, loaders)
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap(cut_source, jobs)


def _plan(videos: list[Path], state: IngestState, spec: CutSpec, options: IngestOptions,
          parts: Path) -> tuple[list[_Job], list[dict[str, Any]], int]:
    """Jobs for unrecorded videos (sorted by identity so an identity's clips share shards), records of
    videos whose sidecar is unusable, and how many videos an earlier run already recorded."""
    jobs, bad, resumed = [], [], 0
    for video in videos:
        sid = source_id(video)
        if sid in state.sources:
            resumed += 1
            continue
        default_identity = video.parent.name if options.identity_from == "folder" else video.stem
        try:
            side = read_sidecar(video)
        except (SidecarError, OSError) as exn:
            bad.append({"source": str(video), "source_id": sid, "identity": default_identity,
                        "status": "skipped", "reason": f"sidecar: {exn}", "clips": 0, "seconds": 0.0,
                        "shards": [], "warnings": []})
            continue
        jobs.append(_Job(path=str(video), source_id=sid, identity=side.identity or default_identity,
                         caption=side.caption, box=side.box, spec=spec, crf=options.crf,
                         part=str(parts / f"{sid}.tar")))
    jobs.sort(key=lambda job: (job.identity, job.path))
    return jobs, bad, resumed


def ingest(inputs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *, split: str = "train",
           options: IngestOptions | None = None, progress: bool | None = None) -> IngestReport:
    """Ingest `inputs` (folders, videos, .txt lists) into `{out}/{split}`; returns (and writes) the report.

    Raises IngestError for unusable arguments or output folders. workers > 1 spawns processes, so a calling
    script needs the usual `if __name__ == "__main__":` guard. progress=None shows a bar on a terminal only.
    """
    options = options or IngestOptions()
    spec = options.cut_spec()
    if not inputs:
        raise IngestError("no sources given")
    if not split or "/" in split or split.startswith("."):
        raise IngestError(f"bad split name {split!r}")
    if options.identity_from not in IDENTITY_FROM:
        raise IngestError(f"identity_from must be one of {IDENTITY_FROM}, got {options.identity_from!r}")
    videos, missing = discover(inputs)
    settings = {"fps": spec.fps, "size": spec.size, "clip_frames": spec.clip_frames,
                "sample_rate": spec.sample_rate}
    state = IngestState.open(split_dir(out, split), settings)
    try:
        return _ingest_locked(state, videos, missing, split, spec, options, progress)
    finally:
        state.close()


def _ingest_locked(state: IngestState, videos: list[Path], missing: list[Skipped], split: str, spec: CutSpec,
                   options: IngestOptions, progress: bool | None) -> IngestReport:
    directory = state.directory
    if options.retry_skipped:
        state.forget_skipped()
    parts = directory / PARTS_DIR
    parts.mkdir(exist_ok=True)
    jobs, bad_sidecars, resumed = _plan(videos, state, spec, options, parts)
    packer = ShardPacker(state, options.shard_size)
    for record in bad_sidecars:
        packer.add(record, None)
    workers = options.workers if options.workers > 0 else (os.cpu_count() or 1)
    bar = tqdm(total=len(jobs), desc=f"ingest {split}", unit="video",
               disable=None if progress is None else not progress)
    clips_new = 0
    try:
        for record in _run_jobs(jobs, workers):
            packer.add(record, parts / f"{record['source_id']}.tar" if record["status"] == "done" else None)
            clips_new += record["clips"]
            bar.update(1)
            bar.set_postfix(clips=clips_new)
    finally:
        bar.close()
        packer.flush()  # commit what finished, also on Ctrl-C: the rerun resumes from here
    if parts.is_dir() and not any(parts.iterdir()):
        parts.rmdir()
    write_index(directory, state.index(split))
    report = _report(state, split, sources=len(videos), new=len(jobs) + len(bad_sidecars), resumed=resumed,
                     clips_new=clips_new, missing=missing)
    write_shared_json(directory / REPORT_NAME, asdict(report))
    return report


def _report(state: IngestState, split: str, *, sources: int, new: int, resumed: int, clips_new: int,
            missing: list[Skipped]) -> IngestReport:
    records = state.sources.values()
    skipped = [{"source": s.source, "reason": s.reason} for s in missing]
    skipped += [{"source": r["source"], "reason": r["reason"]} for r in records if r["status"] != "done"]
    warnings = [{"source": r["source"], "warning": w} for r in records for w in r.get("warnings", [])]
    done = [r for r in records if r["status"] == "done"]
    return IngestReport(
        split=split, directory=str(state.directory), sources=sources, new=new, resumed=resumed,
        clips_new=clips_new, clips_total=sum(r["clips"] for r in done),
        seconds_total=round(sum(r["seconds"] for r in done), 3), shards=len(state.shards), skipped=skipped,
        warnings=warnings,
    )
