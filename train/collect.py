"""The runtime of a non-training stage: a pool of Ray actors working through a stage's work items.

A stage like `preference_collect` has no optimizer: it runs models over many independent items (e.g. a few
prompts' groups of sampled videos) and writes one output file per item. Resume is per item: an item whose
output already exists is done, so a killed stage continues where it stopped. A dead actor is restarted by
Ray and its item retried (`max_failures`), like Ray Train's FailureConfig for training stages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from avatarforge.train.task import resolve_factory
from avatarforge.train.tracking import Tracker


class CollectTask(Protocol):
    """A non-training stage's work, built from the same `task_args` in the driver and in every actor."""

    def items(self) -> list[str]:
        """Deterministic ids of all work items."""

    def is_done(self, item: str) -> bool:
        """Whether the item's output exists (written atomically by run_item)."""

    def run_item(self, item: str) -> dict[str, Any]:
        """Do one item and write its output atomically; return float metrics (and uint8 [T, H, W, 3]
        arrays under `media/...` keys for sample videos). Must be deterministic given the item."""

    def finalize(self) -> dict[str, Any]:
        """Driver side, after every item is done: summary metrics (and an outputs index if any)."""


@dataclass
class CollectSpec:
    stage: str
    kind: str
    task_factory: str  # "package.module:function" returning a CollectTask from task_args
    task_args: dict[str, Any]
    num_actors: int = 1
    cpus_per_actor: float = 1
    gpus_per_actor: float = 0
    max_failures: int = 2
    tracking: dict[str, Any] = field(default_factory=dict)


@dataclass
class CollectResult:
    metrics: dict[str, Any]
    items: int
    resumed_items: int


def _worker_class():
    import ray

    @ray.remote
    class CollectWorker:
        def __init__(self, task_factory: str, task_args: dict[str, Any], threads: int) -> None:
            import torch

            torch.set_num_threads(max(1, threads))
            self.task = resolve_factory(task_factory)(task_args)

        def run(self, item: str) -> tuple[str, dict[str, Any]]:
            return item, self.task.run_item(item)

    return CollectWorker


def run_collect(spec: CollectSpec) -> CollectResult:
    """Run every pending item on `num_actors` actors; log progress to W&B from the driver."""
    import ray
    from ray.util import ActorPool

    task: CollectTask = resolve_factory(spec.task_factory)(spec.task_args)
    items = task.items()
    pending = [item for item in items if not task.is_done(item)]
    resumed = len(items) - len(pending)
    if resumed:
        print(f"[{spec.stage}] resuming: {resumed}/{len(items)} items already done", flush=True)
    tracker = Tracker(spec.tracking, enabled=True)
    start = time.time()
    if pending:
        options: dict[str, Any] = {"num_cpus": spec.cpus_per_actor, "max_restarts": spec.max_failures,
                                   "max_task_retries": spec.max_failures}
        if spec.gpus_per_actor:
            options["num_gpus"] = spec.gpus_per_actor
        worker = _worker_class().options(**options)
        actors = [worker.remote(spec.task_factory, spec.task_args, int(spec.cpus_per_actor))
                  for _ in range(min(spec.num_actors, len(pending)))]
        pool = ActorPool(actors)
        done = resumed
        try:
            for item, metrics in pool.map_unordered(lambda actor, it: actor.run.remote(it), pending):
                done += 1
                media = {k: v for k, v in metrics.items() if isinstance(v, np.ndarray)}
                scalars = {f"collect/{k}": float(v) for k, v in metrics.items() if k not in media}
                scalars["collect/items_done"] = done
                scalars["collect/items_per_s"] = (done - resumed) / max(time.time() - start, 1e-9)
                tracker.log(scalars, done)
                tracker.log_videos(media, done)
                print(f"[{spec.stage}] item {item} done ({done}/{len(items)})", flush=True)
        finally:
            for actor in actors:
                ray.kill(actor)
    summary = task.finalize()
    scalars = {k: v for k, v in summary.items() if isinstance(v, int | float)}
    tracker.log({f"summary/{k}": v for k, v in scalars.items()}, len(items))
    tracker.summary({**scalars, "items": len(items), "seconds": time.time() - start})
    tracker.finish()
    return CollectResult(metrics=summary, items=len(items), resumed_items=resumed)
