"""``algorithm: ppo``: the clipped surrogate on the sampler's own transitions (log-probs of the SDE step), with the
critic's (clipped) value loss and an optional closed-form KL to the reference policy, over inner epochs of shuffled
(trajectory, step) minibatches (:func:`critic_align.update.minibatch_steps`).

Skipped pairs: with no value loss (no critic) and no KL penalty, a pair whose advantage is exactly 0 (e.g. a GRPO
group whose rewards are all equal) has a loss of exactly 0 and a gradient of exactly 0, so it is not forwarded; the
minibatch mean stays the mean over all of the minibatch's pairs (the skipped ones count as 0), so the update is the
one without skipping.  ``skipped_pair_fraction`` logs the share skipped.
"""

from __future__ import annotations

import torch

from ..losses import ppo_policy_loss
from ..rollout import Rollout
from ..steps import gaussian_kl
from ..update import UpdateContext, local_pairs, minibatch_steps, pairs
from ..value_fit import value_loss, values_for_value_step
from ..x0_reward import head_input_at


def loss_on_pairs(ctx: UpdateContext, ro: Rollout, pairs_: torch.Tensor, train_policy: bool = True):
    """Losses on (trajectory, step) pairs of ``ro`` (this process's trajectories); returns (total_loss, stats).
    Averages over pairs."""
    models, cfg = ctx.models, ctx.config
    critic, dev = models.critic, models.device
    bi, ki = pairs_[:, 0].to(dev), pairs_[:, 1].to(dev)
    x_t, x_prev = ro.latents[bi, ki], ro.latents[bi, ki + 1]
    t = ro.timesteps.to(dev)[ki]
    t_prev = ro.prev_timesteps.to(dev)[ki]
    cond = ro.cond[bi] if ro.cond is not None else None
    x0r = head_input_at(ro.x0_rewards, bi, ki, dev)  # None: the head reads the latent alone
    stats: dict = {}
    total = x_t.new_zeros(())
    shared_feats = None
    if train_policy:
        if critic is not None and critic.mode == "shared" and models.guidance_scale == 1.0:
            with models.adapters.using("policy"), models.autocast():
                out, shared_feats = models.adapter.predict_and_features(x_t, t, cond, which=critic.feature_layers)
        else:
            out = models.policy_output(x_t, t, cond)
        step_out = models.step(out, x_t, t, t_prev, prev_sample=x_prev)
        pg_loss, pstats = ppo_policy_loss(step_out.log_prob, ro.log_probs[bi, ki], ro.advantages[bi, ki],
                                          cfg.clip_range)
        total = total + pg_loss
        stats.update(policy_loss=pg_loss.item(), approx_kl=pstats.approx_kl, clip_fraction=pstats.clip_fraction,
                     ratio_mean=pstats.ratio_mean, ratio_max=pstats.ratio_max, ratio_min=pstats.ratio_min)
        if cfg.kl_coef > 0:
            with torch.no_grad():
                ref = models.step(models.reference_output(x_t, t, cond), x_t, t, t_prev, prev_sample=x_prev)
            kl = gaussian_kl(step_out.mean, ref.mean, step_out.std, cfg.log_prob_reduction).mean()
            total = total + cfg.kl_coef * kl
            stats["kl_to_ref"] = kl.item()
    if critic is not None and ro.returns is not None:
        with models.autocast():
            if shared_feats is not None:
                v = critic.head(shared_feats, x0r)
            elif not train_policy:
                v = values_for_value_step(critic, x_t, t, cond, x0r)
            else:
                v = critic(x_t, t, cond, x0r)
        v_loss, vstats = value_loss(critic, cfg, ctx.reward_names, v.float(),
                                    ro.values[bi, ki] if ro.values is not None else None, ro.returns[bi, ki],
                                    ~torch.isnan(ro.rewards[bi]))
        total = total + cfg.vf_coef * v_loss
        stats.update(vstats)
    return total, stats


def can_skip_zero_advantage(ctx: UpdateContext, ro: Rollout, train_policy: bool) -> bool:
    """Whether a pair's loss is exactly its policy term, ∝ its advantage: no value loss (no critic or no
    returns), no KL penalty, and a policy step.  Then a pair with advantage 0 has loss 0 and gradient 0."""
    value_loss_on = ctx.models.critic is not None and ro.returns is not None
    return train_policy and not value_loss_on and ctx.config.kl_coef == 0


def ppo_update(ctx: UpdateContext, ro: Rollout, train_policy: bool = True, passes: int | None = None) -> dict:
    """PPO inner epochs (``passes``, default ``ppo_epochs``) over minibatches of the whole batch's (trajectory, step)
    pairs; this process forwards the pairs of its own trajectories (``ro``: its shard, with advantages).

    Pairs with an advantage of exactly 0 are not forwarded when they cannot change the update
    (:func:`can_skip_zero_advantage`); each minibatch's loss stays the mean over all its pairs."""
    cfg = ctx.config
    minibatches = []
    for _ in range(passes if passes is not None else cfg.ppo_epochs):
        p = pairs(ctx.generator, ctx.batch_size, ro.num_steps, cfg.timestep_fraction, ctx.strata)
        minibatches += [p[s:s + cfg.minibatch_size] for s in range(0, len(p), cfg.minibatch_size)]
    total = sum(len(mb) for mb in minibatches)
    skip = can_skip_zero_advantage(ctx, ro, train_policy)
    adv = ro.advantages.cpu()

    def select(mb):
        mine = local_pairs(mb, ctx.shard)
        return mine[adv[mine[:, 0], mine[:, 1]] != 0] if skip else mine

    left_out, forwarded = None, total
    if skip:  # the whole batch's zero-advantage pairs per minibatch (every process computes the same)
        every = ctx.opt.processes.gather(ro.advantages).cpu()
        kept = [int((every[mb[:, 0], mb[:, 1]] != 0).sum()) for mb in minibatches]
        left_out, forwarded = [k < len(mb) for k, mb in zip(kept, minibatches)], sum(kept)
    stats = minibatch_steps(ctx.opt, minibatches, lambda part: loss_on_pairs(ctx, ro, part, train_policy), select,
                            torch.zeros(1, 2, dtype=torch.long), kind="ppo" if train_policy else "ppo_value",
                            left_out=left_out)
    stats["skipped_pair_fraction"] = 1.0 - forwarded / total if total else 0.0
    return stats


class PPO:
    # the config fields only this one reads (config.py refuses them, set, with another: never silently ignored)
    arguments = ("clip_range", "log_prob_reduction")

    def __init__(self, schedule, scheduler, config):
        pass

    def update(self, ctx: UpdateContext, ro: Rollout) -> dict:
        return ppo_update(ctx, ro)
