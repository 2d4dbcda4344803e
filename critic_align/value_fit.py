"""Value pretraining: fit the critic on rollouts of the frozen initial policy before PPO starts."""

from __future__ import annotations

import time

import torch

from .advantages import gae, terminal_rewards
from .rollout import Rollout
from .value_data import ValueBatch, perturbed_states, trajectory_states


def pretrain_value(trainer) -> list[dict]:
    """``value_pretrain_epochs`` rollout batches of the frozen policy, each fitted ``value_pretrain_passes`` times
    (Monte-Carlo or TD(λ) returns as targets, forward-perturbed states shuffled into the same minibatches); the
    heads' output scale is set from the first batch.  Returns (and logs) one row per batch."""
    cfg = trainer.config
    if trainer.critic is None or cfg.value_pretrain_epochs == 0:
        return []
    logs = []
    it = range(cfg.value_pretrain_epochs)
    if cfg.progress:
        from tqdm import tqdm

        it = tqdm(it, desc="value pretraining", disable=not trainer.is_main_process)
    critic_group = trainer.optimizer.param_groups[-1]
    for i in it:
        t0 = time.time()
        if cfg.value_pretrain_lr_decay:
            critic_group["lr"] = cfg.critic_learning_rate * (1 - i / cfg.value_pretrain_epochs)
        ro = trainer.rollout(trainer.prompt_iter.batch(cfg.prompts_per_epoch, cfg.group_size),
                             window=trainer.draw_window())  # the states PPO's critic will be asked about
        if i == 0:
            trainer.critic.head.set_output_scale(ro.rewards)
        values = trainer.compute_values(ro)
        before = trainer.value_report(ro, values)
        if cfg.value_pretrain_target == "td_lambda":
            step_r = terminal_rewards(torch.nan_to_num(ro.rewards.float()), ro.num_steps)
            returns = gae(step_r, values, cfg.gamma, cfg.gae_lambda)[1]
        else:
            returns = mc_returns(ro, cfg.gamma)
        # the visited states with their returns, and forward-perturbed states of the same samples, shuffled
        # together into the same minibatches
        data = [trajectory_states(ro.latents, ro.timesteps, ro.cond, returns, ro.rewards, ro.x0_rewards)]
        if trainer.forward_process is not None:
            data.append(perturbed_batch(trainer, ro))
        stats = trainer.fit_values(ValueBatch.cat(data), cfg.value_pretrain_passes)
        row = {"phase": "value_pretrain", "iteration": i, "reward_queries": trainer.reward_queries,
               "time_s": time.time() - t0, **{f"pre_{k}": v for k, v in before.items()}, **stats}
        logs.append(row)
        trainer.log(row)
    critic_group["lr"] = cfg.critic_learning_rate
    trainer.pretrained_value = True
    return logs


def mc_returns(ro: Rollout, gamma: float) -> torch.Tensor:
    """(B, T, K) discounted Monte-Carlo returns γ^(T-1-k)·R (NaN rewards -> 0, masked in the loss)."""
    t = ro.num_steps
    disc = gamma ** torch.arange(t - 1, -1, -1, dtype=torch.float32, device=ro.rewards.device)
    return torch.nan_to_num(ro.rewards.float())[:, None, :] * disc[None, :, None]


def perturbed_batch(trainer, ro: Rollout) -> ValueBatch:
    """``value_perturbed_per_sample`` forward-perturbed states of each of the rollout's final samples."""
    return perturbed_states(trainer.forward_process, ro.final, ro.rewards, ro.cond, ro.timesteps,
                            trainer.config.value_perturbed_per_sample, trainer.generator, trainer.config.gamma)
