"""`avatarforge submit` to a real `ray start --head` on 127.0.0.1 with token auth, then `jobs ...`."""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import TINY, run_cli, small_overrides, tiny_subset
from tests.ray_cluster import LoopbackCluster

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TOKEN = "avatarforge-test-token-0123456789abcdef"


@pytest.fixture
def cluster(tmp_path):
    cluster = LoopbackCluster(tmp_path, head_cpus=2, token=TOKEN, dashboard=True)
    yield cluster
    cluster.stop()


STAGES = ("autoencoder", "t2v")


def test_submit_poll_logs(cluster, tmp_path, shared_data):
    # the submission path (upload, entrypoint, status, logs) is under test; the e2e test runs every stage
    config, overrides = tiny_subset(tmp_path, STAGES, small_overrides(tmp_path, shared_data, ae_steps=4, t2v_steps=4))
    submitted = run_cli("submit", "--address", cluster.dashboard_url, str(config), *overrides, env=cluster.env)
    job_id = submitted.stdout.strip().splitlines()[-1]
    assert job_id.startswith("avatarforge-")

    deadline = time.time() + 900
    status = None
    while time.time() < deadline:
        info = json.loads(run_cli("jobs", "status", job_id, "--address", cluster.dashboard_url,
                                  env=cluster.env).stdout)
        status = info["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(3)
    logs = run_cli("jobs", "logs", job_id, "--address", cluster.dashboard_url, env=cluster.env).stdout
    assert status == "SUCCEEDED", logs[-6000:]
    assert "[curriculum] autoencoder: done" in logs and "[curriculum] t2v: done" in logs
    for stage in STAGES:
        assert (tmp_path / "tiny" / "stages" / stage / "DONE.json").exists()
    listed = run_cli("jobs", "list", "--address", cluster.dashboard_url, env=cluster.env).stdout
    assert job_id in listed and "SUCCEEDED" in listed


def test_missing_token_and_bad_address_are_one_line_errors(cluster, tmp_path):
    no_token = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    proc = run_cli("jobs", "list", "--address", cluster.dashboard_url, env=no_token, check=False)
    assert proc.returncode == 2
    assert "token" in proc.stderr.lower() and "Traceback" not in proc.stderr

    proc = run_cli("submit", "--address", "http://127.0.0.1:9", str(TINY), env=cluster.env, check=False)
    assert proc.returncode == 2
    assert "cannot reach" in proc.stderr and "Traceback" not in proc.stderr

    proc = run_cli("jobs", "status", "x", "--address", "127.0.0.1:8265", env=cluster.env, check=False)
    assert proc.returncode == 2 and "http://HOST:8265" in proc.stderr
