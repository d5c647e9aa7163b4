"""Two Ray nodes on loopback (a head plus `ray start --address`): 2 workers placed SPREAD with ZeRO-2
land on two node ids and train the stage to the end."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import run_cli, small_overrides, tiny_subset
from tests.ray_cluster import LoopbackCluster

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_two_nodes_spread_zero2(tmp_path, shared_data):
    cluster = LoopbackCluster(tmp_path, head_cpus=1)
    try:
        cluster.add_node(cpus=1)
        cluster.wait_for_nodes(2)
        config, overrides = tiny_subset(tmp_path, ("autoencoder",), small_overrides(tmp_path, shared_data, ae_steps=8))
        overrides += [
            "train_defaults.scaling.num_workers=2",
            "train_defaults.scaling.cpus_per_worker=1",
            "train_defaults.scaling.placement_strategy=SPREAD",
            "train_defaults.deepspeed.zero_stage=2",
        ]
        proc = run_cli("run", str(config), *overrides, "--address", cluster.address,
                       timeout=900, env=cluster.env)
    finally:
        cluster.stop()
    output = proc.stdout + proc.stderr
    nodes = dict(re.findall(r"rank (\d) of 2 on node ([0-9a-f]{8,})", output))
    assert set(nodes) == {"0", "1"}, output[-4000:]
    assert nodes["0"] != nodes["1"], "both workers ran on the same node"
    done = json.loads((tmp_path / "tiny" / "stages" / "autoencoder" / "DONE.json").read_text())
    assert done["metrics"]["step"] == 8
