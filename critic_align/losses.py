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

    Inputs are (N,) (one value head) or (N, K) (one column per reward head).  The loss is the mean over
    heads of each head's mean over its kept entries (:func:`value_loss_per_head`), so head k's term, and
    the gradient reaching head k's own parameters, depend only on reward k's targets and on which of
    *its* entries are masked.  ``mask`` (same shape, bool) drops entries (e.g. NaN rewards).
    """
    return value_loss_per_head(new_values, old_values, returns, clip_range, mask).mean()


def value_loss_per_head(new_values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                        clip_range: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(K,) per-head value losses: head k's 0.5·(clipped) squared error averaged over its kept entries.

    (N,) inputs are one head (K = 1).  A head with no kept entry gets 0, not NaN.
    """
    if not (new_values.shape == old_values.shape == returns.shape):
        raise ValueError(f"shapes differ: new {tuple(new_values.shape)}, old {tuple(old_values.shape)}, "
                         f"returns {tuple(returns.shape)}")
    if mask is not None and mask.shape != returns.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from returns {tuple(returns.shape)}")
    returns = returns.detach()
    if mask is not None:
        # zero masked targets *before* the square: a NaN there would give NaN gradients even if dropped later
        returns = torch.where(mask, returns, torch.zeros_like(returns))
    err = (new_values - returns) ** 2
    if clip_range is not None:
        clipped = old_values.detach() + torch.clamp(new_values - old_values.detach(), -clip_range, clip_range)
        err = torch.maximum(err, (clipped - returns) ** 2)
    k = err.shape[-1] if err.ndim >= 2 else 1
    err = err.reshape(-1, k)
    if mask is None:
        return 0.5 * err.mean(0)
    m = mask.reshape(-1, k)
    kept = torch.where(m, err, torch.zeros_like(err))
    return 0.5 * kept.sum(0) / m.sum(0).clamp(min=1).to(err.dtype)


def explained_variance(pred: torch.Tensor, target: torch.Tensor) -> float:
    """1 − Var[target − pred] / Var[target] (nan when the target is constant)."""
    pred, target = pred.detach().flatten().double(), target.detach().flatten().double()
    var = target.var(unbiased=False)
    if var == 0:
        return float("nan")
    return float(1 - (target - pred).var(unbiased=False) / var)
