"""The estimate stage's input record and the estimator contract."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch

from ..advantages import group_ids


@dataclass(frozen=True)
class ScoredBatch:
    """What an estimator sees of a scored rollout.

    rewards:   (B, K) float, NaN = reward k not applicable to that sample
    weights:   (K,) the rewards' weights
    prompts:   B prompts (GRPO / DDPO groups)
    num_steps: T, the denoising steps per trajectory (advantages are (B, T))
    """

    rewards: torch.Tensor
    weights: torch.Tensor
    prompts: tuple[str, ...]
    num_steps: int

    @property
    def mask(self) -> torch.Tensor:
        """(B, K) True where the reward is available."""
        return ~torch.isnan(self.rewards)

    @property
    def groups(self) -> torch.Tensor:
        """(B,) one id per distinct prompt, on the rewards' device."""
        return group_ids(self.prompts).to(self.rewards.device)

    def per_step(self, adv: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, T): one advantage for every step of a trajectory."""
        return adv[:, None].expand(-1, self.num_steps).clone()


class Estimator(Protocol):
    needs_values: bool
    """Whether ``compute`` needs the critic's (B, T, K) values (the trainer builds a critic for it)."""

    def compute(self, batch: ScoredBatch, values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(advantages (B, T) before clipping, value targets (B, T, K) or None)."""

    def state_dict(self) -> dict:
        """What a checkpoint must keep (e.g. DDPO's per-prompt buffers); {} for a stateless estimator."""

    def load_state_dict(self, state: dict) -> None: ...


def estimator_class(name: str):
    from ..registry import ESTIMATORS, lookup, resolve

    return resolve(lookup(ESTIMATORS, name, "advantage estimator"))


def build_estimator(config) -> Estimator:
    """The estimator ``config.advantage`` names, built from the config's fields."""
    return estimator_class(config.advantage).from_config(config)


def estimate(estimator: Estimator, ro, values: torch.Tensor | None, reward_weights: torch.Tensor, processes,
             clip: float, prompts=None):
    """A new :class:`~critic_align.rollout.Rollout` with ``advantages`` (B, T) clipped to ±``clip`` and, with
    ``values`` (this process's (B, T, K) critic values), ``values`` and ``returns`` (B, T, K), from ``estimator`` on
    the whole batch's rewards and values (its group statistics and whitening are the whole batch's); this process
    keeps its rows.  prompts: the whole batch's prompts (every process holds them; default: gathered)."""
    if prompts is None:
        prompts = [p for part in processes.gather_objects(list(ro.prompts)) for p in part]
    prompts = tuple(prompts)
    scored = ScoredBatch(processes.gather(ro.rewards).float(), reward_weights, prompts, ro.num_steps)
    adv, returns = estimator.compute(scored, None if values is None else processes.gather(values))
    mine = processes.shard(len(prompts))
    return replace(ro, values=values if values is not None else ro.values,
                   returns=None if returns is None else returns[mine], advantages=adv[mine].clamp(-clip, clip))
