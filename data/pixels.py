"""uint8 pixels -> the float video the models take (x / 127.5 - 1, in [-1, 1]), defined once.

The loader's collate converts with `to_unit` (numpy, on the CPU). With `data.video_uint8` the train
loader leaves batch["video"] / batch["reference"] as uint8 and the trainer calls `float_video` on the
batch it has just moved to its device (train/runtime.to_device), so the DataLoader (workers' shared
memory, pinning, host-to-device copy) moves a quarter of the bytes and the conversion runs on the
accelerator. Either way the values are the same bits. Kept free of decord and webdataset: the trainer
imports it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

VIDEO_KEYS = ("video", "reference")  # the batch entries that are pixel video
_SCALE, _ONE = np.float32(127.5), np.float32(1.0)


def to_unit(pixels: np.ndarray, out: np.ndarray) -> np.ndarray:
    """uint8 `pixels` -> float32 `out` (same shape) = pixels / 127.5 - 1; returns `out`."""
    np.divide(pixels, _SCALE, out=out, dtype=np.float32)
    np.subtract(out, _ONE, out=out)
    return out


# All 256 values through to_unit: an accelerator converts by table lookup, so its bits are numpy's by
# construction (a GPU division by a scalar may be a multiplication by its reciprocal, 1 ulp off).
_TABLE = torch.from_numpy(to_unit(np.arange(256, dtype=np.uint8), np.empty(256, np.float32)))
_TABLES: dict[torch.device, torch.Tensor] = {}


def unit_video(video: torch.Tensor) -> torch.Tensor:
    """uint8 video -> contiguous float32 in [-1, 1] on the same device (to_unit's values); other dtypes
    unchanged."""
    if video.dtype != torch.uint8:
        return video
    if video.device.type == "cpu":
        out = torch.empty(video.shape, dtype=torch.float32)
        to_unit(video.contiguous().numpy(), out.numpy())
        return out
    return _looked_up(video)


def _looked_up(video: torch.Tensor) -> torch.Tensor:
    """The accelerator path of unit_video: one gather from the 256-entry table, on video's device."""
    table = _TABLES.get(video.device)
    if table is None:
        table = _TABLES[video.device] = _TABLE.to(video.device)
    return table[video.int()].contiguous()


def float_video(batch: Any) -> Any:
    """A batch with its uint8 video entries (VIDEO_KEYS) as float [-1, 1]; anything else as it is."""
    if not isinstance(batch, dict) or not any(
        isinstance(batch.get(k), torch.Tensor) and batch[k].dtype == torch.uint8 for k in VIDEO_KEYS
    ):
        return batch
    return {k: unit_video(v) if k in VIDEO_KEYS and isinstance(v, torch.Tensor) else v for k, v in batch.items()}
