"""Policy-optimisation losses for flow models: GRPO (Flow-GRPO, Liu et al. 2025) and Diffusion-DPO
(Wallace et al. 2023) adapted to velocity prediction.

GRPO: sample G videos per prompt (sde.sde_sample), score them, and push up the log-probability of each
SDE step in proportion to the video's reward relative to its group:

    adv = group_advantages(rewards, G)                                   # [N*G]
    lp, mean, std = sde.transition_log_prob(policy, x_i, x_i+1, t_i, t_i+1, a, **cond)
    loss, m = grpo_policy_loss(lp, old_lp[:, i], adv, clip_range=1e-4)
    _, ref_mean, _ = sde.transition_log_prob(reference, ...)          (no_grad)
    loss = loss + kl_coef * gaussian_kl_same_std(mean, ref_mean, std).mean()

Diffusion-DPO on preference pairs (winner w, loser l) with a frozen reference model: per-sample velocity
MSEs at a shared (t, noise) stand in for the negative ELBO, and the loss is
-log sigmoid(-beta / 2 * ((err_w - err_w_ref) - (err_l - err_l_ref))).

Metrics are dicts of detached 0-dim tensors (no host sync).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sde import REDUCTIONS


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4,
                     normalize_std: bool = True) -> torch.Tensor:
    """(r - mean_g) / (std_g + eps) per group of `group_size` consecutive rewards [N*G] -> [N*G] fp32.

    std is the population std of the group; a group of equal rewards gets zero advantages (no NaN).
    normalize_std=False keeps only the mean baseline (Dr. GRPO's variant)."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-d [N*G], got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group of one has no relative advantage), got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if normalize_std:
        centred = centred / (r.std(dim=1, unbiased=False, keepdim=True) + eps)
    return centred.reshape(-1)


def grpo_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                     clip_range: float, adv_clip_max: float | None = None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate on per-sample log-probs [B]: mean of max(-A r, -A clip(r, 1 +- eps)), with
    r = exp(log_prob - old_log_prob). Metrics: loss, clip_frac (share of |r - 1| > clip_range),
    approx_kl (0.5 E[(log r)^2]), ratio (mean r), adv_abs (mean |A| after clipping)."""
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if not (log_prob.shape == old_log_prob.shape == advantages.shape):
        raise ValueError(f"log_prob {tuple(log_prob.shape)}, old_log_prob {tuple(old_log_prob.shape)} and "
                         f"advantages {tuple(advantages.shape)} must have the same shape")
    adv = advantages.float().detach()
    if adv_clip_max is not None:
        adv = adv.clamp(-adv_clip_max, adv_clip_max)
    log_ratio = log_prob.float() - old_log_prob.float().detach()
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    lr = log_ratio.detach()
    metrics = {
        "loss": loss.detach(),
        "clip_frac": ((ratio.detach() - 1).abs() > clip_range).float().mean(),
        "approx_kl": 0.5 * lr.pow(2).mean(),
        "ratio": ratio.detach().mean(),
        "adv_abs": adv.abs().mean(),
    }
    return loss, metrics


def gaussian_kl_same_std(mean_a: torch.Tensor, mean_b: torch.Tensor, std: torch.Tensor | float,
                         reduce: str = "sum") -> torch.Tensor:
    """KL(N(mean_a, std^2) || N(mean_b, std^2)) per sample [B] = (mean_a - mean_b)^2 / (2 std^2), summed
    (the whole latent's KL) or averaged over non-batch dims (as Flow-GRPO's KL term). Symmetric."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    std = torch.as_tensor(std, dtype=torch.float32, device=mean_a.device)
    kl = (mean_a.float() - mean_b.float()).pow(2) / (2 * std.pow(2))
    dims = tuple(range(1, kl.dim()))
    return kl.sum(dims) if reduce == "sum" else kl.mean(dims)


def flow_dpo_loss(err_w_policy: torch.Tensor, err_w_ref: torch.Tensor, err_l_policy: torch.Tensor,
                  err_l_ref: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO for flow matching. Each argument [B]: a pair's per-sample velocity MSE (winner w,
    loser l) under the policy or the frozen reference, at the same t and noise within a pair.

    inside = -beta / 2 * ((err_w_policy - err_w_ref) - (err_l_policy - err_l_ref)); loss = mean of
    -log sigmoid(inside): lowering the policy's error on winners (relative to the reference) and raising
    it on losers lowers the loss. Metrics: loss, implicit_acc (share of inside > 0), margin (mean inside),
    mse_w / mse_l (policy errors), ref_mse."""
    shapes = {tuple(e.shape) for e in (err_w_policy, err_w_ref, err_l_policy, err_l_ref)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"the four errors must be [B] of one shape, got {sorted(shapes)}")
    ref_w, ref_l = err_w_ref.float().detach(), err_l_ref.float().detach()
    policy_diff = err_w_policy.float() - err_l_policy.float()
    inside = -0.5 * beta * (policy_diff - (ref_w - ref_l))
    loss = -F.logsigmoid(inside).mean()
    metrics = {
        "loss": loss.detach(),
        "implicit_acc": (inside.detach() > 0).float().mean(),
        "margin": inside.detach().mean(),
        "mse_w": err_w_policy.detach().float().mean(),
        "mse_l": err_l_policy.detach().float().mean(),
        "ref_mse": 0.5 * (ref_w.mean() + ref_l.mean()),
    }
    return loss, metrics


__all__ = ["group_advantages", "grpo_policy_loss", "gaussian_kl_same_std", "flow_dpo_loss"]
