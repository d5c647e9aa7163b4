"""A training worker killed mid-stage: Ray Train restarts the group from the latest checkpoint and the
stage finishes (FailureConfig.max_failures from config)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import ROOT, cli_env, small_overrides, tiny_subset

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def train_workers(root_pid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_killed_worker_restarts_from_checkpoint(tmp_path, shared_data):
    config, overrides = tiny_subset(tmp_path, ("autoencoder",), small_overrides(tmp_path, shared_data, ae_steps=16))
    overrides += ["stages.autoencoder.train.scaling.max_failures=1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "avatarforge.cluster.cli", "run", str(config), *overrides], cwd=ROOT,
        env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        storage = tmp_path / "tiny" / "ray" / "autoencoder"
        deadline = time.time() + 600
        while not ((storage / "checkpoint_manager_snapshot.json").exists() and list(storage.glob("step_*"))):
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.2)
        victims = train_workers(proc.pid)
        assert victims, "found no RayTrainWorker process to kill"
        victims[0].send_signal(signal.SIGKILL)
        output, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-6000:]
    assert "rank 0: resumed at step" in output
    done = json.loads((tmp_path / "tiny" / "stages" / "autoencoder" / "DONE.json").read_text())
    assert done["metrics"]["step"] == 16
