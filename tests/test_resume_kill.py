"""Kill the driver during `t2v`, and again during `rlhf` (SIGKILL, not a polite stop); each rerun skips the
finished stages, resumes the killed one from its latest checkpoint, and the curriculum ends with exactly the
weights of an uninterrupted run in every stage."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY, kill_at_checkpoint, run_cli, small_overrides

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_killed_driver_resumes_to_identical_weights(tmp_path, finished_run, shared_data):
    reference_dir, _ = finished_run
    args = ["run", str(TINY), *small_overrides(tmp_path, shared_data, t2v_steps=12)]
    run_dir = tmp_path / "tiny"
    kill_at_checkpoint(args, run_dir / "ray" / "t2v")
    assert (run_dir / "stages" / "autoencoder" / "DONE.json").exists()
    assert not (run_dir / "stages" / "t2v" / "DONE.json").exists()

    # the rerun resumes t2v; killed again in the last stage (after the preference and reward stages)
    kill_at_checkpoint(args, run_dir / "ray" / "rlhf")
    assert (run_dir / "stages" / "reward" / "DONE.json").exists()
    assert not (run_dir / "stages" / "rlhf" / "DONE.json").exists()

    resumed = run_cli(*args, timeout=1500)
    for stage in ("autoencoder", "t2v", "a2v", "sft", "distill", "preferences", "reward"):
        assert f"{stage}: done with the same config, skipped" in resumed.stdout
    assert re.search(r"plan: rlhf\s+resume", resumed.stdout)
    assert "[rlhf] rank 0: resumed at step" in resumed.stdout + resumed.stderr

    for stage in ("t2v", "a2v", "sft", "distill", "reward", "rlhf"):
        done = json.loads((run_dir / "stages" / stage / "DONE.json").read_text())
        reference = json.loads((reference_dir / "stages" / stage / "DONE.json").read_text())
        assert done["config_hash"] == reference["config_hash"]
        got, want = load_file(done["weights"]), load_file(reference["weights"])
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), f"{stage}: {name} differs from the uninterrupted run"
