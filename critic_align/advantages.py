"""Advantage estimators over the denoising MDP: GAE (critic), GRPO (group-relative), DDPO (per-prompt).

The episode has T steps, k = 0..T-1 (k = 0 is the first denoising step, from pure noise); the reward
arrives only after the last one: r_k = 0 for k < T-1 and r_{T-1} = R.  All functions are pure and
vectorised; they take and return tensors with documented shapes.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch


def terminal_rewards(rewards: torch.Tensor, num_steps: int) -> torch.Tensor:
    """(B, ...) final rewards -> (B, T, ...) per-step rewards, zero except at the last step."""
    step_rewards = rewards.new_zeros((rewards.shape[0], num_steps, *rewards.shape[1:]))
    step_rewards[:, -1] = rewards
    return step_rewards


def gae(step_rewards: torch.Tensor, values: torch.Tensor, gamma: float = 1.0, lam: float = 0.95,
        last_value: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) along dim 1.

    step_rewards, values: (B, T, ...) — values[:, k] = V(s_k), the state *before* step k.
    last_value: (B, ...) value of the state after the last step; 0 (terminal) by default.
    δ_k = r_k + γ V(s_{k+1}) − V(s_k);  A_k = δ_k + γλ A_{k+1};  returns R_k = A_k + V(s_k).
    Returns (advantages, returns), both (B, T, ...).
    """
    if step_rewards.shape != values.shape:
        raise ValueError(f"step_rewards {tuple(step_rewards.shape)} and values {tuple(values.shape)} differ")
    if last_value is None:
        last_value = torch.zeros_like(values[:, 0])
    next_values = torch.cat([values[:, 1:], last_value.unsqueeze(1)], dim=1)
    deltas = step_rewards + gamma * next_values - values
    advantages = torch.zeros_like(deltas)
    running = torch.zeros_like(deltas[:, 0])
    for k in range(deltas.shape[1] - 1, -1, -1):  # T is small (tens); the recursion is exact
        running = deltas[:, k] + gamma * lam * running
        advantages[:, k] = running
    return advantages, advantages + values


def group_ids(prompts) -> torch.Tensor:
    """(B,) integer id per distinct prompt, in order of first appearance."""
    index: dict = {}
    return torch.tensor([index.setdefault(p, len(index)) for p in prompts], dtype=torch.long)


def grpo_advantages(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-4,
                    scale_by_std: bool = True) -> torch.Tensor:
    """Group-relative advantages: (R − mean_g) / (std_g + eps) within each prompt group g.

    rewards: (B,) or (B, K); groups: (B,) int ids.  std is the population std (ddof = 0), as in
    Flow-GRPO.  A group of size 1, or whose rewards are all equal, gets advantage exactly 0 (the float mean of
    equal rewards can miss them by an ulp, which the eps-guarded division would blow up to ~1e-4; an exact 0
    also lets the update skip those pairs).
    """
    squeeze = rewards.ndim == 1
    r = rewards.unsqueeze(1) if squeeze else rewards
    n_groups = int(groups.max()) + 1 if groups.numel() else 0
    ones = torch.ones_like(groups, dtype=r.dtype)
    count = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(0, groups, ones)
    mean = torch.zeros(n_groups, r.shape[1], dtype=r.dtype, device=r.device).index_add_(0, groups, r) / count[:, None]
    centered = r - mean[groups]
    idx = groups[:, None].expand_as(r)
    gmax = torch.full_like(mean, -math.inf).scatter_reduce(0, idx, r, "amax")
    gmin = torch.full_like(mean, math.inf).scatter_reduce(0, idx, r, "amin")
    centered = torch.where((gmax == gmin)[groups], torch.zeros_like(centered), centered)
    if scale_by_std:
        var = torch.zeros_like(mean).index_add_(0, groups, centered**2) / count[:, None]
        centered = centered / (var.sqrt()[groups] + eps)
    return centered.squeeze(1) if squeeze else centered


@dataclass
class PerPromptStatTracker:
    """DDPO's per-prompt reward normalisation (Black et al. 2023, ddpo-pytorch ``stat_tracking``).

    Keeps the last ``buffer_size`` rewards of every prompt; a prompt with fewer than ``min_count``
    stored rewards is normalised with the statistics of the whole current batch instead.
    """

    buffer_size: int = 16
    min_count: int = 16

    def __post_init__(self):
        if self.buffer_size < 1 or self.min_count < 1:
            raise ValueError("buffer_size and min_count must be >= 1")
        self.buffers: dict[str, deque] = {}

    def update(self, prompts, rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        """rewards: (B,) -> (B,) advantages; updates the buffers with this batch first."""
        r = rewards.detach().to(torch.float64).cpu()
        out = torch.empty_like(r)
        batch_mean, batch_std = r.mean(), r.std(unbiased=False)
        prompts = list(prompts)
        for p in dict.fromkeys(prompts):
            idx = torch.tensor([i for i, q in enumerate(prompts) if q == p])
            buf = self.buffers.setdefault(p, deque(maxlen=self.buffer_size))
            buf.extend(r[idx].tolist())
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                hist = torch.tensor(list(buf), dtype=torch.float64)
                mean, std = hist.mean(), hist.std(unbiased=False)
            out[idx] = (r[idx] - mean) / (std + eps)
        return out.to(rewards.dtype).to(rewards.device)

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "buffers": {k: list(v) for k, v in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = int(state["buffer_size"]), int(state["min_count"])
        self.buffers = {k: deque(v, maxlen=self.buffer_size) for k, v in state["buffers"].items()}


def masked_normalize(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, scale: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Whiten (B, ...) advantages over the samples where ``mask`` (B,) is True; masked samples become 0.

    Mean and (population) std are taken over every entry of the kept samples; no kept sample -> all 0.
    ``scale``: divide the centred values by this instead of their own std (e.g. the rewards' std).
    """
    m = mask.reshape(-1, *([1] * (x.ndim - 1))).expand_as(x)
    if not m.any():
        return torch.zeros_like(x)
    vals = x[m]
    div = vals.std(unbiased=False) if scale is None else scale
    return torch.where(m, (x - vals.mean()) / (div + eps), torch.zeros_like(x))


def combine_advantages(adv: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor,
                       aggregation: str = "normalize_then_sum", normalize_sum: bool = True,
                       reward_std: torch.Tensor | None = None) -> torch.Tensor:
    """Combine per-reward advantages (B, T, K) into (B, T) with weights (K,) and availability ``mask`` (B, K).

    'normalize_then_sum': A = Σ_k w_k · masked_normalize(A_k, mask_k) — every reward's advantages are
    whitened over the samples where it is available, so each reward's influence is set by its weight,
    not by the scale of its values.
    'sum_then_normalize': A = Σ_k w_k · A_k over available entries, then whitened when ``normalize_sum``;
    a reward with a larger spread dominates the sum.
    ``reward_std`` (K,) (GRPO's unit): the centred advantages are divided by the rewards' std instead of their
    own — per reward for 'normalize_then_sum', Σ_k w_k σ_k for 'sum_then_normalize' — so one σ_R of reward
    deviation gives an advantage of about 1 however much of the reward's variance the critic explains.
    In both, an unavailable reward (mask False) contributes 0 — the neutral advantage — and the other
    rewards' weights are not rescaled.
    """
    if adv.ndim != 3 or mask.shape != (adv.shape[0], adv.shape[2]) or weights.shape != (adv.shape[2],):
        raise ValueError(f"expected adv (B, T, K), weights (K,), mask (B, K); got {tuple(adv.shape)}, "
                         f"{tuple(weights.shape)}, {tuple(mask.shape)}")
    adv = torch.where(mask[:, None, :], adv, torch.zeros_like(adv))
    w = weights.to(adv)
    if aggregation == "normalize_then_sum":
        normed = torch.stack([masked_normalize(adv[..., k], mask[:, k],
                                               scale=None if reward_std is None else reward_std[k])
                              for k in range(adv.shape[-1])], -1)
        return (normed * w).sum(-1)
    if aggregation == "sum_then_normalize":
        total = (adv * w).sum(-1)
        if not normalize_sum:
            return total
        if reward_std is None:
            return normalize(total)
        return (total - total.mean()) / ((w.abs() * reward_std.to(w)).sum() + 1e-8)
    raise ValueError(f"aggregation {aggregation!r}: use 'normalize_then_sum' or 'sum_then_normalize'")


def masked_grpo_advantages(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Per-reward GRPO advantages of a (B, K) reward matrix with NaN = not available.

    Column k is group-normalised (:func:`grpo_advantages`) over the samples where reward k is available;
    unavailable entries get 0.  Returns (B, K).
    """
    out = torch.zeros_like(rewards)
    for k in range(rewards.shape[1]):
        avail = ~torch.isnan(rewards[:, k])
        if avail.any():
            _, g = torch.unique(groups[avail], return_inverse=True)
            out[avail, k] = grpo_advantages(rewards[avail, k], g, eps)
    return out


def fill_missing_with_group_mean(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(B, K) rewards with NaN = not available -> the same with each NaN replaced by the mean of its reward over
    the available samples of its group (0 where a group has none).

    Centred within the group, a filled entry contributes exactly 0: the rule :func:`combine_advantages` applies
    to advantages (a missing reward adds nothing, the other weights are not rescaled), carried to the modes that
    combine rewards before normalising them per prompt.  Entries that are not NaN are returned unchanged.
    """
    out = rewards.clone()
    for k in range(rewards.shape[1]):
        missing = torch.isnan(rewards[:, k])
        for g in torch.unique(groups[missing]).tolist():
            avail = (groups == g) & ~missing
            out[(groups == g) & missing, k] = rewards[avail, k].mean() if avail.any() else 0.0
    return out


def normalize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Batch whitening over all entries (PPO's advantage normalisation)."""
    return (x - x.mean()) / (x.std(unbiased=False) + eps)
