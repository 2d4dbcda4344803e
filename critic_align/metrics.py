"""What an epoch reports besides the update's statistics: reward means and stds, the critic's quality, and the
held-out evaluation.  Functions of the networks, the rewards and the numbers they read; with several processes they
receive the whole batch's rewards and values (the trainer gathers them), and the evaluation gathers its few samples."""

from __future__ import annotations

import torch

from .collect import collect, critic_values
from .diagnostics import value_report, within_prompt_diversity
from .value_fit import discounted_returns
from .x0_reward import X0Readout


def column_stats(matrix: torch.Tensor, names, prefix: str = "reward/") -> dict:
    """``<prefix><name>/mean|std`` of each column of a (B, K) matrix over its non-NaN entries (NaN when none)."""
    out = {}
    for k, name in enumerate(names):
        col = matrix[:, k].float()
        col = col[~torch.isnan(col)]
        out[f"{prefix}{name}/mean"] = col.mean().item() if col.numel() else float("nan")
        out[f"{prefix}{name}/std"] = col.std(unbiased=False).item() if col.numel() else float("nan")
    return out


def reward_stats(ro, reward_names, eval_rewards, processes) -> dict:
    """The trained rewards' (``ro.rewards``) and the eval rewards' (scored here, on ``ro``'s samples) mean and std
    over the whole batch (every process's shard, gathered)."""
    out = column_stats(processes.gather(ro.rewards), reward_names)
    if eval_rewards is not None:
        extra = processes.gather(eval_rewards(ro.samples, ro.prompts).to(processes.device))
        out.update(column_stats(extra, eval_rewards.names))
    return out


def critic_report(values: torch.Tensor, rewards: torch.Tensor, names, gamma: float, prefix: str = "") -> dict:
    """Explained variance and calibration of the critic's values (B, T, K) against the Monte-Carlo returns of the
    rewards (B, K), per head, overall and per timestep bucket (:func:`critic_align.diagnostics.value_report`)."""
    return value_report(values, discounted_returns(rewards, values.shape[1], gamma), ~torch.isnan(rewards.float()),
                        names, prefix)


@torch.no_grad()
def evaluate(models, task, rewards, eval_rewards, timesteps: torch.Tensor, config, processes, readout: X0Readout) -> dict:
    """Metrics on a fixed held-out batch: ``eval_prompts`` prompts x ``eval_per_prompt`` samples from noise seeded by
    the run's seed alone (the same batch at every call, never trained on, not counted in ``reward_queries``):
    rewards, within-prompt diversity and, with a critic, its explained variance and calibration per timestep bucket.
    Each process samples and scores its shard; the rewards, values and (few) samples are gathered.  ``readout``: the
    value head's x0 read-out (its x0 predictions are scored for the critic's values)."""
    cfg, procs = config, processes
    prompts = [p for p in list(task.prompts)[:cfg.eval_prompts] for _ in range(cfg.eval_per_prompt)]
    n = len(prompts)
    if procs.num_processes > 1 and n % (procs.num_processes * cfg.sample_chunk_size):
        raise ValueError(f"eval batch of {n} samples does not split into {procs.num_processes} processes' chunks of "
                         f"sample_chunk_size={cfg.sample_chunk_size}: choose eval_prompts x eval_per_prompt to fit")
    ro = collect(models, task, rewards, timesteps, prompts, procs.shard(n),
                 torch.Generator().manual_seed(cfg.seed + 7_919_000), cfg.sample_chunk_size, cfg.overlap_rewards,
                 readout)
    scores = procs.gather(ro.rewards)
    out = {f"eval/reward/{name}": float(torch.nanmean(scores[:, k].float())) for k, name in enumerate(rewards.names)}
    if eval_rewards is not None:
        extra = procs.gather(eval_rewards(ro.samples, ro.prompts).to(models.device))
        out.update({f"eval/reward/{name}": float(torch.nanmean(extra[:, k].float()))
                    for k, name in enumerate(eval_rewards.names)})
    out.update({f"eval/diversity/{k}": v for k, v in within_prompt_diversity(procs.gather(ro.samples), prompts).items()})
    if models.critic is not None:
        out.update(critic_report(procs.gather(critic_values(models, ro)), scores, rewards.names, cfg.gamma, "eval/"))
    return out
