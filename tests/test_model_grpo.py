"""GRPO and flow-DPO losses: advantages, clipping on hand-made numbers, the Gaussian KL, DPO's sign."""

from __future__ import annotations

import math

import pytest
import torch

from avatarforge.model.grpo import flow_dpo_loss, gaussian_kl_same_std, group_advantages, grpo_policy_loss


def test_group_advantages_are_standardised_per_group():
    g = torch.Generator().manual_seed(0)
    rewards = torch.cat([torch.randn(4, generator=g) * 3 + 10, torch.randn(4, generator=g) * 0.1 - 2,
                         torch.randn(4, generator=g)])
    adv = group_advantages(rewards, 4, eps=1e-8).view(3, 4)
    torch.testing.assert_close(adv.mean(dim=1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(adv.std(dim=1, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    # each group's ordering is kept, and groups do not leak into each other
    assert torch.equal(adv.argsort(dim=1), rewards.view(3, 4).argsort(dim=1))
    torch.testing.assert_close(group_advantages(rewards[4:8], 4, eps=1e-8), adv[1])
    # hand-made: rewards 1, 3 -> mean 2, population std 1
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 3.0]), 2, eps=0.0), torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 3.0]), 2, normalize_std=False),
                               torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 5.0]), 2, normalize_std=False),
                               torch.tensor([-2.0, 2.0]))


def test_constant_reward_group_gives_zero_advantage():
    rewards = torch.tensor([0.7, 0.7, 0.7, 1.0, 2.0, 3.0])
    adv = group_advantages(rewards, 3)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[:3], torch.zeros(3))
    assert adv[3] < 0 < adv[5]


def test_group_advantages_validation():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(6), 1)
    with pytest.raises(ValueError, match="1-d"):
        group_advantages(torch.zeros(2, 3), 3)


def test_grpo_loss_clipping_on_hand_made_numbers():
    # ratios 1.5, 0.5, 1.05, 0.95 with advantages +1, +1, -1, -1, clip 0.2
    ratio = torch.tensor([1.5, 0.5, 1.05, 0.95])
    old = torch.zeros(4)
    lp = ratio.log().requires_grad_(True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, m = grpo_policy_loss(lp, old, adv, clip_range=0.2)
    # per sample max(-A r, -A clip(r)): -1.2 (clipped: no gain past 1.2), -0.5 (unclipped: the pessimistic
    # term), 1.05, 0.95 (inside the range)
    expected = torch.tensor([-1.2, -0.5, 1.05, 0.95]).mean()
    torch.testing.assert_close(loss, expected)
    assert m["clip_frac"].item() == pytest.approx(0.5)
    torch.testing.assert_close(m["approx_kl"], 0.5 * ratio.log().pow(2).mean())
    torch.testing.assert_close(m["ratio"], ratio.mean())
    loss.backward()
    # clipped sample gets no gradient; the others get -A r / B
    torch.testing.assert_close(lp.grad, torch.tensor([0.0, -0.5, 1.05, 0.95]) / 4)


def test_grpo_loss_on_policy_is_minus_mean_advantage_and_adv_clip():
    lp = torch.randn(6, requires_grad=True)
    adv = torch.tensor([3.0, -3.0, 1.0, -1.0, 0.5, 0.0])
    loss, m = grpo_policy_loss(lp, lp.detach(), adv, clip_range=1e-4)
    torch.testing.assert_close(loss, -adv.mean())
    assert m["clip_frac"].item() == 0 and m["approx_kl"].item() == 0
    loss.backward()
    torch.testing.assert_close(lp.grad, -adv / 6)  # the policy gradient: raise log-prob of good samples
    loss2, m2 = grpo_policy_loss(lp.detach(), lp.detach(), adv, clip_range=1e-4, adv_clip_max=1.0)
    torch.testing.assert_close(loss2, -adv.clamp(-1, 1).mean())
    assert m2["adv_abs"].item() == pytest.approx(adv.clamp(-1, 1).abs().mean().item())
    with pytest.raises(ValueError, match="same shape"):
        grpo_policy_loss(lp, lp[:3], adv, 0.2)


def test_gaussian_kl_matches_direct_formula_and_distributions():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    std = torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1)
    kl = gaussian_kl_same_std(a, b, std)
    direct = torch.distributions.kl_divergence(
        torch.distributions.Normal(a, std.expand_as(a)), torch.distributions.Normal(b, std.expand_as(b))
    ).sum(dim=(1, 2))
    torch.testing.assert_close(kl, direct, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gaussian_kl_same_std(a, b, std, reduce="mean"), direct / 8, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl, gaussian_kl_same_std(b, a, std))  # symmetric at equal std
    assert torch.equal(gaussian_kl_same_std(a, a, 0.3), torch.zeros(3))
    # a scalar std too: 1 element differing by 1 at std 1 -> 0.5
    assert gaussian_kl_same_std(torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2), 1.0).item() == pytest.approx(0.5)


def test_flow_dpo_loss_value_sign_and_gradient_direction():
    # policy equals reference: inside = 0, loss = log 2
    e = torch.tensor([0.3, 0.7])
    loss, m = flow_dpo_loss(e, e, e.flip(0), e.flip(0), beta=100.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    # hand-made: policy improved the winner by 0.01 and worsened the loser by 0.01 vs reference
    ew_p, ew_r, el_p, el_r = (torch.tensor([v]) for v in (0.49, 0.5, 0.51, 0.5))
    loss, m = flow_dpo_loss(ew_p, ew_r, el_p, el_r, beta=100.0)
    inside = -0.5 * 100.0 * ((0.49 - 0.5) - (0.51 - 0.5))  # = +1
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-inside))), rel=1e-5)
    assert m["implicit_acc"].item() == 1.0 and m["margin"].item() == pytest.approx(inside, rel=1e-5)
    # the opposite preference does worse
    worse, m_worse = flow_dpo_loss(el_p, ew_r, ew_p, el_r, beta=100.0)
    assert worse > loss and m_worse["implicit_acc"].item() == 0.0
    # gradient: descend by lowering the winner's error and raising the loser's; none into the reference
    w = torch.tensor([0.5, 0.4], requires_grad=True)
    lo = torch.tensor([0.5, 0.6], requires_grad=True)
    ref_w = torch.tensor([0.5, 0.5], requires_grad=True)
    flow_dpo_loss(w, ref_w, lo, torch.tensor([0.5, 0.5]), beta=10.0)[0].backward()
    assert (w.grad > 0).all() and (lo.grad < 0).all()
    assert ref_w.grad is None
    with pytest.raises(ValueError, match="one shape"):
        flow_dpo_loss(w, ref_w, lo[:1], ref_w, beta=1.0)
