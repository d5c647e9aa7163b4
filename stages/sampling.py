"""Windowed sampling of the avatar model: speech of any length -> video, one window of `frames_per_window`
frames at a time, shared by `generate`, the in-stage evals and the quality library (teacher, distilled
student and SDE policies plug in their own velocity and step functions).

Window k+1 starts on the last frame of window k and keeps it: its first latent frame (which the causal
autoencoder encodes from that one frame alone) is held on the straight path from the previous window's
encoding to its own noise at every step, and set to it at the end, so windows continue one another.

    sampled = sample_windows(model, autoencoder, reference_latents, wave [B, S], text, text_mask,
                             frames_per_window=9, size=64, fps=25, sample_rate=16000,
                             velocity_fn=guided_velocity_fn(model, {"audio": 2, "reference": 1.5}), steps=12,
                             seeds=[0, 1, ...])
    sampled.video [B, 3, T, H, W] in [-1, 1]; sampled.nfe (network evaluations per video); sampled.seconds
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from avatarforge.model.avatar import ReferenceCache
from avatarforge.model.flow import interpolate, sampling_timesteps
from avatarforge.model.guidance import guided_velocity

# velocity_fn(x [B, C, T, H, W], t [B], cond) -> velocity; cond holds text, text_mask, audio (AudioWindows)
# and reference (ReferenceCache or None), ready for AvatarModel.forward / guided_velocity
VelocityFn = Callable[[torch.Tensor, torch.Tensor, Mapping[str, Any]], torch.Tensor]


class StepFn(Protocol):
    """One integration step from t to t_next < t; `window` and `step` let a stochastic policy key its noise
    or record per-step log-probabilities."""

    def __call__(self, x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, *,
                 window: int, step: int) -> torch.Tensor: ...


def euler_step(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, *, window: int,
               step: int) -> torch.Tensor:
    """The deterministic rectified-flow ODE step."""
    return x + (t_next - t) * v


def guided_velocity_fn(model: nn.Module, scales: Mapping[str, float] | None = None,
                       intervals: Mapping[str, tuple[float, float]] | None = None) -> VelocityFn:
    """Multi-condition classifier-free guidance ({"text", "audio", "reference"} scales; a many-step teacher).
    All scales 1 (or None) is one pass per step: the conditional velocity (a guidance-distilled student).
    intervals {condition: (lo, hi)}: that condition's scale applies only at lo <= t <= hi (t = 1 is noise),
    1 elsewhere: guidance in a limited interval, as in Kynkaanniemi et al. 2024."""
    scales, intervals = dict(scales or {}), {c: tuple(map(float, v)) for c, v in (intervals or {}).items()}
    unknown = set(intervals) - set(scales)
    if unknown:
        raise ValueError(f"intervals name conditions without a guidance scale: {sorted(unknown)}")
    if any(not 0.0 <= lo <= hi <= 1.0 for lo, hi in intervals.values()):
        raise ValueError(f"intervals must satisfy 0 <= lo <= hi <= 1, got {intervals}")

    bounds = {c: intervals.get(c, (0.0, 1.0)) for c in scales}

    def fn(x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
        now = float(t.max())  # the rows of a sampling batch share their timestep
        step_scales = {c: s if bounds[c][0] <= now <= bounds[c][1] else 1.0 for c, s in scales.items()}
        return guided_velocity(model, x, t, cond, step_scales)

    return fn


@dataclass(frozen=True)
class WindowPlan:
    """How `frames` frames are covered by windows of `window` frames that share one frame each."""

    frames: int
    window: int

    @property
    def stride(self) -> int:
        return self.window - 1

    @property
    def count(self) -> int:
        return max(1, int(np.ceil((self.frames - 1) / max(self.stride, 1))))

    def start(self, k: int) -> int:
        return k * self.stride


@dataclass
class Sampled:
    video: torch.Tensor  # [B, 3, T, H, W] in [-1, 1], T = the frames asked for
    nfe: float  # network evaluations per video (a batch-B forward pass counts one per video)
    seconds: float  # wall time of the whole call (encoders, sampling, decoding)
    windows: int


class _ForwardCounter:
    """Counts forward passes of `model` in units of the sampled batch (a doubled CFG batch counts twice)."""

    def __init__(self, model: nn.Module, batch: int) -> None:
        self.batch, self.count = batch, 0.0
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("x")
        self.count += (x.shape[0] if isinstance(x, torch.Tensor) else self.batch) / self.batch

    def close(self) -> None:
        self.handle.remove()


def _noise_generators(seeds: int | Sequence[int], batch: int) -> list[torch.Generator]:
    """One CPU generator per sample, so a sample's noise does not depend on what it is batched with."""
    seeds = [int(seeds) + i for i in range(batch)] if isinstance(seeds, int) else [int(s) for s in seeds]
    if len(seeds) != batch:
        raise ValueError(f"need one seed per sample: {len(seeds)} seeds for batch {batch}")
    return [torch.Generator().manual_seed(s) for s in seeds]


def window_wave(wave: torch.Tensor, k: int, frames_per_window: int, fps: float, sample_rate: int) -> torch.Tensor:
    """The audio [B, S_window] of window k (WindowPlan's frames; zero-padded past the speech's end)."""
    plan = WindowPlan(frames_per_window * (k + 1), frames_per_window)
    start, length = plan.start(k), int(frames_per_window / fps * sample_rate)
    seg = wave[:, int(start / fps * sample_rate): int((start + frames_per_window) / fps * sample_rate)]
    return torch.nn.functional.pad(seg, (0, length - seg.shape[1]))


@torch.no_grad()
def sample_windows(
    model: nn.Module,
    autoencoder: Any,
    reference: ReferenceCache | torch.Tensor | None,
    wave: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor | None,
    *,
    frames_per_window: int,
    size: int,
    fps: float,
    sample_rate: int,
    n_frames: int | None = None,
    velocity_fn: VelocityFn | None = None,
    steps: int = 12,
    shift: float = 1.0,
    timesteps: torch.Tensor | None = None,
    step_fn: StepFn = euler_step,
    seeds: int | Sequence[int] = 0,
    progress: bool = False,
) -> Sampled:
    """Sample videos covering the speech `wave` [B, S] (see module docstring).

    model: the AvatarModel that encodes audio and reference and whose forward passes are counted.
    autoencoder: a FrozenAutoencoder (encode / decode / latent_shape).
    reference: latents [B, C, Tr, h, w] of the reference video, its ReferenceCache, or None (no reference).
    text / text_mask: caption ids [B, L] (data.tokenizer.tokenize). size: frame side in pixels.
    n_frames: default the frames the audio covers.
    velocity_fn: default the conditional velocity (one pass per step). steps / shift or explicit
    `timesteps` (steps + 1 values from 1 to 0). step_fn: default the Euler ODE step.
    seeds: one per sample (or a first seed, incremented per sample); sample b's noise for window k is
    the k-th draw of generator(seeds[b]), whatever else is in the batch.
    """
    start_time = time.perf_counter()
    if wave.dim() != 2:
        raise ValueError(f"wave must be [B, samples], got shape {tuple(wave.shape)}")
    b, device = wave.shape[0], next(model.parameters()).device
    total = n_frames if n_frames is not None else max(1, int(np.ceil(wave.shape[1] / sample_rate * fps)))
    plan = WindowPlan(int(total), int(frames_per_window))
    if timesteps is None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        timesteps = sampling_timesteps(steps, shift)
    ts = timesteps.to(device=device, dtype=torch.float32)
    velocity_fn = velocity_fn or guided_velocity_fn(model)
    if isinstance(reference, torch.Tensor):
        reference = model.encode_reference(reference.to(device))
    text = text.to(device)
    text_mask = text_mask.to(device) if text_mask is not None else None
    gens = _noise_generators(seeds, b)
    shape = autoencoder.latent_shape((b, 3, plan.window, size, size))
    counter = _ForwardCounter(model, b)
    out: list[torch.Tensor] = []
    previous: torch.Tensor | None = None  # decoded last frame of the previous window, [B, 3, 1, H, W]
    try:
        for k in tqdm(range(plan.count), desc="generate", unit="window", disable=not progress):
            seg = window_wave(wave, k, plan.window, fps, sample_rate).to(device)
            cond = {"text": text, "text_mask": text_mask, "audio": model.encode_audio(seg, shape[2]),
                    "reference": reference}
            keep = autoencoder.encode(previous)[:, :, :1] if previous is not None else None
            noise = torch.stack([torch.randn(shape[1:], generator=g) for g in gens]).to(device)
            x = noise.clone()
            for i in range(len(ts) - 1):
                if keep is not None:  # hold the shared first frame on the previous window's trajectory
                    x[:, :, :1] = interpolate(keep, noise[:, :, :1], ts[i].expand(b))
                v = velocity_fn(x, ts[i].expand(b), cond)
                x = step_fn(x, v, ts[i], ts[i + 1], window=k, step=i)
            if keep is not None:
                x[:, :, :1] = keep
            video = autoencoder.decode(x)  # [B, 3, window, H, W]
            previous = video[:, :, -1:]
            out.append(video if k == 0 else video[:, :, 1:])
    finally:
        counter.close()
    video = torch.cat(out, dim=2)[:, :, :total]
    return Sampled(video, counter.count, time.perf_counter() - start_time, plan.count)


__all__ = ["VelocityFn", "StepFn", "euler_step", "guided_velocity_fn", "WindowPlan", "Sampled", "window_wave", "sample_windows"]
