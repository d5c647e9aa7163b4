"""The collect runtime (train/collect.py) on a real local Ray: actors, per-item resume, a dead actor retried."""

from __future__ import annotations

import json
import os
import sys

import pytest

from avatarforge.train.collect import CollectSpec, run_collect

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def ray_local():
    from conftest import ROOT

    from avatarforge.cluster.connect import connect, disconnect

    # the toy task is test code: importable as tests.collect_toy here and in the actors (which inherit
    # the environment of the cluster this fixture starts)
    sys.path.insert(0, str(ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    connect(num_cpus=2)
    yield
    disconnect()


def spec(out, **extra) -> CollectSpec:
    return CollectSpec(stage="toy", kind="toy", task_factory="tests.collect_toy:build",
                       task_args={"out": str(out), "n": 5, **extra}, num_actors=2, cpus_per_actor=1,
                       max_failures=2, tracking={"mode": "disabled"})


def test_items_run_on_actors_and_resume_skips_done(ray_local, tmp_path):
    out = tmp_path / "toy"
    out.mkdir()
    (out / "item-3.json").write_text(json.dumps({"value": 9, "pid": -1}))  # done before a "restart"
    result = run_collect(spec(out))
    assert result.items == 5 and result.resumed_items == 1
    assert result.metrics["total"] == sum(k * k for k in range(5))
    pids = {json.loads((out / f"item-{k}.json").read_text())["pid"] for k in range(5)}
    assert -1 in pids and os.getpid() not in pids  # item 3 was not redone; the rest ran in actors
    again = run_collect(spec(out))
    assert again.resumed_items == 5


def test_dead_actor_is_restarted_and_its_item_retried(ray_local, tmp_path):
    out = tmp_path / "toy"
    out.mkdir()
    result = run_collect(spec(out, crash_once=True))
    assert (out / "crashed").exists()
    assert result.metrics["total"] == sum(k * k for k in range(5))


def test_embedded_cluster_workers_silence_the_cleaner_that_needs_a_dashboard(ray_local):
    # Without a dashboard Ray Train's placement-group cleaner warns every second of every stage.
    import logging

    import ray

    @ray.remote(num_cpus=0)
    def level() -> int:
        return logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").level

    assert ray.get(level.remote()) == logging.ERROR
