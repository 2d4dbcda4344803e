"""What an epoch reports besides the update's statistics: reward means and stds, and the held-out evaluation."""

from __future__ import annotations

import torch

from .collect import eval_reward_matrix
from .diagnostics import value_report, within_prompt_diversity
from .rollout import Rollout
from .value_fit import mc_returns


def column_stats(matrix: torch.Tensor, names, prefix: str = "reward/") -> dict:
    """``<prefix><name>/mean|std`` of each column of a (B, K) matrix over its non-NaN entries (NaN when none)."""
    out = {}
    for k, name in enumerate(names):
        col = matrix[:, k].float()
        col = col[~torch.isnan(col)]
        out[f"{prefix}{name}/mean"] = col.mean().item() if col.numel() else float("nan")
        out[f"{prefix}{name}/std"] = col.std(unbiased=False).item() if col.numel() else float("nan")
    return out


def reward_stats(trainer, ro: Rollout) -> dict:
    """The trained rewards' and (scored here) the eval rewards' mean and std over the batch."""
    out = column_stats(ro.rewards, trainer.rewards.names)
    if trainer.eval_rewards is not None:
        out.update(column_stats(eval_reward_matrix(trainer, ro), trainer.eval_rewards.names))
    return out


def rollout_value_report(trainer, ro: Rollout, values: torch.Tensor, prefix: str = "") -> dict:
    """Explained variance and calibration of the critic against Monte-Carlo returns, per head, overall and per
    timestep bucket (:func:`critic_align.diagnostics.value_report`)."""
    return value_report(values, mc_returns(ro, trainer.config.gamma), ~torch.isnan(ro.rewards.float()),
                        trainer.rewards.names, prefix)


@torch.no_grad()
def evaluate(trainer) -> dict:
    """Metrics on a fixed held-out batch: ``eval_prompts`` prompts x ``eval_per_prompt`` samples from noise seeded by
    the run's seed alone (the same batch at every call, never trained on, not counted in ``reward_queries``):
    rewards, within-prompt diversity and, with a critic, its explained variance and calibration per timestep bucket."""
    cfg = trainer.config
    prompts = [p for p in list(trainer.task.prompts)[:cfg.eval_prompts] for _ in range(cfg.eval_per_prompt)]
    n, procs = len(prompts), trainer.num_processes
    if procs > 1 and n % (procs * cfg.sample_chunk_size):
        raise ValueError(f"eval batch of {n} samples does not split into {procs} processes' chunks of "
                         f"sample_chunk_size={cfg.sample_chunk_size}: choose eval_prompts x eval_per_prompt to fit")
    ro = trainer.rollout(prompts, generator=torch.Generator().manual_seed(cfg.seed + 7_919_000), count=False)
    out = {f"eval/reward/{name}": float(torch.nanmean(ro.rewards[:, k].float()))
           for k, name in enumerate(trainer.rewards.names)}
    if trainer.eval_rewards is not None:
        extra = eval_reward_matrix(trainer, ro)
        out.update({f"eval/reward/{name}": float(torch.nanmean(extra[:, k].float()))
                    for k, name in enumerate(trainer.eval_rewards.names)})
    out.update({f"eval/diversity/{k}": v for k, v in within_prompt_diversity(ro.samples, ro.prompts).items()})
    if trainer.critic is not None:
        out.update(trainer.value_report(ro, trainer.compute_values(ro), prefix="eval/"))
    return out
