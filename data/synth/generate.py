"""Generate the synthetic dataset: identity-grouped WebDataset shards plus an index per split.

Within a split, each identity's records are contiguous: its long reference record first (members
ref.json/ref.mp4/ref.wav), then its clips. When an identity's clips continue into a new shard, its
reference is written again at the start of that shard, so every shard is self-contained and the loader
can attach references while streaming one shard. References are not counted as samples: the index's
`counts` (what the loader's positions and exact resume are built on) count clips only.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..config import SynthConfig
from ..index import INDEX_NAME, SCHEMA_VERSION, SHARD_PATTERN, read_index, split_dir, write_index
from .clip import GENERATOR, REFERENCE, make_record
from .identity import ROOM_PLACES, identity_name, sample_identity

TRAIN_SPLIT = "train"
HELDOUT_SPLIT = "heldout"
SPLITS = (TRAIN_SPLIT, HELDOUT_SPLIT)


@dataclass(frozen=True)
class _Job:
    split: str
    index: int
    clips: int
    seed: int
    seconds: float
    reference_seconds: float
    size: int
    fps: float
    sample_rate: int
    caption_room: str = "last"


def _render_identity(job: _Job) -> tuple[_Job, dict[str, Any] | None, list[dict[str, Any]]]:
    """The reference and all clips of one identity (runs in a worker process; returns bytes only)."""
    identity = sample_identity(job.seed, job.index)
    common = {"seed": job.seed, "size": job.size, "fps": job.fps, "sample_rate": job.sample_rate,
              "caption_room": job.caption_room}
    reference = None
    if job.reference_seconds > 0:
        reference = make_record(identity, job.index, REFERENCE, seconds=job.reference_seconds, **common)[0]
    clips = [make_record(identity, job.index, clip, seconds=job.seconds, **common)[0] for clip in range(job.clips)]
    return job, reference, clips


class _SplitWriter:
    """Rolls TarWriters every `shard_size` samples and records what the index needs."""

    def __init__(self, directory: Path, shard_size: int) -> None:
        self.directory, self.shard_size = directory, shard_size
        self.shards: list[str] = []
        self.counts: list[int] = []
        self.shard_identities: list[list[str]] = []
        self.shard_references: list[list[str]] = []  # identities whose reference record a shard holds
        self.identities: list[str] = []
        self.references: dict[str, str] = {}  # identity -> reference record key
        self._writer: Any = None  # webdataset.TarWriter
        self._reference: tuple[str, dict[str, Any]] | None = None  # the current identity's reference

    def start_identity(self, identity: str, reference: dict[str, Any] | None) -> None:
        """Next records belong to `identity`; its reference (if any) goes ahead of its clips."""
        self._reference = (identity, reference) if reference is not None else None
        if reference is not None:
            self.references[identity] = reference["__key__"]
            if self._writer is not None and self.counts[-1] < self.shard_size:
                self._write_reference()  # otherwise the roll before the first clip writes it

    def write(self, identity: str, sample: dict[str, Any]) -> None:
        if self._writer is None or self.counts[-1] >= self.shard_size:
            self._roll()
            if self._reference is not None and self._reference[0] == identity:
                self._write_reference()  # the identity continues in a new shard: repeat its reference
        assert self._writer is not None
        self._writer.write(sample)
        self.counts[-1] += 1
        if identity not in self.shard_identities[-1]:
            self.shard_identities[-1].append(identity)
        if identity not in self.identities:
            self.identities.append(identity)

    def _write_reference(self) -> None:
        if self._writer is None:
            self._roll()
        assert self._reference is not None and self._writer is not None
        identity, record = self._reference
        if identity not in self.shard_references[-1]:
            self._writer.write(record)
            self.shard_references[-1].append(identity)

    def _roll(self) -> None:
        import webdataset as wds  # here, not at module level: it pulls in torch, which workers never need

        self.close()
        name = SHARD_PATTERN % len(self.shards)
        # mtime fixed and no encoder: same seed -> byte-identical tar files. An int mtime: tarfile writes a
        # float one as a pax extended header ahead of every member, a second header for readers to parse
        self._writer = wds.TarWriter(str(self.directory / name), encoder=False, mtime=0)
        self.shards.append(name)
        self.counts.append(0)
        self.shard_identities.append([])
        self.shard_references.append([])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _clear_split(directory: Path) -> None:
    """Remove a previous generation's files (only ours), so stale shards never linger next to a new index."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / INDEX_NAME).unlink(missing_ok=True)
    for old in directory.glob("clips-*.tar"):
        old.unlink()


def generate_dataset(root: str, synth: SynthConfig, *, size: int, fps: float, sample_rate: int) -> dict:
    """Write {root}/train and {root}/heldout shards + index.json; returns {split: index dict}.

    Deterministic in synth.seed: the same config gives byte-identical shards and indexes, whatever
    synth.workers is. workers > 1 uses spawned processes, so a calling script needs the usual
    `if __name__ == "__main__":` guard (the CLI has one).
    """
    if size < 16 or size % 2:
        raise ValueError(f"size must be an even number >= 16, got {size}")
    _check_decodable(size)
    if synth.shard_size < 1 or synth.clips_per_identity < 1 or synth.clip_seconds <= 0:
        raise ValueError("synth.shard_size and synth.clips_per_identity must be >= 1, clip_seconds > 0")
    if synth.reference_seconds < 0:
        raise ValueError("synth.reference_seconds must be >= 0 (0: no reference records)")
    if synth.caption_room not in ROOM_PLACES:
        raise ValueError(f"synth.caption_room must be one of {ROOM_PLACES}, got {synth.caption_room!r}")
    ranges = {
        TRAIN_SPLIT: range(synth.identities),
        HELDOUT_SPLIT: range(synth.identities, synth.identities + synth.heldout_identities),
    }
    jobs = [
        _Job(split, i, synth.clips_per_identity, synth.seed, synth.clip_seconds, synth.reference_seconds, size, fps,
             sample_rate, synth.caption_room)
        for split, indices in ranges.items()
        for i in indices
    ]
    writers = {split: _SplitWriter(split_dir(root, split), synth.shard_size) for split in SPLITS}
    for split in SPLITS:
        _clear_split(split_dir(root, split))
    durations = dict.fromkeys(SPLITS, 0.0)
    n_frames = max(1, int(round(synth.clip_seconds * fps)))
    n_ref_frames = max(1, int(round(synth.reference_seconds * fps)))
    progress = tqdm(total=len(jobs), desc="synth identities", unit="id", disable=None)
    try:
        for job, reference, samples in _map_jobs(jobs, synth.workers):
            name = identity_name(job.index)
            writers[job.split].start_identity(name, reference)
            for sample in samples:
                writers[job.split].write(name, sample)
                durations[job.split] += n_frames / fps
            progress.update(1)
    finally:
        progress.close()
        for writer in writers.values():
            writer.close()
    indexes = {}
    for split, writer in writers.items():
        index = {
            "schema_version": SCHEMA_VERSION,
            "split": split,
            "shards": writer.shards,
            "counts": writer.counts,
            "shard_identities": writer.shard_identities,
            "total": sum(writer.counts),
            "identities": writer.identities,
            "duration_seconds": round(durations[split], 4),
            "fps": float(fps),
            "size": size,
            "sample_rate": sample_rate,
            "frames_per_clip": n_frames,
            # identity -> key of its reference record (members ref.json/ref.mp4/ref.wav), stored ahead of
            # the identity's clips in every shard listed for it in shard_references
            "references": writer.references,
            "shard_references": writer.shard_references,
            "reference_frames": n_ref_frames if writer.references else 0,
            "generator": {
                "name": GENERATOR,
                "seed": synth.seed,
                "clip_seconds": synth.clip_seconds,
                "reference_seconds": synth.reference_seconds,
                "clips_per_identity": synth.clips_per_identity,
                "shard_size": synth.shard_size,
                "caption_room": synth.caption_room,
            },
        }
        write_index(split_dir(root, split), index)  # last: an index means its shards are complete
        indexes[split] = index
    return indexes


def _map_jobs(
    jobs: list[_Job], workers: int
) -> Iterator[tuple[_Job, dict[str, Any] | None, list[dict[str, Any]]]]:
    """Yield (job, samples) in job order, so each identity's clips stay contiguous in its shards."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(_render_identity, jobs)
        return
    # spawn, not fork: generation may be called from threaded processes (Ray workers, loaders)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(workers, len(jobs), os.cpu_count() or 1)) as pool:
        yield from pool.imap(_render_identity, jobs)


def _check_decodable(size: int) -> None:
    """decord (the loader's decoder) mis-copies frames of some widths (16, 24, 48, 72 px...): refuse
    to write a dataset the loader could not read, before spending time on it."""
    import numpy as np

    from ..media import encode_mp4, open_video, read_frames

    probe = np.zeros((2, size, size, 3), np.uint8)
    try:
        read_frames(open_video(encode_mp4(probe, 25.0)), 0, 2, 25.0)
    except Exception as exn:
        raise ValueError(
            f"size {size}: decord cannot decode H.264 frames of this width ({str(exn)[:80]}); "
            "use e.g. 32, 40, 56, 64, 80, 96, 128 or 256"
        ) from exn


def dataset_exists(root: str) -> bool:
    """True when both splits have a readable index whose shards are all present."""
    try:
        for split in SPLITS:
            index = read_index(root, split)
            if not all((split_dir(root, split) / name).is_file() for name in index["shards"]):
                return False
    except (FileNotFoundError, ValueError):
        return False
    return True
