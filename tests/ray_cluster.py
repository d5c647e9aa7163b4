"""Real Ray clusters on loopback for tests: `ray start --head` (+ more nodes with `ray start --address`)."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from avatarforge.cluster.connect import LOOPBACK_ENV
from tests.conftest import cli_env

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackCluster:
    """A head node (+ optional extra nodes) on 127.0.0.1, each `ray start` with its own resources."""

    def __init__(self, tmp: Path, *, head_cpus: int, token: str | None = None, dashboard: bool = False) -> None:
        self.port = free_port()
        self.dashboard_port = free_port()
        # No RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 here: Ray refuses multi-node clusters with it, so the
        # nodes register this machine's own address (never reachable from outside in tests). An earlier
        # in-process embedded cluster (cluster.connect) leaves it in os.environ, hence the pop.
        self.env = cli_env()
        for key in LOOPBACK_ENV:
            self.env.pop(key, None)
        # Token auth on for every node and client, as on a real cluster (Ray 2.60 turns it on for
        # `ray start --head` only; a joining node without the token is refused).
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token or secrets.token_hex(16))
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        # Ray's socket paths must stay under 107 bytes: pytest's tmp paths are too long.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
        cmd = [RAY, "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
               f"--num-cpus={head_cpus}", f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        if dashboard:
            cmd += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
        else:
            cmd += ["--include-dashboard=false"]
        self._run(cmd)

    def _run(self, cmd: list[str]) -> None:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")

    def add_node(self, cpus: int) -> None:
        self._run([RAY, "start", f"--address={self.address}", "--node-ip-address=127.0.0.1",
                   f"--num-cpus={cpus}", "--disable-usage-stats"])

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        code = (
            "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))"
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run([sys.executable, "-c", code, self.address], env=self.env,
                                 capture_output=True, text=True, timeout=120)
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1] == str(count):
                return
            time.sleep(1)
        raise RuntimeError(f"cluster did not reach {count} nodes")

    def stop(self) -> None:
        subprocess.run([RAY, "stop", "--force"], env=self.env, capture_output=True, timeout=120)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        os.environ.pop("RAY_ADDRESS", None)
