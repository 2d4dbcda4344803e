"""Fitting the critic: the value loss, the one value-fit loop (used by value pretraining, by PPO's value term's
sibling for AWM, and by forward-perturbed states), and value pretraining on rollouts of the frozen initial policy."""

from __future__ import annotations

import time
from typing import Callable

import torch

from .advantages import gae, terminal_rewards
from .rollout import Rollout
from .update import UpdateContext, local_rows, minibatch_steps
from .value_data import ValueBatch, perturbed_states, trajectory_states


def value_loss(critic, config, reward_names, v: torch.Tensor, old: torch.Tensor | None, returns: torch.Tensor,
               mask: torch.Tensor, prefix: str = "value_loss"):
    """The mean over heads of each head's (clipped) squared error, on standardised values when configured
    (``value_loss_standardized``: (V − m)/s against (R − m)/s, i.e. the raw loss / s² per head)."""
    from .losses import value_loss_per_head

    old = v.detach() if old is None else old
    if config.value_loss_standardized:
        std = critic.head.standardize
        v, old, returns = std(v), std(old), std(returns)
    per_head = value_loss_per_head(v, old, returns, config.value_clip_range, mask)
    loss = per_head.mean()  # each head's loss sees only its own reward (and its own NaN mask)
    stats = {prefix: loss.item()}
    stats.update({f"{prefix}/{name}": lk for name, lk in zip(reward_names, per_head.tolist())})
    return loss, stats


def values_for_value_step(critic, x, t, cond, x0_reward=None) -> torch.Tensor:
    """Critic values for a value-only optimiser step.  A shared critic's trunk is the policy: only its head
    learns here (a gradient through the trunk would be an unclipped policy step, e.g. before PPO starts)."""
    if critic.mode != "shared":
        return critic(x, t, cond, x0_reward)
    with torch.no_grad():
        feats = critic.features(x, t, cond)
    return critic.head(feats, x0_reward)


def fit_values(ctx: UpdateContext, vb: ValueBatch, passes: int, coef: float = 1.0, prefix: str = "value_loss",
               total_rows: int | None = None) -> dict:
    """Value-only optimiser steps over shuffled minibatches of the whole batch's value rows (``passes`` times).

    vb: this process's rows (their ``ids`` among the whole batch's ``total_rows``; default: ``len(vb)``, one
    process's batch).  The shuffle is drawn over all rows from the shared generator, so N processes step as one."""
    total = len(vb) if total_rows is None else total_rows
    owner = torch.full((total,), -1, dtype=torch.long)
    owner[vb.ids] = torch.arange(len(vb))
    mbs = ctx.config.minibatch_size
    minibatches = []
    for _ in range(passes):
        perm = torch.randperm(total, generator=ctx.generator)
        minibatches += [perm[s:s + mbs] for s in range(0, len(perm), mbs)]
    critic, cfg, names = ctx.models.critic, ctx.config, ctx.reward_names

    def loss_fn(rows):
        x, t, cond, returns, mask, x0r = vb.rows(rows.to(vb.x.device))
        with ctx.models.autocast():
            v = values_for_value_step(critic, x, t, cond, x0r).float()
        loss, stats = value_loss(critic, cfg, names, v, None, returns, mask, prefix=prefix)
        return coef * loss, stats

    return minibatch_steps(ctx.opt, minibatches, loss_fn, local_rows(owner), torch.zeros(1, dtype=torch.long),
                           kind="value")


def mc_returns(ro: Rollout, gamma: float) -> torch.Tensor:
    """(B, T, K) discounted Monte-Carlo returns γ^(T-1-k)·R (NaN rewards -> 0, masked in the loss)."""
    return discounted_returns(ro.rewards, ro.num_steps, gamma)


def discounted_returns(rewards: torch.Tensor, num_steps: int, gamma: float) -> torch.Tensor:
    """(B, T, K) γ^(T-1-k)·R for rewards (B, K) (NaN rewards -> 0)."""
    disc = gamma ** torch.arange(num_steps - 1, -1, -1, dtype=torch.float32, device=rewards.device)
    return torch.nan_to_num(rewards.float())[:, None, :] * disc[None, :, None]


def rollout_value_data(ctx: UpdateContext, ro: Rollout, returns: torch.Tensor) -> tuple[ValueBatch, int]:
    """(this process's value rows of a rollout, the whole batch's row count): the visited states with their
    ``returns`` (B, T, K), and ``value_perturbed_per_sample`` forward-perturbed states of the same samples when
    configured, shuffled together into the same minibatches by :func:`fit_values`."""
    b, t = ctx.batch_size, ro.num_steps
    data = [trajectory_states(ro.latents, ro.timesteps, ro.cond, returns, ro.rewards, ro.x0_rewards,
                              first=ctx.shard.start)]
    total = b * t
    if ctx.forward_process is not None:
        data.append(perturbed_batch(ctx, ro, first_id=total))
        total += b * ctx.config.value_perturbed_per_sample
    return ValueBatch.cat(data), total


def perturbed_batch(ctx: UpdateContext, ro: Rollout, first_id: int = 0) -> ValueBatch:
    """``value_perturbed_per_sample`` forward-perturbed states of each of the rollout's final samples."""
    cfg = ctx.config
    return perturbed_states(ctx.forward_process, ro.final, ro.rewards, ro.cond, ro.timesteps,
                            cfg.value_perturbed_per_sample, ctx.generator, cfg.gamma, shard=ctx.shard,
                            batch_size=ctx.batch_size, first_id=first_id)


def fit_perturbed(ctx: UpdateContext, ro: Rollout) -> dict:
    """One pass of value steps on forward-perturbed states of the rollout's samples (``value_perturbed_coef``)."""
    cfg = ctx.config
    return fit_values(ctx, perturbed_batch(ctx, ro), 1, cfg.value_perturbed_coef, "perturbed_value_loss",
                      total_rows=ctx.batch_size * cfg.value_perturbed_per_sample)


def pretrain_value(ctx: UpdateContext, next_rollout: Callable[[], Rollout],
                   value_report: Callable[[Rollout, torch.Tensor], dict], critic_group: dict, log, progress: bool,
                   reward_queries: Callable[[], int], is_main_process: bool = True) -> list[dict]:
    """``value_pretrain_epochs`` rollout batches of the frozen policy, each fitted ``value_pretrain_passes`` times
    (Monte-Carlo or TD(λ) returns as targets, forward-perturbed states shuffled into the same minibatches); the
    heads' output scale is set from the first batch's rewards (the whole batch's: every process's).

    next_rollout() -> this process's scored rollout of the next batch; value_report(ro, values) ->
    the critic's explained variance before the fit; critic_group: the optimiser's critic parameter group (its lr
    decays when ``value_pretrain_lr_decay``); log(row): the run's metrics log; reward_queries(): the run's count so
    far.  Returns one row per batch."""
    from .collect import critic_values

    cfg, critic = ctx.config, ctx.models.critic
    logs = []
    it = range(cfg.value_pretrain_epochs)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="value pretraining", disable=not is_main_process)
    for i in it:
        t0 = time.time()
        if cfg.value_pretrain_lr_decay:
            critic_group["lr"] = cfg.critic_learning_rate * (1 - i / cfg.value_pretrain_epochs)
        ro = next_rollout()  # the states PPO's critic will be asked about
        all_rewards = ctx.opt.processes.gather(ro.rewards)  # the whole batch's (B, K)
        if i == 0:
            critic.head.set_output_scale(all_rewards)
        values = critic_values(ctx.models, ro)
        before = value_report(ro, values)
        if cfg.value_pretrain_target == "td_lambda":
            step_r = terminal_rewards(torch.nan_to_num(ro.rewards.float()), ro.num_steps)
            returns = gae(step_r, values, cfg.gamma, cfg.gae_lambda)[1]
        else:
            returns = mc_returns(ro, cfg.gamma)
        vb, total = rollout_value_data(ctx, ro, returns)
        stats = fit_values(ctx, vb, cfg.value_pretrain_passes, total_rows=total)
        row = {"phase": "value_pretrain", "iteration": i, "reward_queries": reward_queries(), "time_s": time.time() - t0,
               **{f"pre_{k}": v for k, v in before.items()}, **stats}
        logs.append(row)
        log(row)
    critic_group["lr"] = cfg.critic_learning_rate
    return logs
