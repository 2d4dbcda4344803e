"""``advantage: grpo``: group-relative advantages per prompt (Flow-GRPO); no critic."""

from __future__ import annotations

from ..advantages import fill_missing_with_group_mean, grpo_advantages, masked_grpo_advantages
from .base import ScoredBatch


class GRPOEstimator:
    """(R − mean_g) / (std_g + eps) within each prompt's group, the same for every step of a trajectory.

    'normalize_then_sum': each reward group-normalised over its available samples, then Σ_k w_k Â_k.
    'sum_then_normalize': Σ_k w_k r_k (a missing r_k filled with its group's mean, so it adds 0), normalised."""

    needs_values = False
    # the config fields only this one reads (config.py refuses them, set, with another: never silently ignored)
    arguments = ()

    def __init__(self, aggregation: str):
        self.aggregation = aggregation

    @classmethod
    def from_config(cls, cfg) -> "GRPOEstimator":
        return cls(cfg.advantage_aggregation)

    def compute(self, batch: ScoredBatch, values=None):
        w = batch.weights.to(batch.rewards.device)
        if self.aggregation == "normalize_then_sum":
            per_k = masked_grpo_advantages(batch.rewards, batch.groups)  # (B, K), 0 where NaN
            return batch.per_step((per_k * w).sum(-1)), None
        combined = (fill_missing_with_group_mean(batch.rewards, batch.groups) * w).sum(-1)
        return batch.per_step(grpo_advantages(combined, batch.groups)), None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
