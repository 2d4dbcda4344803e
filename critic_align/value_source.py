"""Where GAE's values come from (``value_source``): the learned critic, or the oracle (:mod:`critic_align.oracle`).

At every recorded state of a rollout, V(x_t) = E[R | x_t] is estimated by K continuations of the current policy's own
sampler (stochastic inside the rollout's SDE window, its ODE form after it), scored by the run's rewards: the ceiling
a perfect critic would reach.  What it spends (reward queries, backbone calls) is summed over processes and kept apart
from the run's ``reward_queries`` unless ``oracle_counted`` (then it is a method of its own: step-level Monte-Carlo
advantages).

Noise: one seed per chunk of ``sample_chunk_size`` trajectories of the global batch, drawn by every process from the
run's generator (as the rollout draws its own), so a trajectory's oracle value does not depend on the number of
processes and a resumed run draws what the uninterrupted one drew.
"""

from __future__ import annotations

import math

import torch

from .collect import critic_values
from .oracle import rollout_oracle_values
from .rollout import Rollout

__all__ = ["ValueSource", "VALUE_SOURCES"]

VALUE_SOURCES = ("critic", "oracle")


class ValueSource:
    """Where a run's values come from: ``none`` (the estimator reads none: GRPO, DDPO), ``critic`` (the learned critic)
    or ``oracle``; the oracle's spending (``reward_queries``, ``nfe``: every process's) is kept here."""

    def __init__(self, kind: str, processes, continuations: int = 1, counted: bool = False, chunk_size: int = 1):
        if kind not in ("none", *VALUE_SOURCES):
            raise ValueError(f"value source {kind!r}: use one of {('none', *VALUE_SOURCES)}")
        self.kind, self.processes = kind, processes
        self.K, self.counted, self.chunk_size = continuations, counted, chunk_size
        self.reward_queries, self.nfe = 0, 0

    @classmethod
    def from_config(cls, config, estimator, processes) -> "ValueSource":
        if not estimator.needs_values:
            return cls("none", processes)
        return cls(config.value_source, processes, config.oracle_continuations, config.oracle_counted,
                   config.sample_chunk_size)

    builds_critic = property(lambda self: self.kind == "critic")

    def values(self, models, task, rewards, timesteps: torch.Tensor, ro: Rollout,
               generator: torch.Generator) -> tuple[torch.Tensor | None, int]:
        """((B, T, R) values at this process's states before each step, or None; reward queries to add to the run's
        count: the whole batch's oracle queries with ``oracle_counted``, else 0)."""
        if self.kind == "none":
            return None, 0
        if self.kind == "critic":
            return critic_values(models, ro), 0
        return self._oracle(models, task, rewards, timesteps, ro, generator)

    @torch.no_grad()
    def _oracle(self, models, task, rewards, timesteps, ro, generator) -> tuple[torch.Tensor, int]:
        n = self.processes.num_processes
        first, total, chunk = self.processes.shard(ro.batch_size * n).start, ro.batch_size * n, self.chunk_size
        seeds = torch.randint(0, 2**62, (math.ceil(total / chunk),), generator=generator).tolist()
        if first % chunk or (ro.batch_size % chunk and n > 1):
            raise ValueError(f"value_source: oracle draws its noise per chunk of sample_chunk_size={chunk} "
                             f"trajectories; this process's {ro.batch_size} trajectories (from row {first}) are not "
                             "whole chunks: make sample_chunk_size divide batch_size / processes")
        device, ts = models.device, timesteps.to(models.device)
        start = int((ts == ro.timesteps[0].to(device)).nonzero()[0])  # an SDE window's first step, else 0
        stop = start + ro.num_steps if ro.x0 is not None else None  # past the window the sampler is its ODE

        def reward_fn(final, prompts):
            return rewards(task.decode(final), prompts).float()

        out, spent = [], torch.zeros(2, dtype=torch.long)
        for i in range(0, ro.batch_size, chunk):
            sl = slice(i, min(i + chunk, ro.batch_size))
            ov = rollout_oracle_values(models.policy_output, models.step, ro.latents[sl].to(device), start, ts,
                                       None if ro.cond is None else ro.cond[sl].to(device), reward_fn, self.K,
                                       torch.Generator().manual_seed(seeds[(first + i) // chunk]),
                                       list(ro.prompts[sl]), stochastic_stop=stop)
            out.append(ov.values)
            spent += torch.tensor([ov.counts.reward_queries, ov.counts.nfe])
        spent = self.processes.gather(spent[None].to(device)).sum(0).tolist()  # every process's
        self.reward_queries += spent[0]
        self.nfe += spent[1]
        return torch.cat(out).float(), spent[0] if self.counted else 0

    def metrics(self) -> dict:
        """The oracle's spending so far, for the epoch's row (nothing for the other sources)."""
        return {"oracle_reward_queries": self.reward_queries, "oracle_nfe": self.nfe} if self.kind == "oracle" else {}

    def state_dict(self) -> dict:
        return {"reward_queries": self.reward_queries, "nfe": self.nfe}

    def load_state_dict(self, state: dict | None) -> None:
        """``state``: None in checkpoints written before value sources."""
        self.reward_queries, self.nfe = (0, 0) if state is None else (int(state["reward_queries"]), int(state["nfe"]))
