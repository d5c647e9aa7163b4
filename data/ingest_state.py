"""The resumable side of ingest: one state file commits sources and shards together.

An ingested split folder holds `clips-%06d.tar` shards, `index.json` (what the loader reads),
`ingest_state.json` (the commit point) and `.parts/` (per-source tars written by workers, then packed).

Crash safety: shards are written under their final names but only count once `ingest_state.json`
(replaced atomically, after the shards are fsynced) names them. Opening a split removes every shard the
state does not name and every leftover part, so an interrupted run resumes from its last commit and
never duplicates a clip.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import IO, Any, BinaryIO

from avatarforge.atomic import atomic_write_json

from .index import INDEX_NAME, SCHEMA_VERSION, SHARD_PATTERN

STATE_NAME = "ingest_state.json"
LOCK_NAME = ".ingest.lock"
PARTS_DIR = ".parts"
STATE_VERSION = 1
SHARD_GLOB = "clips-*.tar"


def write_shared_json(path: Path, obj: Any) -> None:
    """Atomic JSON write; atomic_write gives it the permissions open() would (umask), like the shards."""
    atomic_write_json(path, obj)


class IngestError(ValueError):
    """Bad ingest input or an output folder that cannot be used; the message is one line."""


class IngestState:
    """Settings, one record per source (done or skipped), and the committed shards of one split folder."""

    def __init__(self, directory: Path, data: dict[str, Any], lock: IO[str]) -> None:
        self.directory = directory
        self._data = data
        self._lock = lock

    @classmethod
    def open(cls, directory: Path, settings: dict[str, Any]) -> IngestState:
        """Load (or start) the state and lock the folder until close(); refuses a folder that another ingest
        is writing, that holds another dataset, or that was ingested with other clip settings."""
        if not (directory / STATE_NAME).is_file() and (
            (directory / INDEX_NAME).exists() or any(directory.glob(SHARD_GLOB))
        ):
            raise IngestError(f"{directory} holds a dataset that ingest did not write; "
                              "choose another --out or --split")
        directory.mkdir(parents=True, exist_ok=True)
        lock = open(directory / LOCK_NAME, "w")  # held until close()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel if we die
            data = cls._load(directory, settings)
        except BaseException as exn:
            lock.close()
            if isinstance(exn, BlockingIOError):
                raise IngestError(f"another ingest is writing {directory}") from exn
            raise
        state = cls(directory, data, lock)
        state._remove_uncommitted()  # safe: the lock says no other run is mid-write here
        return state

    def close(self) -> None:
        self._lock.close()

    @staticmethod
    def _load(directory: Path, settings: dict[str, Any]) -> dict[str, Any]:
        path = directory / STATE_NAME
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exn:
                raise IngestError(f"{path}: unreadable ({exn}); remove the folder to start over") from exn
            if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
                raise IngestError(f"{path}: not an ingest state of version {STATE_VERSION}")
            changed = [f"{k}={data['settings'].get(k)!r} (now {v!r})" for k, v in settings.items()
                       if data["settings"].get(k) != v]
            if changed:
                raise IngestError(f"{directory} was ingested with {', '.join(changed)}; "
                                  "use the same settings or another --out/--split")
        else:
            data = {"version": STATE_VERSION, "settings": dict(settings), "sources": {}, "shards": {}}
        return data

    def _remove_uncommitted(self) -> None:
        for shard in self.directory.glob(SHARD_GLOB):
            if shard.name not in self._data["shards"]:
                shard.unlink()
        shutil.rmtree(self.directory / PARTS_DIR, ignore_errors=True)

    @property
    def sources(self) -> dict[str, dict[str, Any]]:
        return self._data["sources"]

    @property
    def shards(self) -> dict[str, dict[str, Any]]:
        return self._data["shards"]

    def forget_skipped(self) -> int:
        """Drop skipped sources' records so this run tries them again; returns how many."""
        skipped = [sid for sid, rec in self.sources.items() if rec["status"] != "done"]
        for sid in skipped:
            del self.sources[sid]
        return len(skipped)

    def next_shard_number(self) -> int:
        numbers = [int(name[len("clips-") : -len(".tar")]) for name in self.shards]
        return max(numbers, default=-1) + 1

    def commit(self, records: list[dict[str, Any]], shards: dict[str, dict[str, Any]]) -> None:
        """Name new shards and source records in one atomic replace of the state file."""
        self.shards.update(shards)
        for record in records:
            self.sources[record["source_id"]] = record
        write_shared_json(self.directory / STATE_NAME, self._data)

    def index(self, split: str) -> dict[str, Any]:
        """The loader's index.json for everything committed (shards in name order)."""
        settings = self._data["settings"]
        names = sorted(self.shards)
        counts = [self.shards[n]["count"] for n in names]
        shard_identities = [self.shards[n]["identities"] for n in names]
        identities = list(dict.fromkeys(i for ids in shard_identities for i in ids))
        done = sum(rec["status"] == "done" for rec in self.sources.values())
        return {
            "schema_version": SCHEMA_VERSION,
            "split": split,
            "shards": names,
            "counts": counts,
            "shard_identities": shard_identities,
            "total": sum(counts),
            "identities": identities,
            "duration_seconds": round(sum(counts) * settings["clip_frames"] / settings["fps"], 4),
            "fps": settings["fps"],
            "size": settings["size"],
            "sample_rate": settings["sample_rate"],
            "frames_per_clip": settings["clip_frames"],
            "generator": {"name": "ingest", "sources": done,
                          "clip_seconds": settings["clip_frames"] / settings["fps"]},
        }


class ShardPacker:
    """Copies finished sources' part tars into shards of about `shard_size` samples and commits them.

    A source never straddles shards unless it alone holds more than `shard_size` clips, so an identity's
    clips stay together. Commits happen at source boundaries, whenever the open shard is full, and in
    `flush()`.
    """

    def __init__(self, state: IngestState, shard_size: int) -> None:
        if shard_size < 1:
            raise IngestError(f"shard size must be >= 1, got {shard_size}")
        self.state, self.shard_size = state, shard_size
        self._next = state.next_shard_number()
        self._records: list[dict[str, Any]] = []
        self._shards: dict[str, dict[str, Any]] = {}
        self._file: BinaryIO | None = None
        self._tar: tarfile.TarFile | None = None
        self._name = ""
        self._count = 0

    def add(self, record: dict[str, Any], part: Path | None) -> None:
        """Queue a source's record; its clips (if any) are copied from `part`, which is then removed."""
        if part is not None and record["clips"]:
            if self._count and self._count + record["clips"] > self.shard_size:
                self.flush()
            record["shards"] = self._copy(part, record["identity"])
        if part is not None:
            part.unlink(missing_ok=True)
        self._records.append(record)
        if self._count >= self.shard_size:
            self.flush()

    def _copy(self, part: Path, identity: str) -> list[str]:
        names: list[str] = []
        with tarfile.open(part) as src:
            key = None
            for member in src:
                sample_key = member.name.split(".", 1)[0]
                if sample_key != key:  # members of one sample are adjacent: a new key starts a sample
                    key = sample_key
                    if self._tar is None or self._count >= self.shard_size:
                        self._roll()
                    self._count += 1
                    meta = self._shards[self._name]
                    meta["count"] += 1
                    if identity not in meta["identities"]:
                        meta["identities"].append(identity)
                    if self._name not in names:
                        names.append(self._name)
                assert self._tar is not None
                self._tar.addfile(member, src.extractfile(member))
        return names

    def _roll(self) -> None:
        self._close_shard()
        self._name = SHARD_PATTERN % self._next
        self._next += 1
        self._file = open(self.state.directory / self._name, "wb")  # closed in _close_shard
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._shards[self._name] = {"count": 0, "identities": []}
        self._count = 0

    def _close_shard(self) -> None:
        if self._tar is not None and self._file is not None:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())  # on disk before the state names it
            self._file.close()
        self._tar = self._file = None

    def flush(self) -> None:
        """Close the open shard and commit everything queued."""
        self._close_shard()
        self._count = 0
        if self._records or self._shards:
            self.state.commit(self._records, self._shards)
        self._records, self._shards = [], {}
