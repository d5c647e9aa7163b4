import pytest
import torch

from avatarforge.model.flow import (
    EVAL_TIMESTEPS,
    euler_sample,
    eval_flow_loss,
    flow_matching_loss,
    interpolate,
    sample_timesteps,
    sampling_timesteps,
    shift_timesteps,
)


def test_interpolation_endpoints():
    x0, noise = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    assert torch.equal(interpolate(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(interpolate(x0, noise, torch.ones(3)), noise)


def test_sample_timesteps_range_and_determinism():
    for logit_normal in (True, False):
        a = sample_timesteps(1000, torch.Generator().manual_seed(0), logit_normal=logit_normal)
        b = sample_timesteps(1000, torch.Generator().manual_seed(0), logit_normal=logit_normal)
        assert torch.equal(a, b) and a.shape == (1000,)
        assert (a > 0).all() and (a < 1).all()
        assert abs(a.mean().item() - 0.5) < 0.05
    ln = sample_timesteps(5000, torch.Generator().manual_seed(0))
    un = sample_timesteps(5000, torch.Generator().manual_seed(0), logit_normal=False)
    assert ln.std() < un.std()  # logit-normal concentrates around the middle


def test_loss_timestep_distribution_by_name():
    x0 = torch.zeros(4000, 1)
    seen = {}
    for name in ("uniform", "logit_normal"):

        def model(xt, t, name=name):
            seen[name] = t
            return xt

        flow_matching_loss(model, x0, timesteps=name, generator=torch.Generator().manual_seed(0))
    expected = sample_timesteps(4000, torch.Generator().manual_seed(0), logit_normal=False)
    assert torch.equal(seen["uniform"], expected)
    assert (seen["uniform"] > 0.9).float().mean() > 0.08 > (seen["logit_normal"] > 0.9).float().mean()
    with pytest.raises(ValueError, match="timesteps must be one of"):
        flow_matching_loss(lambda xt, t: xt, x0, timesteps="cosine")


def test_data_weighting_measures_the_clean_estimate():
    # "data": the error of x_t - t v against x0 = the velocity error times t^2, so a clean-data head's
    # high-noise timesteps are not drowned by the 1/t^2 of the velocity loss
    torch.manual_seed(0)
    x0, noise = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    t = torch.tensor([0.1, 0.5, 1.0])
    x0_hat = torch.randn_like(x0)
    x_t = interpolate(x0, noise, t)

    def head(xt, tt):  # a clean-data head: its velocity is (x_t - x0_hat) / t
        return (xt - x0_hat) / tt.view(-1, 1, 1)

    _, vel = flow_matching_loss(head, x0, t=t, noise=noise)
    loss, data = flow_matching_loss(head, x0, t=t, noise=noise, weighting="data")
    assert torch.allclose(loss, ((x0_hat - x0) ** 2).mean(), atol=1e-6)
    per_sample_v = ((head(x_t, t) - (noise - x0)) ** 2).mean(dim=(1, 2))
    assert torch.allclose(((x0_hat - x0) ** 2).mean(dim=(1, 2)), per_sample_v * t**2, atol=1e-5)
    assert not torch.allclose(vel["mse"], data["mse"])
    with pytest.raises(ValueError, match="weighting must be one of"):
        flow_matching_loss(head, x0, t=t, noise=noise, weighting="snr")


def test_timestep_shift_moves_training_draws_toward_noise():
    t = torch.linspace(0, 1, 11)
    assert torch.equal(shift_timesteps(t, 1.0), t)
    s = shift_timesteps(t, 3.0)
    assert s[0] == 0 and s[-1] == 1 and (s[1:-1] > t[1:-1]).all()
    assert torch.allclose(sampling_timesteps(4, shift=3.0), shift_timesteps(torch.linspace(1, 0, 5), 3.0))
    seen = {}
    for shift in (1.0, 3.0):

        def model(xt, tt, shift=shift):
            seen[shift] = tt
            return xt

        flow_matching_loss(model, torch.zeros(4000, 1), timesteps="uniform", timestep_shift=shift,
                           generator=torch.Generator().manual_seed(0))
    assert torch.allclose(seen[3.0], shift_timesteps(seen[1.0], 3.0))
    assert (seen[3.0] > 0.9).float().mean() > 2 * (seen[1.0] > 0.9).float().mean()


def test_dynamic_term_scores_only_what_changes_over_time():
    torch.manual_seed(0)
    x0 = torch.randn(2, 3, 4, 5, 5)  # [B, C, T, H, W]
    noise = torch.randn_like(x0)
    t = torch.full((2,), 0.5)
    static = x0.mean(dim=2, keepdim=True).expand_as(x0)
    x_t = (1 - 0.5) * x0 + 0.5 * noise

    def predicts(x0_hat):  # the velocity whose clean estimate x_t - t v is x0_hat
        return lambda xt, tt: (x_t - x0_hat) / 0.5

    base, _ = flow_matching_loss(predicts(static), x0, t=t, noise=noise)
    loss, m = flow_matching_loss(predicts(static), x0, t=t, noise=noise, dynamic_scale=2.0)
    expected = ((x0 - static) ** 2).mean()  # a motionless estimate misses all of the motion
    assert torch.allclose(m["dynamic"], expected) and torch.allclose(loss, base + 2.0 * expected)
    shifted = x0 + torch.randn(2, 3, 1, 5, 5)  # wrong static picture, right motion: no dynamic error
    _, m = flow_matching_loss(predicts(shifted), x0, t=t, noise=noise, dynamic_scale=1.0)
    assert float(m["dynamic"]) < 1e-10
    mask = torch.zeros(1, 1, 1, 5, 5)
    mask[..., 2, 2] = 1.0  # weighted: only that place counts
    _, m = flow_matching_loss(predicts(static), x0, t=t, noise=noise, dynamic_scale=1.0, dynamic_weight=mask)
    assert torch.allclose(m["dynamic"], ((x0 - static) ** 2)[..., 2, 2].mean())


def test_loss_is_zero_for_the_exact_target_and_deterministic_with_generator():
    x0 = torch.randn(4, 2, 3)
    noise = torch.randn_like(x0)
    loss, m = flow_matching_loss(lambda xt, t: noise - x0, x0, noise=noise)
    assert loss.item() == 0.0 and set(m) >= {"loss", "mse", "t_mean"}

    def model(xt, t, scale=1.0):
        return xt * scale

    la, _ = flow_matching_loss(model, x0, generator=torch.Generator().manual_seed(3), scale=2.0)
    lb, _ = flow_matching_loss(model, x0, generator=torch.Generator().manual_seed(3), scale=2.0)
    lc, _ = flow_matching_loss(model, x0, generator=torch.Generator().manual_seed(4), scale=2.0)
    assert la.item() == lb.item() != lc.item()


def test_weighted_loss():
    x0, noise = torch.zeros(2, 1, 4), torch.ones(2, 1, 4)
    w = torch.tensor([1.0, 0, 0, 0]).view(1, 1, 4)
    target = noise - x0

    def model(xt, t):
        out = target.clone()
        out[..., 1:] += 5.0  # wrong only where the weight is zero
        return out

    loss, _ = flow_matching_loss(model, x0, noise=noise, t=torch.full((2,), 0.5), weight=w)
    assert loss.item() == 0.0


def test_euler_recovers_x0_with_exact_velocity():
    x0 = torch.randn(2, 8, 3, 4, 4)

    def v_exact(x, t):  # the flow's velocity for a point mass at x0: (x_t - x0) / t
        return (x - x0) / t.view(-1, 1, 1, 1, 1)

    for steps, shift in ((1, 1.0), (4, 1.0), (10, 3.0)):
        out = euler_sample(v_exact, x0.shape, steps, torch.Generator().manual_seed(0), shift=shift)
        assert torch.allclose(out, x0, atol=1e-5), (steps, shift)


def test_euler_transports_noise_to_a_gaussian():
    # data ~ N(m, s^2): the exact marginal velocity is (x - E[x0 | x_t]) / t
    m, s = 2.0, 0.5

    def v_exact(x, t):
        t = t.view(-1, 1)
        a, var = 1 - t, (1 - t) ** 2 * s**2 + t**2
        e_x0 = m + a * s**2 / var * (x - a * m)
        return (x - e_x0) / t

    out = euler_sample(v_exact, (20000, 1), 50, torch.Generator().manual_seed(0))
    assert abs(out.mean().item() - m) < 0.02
    assert abs(out.std().item() - s) < 0.02


def test_euler_sample_determinism_and_cond_passthrough():
    def model(x, t, bias):
        return -x + bias

    a = euler_sample(model, (2, 3), 5, torch.Generator().manual_seed(7), bias=1.0)
    b = euler_sample(model, (2, 3), 5, torch.Generator().manual_seed(7), bias=1.0)
    assert torch.equal(a, b) and not a.requires_grad
    ts = sampling_timesteps(4, shift=3.0)
    assert ts[0] == 1.0 and ts[-1] == 0.0 and (ts[1:] < ts[:-1]).all()
    with pytest.raises(ValueError):
        euler_sample(model, (2, 3), 0, bias=1.0)


def test_eval_flow_loss_deterministic():
    x0 = torch.randn(3, 2, 4)
    lin = torch.nn.Linear(4, 4)

    def model(x, t):
        return lin(x) * t.view(-1, 1, 1)

    torch.manual_seed(0)
    la, ma = eval_flow_loss(model, x0, seed=5)
    torch.manual_seed(1)  # global RNG must not matter
    lb, mb = eval_flow_loss(model, x0, seed=5)
    assert la.item() == lb.item()
    assert set(ma) == {"loss"} | {f"loss_t{t:g}" for t in EVAL_TIMESTEPS}
    assert not la.requires_grad
    lc, _ = eval_flow_loss(model, x0, seed=6)
    assert lc.item() != la.item()
    # per-sample seeds: a sample's loss does not depend on its batch
    _, m_one = eval_flow_loss(model, x0[1:2], sample_seeds=[11], timesteps=[0.5])
    _, m_full2 = eval_flow_loss(model, x0[1:2].expand(3, -1, -1), sample_seeds=[11, 11, 11], timesteps=[0.5])
    assert torch.allclose(m_one["loss_t0.5"], m_full2["loss_t0.5"])
