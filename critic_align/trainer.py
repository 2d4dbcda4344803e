"""The trainer: owns a run's state and its loop; the stages are plain functions in their own modules.

One epoch, one stage per module, a new record between stages:

    prompts --collect.collect-------> Rollout (trajectories: latents, log-probs; samples; rewards (B, K))
            --collect.critic_values-> values (B, T, K)                         (estimators that need a critic)
            --estimators.<name>-----> Targets (advantages (B, T), value targets (B, T, K) | None)
            --algorithms.<name>-----> statistics (the policy LoRA, critic and optimiser stepped; ppo / nft / awm)
            --checkpoint / RunLog---> safetensors + JSON, metrics.jsonl, TensorBoard, grids

Value pretraining (value_fit.py) fits the critic on rollouts of the frozen policy first.  The advantage
estimator is chosen by name (``PPOConfig.advantage``, :data:`critic_align.registry.ESTIMATORS`); everything
else is shared, so comparing estimators measures the estimator and nothing else.

Multi-process (``torchrun`` / ``accelerate launch``): every process holds the same prompt iterator and generator
and samples its 1/N of each batch; the rollout is gathered, advantages are computed everywhere on the whole batch,
and the gradients are summed before each step (:mod:`critic_align.collect`, :mod:`critic_align.update`,
:mod:`critic_align.distributed`).  Only the main process writes logs, grids and checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import collect, metrics, runio, value_fit
from . import update as upd
from .algorithms import build_algorithm
from .backbones.base import BackboneAdapter
from .backbones.lora import LoraAdapters
from .checkpoint import base_digest, optimizer_tensors, restore_optimizer
from .config import PPOConfig
from .critic import Critic, build_critic
from .distributed import Processes, seed_everything
from .estimators import ScoredBatch, build_estimator
from .rewards.base import MultiReward
from .rollout import Rollout, cfg_denoiser
from .runio import RunLog
from .runlock import lock_for
from .steps import is_flow_matching, make_step
from .tasks.base import check_task
from .update import combine_stats as _combine_stats  # noqa: F401 (the name tests and callers import)
from .value_data import ForwardProcess


@dataclass
class EpochResult:
    epoch: int
    metrics: dict


class Trainer:
    """Post-train ``model`` (a diffusers UNet or any module a :class:`BackboneAdapter` wraps) on ``rewards``.

    task: a :class:`~critic_align.tasks.base.Task` (prompts, latent shape, encode / null_cond / decode).
    rewards: the trained rewards (a :class:`MultiReward`; its (B, K) matrix feeds K critic heads).
    eval_rewards: extra rewards reported each epoch but not trained on (e.g. ``digit_correct``).
    """

    def __init__(self, config: PPOConfig, task, adapter: BackboneAdapter, scheduler, rewards: MultiReward,
                 eval_rewards: MultiReward | None = None, accelerator=None):
        from accelerate import Accelerator

        from .prompts import PromptIterator

        self.config, self.task, self.rewards, self.eval_rewards = config, task, rewards, eval_rewards
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
                "before building the Trainer, or pass it as accelerator=")
        self.processes = Processes(self.accelerator)  # gather / broadcast / gradient sum: critic_align/distributed.py
        self.device = self.accelerator.device
        seed_everything(config.seed)
        config.check_run(rewards.names, self.processes.num_processes, model=adapter.model)
        if config.reward_weights is not None:
            self.rewards = MultiReward(rewards.rewards, config.reward_weights)
        self.reward_weights = self.rewards.weights.float()
        # DDIMStep(eta) for DDPM/DDIM-style schedulers, FlowMatchSDEStep(sde_noise_level) for flow matching
        noise = config.sde_noise_level if is_flow_matching(scheduler) else config.eta
        self.step = make_step(scheduler, noise, config.log_prob_reduction)
        self.schedule = self.step.schedule
        self.timesteps = self.schedule.timesteps(config.num_inference_steps)
        self.prev_timesteps = self.schedule.prev_timesteps(self.timesteps)
        check_task(task)
        task.to(self.device)  # e.g. a pipeline task's frozen text encoders and VAE
        self.adapter = adapter.to(self.device).requires_grad_(False)
        if config.channels_last:  # 4-D weights only; before the LoRA layers and the critic's copies are made
            self.adapter.model.to(memory_format=torch.channels_last)
        self.adapters = LoraAdapters(adapter.model, fused=config.fused_lora)
        self.adapters.add("policy", rank=config.lora_rank, alpha=config.lora_alpha,
                          target_modules=config.lora_target_modules)
        self.prompt_iter = PromptIterator(task.prompts, seed=config.seed)  # checks the prompts before they are used
        self.estimator = build_estimator(config)
        self.critic: Critic | None = self._build_critic() if self.estimator.needs_values else None
        self.forward_process = (ForwardProcess(scheduler, config.num_inference_steps)
                                if self.critic is not None and config.value_perturbed_per_sample else None)
        self.algorithm = build_algorithm(self, scheduler)  # the update: critic_align/algorithms/, by name
        self.adapters.activate("policy")
        if config.gradient_checkpointing:  # after the critic: a 'full' critic's copy gets its own switch
            self._enable_gradient_checkpointing()
        self.policy_params = self.adapters.parameters("policy")
        self.critic_params = self.critic.trainable_parameters() if self.critic else []
        groups = [{"params": self.policy_params, "lr": config.learning_rate}]
        if self.critic_params:
            groups.append({"params": self.critic_params, "lr": config.critic_learning_rate})
        self.optimizer = torch.optim.AdamW(groups, betas=config.adam_betas, eps=config.adam_eps,
                                           weight_decay=config.weight_decay)
        self.epoch, self.reward_queries, self.pretrained_value = 0, 0, False
        self.x0_reward_rows = 0  # reward calls on x0 predictions (critic_x0_reward), apart from reward_queries
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)
        self.out = Path(config.output_dir)
        self.log = RunLog(self.out, config.log_tensorboard, enabled=self.is_main_process)
        self.base_digest = base_digest(self.adapter.model)
        # every trainable tensor once (a shared critic's trunk is the policy's); rank 0's weights everywhere
        self._trainable = list({id(p): p for p in self.policy_params + self.critic_params}.values())
        self.processes.broadcast_(self._trainable + list(self.critic.head.buffers() if self.critic else []))

    def _build_critic(self) -> Critic:
        cfg, task = self.config, self.task
        # one input of the task's shape: the critic measures its feature levels on it and puts its LoRA only on the
        # modules its feature forward reaches
        cond0 = task.encode(list(task.prompts[:1]))
        example = (torch.zeros((1, *task.latent_shape), device=self.device), self.timesteps[:1].to(self.device),
                   None if cond0 is None else cond0.to(self.device))
        features = cfg.critic_features if isinstance(cfg.critic_features, str) else list(cfg.critic_features)
        with self.autocast():  # the probe forward runs as every later forward does (a bf16 base needs autocast)
            return self._critic_from(features, cond0, example)

    def _critic_from(self, features, cond0, example) -> Critic:
        cfg = self.config
        if cfg.critic_body == "grafted":  # the reward network's later layers as the critic (critic_align/grafted.py)
            from .grafted import build_grafted_critic
            return build_grafted_critic(self.adapter, self.adapters, self.schedule, self.task.decode, self.rewards,
                                        example, "critic", cfg.critic_lora_rank, None, cfg.lora_target_modules, features)
        return build_critic(
            self.adapter, mode=cfg.critic_mode, num_rewards=len(self.rewards.names), adapters=self.adapters,
            lora_rank=cfg.critic_lora_rank, lora_target_modules=cfg.lora_target_modules,
            hidden_dim=cfg.value_head_hidden, num_heads=cfg.value_head_heads, features=features,
            use_cond=cfg.critic_cond and cond0 is not None, width=cfg.critic_width, example=example,
            x0_reward=cfg.critic_x0_reward,
        ).to(self.device)

    def _enable_gradient_checkpointing(self) -> None:
        """diffusers' gradient checkpointing, adapter-aware on the shared base (the policy's LoRA, a 'lora' critic's
        LoRA, the reference with adapters off, a 'shared' critic's trunk: ``LoraAdapters.checkpoint``).  A 'full'
        critic's copy carries no adapters, so diffusers' own (non-reentrant) checkpoint function is exact there."""
        self.adapters.enable_gradient_checkpointing()
        if self.critic is not None and self.critic.mode == "full":
            self.critic.backbone.model.enable_gradient_checkpointing()

    num_processes = property(lambda self: self.processes.num_processes)
    rank = property(lambda self: self.processes.rank)
    is_main_process = property(lambda self: self.processes.is_main_process)
    _purge_step = property(lambda self: self.log.purge_step)

    def autocast(self):
        """bf16 autocast for forwards when ``mixed_precision='bf16'``; otherwise a no-op."""
        if self.config.mixed_precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------------------------------------
    # the policy
    def policy_output(self, x_t, t, cond):
        """The policy's model output (CFG-combined when guidance_scale != 1)."""
        with self.adapters.using("policy"), self.autocast():
            return cfg_denoiser(self.adapter.predict, self.config.guidance_scale, self._null_cond)(x_t, t, cond)

    def reference_output(self, x_t, t, cond):
        """The frozen base model's output (the KL reference, the 'before' grid)."""
        with self.adapters.disabled(), self.autocast():
            return cfg_denoiser(self.adapter.predict, self.config.guidance_scale, self._null_cond)(x_t, t, cond)

    def _null_cond(self, n):
        return self.task.null_cond(n).to(self.device)

    # ------------------------------------------------------------------------------------------------
    # the stages (each a function of this trainer's state; see the modules)
    def rollout(self, prompts, x_T=None, generator: torch.Generator | None = None, count: bool = True,
                window: tuple[int, int] | None = None) -> Rollout:
        """Trajectories of the current policy for ``prompts``, scored (``count``: add them to reward_queries);
        ``window``: an SDE window (see :meth:`draw_window`)."""
        ro = collect.collect(self, prompts, x_T, generator, window)
        self.reward_queries += len(ro.prompts) if count else 0
        return ro

    def draw_window(self) -> tuple[int, int] | None:
        """This epoch's SDE window (start, stop) over the denoising steps, or None without one
        (``sde_window_size`` / ``sde_window_range``): the start is uniform on [lo, hi], from the run's generator."""
        cfg = self.config
        if not cfg.sde_window_size:
            return None
        lo, hi = cfg.sde_window_range or (0, cfg.num_inference_steps - cfg.sde_window_size)
        start = int(torch.randint(lo, hi + 1, (1,), generator=self.generator))
        return start, start + cfg.sde_window_size

    def compute_advantages(self, ro: Rollout) -> Rollout:
        """A new Rollout with ``advantages`` (B, T) clipped to ±adv_clip_max and, with a critic, ``values`` and
        ``returns`` (B, T, K), from the configured estimator (:mod:`critic_align.estimators`)."""
        values = self.compute_values(ro) if self.estimator.needs_values else None
        scored = ScoredBatch(ro.rewards.float(), self.reward_weights, tuple(ro.prompts), ro.num_steps)
        adv, returns = self.estimator.compute(scored, values)
        clip = self.config.adv_clip_max
        return replace(ro, values=values if values is not None else ro.values, returns=returns,
                       advantages=adv.clamp(-clip, clip))

    def mc_returns(self, ro: Rollout) -> torch.Tensor:
        return value_fit.mc_returns(ro, self.config.gamma)

    # the other stages are functions of the trainer (its state) and a record, bound here as methods
    compute_values = collect.critic_values
    sample = collect.sample_images
    _pairs = upd.pairs
    loss_on_pairs = upd.loss_on_pairs
    _value_loss = upd.value_loss

    def update(self, ro: Rollout) -> dict:
        """The configured algorithm's update (``config.algorithm``: ppo / nft / awm) on a rollout with advantages."""
        return self.algorithm.update(self, ro)

    fit_values = upd.fit_values
    pretrain_value = value_fit.pretrain_value
    value_report = metrics.rollout_value_report
    evaluate = metrics.evaluate
    save_grid = runio.save_grid
    save = runio.save
    load = runio.load

    # ------------------------------------------------------------------------------------------------
    # the loop
    def train_epoch(self) -> EpochResult:
        cfg = self.config
        t0 = time.time()
        window = self.draw_window()
        ro = self.rollout(self.prompt_iter.batch(cfg.prompts_per_epoch, cfg.group_size), window=window)
        t_rollout = time.time() - t0
        if self.critic is not None and self.epoch == 0 and not self.pretrained_value:
            self.critic.head.set_output_scale(ro.rewards)  # no value pretraining: standardise on the first batch
        ro = self.compute_advantages(ro)
        t1 = time.time()
        stats = self.update(ro)
        if self.forward_process is not None and cfg.value_perturbed_coef > 0:
            stats.update(self.fit_values(value_fit.perturbed_batch(self, ro), 1, cfg.value_perturbed_coef,
                                         "perturbed_value_loss"))
        t_update = time.time() - t1
        self.epoch += 1
        row = {"phase": "train", "epoch": self.epoch, "reward_queries": self.reward_queries,
               "time_rollout_s": t_rollout, "time_update_s": t_update, "time_epoch_s": time.time() - t0}
        if window is not None:
            row["sde_window_start"] = window[0]
        if cfg.critic_x0_reward:
            row["x0_reward_rows"] = self.x0_reward_rows
        row.update(metrics.reward_stats(self, ro))
        if ro.values is not None:
            row.update(self.value_report(ro, ro.values))
        row.update(stats)
        return EpochResult(self.epoch, row)

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

            it = tqdm(it, desc=f"{cfg.algorithm.upper()} ({cfg.advantage})", initial=self.epoch, total=n,
                      disable=not self.is_main_process)
        eval_row = self.log_eval() if cfg.eval_every and self.epoch == 0 else None
        for _ in it:
            res = self.train_epoch()
            history.append(res.metrics)
            self.log(res.metrics)
            if cfg.eval_every and (self.epoch % cfg.eval_every == 0 or self.epoch == n):
                eval_row = self.log_eval()
            if cfg.progress and self.is_main_process:
                post = {"reward": f"{res.metrics[f'reward/{self.rewards.names[0]}/mean']:.3f}"}
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
    # state and outputs
    def state_dict(self) -> tuple[dict, dict]:
        """(tensors, state): the policy LoRA, the critic and the optimiser's tensors; the counters, the prompt
        iterator, the estimator's state (DDPO's buffers) and the optimiser's groups.  A checkpoint adds the RNG
        states of every process, the config and the model's fingerprint."""
        tensors = {f"policy.{k}": v for k, v in self.adapters.state_dict("policy").items()}
        if self.critic is not None:
            tensors.update({f"critic.{k}": v for k, v in self.critic.state_tensors().items()})
        opt_tensors, opt_meta = optimizer_tensors(self.optimizer)
        state = {"epoch": self.epoch, "reward_queries": self.reward_queries, "pretrained_value": self.pretrained_value,
                 "prompt_iterator": self.prompt_iter.state_dict(), "stat_tracker": self.estimator.state_dict(),
                 "optimizer": opt_meta, "x0_reward_rows": self.x0_reward_rows,
                 # the measured activation bytes per row: a resumed run splits its minibatches as an uninterrupted one
                 "micro_batch_bytes_per_row": dict(upd.micro_batcher(self).bytes_per_row)}
        return tensors | opt_tensors, state

    def load_state_dict(self, tensors: dict, state: dict) -> None:
        self.adapters.load_state_dict("policy", {k[7:]: v for k, v in tensors.items() if k.startswith("policy.")})
        if self.critic is not None:
            self.critic.load_state_tensors({k[7:]: v for k, v in tensors.items() if k.startswith("critic.")})
        restore_optimizer(self.optimizer, tensors, state["optimizer"])
        self.epoch, self.reward_queries = int(state["epoch"]), int(state["reward_queries"])
        self.pretrained_value = bool(state["pretrained_value"])
        self.x0_reward_rows = int(state.get("x0_reward_rows", 0))  # absent in checkpoints before critic_x0_reward
        self.prompt_iter.load_state_dict(state["prompt_iterator"])
        self.estimator.load_state_dict(state["stat_tracker"])
        upd.micro_batcher(self).bytes_per_row = {k: float(v) for k, v in
                                                 state.get("micro_batch_bytes_per_row", {}).items()}

    def export_policy_lora(self) -> dict[str, torch.Tensor]:
        return self.adapters.state_dict("policy")
