"""Read W&B offline run files (`run-<id>.wandb`) to check what a stage logged.

wandb's Python package no longer ships a reader for its transaction log (the writer moved into
wandb-core), so this parses the documented LevelDB-log framing itself and decodes each record with
wandb's own protobuf schema.
"""

from __future__ import annotations

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # block trailer padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            pending += chunk
        else:
            break
        record = pb.Record()
        record.ParseFromString(pending)
        yield record


def read_offline_run(wandb_dir: Path, stage: str) -> dict:
    """Group, job type, logged history keys and artifact count over all offline files of a stage's run."""
    files = sorted(wandb_dir.glob(f"offline-run-*-{stage}-*/run-*.wandb"))
    assert files, f"no offline W&B run for stage {stage!r} under {wandb_dir}"
    out = {"group": None, "job_type": None, "history_keys": set(), "artifacts": 0, "files": len(files)}
    for path in files:
        for record in records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                out["group"] = record.run.run_group
                out["job_type"] = record.run.job_type
            elif kind == "history":
                out["history_keys"].update(item.key or "/".join(item.nested_key) for item in record.history.item)
            elif kind == "artifact":
                out["artifacts"] += 1
    return out
