"""`avatarforge data inspect DIR`: per-split counts, durations and identities, plus a contact sheet.

Numbers come from each split's index.json (verified against the shards on disk); the contact sheet decodes
a few clips spread over the shards, a row per clip, so a glance shows crops, colours and motion.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from avatarforge.atomic import atomic_write

from .contact_sheet import encode_png, thumbnails, tile
from .index import INDEX_NAME, read_index, shard_paths
from .media import open_video

THUMB = 96  # contact sheet tile side, pixels (smaller clips are shown at their own size)
SCAN = 64  # samples of a shard looked at when choosing sheet rows (bounds the bytes read)


class InspectError(ValueError):
    """A path that holds no readable dataset; the message is one line."""


@dataclass
class SplitSummary:
    split: str
    clips: int
    shards: int
    missing_shards: list[str]
    size_bytes: int
    duration_seconds: float
    identities: list[str]
    fps: float | None = None
    size: int | None = None
    sample_rate: int | None = None
    generator: str = ""


@dataclass
class Inspection:
    root: str
    splits: list[SplitSummary]
    sheet: str | None = None
    sheet_rows: list[str] = field(default_factory=list)  # "split/key" of each contact sheet row
    sheet_errors: list[str] = field(default_factory=list)  # clips the sheet could not show, with why


def find_splits(path: str | os.PathLike[str]) -> tuple[Path, list[str]]:
    """(root, split names): `path` is a dataset root (sub-folders with an index) or one split's folder."""
    path = Path(path)
    if (path / INDEX_NAME).is_file():
        return path.parent, [path.name]
    if not path.is_dir():
        raise InspectError(f"{path}: no such folder")
    splits = sorted(p.name for p in path.iterdir() if (p / INDEX_NAME).is_file())
    if not splits:
        raise InspectError(f"{path}: no split folder with an {INDEX_NAME} (not a dataset root?)")
    return path, splits


def summarize_split(root: Path, split: str) -> tuple[SplitSummary, dict[str, Any]]:
    try:
        index = read_index(root, split)
    except (FileNotFoundError, ValueError) as exn:
        raise InspectError(str(exn)) from exn
    paths = [Path(p) for p in shard_paths(root, split, index)]
    missing = [p.name for p in paths if not p.is_file()]
    fps = index.get("fps")
    duration = index.get("duration_seconds")
    if duration is None and fps and index.get("frames_per_clip"):
        duration = sum(index["counts"]) * index["frames_per_clip"] / fps
    summary = SplitSummary(
        split=split,
        clips=sum(index["counts"]),
        shards=len(paths),
        missing_shards=missing,
        size_bytes=sum(p.stat().st_size for p in paths if p.is_file()),
        duration_seconds=float(duration or 0.0),
        identities=[str(i) for i in index.get("identities", [])],
        fps=fps,
        size=index.get("size"),
        sample_rate=index.get("sample_rate"),
        generator=str((index.get("generator") or {}).get("name", "")),
    )
    return summary, index


def _spread(n_shards: int, wanted: int) -> list[int]:
    """Shard positions evenly over the list, so sheet rows come from different identities."""
    return sorted({int(round(x)) for x in np.linspace(0, n_shards - 1, min(wanted, n_shards))})


def _pick(samples: Iterator[dict[str, Any]], quota: int) -> list[dict[str, Any]]:
    """Up to `quota` clips of one shard, a new identity first where the first SCAN samples offer one.

    Samples without an mp4 (e.g. identity reference records) are not clips and are passed over.
    """
    fresh: list[dict[str, Any]] = []
    repeat: list[dict[str, Any]] = []
    seen: set[str] = set()
    for n, sample in enumerate(samples):
        if n == SCAN or len(fresh) == quota:
            break
        if "mp4" not in sample:
            continue
        try:
            identity = str(json.loads(sample.get("json", b"{}")).get("identity", sample["__key__"]))
        except (ValueError, AttributeError):
            identity = str(sample.get("__key__"))
        (repeat if identity in seen else fresh).append(sample)
        seen.add(identity)
    return (fresh + repeat)[:quota]


def sheet_rows(root: Path, split: str, index: dict[str, Any], *, clips: int,
               frames: int) -> tuple[list[tuple[str, np.ndarray]], list[str]]:
    """Up to `clips` (key, [frames, S, S, 3]) rows from shards spread over the split, and the errors met."""
    import webdataset as wds  # here: it imports torch, which a summary alone does not need

    errors: list[str] = []

    def handler(exn: Exception) -> bool:
        errors.append(f"{type(exn).__name__}: {str(exn)[:160]}")
        return True

    urls = shard_paths(root, split, index)
    chosen = [i for i in _spread(len(urls), clips) if Path(urls[i]).is_file() and index["counts"][i] > 0]
    rows: list[tuple[str, np.ndarray]] = []
    for n, i in enumerate(chosen):
        # even shares of what is left: a shard short of clips leaves more to the later ones
        quota = -(-(clips - len(rows)) // (len(chosen) - n))
        for sample in _pick(wds.tarfile_to_samples(handler=handler)(iter([{"url": urls[i]}])), quota):
            key = f"{split}/{sample.get('__key__')}"
            try:
                reader = open_video(sample["mp4"])
                picks = np.linspace(0, len(reader) - 1, frames).round().astype(int)
                video = reader.get_batch(picks.tolist()).asnumpy()
            except Exception as exn:  # decord raises several types on bad bytes; a sheet skips the clip
                errors.append(f"{key}: {type(exn).__name__}: {str(exn)[:160]}")
                continue
            rows.append((key, thumbnails(video, min(THUMB, video.shape[1]))))
    return rows, errors


def inspect_dataset(path: str | os.PathLike[str], *, sheet: str | os.PathLike[str] | None = None,
                    clips: int = 4, frames: int = 6) -> Inspection:
    """Summaries of every split under `path`; with `sheet`, also a PNG of `clips` rows per split."""
    if clips < 1 or frames < 1:
        raise InspectError("--clips and --frames must be >= 1")
    root, splits = find_splits(path)
    result = Inspection(root=str(root), splits=[])
    rows: list[np.ndarray] = []
    for split in splits:
        summary, index = summarize_split(root, split)
        result.splits.append(summary)
        if sheet is not None:
            split_rows, errors = sheet_rows(root, split, index, clips=clips, frames=frames)
            rows += [r for _, r in split_rows]
            result.sheet_rows += [key for key, _ in split_rows]
            result.sheet_errors += errors
    if sheet is not None and rows:
        side = min(r.shape[1] for r in rows)  # one tile size for the whole sheet
        png = encode_png(tile([thumbnails(r, side) for r in rows]))
        result.sheet = str(atomic_write(sheet, lambda tmp: Path(tmp).write_bytes(png)))
    return result


def format_inspection(result: Inspection, max_identities: int = 8) -> str:
    lines = [f"dataset {result.root}", "",
             "| split | clips | shards | duration | bytes | identities | fps | size | generator |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in result.splits:
        lines.append(
            f"| {s.split} | {s.clips} | {s.shards} | {_duration(s.duration_seconds)} "
            f"| {_bytes(s.size_bytes)} "
            f"| {len(s.identities)} | {s.fps or '?'} | {s.size or '?'} | {s.generator or '?'} |"
        )
    for s in result.splits:
        shown = ", ".join(s.identities[:max_identities])
        more = f" (+{len(s.identities) - max_identities} more)" if len(s.identities) > max_identities else ""
        lines.append(f"{s.split} identities: {shown}{more}")
        if s.missing_shards:
            names = ", ".join(s.missing_shards[:5])
            lines.append(f"{s.split}: MISSING {len(s.missing_shards)} shard(s): {names}")
    if result.sheet:
        lines.append(f"contact sheet: {result.sheet} (rows: {', '.join(result.sheet_rows)})")
    for error in result.sheet_errors:
        lines.append(f"contact sheet skipped {error}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def _bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
