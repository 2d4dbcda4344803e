"""``advantage: ddpo``: per-prompt reward normalisation with a stat tracker (DDPO); no critic."""

from __future__ import annotations

from ..advantages import PerPromptStatTracker, fill_missing_with_group_mean
from .base import ScoredBatch


class DDPOEstimator:
    """Σ_k w_k r_k (a missing r_k filled with its prompt group's mean), normalised by the prompt's tracked
    statistics (:class:`PerPromptStatTracker`: its last ``buffer_size`` rewards, or the batch's below
    ``min_count``); the same advantage for every step.  The tracker's buffers are checkpointed."""

    needs_values = False
    # the config fields only this one reads (config.py refuses them, set, with another: never silently ignored)
    arguments = ("stat_buffer_size", "stat_min_count")

    def __init__(self, buffer_size: int, min_count: int):
        self.tracker = PerPromptStatTracker(buffer_size, min_count)

    @classmethod
    def from_config(cls, cfg) -> "DDPOEstimator":
        return cls(cfg.stat_buffer_size, cfg.stat_min_count)

    def compute(self, batch: ScoredBatch, values=None):
        w = batch.weights.to(batch.rewards.device)
        combined = (fill_missing_with_group_mean(batch.rewards, batch.groups) * w).sum(-1)
        return batch.per_step(self.tracker.update(list(batch.prompts), combined)), None

    def state_dict(self) -> dict:
        return self.tracker.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state)
