"""``advantage: gae``: generalised advantage estimation per reward head from the critic's values."""

from __future__ import annotations

import torch

from ..advantages import combine_advantages, gae, grpo_advantages, terminal_rewards
from .base import ScoredBatch


class GAEEstimator:
    """GAE(γ, λ) per reward head k (reward only at the last step; a NaN reward counts 0 and its head's target is
    masked in the value loss), optionally centred within each prompt's group (``gae_group_baseline``), then the
    heads' advantages combined with the weights (``advantage_aggregation``; ``advantage_scale``: whitened, or
    divided by each reward's std).  Returns the per-head λ-returns as targets."""

    needs_values = True
    # the config fields only this one reads (config.py refuses them, set, with another: never silently ignored)
    arguments = ("gae_lambda", "gae_group_baseline", "advantage_scale", "value_source", "oracle_continuations",
                 "oracle_counted")

    def __init__(self, gamma: float, lam: float, aggregation: str, normalize: bool, scale_by_rewards: bool,
                 group_baseline: bool = False):
        self.gamma, self.lam, self.aggregation = gamma, lam, aggregation
        self.normalize, self.scale_by_rewards = normalize, scale_by_rewards
        self.group_baseline = group_baseline

    @classmethod
    def from_config(cls, cfg) -> "GAEEstimator":
        return cls(cfg.gamma, cfg.gae_lambda, cfg.advantage_aggregation, cfg.normalize_advantages,
                   cfg.advantage_scale == "rewards", cfg.gae_group_baseline)

    def compute(self, batch: ScoredBatch, values: torch.Tensor | None):
        rewards, mask = batch.rewards, batch.mask
        step_r = terminal_rewards(torch.nan_to_num(rewards), batch.num_steps)
        adv_k, ret_k = gae(step_r, values, self.gamma, self.lam)  # (B, T, K)
        if self.group_baseline:
            adv_k = group_centred(adv_k, mask, batch.groups)
        reward_std = None
        if self.scale_by_rewards:
            reward_std = torch.stack([rewards[mask[:, k], k].std(unbiased=False) if mask[:, k].any()
                                      else rewards.new_ones(()) for k in range(rewards.shape[1])])
        w = batch.weights.to(rewards.device)
        return combine_advantages(adv_k, w, mask, self.aggregation, self.normalize, reward_std), ret_k

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def group_centred(adv: torch.Tensor, mask: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(B, T, K) advantages minus, per step and head, their mean over the samples of the same prompt group where
    that head's reward is available (:func:`grpo_advantages` without the std); unavailable entries -> 0."""
    out = torch.zeros_like(adv)
    for k in range(adv.shape[-1]):
        avail = mask[:, k]
        if avail.any():
            _, g = torch.unique(groups[avail], return_inverse=True)
            out[avail, :, k] = grpo_advantages(adv[avail, :, k], g, scale_by_std=False)
    return out
