"""The trainer: value pretraining, then joint PPO of a LoRA policy and a latent critic.

One epoch:  prompts -> rollout (policy, stochastic step, log-probs) -> rewards (B, K)
            -> critic values (B, T, K) -> advantages (GAE | GRPO | DDPO) -> PPO update of policy + critic.

The three advantage modes share every other line of code, so a comparison between them measures the
advantage estimator and nothing else.

Multi-process (``torchrun --nproc_per_node N`` or accelerate): every process holds the same prompt
iterator and the same RNG generator, so all draw the same prompts, initial noise and per-chunk noise
seeds; each samples and scores its own contiguous 1/N of the batch (in whole ``sample_chunk_size``
chunks, each with its own noise generator, so a trajectory's noise does not depend on N), then the
rollout is all-gathered and every process computes the same advantages (GRPO groups and the DDPO stat
tracker see the whole batch).  The update walks the same shuffled minibatches everywhere; each process
takes its 1/N of every minibatch, gradients of all trainable parameters are summed across processes
before clipping and the optimiser step, so the update equals the 1-process one up to float summation
order and the weights stay identical on every process.  Only the main process writes logs, grids and
checkpoints (each process's RNG states are gathered into the checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .advantages import (
    PerPromptStatTracker,
    combine_advantages,
    fill_missing_with_group_mean,
    gae,
    group_ids,
    grpo_advantages,
    masked_grpo_advantages,
    terminal_rewards,
)
from .backbones.base import BackboneAdapter
from .backbones.lora import LoraAdapters
from .checkpoint import CheckpointError, base_digest, load_checkpoint, local_rng_state, save_checkpoint
from .config import PPOConfig
from .critic import Critic, build_critic
from .diagnostics import value_report, within_prompt_diversity
from .distributed import Processes, seed_everything
from .guard import check_reward_magnitude, check_update, check_weights
from .losses import ppo_policy_loss, value_loss_per_head
from .rewards.base import MultiReward
from .rollout import Rollout, cfg_denoiser, sample, sample_trajectories
from .runlock import lock_for
from .steps import gaussian_kl, is_flow_matching, make_step
from .tasks.base import check_task
from .value_data import ForwardProcess, ValueBatch, perturbed_states, trajectory_states


@dataclass
class EpochResult:
    epoch: int
    metrics: dict


class Trainer:
    """Post-train ``model`` (a diffusers UNet or any module a :class:`BackboneAdapter` wraps) on ``rewards``.

    task: supplies ``prompts``, ``latent_shape``, ``encode(prompts)``, ``null_cond(n)``, ``decode(latents)``.
    rewards: the trained rewards (a :class:`MultiReward`; its (B, K) matrix feeds K critic heads).
    eval_rewards: extra rewards reported each epoch but not trained on (e.g. ``digit_correct``).
    """

    def __init__(self, config: PPOConfig, task, adapter: BackboneAdapter, scheduler, rewards: MultiReward,
                 eval_rewards: MultiReward | None = None, accelerator=None):
        from accelerate import Accelerator

        self.config = config
        self.task = task
        self.rewards = rewards
        self.eval_rewards = eval_rewards
        # Mixed precision is our own autocast, not accelerate's: AcceleratorState is a process-wide singleton
        # that refuses a second, different mixed_precision (e.g. two trainers in one process).
        # cpu=True on a machine without CUDA: accelerate only recognises a multi-process CPU launch (torchrun) then
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != self.accelerator.num_processes:
            raise RuntimeError(
                f"launched as {world} processes (WORLD_SIZE={world}) but accelerate sees "
                f"{self.accelerator.num_processes}: every process would train alone and write the same run directory. "
                "Create the accelerate state for the launch (on CPU: ACCELERATE_USE_CPU=1 or Accelerator(cpu=True)) "
                "before building the Trainer, or pass it as accelerator="
            )
        self.processes = Processes(self.accelerator)  # gather / broadcast / gradient sum: critic_align/distributed.py
        self.device = self.accelerator.device
        seed_everything(config.seed)
        config.check_run(rewards.names, self.processes.num_processes)
        if config.reward_weights is not None:
            rewards = self.rewards = MultiReward(rewards.rewards, config.reward_weights)
        self.reward_weights = rewards.weights.float()

        # DDIMStep(eta) for DDPM/DDIM-style schedulers, FlowMatchSDEStep(sde_noise_level) for flow matching
        noise = config.sde_noise_level if is_flow_matching(scheduler) else config.eta
        self.step = make_step(scheduler, noise, config.log_prob_reduction)
        self.schedule = self.step.schedule
        self.timesteps = self.schedule.timesteps(config.num_inference_steps)
        self.prev_timesteps = self.schedule.prev_timesteps(self.timesteps)

        check_task(task)
        task.to(self.device)  # e.g. a pipeline task's frozen text encoders and VAE
        self.adapter = adapter.to(self.device)
        self.adapter.requires_grad_(False)
        self.adapters = LoraAdapters(adapter.model, fused=config.fused_lora)
        self.adapters.add("policy", rank=config.lora_rank, alpha=config.lora_alpha,
                          target_modules=config.lora_target_modules)
        self.critic: Critic | None = None
        from .prompts import PromptIterator

        self.prompt_iter = PromptIterator(task.prompts, seed=config.seed)  # checks the prompts before they are used
        if config.advantage == "gae":
            # one input of the task's shape: the critic measures its feature levels on it and puts its LoRA only
            # on the modules its feature forward reaches
            cond0 = task.encode(list(task.prompts[:1]))
            example = (torch.zeros((1, *task.latent_shape), device=self.device), self.timesteps[:1].to(self.device),
                       None if cond0 is None else cond0.to(self.device))
            self.critic = build_critic(
                adapter, mode=config.critic_mode, num_rewards=len(rewards.names), adapters=self.adapters,
                lora_rank=config.critic_lora_rank, lora_target_modules=config.lora_target_modules,
                hidden_dim=config.value_head_hidden, num_heads=config.value_head_heads,
                features=config.critic_features if isinstance(config.critic_features, str) else list(config.critic_features),
                use_cond=config.critic_cond and cond0 is not None, width=config.critic_width, example=example,
            ).to(self.device)
        self.forward_process = (ForwardProcess(scheduler, config.num_inference_steps)
                                if self.critic is not None and config.value_perturbed_per_sample else None)
        self.adapters.activate("policy")
        self.policy_params = self.adapters.parameters("policy")
        self.critic_params = self.critic.trainable_parameters() if self.critic else []
        groups = [{"params": self.policy_params, "lr": config.learning_rate}]
        if self.critic_params:
            groups.append({"params": self.critic_params, "lr": config.critic_learning_rate})
        self.optimizer = torch.optim.AdamW(groups, betas=config.adam_betas, eps=config.adam_eps,
                                           weight_decay=config.weight_decay)
        self.stat_tracker = PerPromptStatTracker(config.stat_buffer_size, config.stat_min_count)
        self.epoch = 0
        self.reward_queries = 0
        self.pretrained_value = False
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)
        self.out = Path(config.output_dir)
        self._writer = None
        self._purge_step = None  # set by load(): tensorboard hides events logged after the checkpoint
        self.base_digest = base_digest(self.adapter.model)
        self._setup_processes()

    # ------------------------------------------------------------------------------------------------
    # processes
    @property
    def num_processes(self) -> int:
        return self.processes.num_processes

    @property
    def rank(self) -> int:
        return self.processes.rank

    @property
    def is_main_process(self) -> bool:
        return self.processes.is_main_process

    def _setup_processes(self) -> None:
        """Start every process from rank 0's weights (the batch split was checked by ``config.check_run``)."""
        params = {id(p): p for p in self.policy_params + self.critic_params}
        self._trainable = list(params.values())
        self.processes.broadcast_(self._trainable + list(self.critic.head.buffers() if self.critic else []))

    def autocast(self):
        """bf16 autocast for forwards when ``mixed_precision='bf16'``; otherwise a no-op."""
        if self.config.mixed_precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------------------------------------
    # policy evaluation
    def policy_output(self, x_t, t, cond):
        """The policy's model output (CFG-combined when guidance_scale != 1)."""
        with self.adapters.using("policy"), self.autocast():
            den = cfg_denoiser(self.adapter.predict, self.config.guidance_scale, self._null_cond)
            return den(x_t, t, cond)

    def _null_cond(self, n):
        return self.task.null_cond(n).to(self.device)

    def reference_output(self, x_t, t, cond):
        with self.adapters.disabled(), self.autocast():
            den = cfg_denoiser(self.adapter.predict, self.config.guidance_scale, self._null_cond)
            return den(x_t, t, cond)

    @torch.no_grad()
    def rollout(self, prompts: list[str], x_T: torch.Tensor | None = None, generator: torch.Generator | None = None,
                count: bool = True) -> Rollout:
        """Sample trajectories for ``prompts`` with the current policy and score them with the rewards.

        generator: the source of the initial noise and the per-chunk noise seeds (default: the run's own);
        count: add the batch to ``reward_queries`` (False for held-out evaluation batches)."""
        cfg = self.config
        prompts = list(prompts)
        gen = self.generator if generator is None else generator
        if x_T is None:
            x_T = torch.randn((len(prompts), *self.task.latent_shape), generator=gen).to(self.device)
        cond = self.task.encode(prompts)
        cond = cond.to(self.device) if cond is not None else None  # None: an unconditional task
        c = cfg.sample_chunk_size
        # one noise seed per chunk, drawn by every process: a trajectory's noise does not depend on the
        # number of processes, and the processes' generators stay identical
        seeds = torch.randint(0, 2**62, (math.ceil(len(prompts) / c),), generator=gen).tolist()
        mine = self.processes.shard(len(prompts))
        chunks = []
        for j, i in enumerate(range(mine.start, mine.stop, c), start=mine.start // c):
            sl = slice(i, min(i + c, mine.stop))
            chunks.append(sample_trajectories(
                self.policy_output, self.step, x_T[sl], self.timesteps.to(self.device),
                None if cond is None else cond[sl], prompts[sl],
                generator=torch.Generator(device=self.device).manual_seed(seeds[j]),
            ))
        ro = Rollout.cat(chunks)
        ro.samples = self.task.decode(ro.final)
        ro.rewards = self.rewards(ro.samples, ro.prompts).to(self.device)
        check_reward_magnitude(ro.rewards, self.rewards.names)
        if self.num_processes > 1:  # every process gets the whole batch
            ro.latents, ro.log_probs = self.processes.gather(ro.latents), self.processes.gather(ro.log_probs)
            ro.samples, ro.rewards = self.processes.gather(ro.samples), self.processes.gather(ro.rewards)
            ro.cond, ro.prompts = cond, prompts
            ro.validate()
        if count:
            self.reward_queries += len(prompts)
        return ro

    @torch.no_grad()
    def compute_values(self, ro: Rollout, chunk: int = 512) -> torch.Tensor:
        """(B, T, K) critic values at every state before a step, batched over (trajectory, step) pairs."""
        mine = self.processes.shard(ro.batch_size)  # each process scores its share of the trajectories
        b, t = mine.stop - mine.start, ro.num_steps
        x = ro.latents[mine, :-1].reshape(b * t, *ro.latents.shape[2:])
        ts = ro.timesteps.to(self.device).repeat(b)
        cond = ro.cond[mine].repeat_interleave(t, dim=0) if ro.cond is not None else None
        with self.autocast():
            out = [self.critic(x[i:i + chunk], ts[i:i + chunk], None if cond is None else cond[i:i + chunk])
                   for i in range(0, b * t, chunk)]
        return self.processes.gather(torch.cat(out).view(b, t, -1).float())

    # ------------------------------------------------------------------------------------------------
    # advantages
    def compute_advantages(self, ro: Rollout) -> Rollout:
        """Set ``ro.advantages`` (B, T) (and, in GAE mode, ``ro.values`` / ``ro.returns`` (B, T, K)).

        Multi-reward rules (K rewards, weights w, NaN = reward not applicable to that sample):

        * GAE runs per reward head: reward k's terminal reward and head k's values give A_k and R_k.
          A NaN reward zeroes that sample's A_k and drops its R_k from head k's value loss.
        * ``normalize_then_sum``: each A_k is whitened over the samples where reward k is available
          (GRPO: group-normalised per prompt over them), then A = Σ_k w_k Â_k over available k.
        * ``sum_then_normalize``: GAE: A = Σ_k w_k A_k over available k, then whitened if
          ``normalize_advantages``.  GRPO / DDPO: the rewards are combined first, Σ_k w_k r_k, with a
          missing r_k replaced by the mean of reward k over its prompt's available samples in the batch
          (:func:`fill_missing_with_group_mean`), then normalised per prompt.
        * One rule for a missing reward in every mode: it contributes 0 to the (centred) advantage and the
          other weights are **not** rescaled, so a sample missing a reward gets a smaller-magnitude advantage
          rather than an amplified one.  Advantages are finally clipped to ±adv_clip_max.
        """
        cfg = self.config
        rewards = ro.rewards.float()
        w = self.reward_weights.to(rewards.device)
        t = ro.num_steps
        mask = ~torch.isnan(rewards)  # (B, K): NaN rewards are masked per head
        if cfg.advantage == "gae":
            values = self.compute_values(ro)
            ro.values = values
            step_r = terminal_rewards(torch.nan_to_num(rewards), t)
            adv_k, ret_k = gae(step_r, values, cfg.gamma, cfg.gae_lambda)  # (B, T, K)
            ro.returns = ret_k
            reward_std = None
            if cfg.advantage_scale == "rewards":
                reward_std = torch.stack([rewards[mask[:, k], k].std(unbiased=False) if mask[:, k].any()
                                          else rewards.new_ones(()) for k in range(rewards.shape[1])])
            adv = combine_advantages(adv_k, w, mask, cfg.advantage_aggregation, cfg.normalize_advantages, reward_std)
        elif cfg.advantage == "grpo" and cfg.advantage_aggregation == "normalize_then_sum":
            per_k = masked_grpo_advantages(rewards, group_ids(ro.prompts).to(rewards.device))  # (B, K), 0 where NaN
            adv = (per_k * w).sum(-1)[:, None].expand(-1, t).clone()
        else:
            groups = group_ids(ro.prompts).to(rewards.device)
            combined = (fill_missing_with_group_mean(rewards, groups) * w).sum(-1)
            if cfg.advantage == "grpo":
                adv1 = grpo_advantages(combined, group_ids(ro.prompts).to(combined.device))
            else:
                adv1 = self.stat_tracker.update(ro.prompts, combined)
            adv = adv1[:, None].expand(-1, t).clone()
        ro.advantages = adv.clamp(-cfg.adv_clip_max, cfg.adv_clip_max)
        return ro

    # ------------------------------------------------------------------------------------------------
    # the update
    def _pairs(self, ro: Rollout) -> torch.Tensor:
        """(N, 2) (trajectory, step) index pairs to train on, shuffled."""
        cfg = self.config
        b, t = ro.batch_size, ro.num_steps
        n_steps = max(1, int(round(cfg.timestep_fraction * t)))
        if n_steps == t:
            steps = torch.arange(t).repeat(b, 1)
        else:
            # a random permutation per trajectory, all at once: argsort of i.i.d. uniforms
            steps = torch.rand(b, t, generator=self.generator).argsort(dim=1)[:, :n_steps]
        traj = torch.arange(b)[:, None].expand(-1, n_steps)
        pairs = torch.stack([traj.reshape(-1), steps.reshape(-1)], dim=1)
        return pairs[torch.randperm(len(pairs), generator=self.generator)]

    def loss_on_pairs(self, ro: Rollout, pairs: torch.Tensor, train_policy: bool = True):
        """Losses on (trajectory, step) pairs; returns (total_loss, stats dict).  Averages over pairs."""
        cfg = self.config
        bi, ki = pairs[:, 0].to(self.device), pairs[:, 1].to(self.device)
        x_t = ro.latents[bi, ki]
        x_prev = ro.latents[bi, ki + 1]
        t = ro.timesteps.to(self.device)[ki]
        t_prev = ro.prev_timesteps.to(self.device)[ki]
        cond = ro.cond[bi] if ro.cond is not None else None
        stats: dict = {}
        total = x_t.new_zeros(())
        shared_feats = None
        if train_policy:
            if self.critic is not None and self.critic.mode == "shared" and cfg.guidance_scale == 1.0:
                with self.adapters.using("policy"), self.autocast():
                    out, shared_feats = self.adapter.predict_and_features(x_t, t, cond, which=self.critic.feature_layers)
            else:
                out = self.policy_output(x_t, t, cond)
            step_out = self.step(out, x_t, t, t_prev, prev_sample=x_prev)
            pg_loss, pstats = ppo_policy_loss(step_out.log_prob, ro.log_probs[bi, ki], ro.advantages[bi, ki],
                                              cfg.clip_range)
            total = total + pg_loss
            stats.update(policy_loss=pg_loss.item(), approx_kl=pstats.approx_kl, clip_fraction=pstats.clip_fraction,
                         ratio_mean=pstats.ratio_mean, ratio_max=pstats.ratio_max, ratio_min=pstats.ratio_min)
            if cfg.kl_coef > 0:
                with torch.no_grad():
                    ref = self.step(self.reference_output(x_t, t, cond), x_t, t, t_prev, prev_sample=x_prev)
                kl = gaussian_kl(step_out.mean, ref.mean, step_out.std, cfg.log_prob_reduction).mean()
                total = total + cfg.kl_coef * kl
                stats["kl_to_ref"] = kl.item()
        if self.critic is not None and ro.returns is not None:
            with self.autocast():
                if shared_feats is not None:
                    v = self.critic.head(shared_feats)
                elif not train_policy:
                    v = self._values_for_value_step(x_t, t, cond)
                else:
                    v = self.critic(x_t, t, cond)
            v_loss, vstats = self._value_loss(v.float(), ro.values[bi, ki] if ro.values is not None else None,
                                              ro.returns[bi, ki], ~torch.isnan(ro.rewards[bi]))
            total = total + cfg.vf_coef * v_loss
            stats.update(vstats)
        return total, stats

    def _value_loss(self, v: torch.Tensor, old: torch.Tensor | None, returns: torch.Tensor, mask: torch.Tensor,
                    prefix: str = "value_loss"):
        """The mean over heads of each head's (clipped) squared error, on standardised values when configured
        (``value_loss_standardized``: (V − m)/s against (R − m)/s, i.e. the raw loss / s² per head)."""
        old = v.detach() if old is None else old
        if self.config.value_loss_standardized:
            std = self.critic.head.standardize
            v, old, returns = std(v), std(old), std(returns)
        per_head = value_loss_per_head(v, old, returns, self.config.value_clip_range, mask)
        loss = per_head.mean()  # each head's loss sees only its own reward (and its own NaN mask)
        stats = {prefix: loss.item()}
        stats.update({f"{prefix}/{name}": lk for name, lk in zip(self.rewards.names, per_head.tolist())})
        return loss, stats

    def _values_for_value_step(self, x, t, cond) -> torch.Tensor:
        """Critic values for a value-only optimiser step.  A shared critic's trunk is the policy: only its head
        learns here (a gradient through the trunk would be an unclipped policy step, e.g. before PPO starts)."""
        if self.critic.mode != "shared":
            return self.critic(x, t, cond)
        with torch.no_grad():
            feats = self.critic.features(x, t, cond)
        return self.critic.head(feats)

    def value_batch_loss(self, vb: ValueBatch, rows: torch.Tensor, coef: float = 1.0, prefix: str = "value_loss"):
        """Value loss on ``rows`` of a :class:`ValueBatch`; no clipping reference (value pretraining fits a critic from
        scratch, and perturbed states have no rollout value to clip around)."""
        x, t, cond, returns, mask = vb.rows(rows)
        with self.autocast():
            v = self._values_for_value_step(x, t, cond).float()
        loss, stats = self._value_loss(v, None, returns, mask, prefix=prefix)
        return coef * loss, stats

    def _optimizer_step(self, losses: list[dict] = ()) -> dict:
        cfg = self.config
        norms = {}
        norms["grad_norm_policy"] = float(torch.nn.utils.clip_grad_norm_(self.policy_params, cfg.max_grad_norm))
        if self.critic_params:
            norms["grad_norm_critic"] = float(torch.nn.utils.clip_grad_norm_(self.critic_params, cfg.max_grad_norm))
        check_update(self, losses, norms)  # a non-finite loss or gradient stops the run before the step
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        check_weights(self)
        return norms

    def update(self, ro: Rollout, train_policy: bool = True, passes: int | None = None) -> dict:
        """PPO inner epochs over minibatches of (trajectory, step) pairs; gradient accumulation inside.

        With N processes each takes its 1/N of every minibatch and the gradients are summed across
        processes before the step.  Statistics are per minibatch (pair-weighted means over its parts; the
        extremes for ratio_max / ratio_min), then averaged over minibatches.
        """
        cfg = self.config
        minibatches = []
        for _ in range(passes if passes is not None else cfg.ppo_epochs):
            pairs = self._pairs(ro)
            minibatches += [pairs[s:s + cfg.minibatch_size] for s in range(0, len(pairs), cfg.minibatch_size)]
        return self._minibatch_steps(minibatches, lambda part: self.loss_on_pairs(ro, part, train_policy=train_policy))

    def fit_values(self, vb: ValueBatch, passes: int, coef: float = 1.0, prefix: str = "value_loss") -> dict:
        """Value-only optimiser steps over shuffled minibatches of ``vb`` (``passes`` times)."""
        mbs = self.config.minibatch_size
        minibatches = []
        for _ in range(passes):
            perm = torch.randperm(len(vb), generator=self.generator)
            minibatches += [perm[s:s + mbs] for s in range(0, len(perm), mbs)]
        return self._minibatch_steps(minibatches, lambda rows: self.value_batch_loss(vb, rows.to(vb.x.device), coef, prefix))

    def _minibatch_steps(self, minibatches: list[torch.Tensor], loss_fn) -> dict:
        """One optimiser step per minibatch of row indices; ``loss_fn(rows) -> (loss, stats)`` is the mean loss over
        ``rows``.  Each process takes its share of every minibatch, in ``gradient_accumulation_steps`` micro-batches;
        gradients are summed over processes before the step."""
        acc = self.config.gradient_accumulation_steps
        parts_per_mb: list[list] = []
        norms: dict[str, list] = {}
        self.optimizer.zero_grad(set_to_none=True)
        for mb in minibatches:
            share = torch.tensor_split(mb, self.num_processes)[self.rank]
            micro = max(1, math.ceil(len(share) / acc))
            parts = []
            for j in range(0, len(share), micro):
                part = share[j:j + micro]
                loss, stats = loss_fn(part)
                # weight by the micro-batch's share so the summed gradient equals the minibatch mean
                self.accelerator.backward(loss * (len(part) / len(mb)))
                parts.append((len(part), stats))
            parts_per_mb.append(parts)
            self.processes.sum_gradients(self._trainable)
            for k, v in self._optimizer_step([st for _, st in parts]).items():
                norms.setdefault(k, []).append(v)
        per_mb = [[p for rank_parts in all_parts for p in rank_parts]
                  for all_parts in zip(*self.processes.gather_objects(parts_per_mb))]
        collected: dict[str, list] = {}
        for parts in per_mb:
            for k, v in _combine_stats(parts).items():
                collected.setdefault(k, []).append(v)
        collected.update(norms)
        return {k: float(np.mean(v)) for k, v in collected.items()}

    # ------------------------------------------------------------------------------------------------
    # value pretraining
    def pretrain_value(self) -> list[dict]:
        """Fit the critic on rollouts of the frozen initial policy (Monte-Carlo returns as targets)."""
        cfg = self.config
        if self.critic is None or cfg.value_pretrain_epochs == 0:
            return []
        logs = []
        it = range(cfg.value_pretrain_epochs)
        if cfg.progress:
            from tqdm import tqdm

            it = tqdm(it, desc="value pretraining", disable=not self.is_main_process)
        critic_group = self.optimizer.param_groups[-1]
        for i in it:
            t0 = time.time()
            if cfg.value_pretrain_lr_decay:
                critic_group["lr"] = cfg.critic_learning_rate * (1 - i / cfg.value_pretrain_epochs)
            ro = self.rollout(self.prompt_iter.batch(cfg.prompts_per_epoch, cfg.group_size))
            if i == 0:
                self.critic.head.set_output_scale(ro.rewards)
            ro.values = self.compute_values(ro)
            before = self.value_report(ro, ro.values)
            if cfg.value_pretrain_target == "td_lambda":
                step_r = terminal_rewards(torch.nan_to_num(ro.rewards.float()), ro.num_steps)
                ro.returns = gae(step_r, ro.values, cfg.gamma, cfg.gae_lambda)[1]
            else:
                ro.returns = self.mc_returns(ro)
            # the visited states with their Monte-Carlo returns, and forward-perturbed states of the same samples,
            # shuffled together into the same minibatches
            data = [trajectory_states(ro.latents, ro.timesteps, ro.cond, ro.returns, ro.rewards)]
            if self.forward_process is not None:
                data.append(self.perturbed_batch(ro))
            stats = self.fit_values(ValueBatch.cat(data), cfg.value_pretrain_passes)
            row = {"phase": "value_pretrain", "iteration": i, "reward_queries": self.reward_queries,
                   "time_s": time.time() - t0, **{f"pre_{k}": v for k, v in before.items()}, **stats}
            logs.append(row)
            self.log(row)
        critic_group["lr"] = cfg.critic_learning_rate
        self.pretrained_value = True
        return logs

    def mc_returns(self, ro: Rollout) -> torch.Tensor:
        """(B, T, K) discounted Monte-Carlo returns γ^(T-1-k)·R (NaN rewards -> 0, masked in the loss)."""
        t = ro.num_steps
        disc = self.config.gamma ** torch.arange(t - 1, -1, -1, dtype=torch.float32, device=ro.rewards.device)
        return torch.nan_to_num(ro.rewards.float())[:, None, :] * disc[None, :, None]

    def perturbed_batch(self, ro: Rollout) -> ValueBatch:
        """``value_perturbed_per_sample`` forward-perturbed states of each of the rollout's final samples."""
        return perturbed_states(self.forward_process, ro.final, ro.rewards, ro.cond, ro.timesteps,
                                self.config.value_perturbed_per_sample, self.generator, self.config.gamma)

    def value_report(self, ro: Rollout, values: torch.Tensor, prefix: str = "") -> dict:
        """Explained variance and calibration of the critic against Monte-Carlo returns, per head, overall and
        per timestep bucket (:func:`critic_align.diagnostics.value_report`)."""
        return value_report(values, self.mc_returns(ro), ~torch.isnan(ro.rewards.float()), self.rewards.names, prefix)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Metrics on a fixed held-out batch: ``eval_prompts`` prompts x ``eval_per_prompt`` samples from noise
        seeded by the run's seed alone (the same batch at every call, never trained on, not counted in
        ``reward_queries``): rewards, within-prompt diversity and, with a critic, its explained variance and
        calibration per timestep bucket."""
        cfg = self.config
        prompts = [p for p in list(self.task.prompts)[:cfg.eval_prompts] for _ in range(cfg.eval_per_prompt)]
        n = len(prompts)
        pad = (-n) % (self.num_processes * cfg.sample_chunk_size) if self.num_processes > 1 else 0
        if pad:
            raise ValueError(f"eval batch of {n} samples does not split into {self.num_processes} processes' chunks of "
                             f"sample_chunk_size={cfg.sample_chunk_size}: choose eval_prompts x eval_per_prompt to fit")
        gen = torch.Generator().manual_seed(cfg.seed + 7_919_000)
        ro = self.rollout(prompts, generator=gen, count=False)
        out = {}
        for k, name in enumerate(self.rewards.names):
            out[f"eval/reward/{name}"] = float(torch.nanmean(ro.rewards[:, k].float()))
        if self.eval_rewards is not None:
            mine = self.processes.shard(ro.batch_size)
            extra = self.processes.gather(self.eval_rewards(ro.samples[mine], ro.prompts[mine]).to(self.device))
            for k, name in enumerate(self.eval_rewards.names):
                out[f"eval/reward/{name}"] = float(torch.nanmean(extra[:, k].float()))
        out.update({f"eval/diversity/{k}": v for k, v in within_prompt_diversity(ro.samples, ro.prompts).items()})
        if self.critic is not None:
            out.update(self.value_report(ro, self.compute_values(ro), prefix="eval/"))
        return out

    # ------------------------------------------------------------------------------------------------
    # the loop
    def train_epoch(self) -> EpochResult:
        cfg = self.config
        t0 = time.time()
        prompts = self.prompt_iter.batch(cfg.prompts_per_epoch, cfg.group_size)
        ro = self.rollout(prompts)
        t_rollout = time.time() - t0
        if self.critic is not None and self.epoch == 0 and not self.pretrained_value:
            self.critic.head.set_output_scale(ro.rewards)  # no value pretraining: standardise on the first batch
        ro = self.compute_advantages(ro)
        t1 = time.time()
        stats = self.update(ro)
        if self.forward_process is not None and cfg.value_perturbed_coef > 0:
            stats.update(self.fit_values(self.perturbed_batch(ro), 1, cfg.value_perturbed_coef, "perturbed_value_loss"))
        t_update = time.time() - t1
        self.epoch += 1
        metrics = {"phase": "train", "epoch": self.epoch, "reward_queries": self.reward_queries,
                   "time_rollout_s": t_rollout, "time_update_s": t_update, "time_epoch_s": time.time() - t0}
        metrics.update(self.reward_stats(ro))
        if ro.values is not None:
            metrics.update(self.value_report(ro, ro.values))
        metrics.update(stats)
        return EpochResult(self.epoch, metrics)

    def reward_stats(self, ro: Rollout) -> dict:
        out = {}
        for k, name in enumerate(self.rewards.names):
            col = ro.rewards[:, k].float()
            col = col[~torch.isnan(col)]
            out[f"reward/{name}/mean"] = col.mean().item() if col.numel() else float("nan")
            out[f"reward/{name}/std"] = col.std(unbiased=False).item() if col.numel() else float("nan")
        if self.eval_rewards is not None:
            mine = self.processes.shard(ro.batch_size)
            extra = self.processes.gather(self.eval_rewards(ro.samples[mine], ro.prompts[mine]).to(self.device))
            for k, name in enumerate(self.eval_rewards.names):
                col = extra[:, k].float()
                col = col[~torch.isnan(col)]
                out[f"reward/{name}/mean"] = col.mean().item() if col.numel() else float("nan")
                out[f"reward/{name}/std"] = col.std(unbiased=False).item() if col.numel() else float("nan")
        return out

    def train(self, num_epochs: int | None = None) -> list[dict]:
        cfg = self.config
        lock_for(self)  # one writer per run directory (critic_align/runlock.py)
        if self.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=list))
        history = []
        if self.critic is not None and not self.pretrained_value:
            self.pretrain_value()
            if cfg.checkpoint_every:
                self.save()  # epoch 0: a kill during epoch 1 does not repeat value pretraining
        n = num_epochs if num_epochs is not None else cfg.num_epochs
        it = range(self.epoch, n)
        if cfg.progress:
            from tqdm import tqdm

            it = tqdm(it, desc=f"PPO ({cfg.advantage})", initial=self.epoch, total=n,
                      disable=not self.is_main_process)
        eval_row = None
        if cfg.eval_every and self.epoch == 0:
            eval_row = self.log_eval()
        for _ in it:
            res = self.train_epoch()
            history.append(res.metrics)
            self.log(res.metrics)
            if cfg.eval_every and (self.epoch % cfg.eval_every == 0 or self.epoch == n):
                eval_row = self.log_eval()
            if cfg.progress and self.is_main_process:
                key = f"reward/{self.rewards.names[0]}/mean"
                post = {"reward": f"{res.metrics[key]:.3f}"}
                if eval_row is not None and "eval/value_ev" in eval_row:
                    post["heldout_ev"] = f"{eval_row['eval/value_ev']:.2f}"
                it.set_postfix(post)
            if cfg.grid_every and self.epoch % cfg.grid_every == 0:
                self.save_grid(self.out / "grids" / f"epoch_{self.epoch:04d}.png")
            if (cfg.checkpoint_every and self.epoch % cfg.checkpoint_every == 0) or self.epoch == n:
                self.save()
        return history

    def log_eval(self) -> dict:
        row = {"phase": "eval", "epoch": self.epoch, "reward_queries": self.reward_queries, **self.evaluate()}
        self.log(row)
        return row

    # ------------------------------------------------------------------------------------------------
    # outputs
    def log(self, row: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.config.log_tensorboard:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=self._purge_step)
            step = row.get("reward_queries", 0)
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._writer.add_scalar(f"{row.get('phase', 'train')}/{k}", v, step)
            self._writer.flush()

    @torch.no_grad()
    def sample(self, prompts, seed: int = 1234, use_policy: bool = True) -> torch.Tensor:
        """Decoded samples for ``prompts`` from a fixed noise seed (policy or base model)."""
        g = torch.Generator().manual_seed(seed)
        x_T = torch.randn((len(prompts), *self.task.latent_shape), generator=g).to(self.device)
        cond = self.task.encode(prompts)
        cond = cond.to(self.device) if cond is not None else None
        den = self.policy_output if use_policy else self.reference_output
        # plain sampling: the same noise draws as a rollout, without storing T+1 latents and log-probs
        return self.task.decode(sample(den, self.step, x_T, self.timesteps.to(self.device), cond, generator=g))

    def save_grid(self, path, per_prompt: int = 8, use_policy: bool = True) -> Path | None:
        """A PNG grid of samples per prompt (main process only; the others return None)."""
        from .viz import save_grid

        if not self.is_main_process:
            return None
        # a task may show only some prompts, unscaled (e.g. 512-pixel Stable Diffusion images)
        rows = list(self.task.grid_prompts)
        prompts = [p for p in rows for _ in range(per_prompt)]
        return save_grid(self.sample(prompts, use_policy=use_policy), path, nrow=per_prompt, labels=rows,
                         scale=self.task.grid_scale)

    def save(self) -> Path | None:
        """Checkpoint into ``output_dir/checkpoints`` (call it on every process: RNG states are gathered; the
        main process writes and returns the path, the others return None).  A failed write raises a
        :class:`CheckpointError` on every process, so none waits forever for the others."""
        check_weights(self, "before writing a checkpoint")  # never checkpoint non-finite weights
        states = self.processes.gather_objects(local_rng_state(self))
        path, error = None, None
        if self.is_main_process:
            metrics = self.out / "metrics.jsonl"
            try:
                path = save_checkpoint(self, self.out / "checkpoints", keep_last=self.config.keep_last,
                                       rng_states=states, metrics_bytes=metrics.stat().st_size if metrics.exists() else 0)
            except CheckpointError as exc:
                error = exc
        message = self.processes.share_from_main(str(error) if error else None)
        if message and error is None:
            raise CheckpointError(f"the main process could not write the checkpoint: {message}")
        if error is not None:
            raise error
        return path

    def load(self, path, resume: bool = True) -> None:
        """Restore a checkpoint (call it on every process).

        resume=True (continue the run, exactly): the config must equal the checkpoint's except num_epochs,
        output_dir and the logging / checkpoint cadence; rows of metrics.jsonl logged after the checkpoint was
        written (by a run killed later) are cut off and tensorboard hides their events, so the resumed run's logs
        equal an uninterrupted run's.  resume=False (reuse the trained policy and critic elsewhere, e.g. for
        steering under another sampling config): only the model must match; the logs are left alone.
        """
        if resume:  # a resume truncates the logs: refused while another live process writes this run
            lock_for(self, "resume")
        state = load_checkpoint(self, path, rank=self.rank, check_config=resume)
        if not resume:
            return
        self._purge_step = self.reward_queries + 1
        metrics, size = self.out / "metrics.jsonl", state.get("metrics_bytes")
        if self.is_main_process and size is not None and metrics.exists() and metrics.stat().st_size > size:
            with open(metrics, "r+b") as f:
                f.truncate(size)

    def export_policy_lora(self) -> dict[str, torch.Tensor]:
        return self.adapters.state_dict("policy")


def _combine_stats(parts: list[tuple[int, dict]]) -> dict:
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

