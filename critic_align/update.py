"""The update stage: PPO's clipped surrogate + value loss (+ KL to the reference) on (trajectory, step) pairs,
value-only fits on :class:`~critic_align.value_data.ValueBatch` rows, and the optimiser steps.

Functions of the trainer (which owns the policy, critic, optimiser, generator and processes) and a record: they
change only the trainable weights, the optimiser state and the generator, and return their statistics.

Multi-process: every process walks the same shuffled minibatches and takes its 1/N of each, in
``gradient_accumulation_steps`` micro-batches; the gradients of all trainable parameters are summed over the
processes before clipping and the step (:mod:`critic_align.distributed`), so the weights stay identical on every
process.  Statistics are per minibatch (pair-weighted means over its parts; the extremes for ``*_max`` /
``*_min``), then averaged over minibatches.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .guard import check_update, check_weights
from .losses import ppo_policy_loss, value_loss_per_head
from .rollout import Rollout
from .steps import gaussian_kl
from .value_data import ValueBatch


def pairs(trainer, ro: Rollout) -> torch.Tensor:
    """(N, 2) (trajectory, step) index pairs to train on, shuffled (``timestep_fraction`` of each trajectory's)."""
    cfg = trainer.config
    b, t = ro.batch_size, ro.num_steps
    n_steps = max(1, int(round(cfg.timestep_fraction * t)))
    if n_steps == t:
        steps = torch.arange(t).repeat(b, 1)
    else:
        # a random permutation per trajectory, all at once: argsort of i.i.d. uniforms
        steps = torch.rand(b, t, generator=trainer.generator).argsort(dim=1)[:, :n_steps]
    traj = torch.arange(b)[:, None].expand(-1, n_steps)
    out = torch.stack([traj.reshape(-1), steps.reshape(-1)], dim=1)
    return out[torch.randperm(len(out), generator=trainer.generator)]


def loss_on_pairs(trainer, ro: Rollout, pairs: torch.Tensor, train_policy: bool = True):
    """Losses on (trajectory, step) pairs; returns (total_loss, stats dict).  Averages over pairs."""
    cfg, critic = trainer.config, trainer.critic
    bi, ki = pairs[:, 0].to(trainer.device), pairs[:, 1].to(trainer.device)
    x_t, x_prev = ro.latents[bi, ki], ro.latents[bi, ki + 1]
    t = ro.timesteps.to(trainer.device)[ki]
    t_prev = ro.prev_timesteps.to(trainer.device)[ki]
    cond = ro.cond[bi] if ro.cond is not None else None
    stats: dict = {}
    total = x_t.new_zeros(())
    shared_feats = None
    if train_policy:
        if critic is not None and critic.mode == "shared" and cfg.guidance_scale == 1.0:
            with trainer.adapters.using("policy"), trainer.autocast():
                out, shared_feats = trainer.adapter.predict_and_features(x_t, t, cond, which=critic.feature_layers)
        else:
            out = trainer.policy_output(x_t, t, cond)
        step_out = trainer.step(out, x_t, t, t_prev, prev_sample=x_prev)
        pg_loss, pstats = ppo_policy_loss(step_out.log_prob, ro.log_probs[bi, ki], ro.advantages[bi, ki],
                                          cfg.clip_range)
        total = total + pg_loss
        stats.update(policy_loss=pg_loss.item(), approx_kl=pstats.approx_kl, clip_fraction=pstats.clip_fraction,
                     ratio_mean=pstats.ratio_mean, ratio_max=pstats.ratio_max, ratio_min=pstats.ratio_min)
        if cfg.kl_coef > 0:
            with torch.no_grad():
                ref = trainer.step(trainer.reference_output(x_t, t, cond), x_t, t, t_prev, prev_sample=x_prev)
            kl = gaussian_kl(step_out.mean, ref.mean, step_out.std, cfg.log_prob_reduction).mean()
            total = total + cfg.kl_coef * kl
            stats["kl_to_ref"] = kl.item()
    if critic is not None and ro.returns is not None:
        with trainer.autocast():
            if shared_feats is not None:
                v = critic.head(shared_feats)
            elif not train_policy:
                v = values_for_value_step(critic, x_t, t, cond)
            else:
                v = critic(x_t, t, cond)
        v_loss, vstats = value_loss(trainer, v.float(), ro.values[bi, ki] if ro.values is not None else None,
                                    ro.returns[bi, ki], ~torch.isnan(ro.rewards[bi]))
        total = total + cfg.vf_coef * v_loss
        stats.update(vstats)
    return total, stats


def value_loss(trainer, v: torch.Tensor, old: torch.Tensor | None, returns: torch.Tensor, mask: torch.Tensor,
               prefix: str = "value_loss"):
    """The mean over heads of each head's (clipped) squared error, on standardised values when configured
    (``value_loss_standardized``: (V − m)/s against (R − m)/s, i.e. the raw loss / s² per head)."""
    cfg = trainer.config
    old = v.detach() if old is None else old
    if cfg.value_loss_standardized:
        std = trainer.critic.head.standardize
        v, old, returns = std(v), std(old), std(returns)
    per_head = value_loss_per_head(v, old, returns, cfg.value_clip_range, mask)
    loss = per_head.mean()  # each head's loss sees only its own reward (and its own NaN mask)
    stats = {prefix: loss.item()}
    stats.update({f"{prefix}/{name}": lk for name, lk in zip(trainer.rewards.names, per_head.tolist())})
    return loss, stats


def values_for_value_step(critic, x, t, cond) -> torch.Tensor:
    """Critic values for a value-only optimiser step.  A shared critic's trunk is the policy: only its head
    learns here (a gradient through the trunk would be an unclipped policy step, e.g. before PPO starts)."""
    if critic.mode != "shared":
        return critic(x, t, cond)
    with torch.no_grad():
        feats = critic.features(x, t, cond)
    return critic.head(feats)


def value_batch_loss(trainer, vb: ValueBatch, rows: torch.Tensor, coef: float = 1.0, prefix: str = "value_loss"):
    """Value loss on ``rows`` of a :class:`ValueBatch`; no clipping reference (value pretraining fits a critic from
    scratch, and perturbed states have no rollout value to clip around)."""
    x, t, cond, returns, mask = vb.rows(rows)
    with trainer.autocast():
        v = values_for_value_step(trainer.critic, x, t, cond).float()
    loss, stats = value_loss(trainer, v, None, returns, mask, prefix=prefix)
    return coef * loss, stats


def ppo_update(trainer, ro: Rollout, train_policy: bool = True, passes: int | None = None) -> dict:
    """PPO inner epochs (``passes``, default ``ppo_epochs``) over minibatches of (trajectory, step) pairs."""
    cfg = trainer.config
    minibatches = []
    for _ in range(passes if passes is not None else cfg.ppo_epochs):
        p = pairs(trainer, ro)
        minibatches += [p[s:s + cfg.minibatch_size] for s in range(0, len(p), cfg.minibatch_size)]
    return minibatch_steps(trainer, minibatches, lambda part: loss_on_pairs(trainer, ro, part, train_policy))


def fit_values(trainer, vb: ValueBatch, passes: int, coef: float = 1.0, prefix: str = "value_loss") -> dict:
    """Value-only optimiser steps over shuffled minibatches of ``vb`` (``passes`` times)."""
    mbs = trainer.config.minibatch_size
    minibatches = []
    for _ in range(passes):
        perm = torch.randperm(len(vb), generator=trainer.generator)
        minibatches += [perm[s:s + mbs] for s in range(0, len(perm), mbs)]
    return minibatch_steps(trainer, minibatches,
                           lambda rows: value_batch_loss(trainer, vb, rows.to(vb.x.device), coef, prefix))


def optimizer_step(trainer, losses: list[dict] = ()) -> dict:
    """Clip the policy's and the critic's gradients separately, check them, step, check the weights."""
    cfg = trainer.config
    norms = {"grad_norm_policy": float(torch.nn.utils.clip_grad_norm_(trainer.policy_params, cfg.max_grad_norm))}
    if trainer.critic_params:
        norms["grad_norm_critic"] = float(torch.nn.utils.clip_grad_norm_(trainer.critic_params, cfg.max_grad_norm))
    check_update(trainer, losses, norms)  # a non-finite loss or gradient stops the run before the step
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    check_weights(trainer)
    return norms


def minibatch_steps(trainer, minibatches: list[torch.Tensor], loss_fn) -> dict:
    """One optimiser step per minibatch of row indices; ``loss_fn(rows) -> (loss, stats)`` is the mean loss over
    ``rows``.  Each process takes its share of every minibatch, in ``gradient_accumulation_steps`` micro-batches;
    gradients are summed over processes before the step."""
    procs = trainer.processes
    acc = trainer.config.gradient_accumulation_steps
    parts_per_mb: list[list] = []
    norms: dict[str, list] = {}
    trainer.optimizer.zero_grad(set_to_none=True)
    for mb in minibatches:
        share = torch.tensor_split(mb, procs.num_processes)[procs.rank]
        micro = max(1, math.ceil(len(share) / acc))
        parts = []
        for j in range(0, len(share), micro):
            part = share[j:j + micro]
            loss, stats = loss_fn(part)
            # weight by the micro-batch's share so the summed gradient equals the minibatch mean
            trainer.accelerator.backward(loss * (len(part) / len(mb)))
            parts.append((len(part), stats))
        parts_per_mb.append(parts)
        procs.sum_gradients(trainer._trainable)
        for k, v in optimizer_step(trainer, [st for _, st in parts]).items():
            norms.setdefault(k, []).append(v)
    per_mb = [[p for rank_parts in all_parts for p in rank_parts]
              for all_parts in zip(*procs.gather_objects(parts_per_mb))]
    collected: dict[str, list] = {}
    for parts in per_mb:
        for k, v in combine_stats(parts).items():
            collected.setdefault(k, []).append(v)
    collected.update(norms)
    return {k: float(np.mean(v)) for k, v in collected.items()}


def combine_stats(parts: list[tuple[int, dict]]) -> dict:
    """One minibatch's statistics from its parts' (pairs, stats): pair-weighted means; extremes of max / min."""
    out: dict = {}
    total = sum(n for n, _ in parts)
    for k in dict.fromkeys(k for _, st in parts for k in st):
        vals = [(n, st[k]) for n, st in parts if k in st]
        if k.endswith("_max"):
            out[k] = max(v for _, v in vals)
        elif k.endswith("_min"):
            out[k] = min(v for _, v in vals)
        else:
            out[k] = sum(n * v for n, v in vals) / sum(n for n, _ in vals) if total else float("nan")
    return out
