"""Build DeepSpeed's JIT ops that CPU training uses, once at install time (`make install`)."""

from __future__ import annotations

import os
import time


def main() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    start = time.perf_counter()
    from deepspeed.comm.torch import build_shm_op

    built = build_shm_op()
    print(f"DeepSpeed CPU shared-memory comm op: {'ready' if built else 'not available'} "
          f"({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
