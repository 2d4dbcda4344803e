"""PPO losses as small pure functions that return their statistics (CleanRL style)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PolicyLossStats:
    approx_kl: float  # E[(r − 1) − log r], the low-variance estimator of KL(old || new) (Schulman)
    clip_fraction: float
    ratio_mean: float
    ratio_max: float
    ratio_min: float


def ppo_policy_loss(new_log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                    clip_range: float) -> tuple[torch.Tensor, PolicyLossStats]:
    """Clipped surrogate: mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))), ρ = exp(new − old).  All inputs (N,)."""
    if not (new_log_prob.shape == old_log_prob.shape == advantages.shape):
        raise ValueError(
            f"shapes differ: new {tuple(new_log_prob.shape)}, old {tuple(old_log_prob.shape)}, adv {tuple(advantages.shape)}"
        )
    log_ratio = new_log_prob - old_log_prob.detach()
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = PolicyLossStats(
            approx_kl=((ratio - 1) - log_ratio).mean().item(),
            clip_fraction=((ratio - 1).abs() > clip_range).float().mean().item(),
            ratio_mean=ratio.mean().item(),
            ratio_max=ratio.max().item(),
            ratio_min=ratio.min().item(),
        )
    return loss, stats


def value_loss(new_values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               clip_range: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """0.5·(V − R)², optionally PPO-clipped around the rollout's values: 0.5·max((V−R)², (V_clip−R)²).

    ``mask`` (same shape, bool) drops entries (e.g. NaN rewards); the mean is over kept entries.
    """
    returns = returns.detach()
    if mask is not None:
        # zero masked targets *before* the square: a NaN there would give NaN gradients even if dropped later
        returns = torch.where(mask, returns, torch.zeros_like(returns))
    err = (new_values - returns) ** 2
    if clip_range is not None:
        clipped = old_values.detach() + torch.clamp(new_values - old_values.detach(), -clip_range, clip_range)
        err = torch.maximum(err, (clipped - returns) ** 2)
    if mask is None:
        return 0.5 * err.mean()
    kept = torch.where(mask, err, torch.zeros_like(err))
    return 0.5 * kept.sum() / mask.sum().clamp(min=1).to(err.dtype)


def explained_variance(pred: torch.Tensor, target: torch.Tensor) -> float:
    """1 − Var[target − pred] / Var[target] (nan when the target is constant)."""
    pred, target = pred.detach().flatten().double(), target.detach().flatten().double()
    var = target.var(unbiased=False)
    if var == 0:
        return float("nan")
    return float(1 - (target - pred).var(unbiased=False) / var)
