"""The update stage: PPO's clipped surrogate + value loss (+ KL to the reference) on (trajectory, step) pairs,
value-only fits on :class:`~critic_align.value_data.ValueBatch` rows, and the optimiser steps.

Functions of the trainer (which owns the policy, critic, optimiser, generator and processes) and a record: they
change only the trainable weights, the optimiser state and the generator, and return their statistics.

Micro-batches: a minibatch's loss is the mean over its pairs; it is forwarded and back-propagated in micro-batches
(at most ``micro_batch_size`` pairs, 'auto': sized from ``micro_batch_memory_mb`` and the activation bytes per pair
measured on the run's first micro-batch, :class:`MicroBatcher`; and at most minibatch / ``gradient_accumulation_steps``),
each loss weighted by its share of the minibatch, so the summed gradient is the minibatch mean's whatever the split.

Skipped pairs: with the 'ppo' update, no value loss (no critic) and no KL penalty, a pair whose advantage is exactly
0 (e.g. a GRPO group whose rewards are all equal) has a loss of exactly 0 and a gradient of exactly 0, so it is not
forwarded; the minibatch mean stays the mean over all of the minibatch's pairs (the skipped ones count as 0), so
the update is the one without skipping.  ``skipped_pair_fraction`` logs the share skipped.

Multi-process: every process walks the same shuffled minibatches and takes its 1/N of each (of the pairs it
forwards); the gradients of all trainable parameters are summed over the processes before clipping and the step
(:mod:`critic_align.distributed`), so the weights stay identical on every process.  Statistics are per minibatch
(pair-weighted means over its forwarded parts; the extremes for ``*_max`` / ``*_min``), then averaged over
minibatches.
"""

from __future__ import annotations

import contextlib
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
    x0r = ro.x0_rewards[bi, ki].to(trainer.device) if ro.x0_rewards is not None else None
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
                v = critic.head(shared_feats, x0r)
            elif not train_policy:
                v = values_for_value_step(critic, x_t, t, cond, x0r)
            else:
                v = critic(x_t, t, cond, x0r)
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


def values_for_value_step(critic, x, t, cond, x0_reward=None) -> torch.Tensor:
    """Critic values for a value-only optimiser step.  A shared critic's trunk is the policy: only its head
    learns here (a gradient through the trunk would be an unclipped policy step, e.g. before PPO starts)."""
    if critic.mode != "shared":
        return critic(x, t, cond, x0_reward)
    with torch.no_grad():
        feats = critic.features(x, t, cond)
    return critic.head(feats, x0_reward)


def value_batch_loss(trainer, vb: ValueBatch, rows: torch.Tensor, coef: float = 1.0, prefix: str = "value_loss"):
    """Value loss on ``rows`` of a :class:`ValueBatch`; no clipping reference (value pretraining fits a critic from
    scratch, and perturbed states have no rollout value to clip around)."""
    x, t, cond, returns, mask, x0r = vb.rows(rows)
    with trainer.autocast():
        v = values_for_value_step(trainer.critic, x, t, cond, x0r).float()
    loss, stats = value_loss(trainer, v, None, returns, mask, prefix=prefix)
    return coef * loss, stats


def can_skip_zero_advantage(trainer, ro: Rollout, train_policy: bool) -> bool:
    """Whether a pair's loss is exactly its policy term, ∝ its advantage: no value loss (no critic or no
    returns), no KL penalty, and a policy step.  Then a pair with advantage 0 has loss 0 and gradient 0."""
    value_loss_on = trainer.critic is not None and ro.returns is not None
    return train_policy and not value_loss_on and trainer.config.kl_coef == 0


def ppo_update(trainer, ro: Rollout, train_policy: bool = True, passes: int | None = None) -> dict:
    """PPO inner epochs (``passes``, default ``ppo_epochs``) over minibatches of (trajectory, step) pairs.

    Pairs with an advantage of exactly 0 are not forwarded when they cannot change the update
    (:func:`can_skip_zero_advantage`); each minibatch's loss stays the mean over all its pairs."""
    cfg = trainer.config
    minibatches = []
    for _ in range(passes if passes is not None else cfg.ppo_epochs):
        p = pairs(trainer, ro)
        minibatches += [p[s:s + cfg.minibatch_size] for s in range(0, len(p), cfg.minibatch_size)]
    sizes = [len(mb) for mb in minibatches]
    total = sum(sizes)
    if can_skip_zero_advantage(trainer, ro, train_policy):
        adv = ro.advantages.cpu()
        minibatches = [mb[adv[mb[:, 0], mb[:, 1]] != 0] for mb in minibatches]
    stats = minibatch_steps(trainer, minibatches, lambda part: loss_on_pairs(trainer, ro, part, train_policy),
                            kind="ppo" if train_policy else "ppo_value", sizes=sizes)
    stats["skipped_pair_fraction"] = 1.0 - sum(len(mb) for mb in minibatches) / total if total else 0.0
    return stats


def fit_values(trainer, vb: ValueBatch, passes: int, coef: float = 1.0, prefix: str = "value_loss") -> dict:
    """Value-only optimiser steps over shuffled minibatches of ``vb`` (``passes`` times)."""
    mbs = trainer.config.minibatch_size
    minibatches = []
    for _ in range(passes):
        perm = torch.randperm(len(vb), generator=trainer.generator)
        minibatches += [perm[s:s + mbs] for s in range(0, len(perm), mbs)]
    return minibatch_steps(trainer, minibatches,
                           lambda rows: value_batch_loss(trainer, vb, rows.to(vb.x.device), coef, prefix), kind="value")


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


class MicroBatcher:
    """How many rows the update forwards at a time (``micro_batch_size``; 'auto': from a memory budget).

    'auto' measures, per kind of loss (the PPO loss, a value-only fit, an algorithm's own loss), the bytes of the
    tensors autograd saves for the backward pass (activations and rebuilt fused-LoRA weights, not the parameters)
    on the first micro-batch of that kind (at most ``PROBE_ROWS`` rows), and from then on forwards
    ``floor(budget / bytes per row)`` rows at a time (at least 1; the budget: :meth:`budget_bytes`).  The per-row
    figure includes the micro-batch's fixed costs (fused weights) divided among its rows, so it errs on the lean
    side."""

    PROBE_ROWS = 4
    CPU_BUDGET_MB = 128.0

    def __init__(self, size: int | str, memory_mb: float | None, device: torch.device | str = "cpu"):
        self.fixed = None if size == "auto" else int(size)
        self.memory_mb, self.device = memory_mb, torch.device(device)
        self.budget: float | None = None if memory_mb is None else memory_mb * 2**20
        self.bytes_per_row: dict[str, float] = {}

    def budget_bytes(self) -> float:
        """The budget: ``micro_batch_memory_mb``, or per device (None): CPU_BUDGET_MB on a CPU, half the GPU's free
        memory (taken once, at the first measurement) on CUDA."""
        if self.budget is None:
            if self.device.type == "cuda":
                self.budget = torch.cuda.mem_get_info(self.device)[0] / 2
            else:
                self.budget = self.CPU_BUDGET_MB * 2**20
        return self.budget

    def size(self, kind: str) -> int | None:
        """Rows per micro-batch for ``kind``; None: not measured yet (forward a probe under :meth:`measure`)."""
        if self.fixed is not None:
            return self.fixed
        per_row = self.bytes_per_row.get(kind)
        return None if per_row is None else max(1, int(self.budget_bytes() // max(per_row, 1.0)))

    @contextlib.contextmanager
    def measure(self, kind: str, rows: int):
        """Count the bytes autograd saves inside the block (each storage once) and record them per row."""
        seen: dict[int, int] = {}

        def pack(t):
            if not isinstance(t, torch.nn.Parameter):
                try:
                    st = t.untyped_storage()
                    seen[st.data_ptr()] = st.nbytes()
                except (RuntimeError, NotImplementedError):  # a tensor without a plain storage (a subclass)
                    seen[id(t)] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        if seen and rows > 0:
            self.bytes_per_row[kind] = sum(seen.values()) / rows


def micro_batcher(trainer) -> MicroBatcher:
    """The trainer's :class:`MicroBatcher` (made on first use: its measurements live as long as the trainer)."""
    mb = getattr(trainer, "_micro_batcher", None)
    if mb is None:
        cfg = trainer.config
        mb = trainer._micro_batcher = MicroBatcher(cfg.micro_batch_size, cfg.micro_batch_memory_mb, trainer.device)
    return mb


def minibatch_steps(trainer, minibatches: list[torch.Tensor], loss_fn, kind: str = "default",
                    sizes: list[int] | None = None) -> dict:
    """One optimiser step per minibatch of row indices; ``loss_fn(rows) -> (loss, stats)`` is the mean loss over
    ``rows``.  Each process takes its share of every minibatch and forwards it in micro-batches (at most
    minibatch / ``gradient_accumulation_steps`` rows, and at most :class:`MicroBatcher`'s size for ``kind``);
    gradients are summed over processes before the step.

    sizes: the number of rows each minibatch's mean is over (default: its length); larger when rows whose loss
    and gradient are exactly 0 were left out of it (their trainable parameters then still get a zero gradient,
    as they would have had, so the optimiser steps them the same way)."""
    procs = trainer.processes
    acc = trainer.config.gradient_accumulation_steps
    batcher = micro_batcher(trainer)
    parts_per_mb: list[list] = []
    norms: dict[str, list] = {}
    trainer.optimizer.zero_grad(set_to_none=True)
    for i, mb in enumerate(minibatches):
        size = len(mb) if sizes is None else sizes[i]
        share = torch.tensor_split(mb, procs.num_processes)[procs.rank]
        cap = max(1, math.ceil(len(share) / acc))
        parts = []
        j = 0
        while j < len(share):
            micro = batcher.size(kind)
            probe = micro is None
            n = min(cap, batcher.PROBE_ROWS if probe else micro)
            part = share[j:j + n]
            with batcher.measure(kind, len(part)) if probe else contextlib.nullcontext():
                loss, stats = loss_fn(part)
                # weight by the micro-batch's share so the summed gradient equals the minibatch mean
                trainer.accelerator.backward(loss * (len(part) / size))
            parts.append((len(part), stats))
            j += n
        if len(mb) < size:  # rows left out had gradient 0: give every policy parameter its (zero) gradient
            for p in trainer.policy_params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
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
