"""Ingest inputs: video files found in folders, named directly or listed in .txt files, and their sidecars.

Sidecars sit next to a video and share its stem (`talk.mp4`):
- `talk.txt`: the caption (whole file);
- `talk.json`: {"caption": str, "identity": str, "box": {"x", "y", "w", "h"}}, every field optional;
- `talk.box.json`: {"x", "y", "w", "h"}, the crop box in displayed source pixels.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .footage import Box

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm")
LIST_SUFFIX = ".txt"


class SidecarError(ValueError):
    """A sidecar that exists but cannot be used; the message names the file."""


@dataclass(frozen=True)
class Skipped:
    source: str
    reason: str


@dataclass(frozen=True)
class Sidecar:
    caption: str = ""
    identity: str | None = None
    box: Box | None = None


def discover(inputs: Sequence[str | Path]) -> tuple[list[Path], list[Skipped]]:
    """Resolved video paths in input order (folders searched recursively, sorted; duplicates dropped), and
    the inputs that are not usable videos, with why."""
    found: dict[Path, None] = {}  # an ordered set
    skipped: list[Skipped] = []

    def add(path: Path, listed_in: Path | None) -> None:
        where = f" (listed in {listed_in})" if listed_in else ""
        if not path.exists():
            skipped.append(Skipped(str(path), f"not found{where}"))
        elif path.is_dir():
            for child in sorted(path.rglob("*")):
                hidden = child.name.startswith(".")
                if child.suffix.lower() in VIDEO_SUFFIXES and child.is_file() and not hidden:
                    found.setdefault(child.resolve())
        elif path.suffix.lower() in VIDEO_SUFFIXES:
            found.setdefault(path.resolve())
        elif path.suffix.lower() == LIST_SUFFIX and listed_in is None:
            for entry in _list_entries(path):
                add(entry, path)
        else:
            kinds = ", ".join(VIDEO_SUFFIXES)
            skipped.append(Skipped(str(path), f"not a folder, a video ({kinds}) or a .txt list{where}"))

    for item in inputs:
        add(Path(item), None)
    return list(found), skipped


def _list_entries(path: Path) -> list[Path]:
    """Non-blank, non-# lines of a list file; relative entries are relative to the list's folder."""
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entry = Path(line).expanduser()
            entries.append(entry if entry.is_absolute() else path.parent / entry)
    return entries


def source_id(video: Path) -> str:
    """A stable, unique, dot-free id (webdataset splits sample keys at the first dot): stem + path hash."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", video.stem).strip("_")[:48] or "video"
    return f"{stem}-{hashlib.sha1(str(video.resolve()).encode()).hexdigest()[:10]}"


def read_sidecar(video: Path) -> Sidecar:
    """The video's caption, identity and crop box from its sidecars; raises SidecarError on a bad one."""
    caption, identity, box = "", None, None
    text = video.with_suffix(".txt")
    if text.is_file():
        caption = text.read_text(encoding="utf-8", errors="replace").strip()
    meta_path = video.with_suffix(".json")
    if meta_path.is_file():
        meta = _json_object(meta_path)
        if "caption" in meta:
            caption = _string(meta, "caption", meta_path).strip()
        if "identity" in meta:
            identity = _string(meta, "identity", meta_path).strip() or None
        if "box" in meta:
            box = _box(meta["box"], meta_path)
    box_path = video.with_suffix(".box.json")
    if box_path.is_file():
        box = _box(_json_object(box_path), box_path)
    return Sidecar(caption=caption, identity=identity, box=box)


def _json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise SidecarError(f"{path.name}: not valid JSON ({exn})") from exn
    if not isinstance(value, dict):
        raise SidecarError(f"{path.name}: expected a JSON object")
    return value


def _string(meta: dict[str, Any], key: str, path: Path) -> str:
    if not isinstance(meta[key], str):
        raise SidecarError(f"{path.name}: '{key}' must be a string")
    return meta[key]


def _box(value: Any, path: Path) -> Box:
    keys = ("x", "y", "w", "h")
    if not isinstance(value, dict) or any(k not in value for k in keys):
        raise SidecarError(f"{path.name}: a box needs numbers x, y, w, h")
    nums = [value[k] for k in keys]
    if any(isinstance(n, bool) or not isinstance(n, int | float) for n in nums):
        raise SidecarError(f"{path.name}: box x, y, w, h must be numbers")
    if nums[2] <= 0 or nums[3] <= 0:
        raise SidecarError(f"{path.name}: box w and h must be positive")
    return Box(*(float(n) for n in nums))
