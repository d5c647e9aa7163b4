"""Build DeepSpeed's JIT ops that CPU training uses, once at install time (`make install`), and clear
the build locks that a killed build leaves behind."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# A CPU build of the shared-memory comm op takes about a minute (four on a loaded 2-core machine).
STALE_LOCK_S = 900.0


def extensions_root() -> Path:
    """Where torch builds JIT extensions (the same rule as torch.utils.cpp_extension)."""
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def clear_stale_build_locks(root: Path | None = None, max_age_s: float = STALE_LOCK_S) -> list[Path]:
    """Remove JIT-extension build locks older than `max_age_s`; returns the removed paths.

    torch's build lock (FileBaton) is an empty file with no owner: a build killed mid-way leaves it, and
    every later load of that extension (each DeepSpeed start on CPU) then waits on it forever. Builds are
    short, so an old lock is a dead build's; without it the next load rebuilds or reuses the op."""
    root = extensions_root() if root is None else root
    removed = []
    now = time.time()
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        try:
            if now - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(lock)
                print(f"removed a stale torch extension build lock: {lock}", file=sys.stderr, flush=True)
        except FileNotFoundError:  # released or removed by another process meanwhile
            continue
    return removed


def main() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    clear_stale_build_locks()
    start = time.perf_counter()
    from deepspeed.comm.torch import build_shm_op

    built = build_shm_op()
    print(f"DeepSpeed CPU shared-memory comm op: {'ready' if built else 'not available'} "
          f"({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
