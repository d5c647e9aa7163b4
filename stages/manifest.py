"""Stage manifests: DONE.json (a finished stage's lineage card) and STARTED.json, written atomically."""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from avatarforge import __version__
from avatarforge.atomic import atomic_write_json

DONE = "DONE.json"
STARTED = "STARTED.json"


@dataclass
class Manifest:
    stage: str
    kind: str
    config_hash: str
    parents: dict[str, str]  # parent stage -> its config hash
    final_checkpoint: str | None
    weights: str
    metrics: dict[str, Any]
    wandb_run_id: str
    started_at: float
    finished_at: float
    git_commit: str
    version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)


def git_commit(cwd: str | Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def write_done(stage_dir: Path, manifest: Manifest) -> Path:
    return atomic_write_json(stage_dir / DONE, asdict(manifest))


def read_done(stage_dir: Path) -> Manifest | None:
    path = stage_dir / DONE
    if not path.exists():
        return None
    try:
        return Manifest(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"{path} is unreadable ({exc}); remove it or rerun the stage with --rerun") from None


def write_started(stage_dir: Path, config_hash: str, started_at: float) -> Path:
    return atomic_write_json(stage_dir / STARTED, {"config_hash": config_hash, "started_at": started_at})


def read_started(stage_dir: Path) -> dict[str, Any] | None:
    path = stage_dir / STARTED
    return json.loads(path.read_text()) if path.exists() else None
