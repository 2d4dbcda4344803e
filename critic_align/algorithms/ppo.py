"""``algorithm: ppo``: the clipped surrogate on the sampler's own transitions (log-probs of the SDE step)."""

from __future__ import annotations

from ..update import ppo_update


class PPO:
    def __init__(self, trainer, scheduler):
        pass

    def update(self, trainer, ro) -> dict:
        return ppo_update(trainer, ro)
