"""Where the curriculum runs: an embedded local Ray cluster bound to 127.0.0.1, or an existing one."""

from __future__ import annotations

import os
from typing import Any


def ray_address(configured: str = "") -> str:
    """An explicit address (CLI/config) wins over RAY_ADDRESS; "" means an embedded local cluster."""
    return configured or os.environ.get("RAY_ADDRESS", "")


# Ray resolves "127.0.0.1" to the routable interface address unless this is off (its macOS/Windows
# default); it is read when ray is first imported, so set it before that.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def prefer_loopback() -> None:
    """Make an embedded cluster bind its node to 127.0.0.1. Call before `import ray`."""
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)


def connect(address: str = "", *, num_cpus: int = 0, namespace: str = "avatarforge",
            dashboard: bool = False) -> dict[str, Any]:
    """Start or join Ray. Returns a short description for the user."""
    address = ray_address(address)
    if not address:
        prefer_loopback()
    import ray

    if ray.is_initialized():
        return {"address": "already-initialized"}
    env: dict[str, Any] = {"env_vars": {"PYTHONUNBUFFERED": "1"}}
    if address:
        # No runtime_env here: inside a Ray job it would clash with the job's own (working_dir, env vars).
        ctx = ray.init(address=address, namespace=namespace, log_to_driver=True)
        return {"address": address, "dashboard": ctx.dashboard_url, "embedded": False}
    if not dashboard:
        env["worker_process_setup_hook"] = "avatarforge.cluster.connect.quiet_without_dashboard"
    # address="local" always starts a fresh cluster instead of joining a stray one on this machine.
    ctx = ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count(),
        namespace=namespace,
        include_dashboard=dashboard,
        _node_ip_address="127.0.0.1",
        runtime_env=env,
        log_to_driver=True,
    )
    node_ip = ctx.address_info.get("node_ip_address")
    if node_ip != "127.0.0.1":
        print(f"[ray] warning: the embedded cluster bound to {node_ip}, not 127.0.0.1 "
              "(ray was imported before prefer_loopback())", flush=True)
    return {"address": ctx.address_info.get("address", "local"), "node_ip": node_ip, "embedded": True}


def quiet_without_dashboard() -> None:
    """Worker setup hook for an embedded cluster started without the dashboard. Ray's state API is served
    by the dashboard, so Ray Train's placement-group cleaner (a detached actor that frees a crashed
    controller's placement group) cannot query the controller and warns every second of every stage.
    An embedded cluster goes away with its driver, placement groups included: keep only its errors."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(
        logging.ERROR)


def disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
