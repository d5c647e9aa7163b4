"""Generate the v0 synthetic dataset: identity-grouped WebDataset shards plus an index per split."""

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
from .clip import GENERATOR, make_clip
from .identity import identity_name, sample_identity

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
    size: int
    fps: float
    sample_rate: int


def _render_identity(job: _Job) -> tuple[_Job, list[dict[str, Any]]]:
    """All clips of one identity (runs in a worker process; returns encoded bytes only)."""
    identity = sample_identity(job.seed, job.index)
    samples = [
        make_clip(
            identity,
            job.index,
            clip,
            seed=job.seed,
            seconds=job.seconds,
            size=job.size,
            fps=job.fps,
            sample_rate=job.sample_rate,
        )[0]
        for clip in range(job.clips)
    ]
    return job, samples


class _SplitWriter:
    """Rolls TarWriters every `shard_size` samples and records what the index needs."""

    def __init__(self, directory: Path, shard_size: int) -> None:
        self.directory, self.shard_size = directory, shard_size
        self.shards: list[str] = []
        self.counts: list[int] = []
        self.shard_identities: list[list[str]] = []
        self.identities: list[str] = []
        self._writer: Any = None  # webdataset.TarWriter

    def write(self, identity: str, sample: dict[str, Any]) -> None:
        if self._writer is None or self.counts[-1] >= self.shard_size:
            self._roll()
        assert self._writer is not None
        self._writer.write(sample)
        self.counts[-1] += 1
        if identity not in self.shard_identities[-1]:
            self.shard_identities[-1].append(identity)
        if identity not in self.identities:
            self.identities.append(identity)

    def _roll(self) -> None:
        import webdataset as wds  # here, not at module level: it pulls in torch, which workers never need

        self.close()
        name = SHARD_PATTERN % len(self.shards)
        # mtime fixed and no encoder: same seed -> byte-identical tar files
        self._writer = wds.TarWriter(str(self.directory / name), encoder=False, mtime=0.0)
        self.shards.append(name)
        self.counts.append(0)
        self.shard_identities.append([])

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
    if synth.shard_size < 1 or synth.clips_per_identity < 1 or synth.clip_seconds <= 0:
        raise ValueError("synth.shard_size and synth.clips_per_identity must be >= 1, clip_seconds > 0")
    ranges = {
        TRAIN_SPLIT: range(synth.identities),
        HELDOUT_SPLIT: range(synth.identities, synth.identities + synth.heldout_identities),
    }
    jobs = [
        _Job(split, i, synth.clips_per_identity, synth.seed, synth.clip_seconds, size, fps, sample_rate)
        for split, indices in ranges.items()
        for i in indices
    ]
    writers = {split: _SplitWriter(split_dir(root, split), synth.shard_size) for split in SPLITS}
    for split in SPLITS:
        _clear_split(split_dir(root, split))
    durations = dict.fromkeys(SPLITS, 0.0)
    n_frames = max(1, int(round(synth.clip_seconds * fps)))
    progress = tqdm(total=len(jobs), desc="synth identities", unit="id", disable=None)
    try:
        for job, samples in _map_jobs(jobs, synth.workers):
            for sample in samples:
                writers[job.split].write(identity_name(job.index), sample)
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
            "generator": {
                "name": GENERATOR,
                "seed": synth.seed,
                "clip_seconds": synth.clip_seconds,
                "clips_per_identity": synth.clips_per_identity,
                "shard_size": synth.shard_size,
            },
        }
        write_index(split_dir(root, split), index)  # last: an index means its shards are complete
        indexes[split] = index
    return indexes


def _map_jobs(jobs: list[_Job], workers: int) -> Iterator[tuple[_Job, list[dict[str, Any]]]]:
    """Yield (job, samples) in job order, so each identity's clips stay contiguous in its shards."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(_render_identity, jobs)
        return
    # spawn, not fork: generation may be called from threaded processes (Ray workers, loaders)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(workers, len(jobs), os.cpu_count() or 1)) as pool:
        yield from pool.imap(_render_identity, jobs)


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
