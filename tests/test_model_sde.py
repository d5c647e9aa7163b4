"""SDE sampling for rectified flow: step densities against direct computations, stored vs recomputed
log-probabilities, the ODE limit, and the SDE's marginals against the ODE's on a Gaussian toy problem."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from avatarforge.model.flow import euler_sample, sampling_timesteps
from avatarforge.model.sde import (
    gaussian_log_prob,
    sde_mean_std,
    sde_sample,
    sde_step,
    transition_log_prob,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyVelocity(nn.Module):
    """A small conditional velocity model on [B, C, T, H, W] latents."""

    def __init__(self, channels: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv3d(channels + 1, channels, 3, padding=1)

    def forward(self, x, t, scale: float = 1.0):
        tt = t.view(-1, 1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return scale * self.conv(torch.cat([x, tt], dim=1))


def reference_step(x, v, t, t_next, a):
    """The Flow-GRPO step written out independently (Flow-GRPO's form: x(1 + s^2/(2t) dt) + v(1 + s^2(1-t)/(2t)) dt)."""
    denom = 1 - (t_next if t >= 1 else t)
    s = a * math.sqrt(t / denom)
    dt = t_next - t
    mean = x * (1 + s**2 / (2 * t) * dt) + v * (1 + s**2 * (1 - t) / (2 * t)) * dt
    return mean, s * math.sqrt(-dt)


@pytest.mark.parametrize("t,t_next", [(1.0, 0.75), (0.6, 0.45), (0.2, 0.0)])
def test_step_mean_std_match_flow_grpo_formula(t, t_next):
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(4, 3, 2, 4, 4, generator=g), torch.randn(4, 3, 2, 4, 4, generator=g)
    mean, std = sde_mean_std(x, v, t, t_next, 0.7)
    ref_mean, ref_std = reference_step(x, v, t, t_next, 0.7)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std, torch.full((4, 1, 1, 1, 1), ref_std), rtol=1e-6, atol=1e-6)


def test_step_density_equals_torch_normal():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(5, 3, 2, 4, 4, generator=g), torch.randn(5, 3, 2, 4, 4, generator=g)
    t = torch.tensor([0.9, 0.7, 0.5, 0.3, 1.0])  # per-sample times
    t_next = t - 0.1
    x_next, mean, std = sde_step(x, v, t, t_next, 0.7, generator=g)
    direct = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x_next).sum(dim=(1, 2, 3, 4))
    torch.testing.assert_close(gaussian_log_prob(x_next, mean, std), direct, rtol=1e-5, atol=1e-3)
    n = mean[0].numel()
    torch.testing.assert_close(gaussian_log_prob(x_next, mean, std, reduce="mean"), direct / n,
                               rtol=1e-5, atol=1e-5)
    # the sample really follows N(mean, std): standardised residuals are standard normal
    z = (x_next - mean) / std
    assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.1
    # stds differ per sample as sigma_t does: larger near t=1 for the same dt
    assert std.view(-1)[4] > std.view(-1)[0] > std.view(-1)[3]


def test_step_uses_given_noise_and_generator_reproducibly():
    x, v = torch.randn(2, 3, 1, 2, 2), torch.randn(2, 3, 1, 2, 2)
    eps = torch.randn_like(x)
    x_next, mean, std = sde_step(x, v, 0.5, 0.25, 0.7, noise=eps)
    torch.testing.assert_close(x_next, mean + std * eps)
    a = sde_step(x, v, 0.5, 0.25, 0.7, generator=torch.Generator().manual_seed(3))[0]
    b = sde_step(x, v, 0.5, 0.25, 0.7, generator=torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, b)


def test_noise_level_zero_is_euler_sample():
    model = TinyVelocity()
    shape = (2, 3, 2, 4, 4)
    euler = euler_sample(model, shape, 5, torch.Generator().manual_seed(7), shift=3.0, scale=0.5)
    traj = sde_sample(model, shape, 5, 0.0, torch.Generator().manual_seed(7), shift=3.0, scale=0.5)
    torch.testing.assert_close(traj.samples, euler, rtol=1e-6, atol=1e-6)
    assert traj.log_probs is None
    torch.testing.assert_close(traj.timesteps, sampling_timesteps(5, 3.0))
    with pytest.raises(ValueError, match="noise_level > 0"):
        transition_log_prob(model, traj.latents[0], traj.latents[1], 1.0, traj.timesteps[1], 0.0)


def test_recomputed_log_probs_equal_stored_and_carry_gradients():
    model = TinyVelocity()
    shape = (3, 3, 2, 4, 4)
    traj = sde_sample(model, shape, 4, 0.7, torch.Generator().manual_seed(0), scale=0.8)
    assert traj.latents.shape == (5, *shape) and traj.log_probs.shape == (3, 4)
    assert torch.isfinite(traj.log_probs).all()
    for i in range(traj.steps):
        lp, mean, std = transition_log_prob(model, traj.latents[i], traj.latents[i + 1], traj.timesteps[i],
                                            traj.timesteps[i + 1], 0.7, scale=0.8)
        torch.testing.assert_close(lp, traj.log_probs[:, i], rtol=1e-6, atol=1e-4)
        assert lp.requires_grad
    # a batch mixing steps of different trajectories (per-sample t) gives the same numbers
    steps = torch.tensor([0, 2, 3])
    idx = torch.arange(3)
    lp_mixed, _, _ = transition_log_prob(model, traj.latents[steps, idx], traj.latents[steps + 1, idx],
                                         traj.timesteps[steps], traj.timesteps[steps + 1], 0.7, scale=0.8)
    torch.testing.assert_close(lp_mixed, traj.log_probs[idx, steps], rtol=1e-6, atol=1e-4)
    # gradients reach the model, and a different model gives a different density
    lp_mixed.sum().backward()
    assert model.conv.weight.grad.abs().sum() > 0
    other = TinyVelocity(seed=1)
    lp_other, _, _ = transition_log_prob(other, traj.latents[1], traj.latents[2], traj.timesteps[1],
                                         traj.timesteps[2], 0.7, scale=0.8)
    assert not torch.allclose(lp_other, traj.log_probs[:, 1], atol=1e-2)


def test_sampling_is_reproducible_and_step_noise_is_respected():
    model = TinyVelocity()
    shape = (2, 3, 1, 2, 2)
    a = sde_sample(model, shape, 3, 0.7, torch.Generator().manual_seed(5))
    b = sde_sample(model, shape, 3, 0.7, torch.Generator().manual_seed(5))
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    noise, step_noise = torch.randn(shape), torch.zeros(3, *shape)
    c = sde_sample(model, shape, 3, 0.7, noise=noise, step_noise=step_noise)
    d = sde_sample(model, shape, 3, 0.0, noise=noise)
    # zero step noise follows the SDE's mean path, which is not the ODE path (the drift is corrected)
    assert not torch.allclose(c.samples, d.samples, atol=1e-3)
    with pytest.raises(ValueError, match="step_noise"):
        sde_sample(model, shape, 3, 0.7, noise=noise, step_noise=torch.zeros(2, *shape))


def gaussian_velocity(mu: float, s: float):
    """Exact velocity E[noise - x0 | x_t] for data x0 ~ N(mu, s^2) (per element), noise ~ N(0, 1)."""

    def fn(x, t):
        t = t.view(-1, *([1] * (x.dim() - 1)))
        var = (1 - t) ** 2 * s**2 + t**2
        return (t - (1 - t) * s**2) / var * (x - (1 - t) * mu) - mu

    return fn


def test_sde_marginals_match_the_ode_on_gaussian_data():
    """With the exact velocity of Gaussian data the ODE's p_t is N((1-t) mu, (1-t)^2 s^2 + t^2); the
    SDE must keep these marginals (up to discretisation error) at every step and end at N(mu, s^2)."""
    mu, s, steps = 1.5, 0.5, 100
    fn = gaussian_velocity(mu, s)
    traj = sde_sample(fn, (20000, 4), steps, 0.7, torch.Generator().manual_seed(0))
    for i in (10, 50, 90, steps):
        t = traj.timesteps[i].item()
        x = traj.latents[i]
        m_t, sd_t = (1 - t) * mu, math.sqrt((1 - t) ** 2 * s**2 + t**2)
        assert abs(x.mean().item() - m_t) < 0.03 + 0.02 * sd_t, (i, t, x.mean().item(), m_t)
        assert abs(x.std().item() / sd_t - 1) < 0.06, (i, t, x.std().item(), sd_t)
    # the noise really is there: the same start gives different samples (the ODE would not)
    assert traj.samples.std().item() > 0.4


def test_invalid_arguments():
    with pytest.raises(ValueError, match="noise_level"):
        sde_mean_std(torch.zeros(1, 2), torch.zeros(1, 2), 0.5, 0.4, -0.1)
    with pytest.raises(ValueError, match="reduce"):
        gaussian_log_prob(torch.zeros(1, 2), torch.zeros(1, 2), 1.0, reduce="max")
    with pytest.raises(ValueError, match="steps"):
        sde_sample(TinyVelocity(), (1, 3, 1, 2, 2), 0, 0.7)
