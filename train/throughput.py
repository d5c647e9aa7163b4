"""Throughput metrics: samples/s, tokens/s, data-wait share, MFU against a measured or given peak."""

from __future__ import annotations

import time

import torch


def measure_matmul_peak_flops(size: int = 1024, repeats: int = 5, device: str = "cpu") -> float:
    """Measured fp32 matmul FLOP/s on this device: the honest CPU 'peak' to compare MFU against."""
    # Own generator: measuring must not move the training RNG (resume must replay it exactly).
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device)
    b = torch.randn(size, size, generator=gen).to(device)
    a @ b  # warm up the kernels
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


class ThroughputMeter:
    """Accumulates step timings between two `read()` calls."""

    def __init__(self, world_size: int, flops_per_sample: float = 0.0, peak_flops: float = 0.0) -> None:
        self.world_size = world_size
        self.flops_per_sample = flops_per_sample
        self.peak_flops = peak_flops
        self.reset()

    def reset(self) -> None:
        self.samples = self.tokens = 0
        self.data_wait = 0.0
        self.start = time.perf_counter()

    def add(self, samples: int, tokens: int, data_wait: float) -> None:
        self.samples += samples
        self.tokens += tokens
        self.data_wait += data_wait

    def read(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        samples_per_s = self.samples * self.world_size / elapsed
        out = {
            "perf/samples_per_s": samples_per_s,
            "perf/tokens_per_s": self.tokens * self.world_size / elapsed,
            "perf/data_wait_share": self.data_wait / elapsed,
        }
        if self.flops_per_sample and self.peak_flops:
            # forward + backward ~ 3x forward FLOPs; peak is per worker, so compare per worker.
            achieved = 3 * self.flops_per_sample * self.samples / elapsed
            out["perf/mfu"] = achieved / self.peak_flops
        self.reset()
        return out
