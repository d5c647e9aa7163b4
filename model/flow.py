"""Rectified flow: the straight path from data (t=0) to noise (t=1), and a velocity-prediction loss.

    x_t = (1 - t) * x0 + t * noise,     target velocity v = dx_t/dt = noise - x0

A model `model_fn(x_t, t, **cond) -> v` is trained with MSE to the target; sampling integrates
dx/dt = v from t=1 (pure noise) down to t=0 with Euler steps.

Randomness (timesteps, noise) comes from an optional torch.Generator, so a run can be made exactly
reproducible; without one the global RNG is used. Random numbers are drawn on the generator's device and
moved to the data's device, so a CPU generator gives the same numbers whatever device trains.
Metrics are dicts of detached 0-dim tensors (no host sync inside the step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

ModelFn = Callable[..., torch.Tensor]
EVAL_TIMESTEPS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Training timestep distributions. logit_normal (SD3) puts little mass near t = 1 (P(t > 0.9) = 1.4%): fine
# for long runs, but in a few hundred steps the high-noise end, where sampling decides the layout, stays
# untrained; uniform trains every t alike.
TIMESTEP_DISTRIBUTIONS = ("logit_normal", "uniform")
# What the squared error is measured on. "velocity": v - (noise - x0), the rectified-flow loss. "data": the
# clean estimate x_t - t v against x0, i.e. the velocity error times t^2. For a clean-data head
# (v = (x_t - x0_hat) / t) the velocity loss weighs a timestep by 1/t^2: with uniform t the t > 0.9 end, where
# sampling decides the layout, gets ~0.3% of the gradient, and a few hundred steps leave its estimate worse
# than each channel's mean.
LOSS_WEIGHTINGS = ("velocity", "data")


def flow_loss_errors(name: str, shift: float = 1.0, weighting: str = "velocity") -> list[str]:
    """Messages (Options.validate entries) for a bad training timestep distribution, shift or loss weighting."""
    errors = [] if name in TIMESTEP_DISTRIBUTIONS else [f"timesteps: {name!r} is not one of {TIMESTEP_DISTRIBUTIONS}"]
    if not shift > 0:
        errors.append(f"timestep_shift: must be > 0, got {shift}")
    if weighting not in LOSS_WEIGHTINGS:
        errors.append(f"loss_weighting: {weighting!r} is not one of {LOSS_WEIGHTINGS}")
    return errors


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = shift t / (1 + (shift - 1) t): shift > 1 moves mass toward t = 1 (SD3's resolution shift)."""
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def _randn(shape, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def _expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, ...] to broadcast against x."""
    return t.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def sample_timesteps(batch: int, generator: torch.Generator | None = None, logit_normal: bool = True,
                     mean: float = 0.0, std: float = 1.0, device=None) -> torch.Tensor:
    """Training timesteps [batch] in (0, 1): logit-normal (SD3; favours the middle) or uniform."""
    if logit_normal:
        t = torch.sigmoid(_randn((batch,), generator, device, torch.float32) * std + mean)
    elif generator is None:
        t = torch.rand(batch, device=device)
    else:
        t = torch.rand(batch, generator=generator, device=generator.device).to(device)
    return t


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, with t [B]."""
    t = _expand(t, x0)
    return (1 - t) * x0 + t * noise


def flow_matching_loss(model_fn: ModelFn, x0: torch.Tensor, *, generator: torch.Generator | None = None,
                       t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                       weight: torch.Tensor | None = None, logit_normal: bool = True,
                       timesteps: str | None = None, timestep_shift: float = 1.0,
                       weighting: str = "velocity", dynamic_scale: float = 0.0,
                       dynamic_weight: torch.Tensor | None = None,
                       **cond) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MSE between model_fn(x_t, t, **cond) and noise - x0 (`weighting="velocity"`), or between the clean
    estimate x_t - t v and x0 (`"data"`, see LOSS_WEIGHTINGS).

    t / noise default to draws from `generator` (or the global RNG), shifted by `timestep_shift` (drawn t only);
    `timesteps` (one of TIMESTEP_DISTRIBUTIONS) overrides `logit_normal`. `dynamic_scale` > 0 adds a motion term for video
    [B, C, T, H, W]: the squared error of the clean estimate x_t - t v in what changes over time (each clip's
    deviation from its temporal mean), weighted by `dynamic_weight` (e.g. the mouth). Frame-to-frame change
    is a few percent of the variance, so the plain loss barely sees it: models learn the static picture first
    and meanwhile predict spurious motion (flicker), and a driving signal such as audio, which only explains
    the motion, gets no useful gradient. `weight` (broadcastable to x0, e.g. a
    mouth-region map) turns the mean into a weighted mean."""
    if timesteps is not None:
        if timesteps not in TIMESTEP_DISTRIBUTIONS:
            raise ValueError(f"timesteps must be one of {TIMESTEP_DISTRIBUTIONS}, got {timesteps!r}")
        logit_normal = timesteps == "logit_normal"
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
    if t is None:
        t = shift_timesteps(sample_timesteps(x0.shape[0], generator, logit_normal, device=x0.device), timestep_shift)
    if noise is None:
        noise = _randn(x0.shape, generator, x0.device, x0.dtype)
    x_t = interpolate(x0, noise, t)
    v = model_fn(x_t, t, **cond)
    # the clean estimate, for the data weighting and the motion term
    x0_hat = x_t.float() - _expand(t, x_t) * v.float() if weighting == "data" or dynamic_scale > 0 else None
    if weighting == "velocity":
        err = (v.float() - (noise - x0).float()).pow(2)
    else:
        err = (x0_hat - x0.float()).pow(2)
    loss = _weighted_mean(err, weight)
    metrics = {"loss": loss.detach(), "mse": err.mean().detach(), "t_mean": t.float().mean().detach()}
    if dynamic_scale > 0:
        dynamic = _weighted_mean(dynamic_error(x0_hat, x0.float()), dynamic_weight)
        loss = loss + dynamic_scale * dynamic
        metrics.update(loss=loss.detach(), dynamic=dynamic.detach())
    return loss, metrics


def dynamic_error(x0_hat: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Elementwise squared error of what changes over time (dim 2): each clip's deviation from its mean."""
    return ((x0_hat - x0_hat.mean(dim=2, keepdim=True)) - (x0 - x0.mean(dim=2, keepdim=True))).pow(2)


def regression_loss(pred: torch.Tensor, target: torch.Tensor, *, weight: torch.Tensor | None = None,
                    dynamic_scale: float = 0.0, dynamic_weight: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted MSE of pred against target (both [B, C, T, H, W]) plus, with dynamic_scale > 0, the motion
    term of flow_matching_loss on them (the error in what changes over time, weighted by dynamic_weight).
    For losses that regress a teacher's output (distillation) with the same region weighting as training."""
    err = (pred.float() - target.float()).pow(2)
    loss = _weighted_mean(err, weight)
    metrics = {"mse": err.mean().detach()}
    if dynamic_scale > 0:
        dynamic = _weighted_mean(dynamic_error(pred.float(), target.float()), dynamic_weight)
        loss = loss + dynamic_scale * dynamic
        metrics["dynamic"] = dynamic.detach()
    return loss, metrics


def _weighted_mean(err: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return err.mean()
    w = weight.float().expand_as(err)
    return (err * w).sum() / w.sum().clamp_min(1e-8)


def sampling_timesteps(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """steps + 1 times from 1 to 0. shift > 1 spends more steps near t=1 (high noise), as in SD3:
    t' = shift * t / (1 + (shift - 1) * t)."""
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)


def euler_sample(model_fn: ModelFn, shape: Sequence[int], steps: int,
                 generator: torch.Generator | None = None, *, noise: torch.Tensor | None = None,
                 device=None, dtype: torch.dtype = torch.float32, shift: float = 1.0,
                 grad: bool = False, **cond) -> torch.Tensor:
    """Integrate dx/dt = model_fn(x, t, **cond) from t=1 (noise from `generator`, or `noise`) to t=0.

    Runs under no_grad unless grad=True (e.g. reward-gradient fine-tuning through the sampler)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = noise if noise is not None else _randn(tuple(shape), generator, device, dtype)
    ts = sampling_timesteps(steps, shift, device=x.device)
    with torch.set_grad_enabled(grad):
        for i in range(steps):
            t = ts[i].expand(x.shape[0])
            v = model_fn(x, t, **cond)
            x = x + (ts[i + 1] - ts[i]).to(x.dtype) * v.to(x.dtype)
    return x


@torch.no_grad()
def eval_flow_loss(model_fn: ModelFn, x0: torch.Tensor, *, seed: int = 0,
                   timesteps: Sequence[float] = EVAL_TIMESTEPS, sample_seeds: Sequence[int] | None = None,
                   **cond) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Deterministic held-out flow loss: fixed timesteps, fixed noise.

    Noise comes from a CPU generator seeded with `seed` (the whole batch), or, with `sample_seeds`, one
    seed per sample, so a sample's noise does not depend on which batch or rank it lands in. The same
    noise is used at every timestep. Returns (mean loss over timesteps, {"loss", "loss_t0.1", ...})."""
    b = x0.shape[0]
    if sample_seeds is None:
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32)
    else:
        if len(sample_seeds) != b:
            raise ValueError(f"need one seed per sample: {len(sample_seeds)} seeds for batch {b}")
        noise = torch.stack([
            torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in sample_seeds
        ])
    noise = noise.to(device=x0.device, dtype=x0.dtype)
    metrics: dict[str, torch.Tensor] = {}
    for tv in timesteps:
        t = torch.full((b,), float(tv), device=x0.device)
        loss_t, _ = flow_matching_loss(model_fn, x0, t=t, noise=noise, **cond)
        metrics[f"loss_t{tv:g}"] = loss_t
    loss = torch.stack(list(metrics.values())).mean()
    return loss, {"loss": loss, **metrics}


__all__ = [
    "EVAL_TIMESTEPS",
    "TIMESTEP_DISTRIBUTIONS",
    "LOSS_WEIGHTINGS",
    "flow_loss_errors",
    "shift_timesteps",
    "sample_timesteps",
    "interpolate",
    "flow_matching_loss",
    "dynamic_error",
    "regression_loss",
    "sampling_timesteps",
    "euler_sample",
    "eval_flow_loss",
]
