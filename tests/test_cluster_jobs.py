"""cluster/jobs.py without a cluster: the submit's wait for a job agent (the real submission path is
tests/test_job_submission.py)."""

from __future__ import annotations

import pytest

from avatarforge.cluster import jobs


class FlakyClient:
    """Refuses like a Ray head whose job agent has not registered yet, `refusals` times, then accepts."""

    def __init__(self, refusals: int, message: str = "Request failed with status code 500: No available agent "
                                                     "to submit job, please try again later.") -> None:
        self.refusals, self.message, self.calls = refusals, message, 0

    def submit_job(self, **job):
        self.calls += 1
        if self.calls <= self.refusals:
            raise RuntimeError(self.message)
        return job["submission_id"]


@pytest.fixture
def no_sleep(monkeypatch):
    monkeypatch.setattr(jobs.time, "sleep", lambda s: None)


def submit_with(monkeypatch, tmp_path, client, **kwargs) -> str:
    monkeypatch.setattr(jobs, "_client", lambda address: client)
    config = tmp_path / "c.yaml"
    config.write_text("name: x\n")
    return jobs.submit("http://127.0.0.1:1", str(config), [], submission_id="job-1", **kwargs)


def test_submit_waits_for_the_job_agent(monkeypatch, tmp_path, no_sleep):
    client = FlakyClient(refusals=3)
    assert submit_with(monkeypatch, tmp_path, client) == "job-1"
    assert client.calls == 4


def test_submit_gives_up_after_the_wait_with_one_line(monkeypatch, tmp_path, no_sleep):
    client = FlakyClient(refusals=10**6)
    with pytest.raises(jobs.JobsError, match="No available agent") as err:
        submit_with(monkeypatch, tmp_path, client, agent_wait_s=0.0)
    assert "\n" not in str(err.value) and client.calls == 1


def test_other_failures_are_not_retried(monkeypatch, tmp_path, no_sleep):
    client = FlakyClient(refusals=1, message="Request failed with status code 400: bad runtime_env")
    with pytest.raises(jobs.JobsError, match="bad runtime_env"):
        submit_with(monkeypatch, tmp_path, client)
    assert client.calls == 1
