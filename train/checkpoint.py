"""Checkpoint contents beyond DeepSpeed's own: per-rank trainer state + RNG, and EMA weights.

DeepSpeed saves model, optimizer and LR scheduler; Ray Train merges every rank's files into one
persisted checkpoint directory. Everything here loads with `weights_only=True` or from safetensors/JSON.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

EMA_FILE = "ema.safetensors"


def _rank_file(directory: str | Path, rank: int) -> Path:
    return Path(directory) / f"trainer_state_rank{rank:04d}.pt"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rank_state(directory: str | Path, rank: int, trainer_state: dict[str, Any]) -> None:
    torch.save({"trainer": trainer_state, "rng": rng_state()}, _rank_file(directory, rank))


def load_rank_state(directory: str | Path, rank: int) -> dict[str, Any]:
    """Restores this rank's RNG and returns its trainer state (step, batches consumed...)."""
    path = _rank_file(directory, rank)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the checkpoint was written by fewer ranks than now run; "
            "resume with the same number of workers"
        )
    state = torch.load(path, weights_only=True)
    set_rng_state(state["rng"])
    return state["trainer"]


def save_ema(directory: str | Path, ema_state: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in ema_state.items()}, str(Path(directory) / EMA_FILE))


def load_ema(directory: str | Path) -> dict[str, torch.Tensor] | None:
    path = Path(directory) / EMA_FILE
    return load_file(str(path)) if path.exists() else None
