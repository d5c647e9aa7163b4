"""A killed JIT build's lock is cleared before DeepSpeed loads its CPU op; a live build's is kept."""

import os
import time

from torch.utils.cpp_extension import FileBaton

from avatarforge.train.engine import ensure_accelerator
from avatarforge.train.prebuild import STALE_LOCK_S, clear_stale_build_locks


def _lock(path, age_s: float):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert FileBaton(str(path)).try_acquire()  # torch's own lock file, as a build takes it
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_old_locks_are_removed_young_ones_kept(tmp_path):
    dead = _lock(tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock", STALE_LOCK_S + 60)
    live = _lock(tmp_path / "py311_cpu" / "other_op" / "lock", 5)
    assert clear_stale_build_locks(tmp_path) == [dead]
    assert not dead.exists() and live.exists()
    # a waiter on the dead lock now proceeds: FileBaton.wait returns once the file is gone
    FileBaton(str(dead), wait_seconds=0.01).wait()


def test_cpu_accelerator_setup_clears_the_extensions_dirs_stale_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # layout without the pyXY_cpu level
    dead = _lock(tmp_path / "deepspeed_shm_comm" / "lock", STALE_LOCK_S + 60)
    ensure_accelerator(use_gpu=False)
    assert not dead.exists()
