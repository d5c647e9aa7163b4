"""W&B from rank 0: one run per (curriculum run, stage), continued across restarts."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any


def wandb_run_id(run_name: str, stage: str) -> str:
    """Deterministic, so a restarted stage (new process, new node) continues the same W&B run."""
    digest = hashlib.sha1(f"{run_name}/{stage}".encode()).hexdigest()[:12]
    return f"{stage[:16]}-{digest}"


def tracking_settings(
    *, project: str, entity: str, mode: str, tags: list[str], run_name: str, stage: str, kind: str,
    directory: str, config: dict[str, Any], parents: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Plain settings shipped to the worker; WANDB_MODE / WANDB_PROJECT / WANDB_ENTITY win when set."""
    return {
        "project": os.environ.get("WANDB_PROJECT") or project,
        "entity": os.environ.get("WANDB_ENTITY") or entity or None,
        "mode": os.environ.get("WANDB_MODE") or mode,
        "tags": list(tags),
        "id": wandb_run_id(run_name, stage),
        "group": run_name,
        "job_type": stage,
        "name": f"{run_name}/{stage}",
        "dir": directory,
        "config": {**config, "stage_kind": kind},
        "parent_artifacts": [f"{parent}-weights:latest" for parent in parents],
    }


class Tracker:
    """Thin W&B wrapper; a no-op on ranks other than 0 or when mode is 'disabled'."""

    def __init__(self, settings: dict[str, Any], *, enabled: bool) -> None:
        self.run = None
        if not enabled or not settings or settings.get("mode") == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")  # keep the worker log for training lines
        import wandb

        Path(settings["dir"]).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=settings["project"],
            entity=settings["entity"],
            id=settings["id"],
            resume="allow",
            group=settings["group"],
            job_type=settings["job_type"],
            name=settings["name"],
            tags=settings["tags"],
            config=settings["config"],
            dir=settings["dir"],
            mode=settings["mode"],
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        self.run.define_metric("train/*", step_metric="step")
        self.run.define_metric("eval/*", step_metric="step")
        if settings["mode"] == "online":
            # Lineage parent -> stage in W&B's artifact graph. Offline W&B cannot use artifacts; the
            # local manifests (DONE.json) hold the same lineage and stay the source of truth.
            for name in settings.get("parent_artifacts", []):
                self.run.use_artifact(name)

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run:
            self.run.log({**metrics, "step": step}, step=step)

    def log_videos(self, videos: dict[str, Any], step: int, fps: int = 25) -> None:
        """Sample videos, uint8 arrays [T, H, W, 3] (several clips side by side are one video), written as
        mp4 with PyAV (wandb's own array encoder needs moviepy, which this project does not install)."""
        if not (self.run and videos):
            return
        import wandb

        from avatarforge.data.media import encode_mp4

        media_dir = Path(self.run.dir) / "media_src"
        media_dir.mkdir(parents=True, exist_ok=True)
        logged = {}
        for name, frames in videos.items():
            path = media_dir / f"{name.replace('/', '_')}_{step:08d}.mp4"
            path.write_bytes(encode_mp4(frames, fps))
            logged[name] = wandb.Video(str(path), format="mp4")
        self.run.log(logged, step=step)

    def log_weights(self, name: str, path: str, metadata: dict[str, Any]) -> None:
        """Exported weights as a reference artifact: lineage without uploading the file."""
        if not self.run:
            return
        import wandb

        artifact = wandb.Artifact(name=name, type="model", metadata=metadata)
        artifact.add_reference(f"file://{os.path.abspath(path)}", checksum=True)
        self.run.log_artifact(artifact, aliases=["latest"])

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run:
            self.run.summary.update(metrics)

    def finish(self) -> None:
        if self.run:
            self.run.finish()
            self.run = None
