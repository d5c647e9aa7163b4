"""A toy CollectTask for tests/test_collect_runtime.py (importable by Ray actors as `tests.collect_toy`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from avatarforge.atomic import atomic_write_text


class ToyTask:
    """Item k writes k squared. With `crash_once`, the first attempt at item 1 kills its actor's process."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.out = Path(args["out"])
        self.n = int(args["n"])
        self.crash_once = bool(args.get("crash_once"))

    def items(self) -> list[str]:
        return [f"item-{k}" for k in range(self.n)]

    def is_done(self, item: str) -> bool:
        return (self.out / f"{item}.json").exists()

    def run_item(self, item: str) -> dict[str, Any]:
        k = int(item.split("-")[1])
        marker = self.out / "crashed"
        if self.crash_once and k == 1 and not marker.exists():
            marker.write_text("1")
            os._exit(1)  # the actor's process dies mid-item
        atomic_write_text(self.out / f"{item}.json", json.dumps({"value": k * k, "pid": os.getpid()}))
        return {"value": float(k * k)}

    def finalize(self) -> dict[str, Any]:
        values = [json.loads((self.out / f"{i}.json").read_text())["value"] for i in self.items()]
        return {"total": float(sum(values)), "outputs": {"dir": str(self.out)}}


def build(args: dict[str, Any]) -> ToyTask:
    return ToyTask(args)
