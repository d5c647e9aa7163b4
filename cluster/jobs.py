"""Ray Jobs API: submit the curriculum to a cluster and follow it (token auth stays on)."""

from __future__ import annotations

import asyncio
import shlex
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any


class JobsError(RuntimeError):
    """A one-line, user-facing failure of a jobs command."""


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    if not address.startswith(("http://", "https://")):
        raise JobsError(f"--address must be the dashboard URL, like http://HOST:8265 (got {address!r})")
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # Ray raises ConnectionError/RuntimeError with long traces; keep one line
        raise JobsError(_explain(exc, address)) from None


def _explain(exc: Exception, address: str) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    lowered = str(exc).lower()
    if "401" in lowered or "403" in lowered or "unauthorized" in lowered or "token" in lowered:
        return (f"Ray at {address} rejected the request ({text}): it needs the cluster's auth token; "
                "set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) and RAY_AUTH_MODE=token")
    if "connect" in lowered or "timed out" in lowered or "refused" in lowered:
        return f"cannot reach the Ray dashboard at {address}: {text}"
    return f"Ray jobs request to {address} failed: {text}"


def _call(address: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except JobsError:
        raise
    except Exception as exc:
        raise JobsError(_explain(exc, address)) from None


# Ray's head answers 500 "No available agent to submit job, please try again later" until a node's job
# agent has registered (seconds after `ray start` on a loaded machine): transient, so the submit waits for it.
AGENT_NOT_READY = "no available agent to submit job"


def _submit_when_agent_ready(address: str, client: Any, wait_s: float, **job: Any) -> str:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(**job)
        except Exception as exc:
            if AGENT_NOT_READY not in str(exc).lower() or time.monotonic() >= deadline:
                raise JobsError(_explain(exc, address)) from None
        time.sleep(2.0)


def submit(address: str, config_path: str, overrides: list[str], *, rerun: list[str] = (),
           python: str = "python", submission_id: str | None = None, agent_wait_s: float = 300.0) -> str:
    """Upload the config file as the job's working dir and run `avatarforge run` there. Returns the id.
    Waits up to agent_wait_s for the cluster's job agent (a freshly started head has none for a while)."""
    client = _client(address)
    staging = Path(tempfile.mkdtemp(prefix="avatarforge-submit-"))
    try:
        shutil.copy(config_path, staging / "curriculum.yaml")
        args = ["-m", "avatarforge.cluster.cli", "run", "curriculum.yaml", *overrides]
        for stage in rerun:
            args += ["--rerun", stage]
        entrypoint = " ".join(shlex.quote(a) for a in [python, *args])
        job_id = submission_id or f"avatarforge-{uuid.uuid4().hex[:10]}"
        return _submit_when_agent_ready(
            address,
            client,
            agent_wait_s,
            entrypoint=entrypoint,
            submission_id=job_id,
            runtime_env={"working_dir": str(staging), "env_vars": {"PYTHONUNBUFFERED": "1"}},
            metadata={"tool": "avatarforge"},
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def status(address: str, job_id: str) -> str:
    client = _client(address)
    return str(_call(address, client.get_job_status, job_id).value)


def info(address: str, job_id: str) -> dict[str, Any]:
    client = _client(address)
    job = _call(address, client.get_job_info, job_id)
    return {"job_id": job_id, "status": str(job.status.value), "message": job.message,
            "entrypoint": job.entrypoint, "start_time": job.start_time, "end_time": job.end_time}


def logs(address: str, job_id: str, *, follow: bool = False) -> None:
    client = _client(address)
    if not follow:
        print(_call(address, client.get_job_logs, job_id), end="", flush=True)
        return

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    _call(address, asyncio.run, tail())


def stop(address: str, job_id: str) -> bool:
    client = _client(address)
    return bool(_call(address, client.stop_job, job_id))


def list_jobs(address: str) -> list[dict[str, Any]]:
    client = _client(address)
    jobs = _call(address, client.list_jobs)
    return [{"job_id": j.submission_id or j.job_id, "status": str(j.status.value), "entrypoint": j.entrypoint}
            for j in jobs]
