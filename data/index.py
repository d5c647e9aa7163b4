"""The per-split shard index ({root}/{split}/index.json): written atomically, validated on read."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from avatarforge.atomic import atomic_write_text

SCHEMA_VERSION = 1
INDEX_NAME = "index.json"
SHARD_PATTERN = "clips-%06d.tar"


def split_dir(root: str | os.PathLike[str], split: str) -> Path:
    return Path(root) / split


def write_index(directory: str | os.PathLike[str], index: dict[str, Any]) -> Path:
    """Write index.json atomically, so readers never see a half-written index."""
    text = json.dumps(index, indent=1, sort_keys=True) + "\n"
    return atomic_write_text(Path(directory) / INDEX_NAME, text)


def read_index(root: str | os.PathLike[str], split: str) -> dict[str, Any]:
    """Load and sanity-check a split's index; errors name the file and what is wrong with it."""
    path = split_dir(root, split) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no dataset index at {path}: generate or ingest the '{split}' split first")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exn:
        raise ValueError(f"{path}: not valid JSON ({exn})") from exn
    version = index.get("schema_version") if isinstance(index, dict) else None
    if version != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {version!r}, this code reads {SCHEMA_VERSION}")
    shards, counts = index.get("shards"), index.get("counts")
    if not isinstance(shards, list) or not isinstance(counts, list) or len(shards) != len(counts):
        raise ValueError(f"{path}: 'shards' and 'counts' must be lists of equal length")
    if any(not isinstance(c, int) or c < 0 for c in counts):
        raise ValueError(f"{path}: 'counts' must be non-negative integers")
    return index


def shard_paths(root: str | os.PathLike[str], split: str, index: dict[str, Any]) -> list[str]:
    """Absolute shard paths; the index stores names relative to its split folder so datasets can move."""
    base = split_dir(root, split).resolve()
    return [str(base / name) for name in index["shards"]]
