"""SDE sampling for the rectified-flow models of flow.py, so that every sampling step has a density.

The ODE dx/dt = v (flow.euler_sample) is deterministic: a trajectory has no log-probability to weigh by a
reward. Flow-GRPO (Liu et al. 2025) swaps it for an SDE with the same marginals p_t; an Euler-Maruyama
step from t to t_next = t + dt (dt < 0) is Gaussian:

    mean = x + [v + sigma_t^2 / (2 t) * (x + (1 - t) v)] dt,     std = sigma_t * sqrt(-dt),
    sigma_t = a * sqrt(t / (1 - t))         (a = noise_level; Flow-GRPO uses 0.7)

At t = 1 sigma_t is infinite; as in Flow-GRPO's code, the first step uses 1 - t_next in place of 1 - t.
noise_level = 0 is exactly the Euler step of the ODE. Densities are computed in fp32 (bf16 overflows in
the mean, Flow-GRPO notes the same).

    traj = sde_sample(model_fn, shape, steps, noise_level, generator, **cond)       # rollouts, no_grad
    lp, mean, std = transition_log_prob(policy_fn, traj.latents[i], traj.latents[i + 1],
                                        traj.timesteps[i], traj.timesteps[i + 1], noise_level, **cond)
    ratio = (lp - traj.log_probs[:, i]).exp()                                         # GRPO's ratio

Log-probabilities sum over all non-batch dimensions (the density of the whole latent) unless
reduce="mean" (Flow-GRPO's choice, a per-element average that keeps ratios near 1 for large latents).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .flow import ModelFn, _expand, _randn, sampling_timesteps

REDUCTIONS = ("sum", "mean")


def _as_batch_t(t: float | torch.Tensor, batch: int, device) -> torch.Tensor:
    """A float, 0-dim or [B] time -> [B] fp32 on device."""
    t = torch.as_tensor(t, dtype=torch.float32, device=device)
    return t.expand(batch) if t.dim() == 0 else t.float()


def sde_sigma(t: torch.Tensor, t_next: torch.Tensor, noise_level: float) -> torch.Tensor:
    """sigma_t = a * sqrt(t / (1 - t)), with 1 - t_next standing in for 1 - t where t = 1."""
    one_minus = 1.0 - torch.where(t >= 1.0, t_next, t)
    return noise_level * torch.sqrt(t / one_minus)


def sde_mean_std(x: torch.Tensor, v: torch.Tensor, t: float | torch.Tensor, t_next: float | torch.Tensor,
                 noise_level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (shape of x) and std ([B, 1, ...], broadcastable) of the Gaussian step from t to t_next < t,
    both fp32. t / t_next: floats, 0-dim or [B] tensors."""
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    b = x.shape[0]
    t_b = _expand(_as_batch_t(t, b, x.device), x.float())
    tn_b = _expand(_as_batch_t(t_next, b, x.device), x.float())
    dt = tn_b - t_b
    x32, v32 = x.float(), v.float()
    sigma = sde_sigma(t_b, tn_b, noise_level)
    mean = x32 + (v32 + sigma.pow(2) / (2 * t_b) * (x32 + (1 - t_b) * v32)) * dt
    return mean, sigma * torch.sqrt(-dt)


def sde_step(x: torch.Tensor, v: torch.Tensor, t: float | torch.Tensor, t_next: float | torch.Tensor,
             noise_level: float, generator: torch.Generator | None = None,
             noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One SDE step from x at t with velocity v: (x_next in x's dtype, mean fp32, std fp32 [B, 1, ...]).

    The step's standard normal draw is `noise` if given, else from `generator` (or the global RNG);
    nothing is drawn when noise_level = 0."""
    mean, std = sde_mean_std(x, v, t, t_next, noise_level)
    if noise_level == 0:
        return mean.to(x.dtype), mean, std
    if noise is None:
        noise = _randn(x.shape, generator, x.device, torch.float32)
    return (mean + std * noise.float()).to(x.dtype), mean, std


def gaussian_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float,
                      reduce: str = "sum") -> torch.Tensor:
    """log N(x_next; mean, std^2) per sample [B]: summed (the joint density) or averaged over all
    non-batch dims. std must be > 0 and broadcastable to mean. x_next is treated as data (detached)."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    z = (x_next.detach().float() - mean.float()) / std
    lp = -0.5 * z.pow(2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    lp = lp.expand_as(z)
    dims = tuple(range(1, lp.dim()))
    return lp.sum(dims) if reduce == "sum" else lp.mean(dims)


def _check_stochastic(noise_level: float) -> None:
    if noise_level <= 0:
        raise ValueError("log-probabilities need noise_level > 0: an ODE step (noise_level=0) has no density")


@dataclass
class SDETrajectory:
    """One batch of SDE rollouts. latents [steps + 1, B, ...] from the initial noise (t=1) to the sample
    (t=0); log_probs [B, steps] (fp32) of each transition under the sampling model, None when
    noise_level = 0; timesteps [steps + 1] from 1 to 0."""

    latents: torch.Tensor
    log_probs: torch.Tensor | None
    timesteps: torch.Tensor
    noise_level: float

    @property
    def steps(self) -> int:
        return self.timesteps.numel() - 1

    @property
    def samples(self) -> torch.Tensor:
        """The final latents x_0 [B, ...]."""
        return self.latents[-1]


@torch.no_grad()
def sde_sample(model_fn: ModelFn, shape: Sequence[int], steps: int, noise_level: float,
               generator: torch.Generator | None = None, *, noise: torch.Tensor | None = None,
               step_noise: torch.Tensor | None = None, device=None, dtype: torch.dtype = torch.float32,
               shift: float = 1.0, reduce: str = "sum", **cond) -> SDETrajectory:
    """Roll out the SDE from t=1 to 0 with the timesteps of flow.sampling_timesteps(steps, shift).

    Initial noise: `noise`, else drawn from `generator` first (as euler_sample does, so noise_level=0
    with the same generator gives euler_sample's result); step draws: `step_noise` [steps, *shape], else
    from `generator`. `cond` goes to model_fn(x, t, **cond)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = noise if noise is not None else _randn(tuple(shape), generator, device, dtype)
    if step_noise is not None and tuple(step_noise.shape) != (steps, *x.shape):
        raise ValueError(f"step_noise must be [{steps}, {', '.join(map(str, x.shape))}], "
                         f"got {tuple(step_noise.shape)}")
    ts = sampling_timesteps(steps, shift, device=x.device)
    latents, log_probs = [x], []
    for i in range(steps):
        v = model_fn(x, ts[i].expand(x.shape[0]), **cond)
        eps = None if step_noise is None else step_noise[i]
        x, mean, std = sde_step(x, v, ts[i], ts[i + 1], noise_level, generator, eps)
        if noise_level > 0:
            log_probs.append(gaussian_log_prob(x, mean, std, reduce))
        latents.append(x)
    return SDETrajectory(torch.stack(latents), torch.stack(log_probs, dim=1) if log_probs else None, ts,
                         float(noise_level))


def transition_log_prob(model_fn: ModelFn, x: torch.Tensor, x_next: torch.Tensor,
                        t: float | torch.Tensor, t_next: float | torch.Tensor, noise_level: float, *,
                        reduce: str = "sum", **cond) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probability [B] of a stored transition x -> x_next under model_fn (grad flows into the model),
    with the step's mean and std (for a KL to a reference model's mean at the same std).

    t / t_next: floats, 0-dim or [B] tensors (a batch may mix steps of different trajectories)."""
    _check_stochastic(noise_level)
    t_b = _as_batch_t(t, x.shape[0], x.device)
    v = model_fn(x, t_b, **cond)
    mean, std = sde_mean_std(x, v, t_b, t_next, noise_level)
    return gaussian_log_prob(x_next, mean, std, reduce), mean, std


__all__ = [
    "SDETrajectory",
    "sde_sigma",
    "sde_mean_std",
    "sde_step",
    "gaussian_log_prob",
    "sde_sample",
    "transition_log_prob",
]
