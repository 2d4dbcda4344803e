"""The trainer: owns a run's state and reads its loop top to bottom; the stages are plain functions of the networks
(:class:`~critic_align.models.Models`), a batch and the config, in their own modules:

    prompts --collect.collect---------> Rollout (this process's trajectories, samples, rewards (B, K))
            --collect.critic_values---> values (B, T, K)                       (estimators that need a critic)
            --estimators.<name>-------> advantages (B, T), value targets (B, T, K) | None   (on the whole batch)
            --algorithms.<name>.update> statistics (the policy LoRA, critic and optimiser stepped; ppo / nft / awm)
            --RunLog / checkpoint-----> metrics.jsonl, TensorBoard, grids, safetensors + JSON

Value pretraining (:mod:`critic_align.value_fit`) fits the critic on rollouts of the frozen policy first.  The
advantage estimator is chosen by name (``PPOConfig.advantage``, :data:`critic_align.registry.ESTIMATORS`); everything
else is shared, so comparing estimators measures the estimator and nothing else.

Multi-process (``accelerate launch`` / ``torchrun``): the trainable modules and the optimiser go through
``accelerator.prepare`` (DDP: the engine syncs the gradients); every process holds the same prompt iterator and
generator, samples, encodes and scores only its own shard of each batch, and receives only the whole batch's rewards
and critic values (the estimators' inputs) and statistics (:mod:`critic_align.distributed`).  Only the main process
writes logs, grids and checkpoints.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import collect, metrics, runio, value_fit
from .algorithms import build_algorithm
from .algorithms.ppo import loss_on_pairs
from .backbones.base import BackboneAdapter
from .backbones.lora import LoraAdapters
from .best import BestKeeper
from .checkpoint import base_digest, optimizer_tensors, restore_optimizer
from .checks import check_trainer_args
from .config import PPOConfig
from .critic import Critic, build_critic
from .distributed import Processes, TrainModule, seed_everything
from .estimators import ScoredBatch, build_estimator
from .guard import check_reward_magnitude, check_update, check_weights
from .launch import check_launch
from .models import Models
from .optim import build_optimizer
from .rewards.base import MultiReward
from .rollout import Rollout
from .runio import RunLog
from .runlock import lock_for
from .steps import is_flow_matching, make_step
from .tasks.base import check_task
from .update import MicroBatcher, Optimization, UpdateContext, combine_stats  # noqa: F401 (re-exported)
from .update import pairs as draw_pairs
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
        check_trainer_args(config, task, adapter, scheduler, rewards, eval_rewards)  # checks.py: types, with examples
        from accelerate import Accelerator

        from .prompts import PromptIterator

        self.config, self.task, self.rewards, self.eval_rewards = config, task, rewards, eval_rewards
        check_launch(config)  # what the launcher asked for, before the engine is made (critic_align/launch.py)
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
        self.processes = Processes(self.accelerator)  # the engine and what crosses processes: distributed.py
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
        if config.policy == "lora":
            self.adapters.add("policy", rank=config.lora_rank, alpha=config.lora_alpha,
                              target_modules=config.lora_target_modules)
        self.prompt_iter = PromptIterator(task.prompts, seed=config.seed)  # checks the prompts before they are used
        self.estimator = build_estimator(config)
        self.models = self._models(None)
        self.critic: Critic | None = self._build_critic() if self.estimator.needs_values else None
        self.models = self._models(self.critic)
        self.forward_process = (ForwardProcess(scheduler, config.num_inference_steps)
                                if self.critic is not None and config.value_perturbed_per_sample else None)
        self.algorithm = build_algorithm(config.algorithm, self.schedule, scheduler, config)  # algorithms/, by name
        if config.policy == "lora":
            self.adapters.activate("policy")
        else:  # policy: full: every backbone weight trains (a 'full' critic has its own copy, made above)
            self.adapter.model.requires_grad_(True)
        if config.gradient_checkpointing:  # after the critic: a 'full' critic's copy gets its own switch
            self.adapters.enable_gradient_checkpointing()
            if self.critic is not None and self.critic.mode == "full":
                self.critic.backbone.model.enable_gradient_checkpointing()
        self.policy_params = self._policy_parameters()
        self.critic_params = self.critic.trainable_parameters() if self.critic else []
        groups = [{"params": self.policy_params, "lr": config.learning_rate}]
        if self.critic_params:
            groups.append({"params": self.critic_params, "lr": config.critic_learning_rate})
        self.optimizer = build_optimizer(groups, config)  # adamw | adamw_8bit: critic_align/optim.py
        self.base_digest = base_digest(self.adapter.model)  # before the engine: FSDP shards the base
        # the engine: one module holding every trainable tensor, and the optimiser (DDP with several processes)
        prepared = self.processes.prepare(TrainModule(self.adapter.model, self.critic), self.optimizer)
        if self.processes.sharded:  # FSDP2 replaced the parameters by DTensor shards (the optimiser holds those)
            self.adapters.refresh_parameters()
            self.policy_params = self._policy_parameters()
            self.critic_params = self.critic.trainable_parameters() if self.critic else []
            for a in (self.adapter, getattr(self.critic, "backbone", None)):  # see BackboneAdapter.stop_early
                if isinstance(a, BackboneAdapter):
                    a.stop_early = False
        self.opt = Optimization(prepared, self.policy_params, self.critic_params, self.processes,
                                MicroBatcher(config.micro_batch_size, config.micro_batch_memory_mb, self.device),
                                config.max_grad_norm, config.gradient_accumulation_steps,
                                lambda losses, norms: check_update(self, losses, norms), lambda: check_weights(self))
        self.epoch, self.reward_queries, self.pretrained_value = 0, 0, False
        self.x0_reward_rows = 0  # reward calls on x0 predictions (critic_x0_reward), apart from reward_queries
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)
        self.out = Path(config.output_dir)
        self.log = RunLog(self.out, config.log_tensorboard, enabled=self.is_main_process, log_with=config.log_with,
                          config=config.to_dict())

    def _models(self, critic) -> Models:
        return Models(self.adapter, self.adapters, critic, self.step, self.config.guidance_scale,
                      lambda n: self.task.null_cond(n).to(self.device), self.config.mixed_precision, self.device,
                      self.config.policy)

    def _policy_parameters(self) -> list:
        """What the policy trains: its LoRA adapter's tensors, or every backbone weight (``policy: full``)."""
        return self.adapters.parameters("policy") if self.config.policy == "lora" else list(self.adapter.model.parameters())

    def policy_tensors(self) -> dict:
        """The policy's tensors as a checkpoint holds them (without the "policy." prefix): the LoRA adapter's
        (peft's names), or the backbone's whole state dict (``policy: full``)."""
        if self.config.policy == "lora":
            return self.adapters.state_dict("policy")
        return {k: v.detach() for k, v in self.adapter.model.state_dict().items()}

    def load_policy_tensors(self, tensors: dict) -> None:
        if self.config.policy == "lora":
            self.adapters.load_state_dict("policy", tensors)
        else:
            self.adapter.model.load_state_dict(tensors)

    def _build_critic(self) -> Critic:
        cfg, task = self.config, self.task
        # one input of the task's shape: the critic measures its feature levels on it and puts its LoRA only on the
        # modules its feature forward reaches
        cond0 = task.encode(list(task.prompts[:1]))
        example = (torch.zeros((1, *task.latent_shape), device=self.device), self.timesteps[:1].to(self.device),
                   None if cond0 is None else cond0.to(self.device))
        features = cfg.critic_features if isinstance(cfg.critic_features, str) else list(cfg.critic_features)
        with self.autocast():  # the probe forward runs as every later forward does (a bf16 base needs autocast)
            if cfg.critic_body == "grafted":  # the reward network's later layers as the critic (critic_align/grafted.py)
                from .grafted import build_grafted_critic

                return build_grafted_critic(self.adapter, self.adapters, self.schedule, self.task.decode, self.rewards,
                                            example, "critic", cfg.critic_lora_rank, None, cfg.lora_target_modules,
                                            features)
            return build_critic(
                self.adapter, mode=cfg.critic_mode, num_rewards=len(self.rewards.names), adapters=self.adapters,
                lora_rank=cfg.critic_lora_rank, lora_target_modules=cfg.lora_target_modules,
                hidden_dim=cfg.value_head_hidden, num_heads=cfg.value_head_heads, features=features,
                use_cond=cfg.critic_cond and cond0 is not None, width=cfg.critic_width, example=example,
                x0_reward=cfg.critic_x0_reward,
            ).to(self.device)

    num_processes = property(lambda self: self.processes.num_processes)
    rank = property(lambda self: self.processes.rank)
    is_main_process = property(lambda self: self.processes.is_main_process)
    _purge_step = property(lambda self: self.log.purge_step)
    _trainable = property(lambda self: list({id(p): p for p in self.policy_params + self.critic_params}.values()))
    autocast = property(lambda self: self.models.autocast)
    policy_output = property(lambda self: self.models.policy_output)
    reference_output = property(lambda self: self.models.reference_output)

    def context(self, batch_size: int) -> UpdateContext:
        """What an update of a batch of ``batch_size`` trajectories reads (:class:`~critic_align.update.UpdateContext`)."""
        return UpdateContext(self.models, self.opt, self.config, self.generator, self.processes.shard(batch_size),
                             batch_size, tuple(self.rewards.names), self.reward_weights, self.forward_process)

    # ------------------------------------------------------------------------------------------------
    # the stages, called with what they need
    def rollout(self, prompts, x_T=None, generator: torch.Generator | None = None, count: bool = True,
                window: tuple[int, int] | None = None) -> Rollout:
        """This process's shard of trajectories of the current policy for ``prompts`` (the whole batch), scored
        (``count``: add the whole batch to reward_queries); ``window``: an SDE window (see :meth:`draw_window`)."""
        cfg, prompts = self.config, list(prompts)
        ro = collect.collect(self.models, self.task, self.rewards, self.timesteps, prompts,
                             self.processes.shard(len(prompts)), self.generator if generator is None else generator,
                             cfg.sample_chunk_size, cfg.overlap_rewards, cfg.critic_x0_reward, x_T, window)
        check_reward_magnitude(self.processes.gather(ro.rewards), self.rewards.names)  # every process raises together
        self.reward_queries += len(prompts) if count else 0
        if ro.x0_rewards is not None:
            self.x0_reward_rows += ro.x0_rewards.shape[0] * ro.x0_rewards.shape[1] * self.num_processes
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

    def compute_values(self, ro: Rollout) -> torch.Tensor:
        """(B, T, K) critic values at the states of ``ro`` (this process's)."""
        return collect.critic_values(self.models, ro)

    def compute_advantages(self, ro: Rollout, prompts=None) -> Rollout:
        """A new Rollout with ``advantages`` (B, T) clipped to ±adv_clip_max and, with a critic, ``values`` and
        ``returns`` (B, T, K), from the configured estimator on the whole batch's rewards and values (the
        estimator's group statistics and whitening are the whole batch's); this process keeps its rows.
        prompts: the whole batch's prompts (every process holds them; default: gathered from the processes)."""
        procs = self.processes
        values = self.compute_values(ro) if self.estimator.needs_values else None
        if prompts is None:
            prompts = [p for part in procs.gather_objects(list(ro.prompts)) for p in part]
        prompts = tuple(prompts)
        scored = ScoredBatch(procs.gather(ro.rewards).float(), self.reward_weights, prompts, ro.num_steps)
        adv, returns = self.estimator.compute(scored, None if values is None else procs.gather(values))
        mine, clip = procs.shard(len(prompts)), self.config.adv_clip_max
        return replace(ro, values=values if values is not None else ro.values,
                       returns=None if returns is None else returns[mine], advantages=adv[mine].clamp(-clip, clip))

    def update(self, ro: Rollout) -> dict:
        """The configured algorithm's update (``config.algorithm``: ppo / nft / awm) on a rollout with advantages."""
        return self.algorithm.update(self.context(ro.batch_size * self.num_processes), ro)

    def pretrain_value(self) -> list[dict]:
        """Value pretraining on rollouts of the frozen initial policy (:func:`critic_align.value_fit.pretrain_value`)."""
        cfg = self.config
        if self.critic is None or cfg.value_pretrain_epochs == 0:
            return []

        def next_rollout():
            ro = self.rollout(self.prompt_iter.batch(cfg.prompts_per_epoch, cfg.group_size), window=self.draw_window())
            return ro, self.processes.gather(ro.rewards)

        logs = value_fit.pretrain_value(self.context(cfg.batch_size), next_rollout, self.value_report,
                                        self.optimizer.param_groups[-1], self.log, cfg.progress,
                                        lambda: self.reward_queries, self.is_main_process)
        self.pretrained_value = True
        return logs

    def fit_values(self, vb, passes: int, coef: float = 1.0, prefix: str = "value_loss") -> dict:
        """Value-only steps on one process's :class:`~critic_align.value_data.ValueBatch` (:func:`value_fit.fit_values`)."""
        return value_fit.fit_values(self.context(self.config.batch_size), vb, passes, coef, prefix)

    def value_report(self, ro: Rollout, values: torch.Tensor, prefix: str = "") -> dict:
        """The critic's explained variance and calibration on the whole batch (:func:`metrics.critic_report`)."""
        procs = self.processes
        return metrics.critic_report(procs.gather(values), procs.gather(ro.rewards), self.rewards.names,
                                     self.config.gamma, prefix)

    def reward_stats(self, ro: Rollout) -> dict:
        """The trained rewards' and the eval rewards' mean and std over the whole batch."""
        procs = self.processes
        out = metrics.column_stats(procs.gather(ro.rewards), self.rewards.names)
        if self.eval_rewards is not None:
            extra = procs.gather(self.eval_rewards(ro.samples, ro.prompts).to(self.device))
            out.update(metrics.column_stats(extra, self.eval_rewards.names))
        return out

    def evaluate(self) -> dict:
        if self.config.critic_x0_reward:  # the held-out batch's x0 predictions are scored too
            self.x0_reward_rows += self.config.eval_prompts * self.config.eval_per_prompt * len(self.timesteps)
        return metrics.evaluate(self.models, self.task, self.rewards, self.eval_rewards, self.timesteps, self.config,
                                self.processes)

    def sample(self, prompts, seed: int = 1234, use_policy: bool = True) -> torch.Tensor:
        if not use_policy and self.config.policy == "full":
            if self.epoch > 0:
                raise ValueError("policy: full keeps no frozen copy of the base: the base model cannot be sampled "
                                 "after training started (use_policy=True)")
            use_policy = True  # before the first update the policy is the base (value pretraining does not move it)
        return collect.sample_images(self.models, self.task, self.timesteps, prompts, seed, use_policy)

    def mc_returns(self, ro: Rollout) -> torch.Tensor:
        return value_fit.mc_returns(ro, self.config.gamma)

    def _pairs(self, ro: Rollout) -> torch.Tensor:
        return draw_pairs(self.generator, ro.batch_size, ro.num_steps, self.config.timestep_fraction)

    def loss_on_pairs(self, ro: Rollout, pairs: torch.Tensor, train_policy: bool = True):
        return loss_on_pairs(self.context(ro.batch_size), ro, pairs, train_policy)

    save_grid = runio.save_grid
    save = runio.save
    load = runio.load

    # ------------------------------------------------------------------------------------------------
    # the loop
    def train_epoch(self) -> EpochResult:
        cfg = self.config
        t0 = time.time()
        window = self.draw_window()
        prompts = self.prompt_iter.batch(cfg.prompts_per_epoch, cfg.group_size)
        ro = self.rollout(prompts, window=window)
        t_rollout = time.time() - t0
        if self.critic is not None and self.epoch == 0 and not self.pretrained_value:
            # no value pretraining: standardise on the first batch
            self.critic.head.set_output_scale(self.processes.gather(ro.rewards))
        ro = self.compute_advantages(ro, prompts)
        t1 = time.time()
        stats = self.update(ro)
        if self.forward_process is not None and cfg.value_perturbed_coef > 0:
            stats.update(value_fit.fit_perturbed(self.context(cfg.batch_size), ro))
        t_update = time.time() - t1
        self.epoch += 1
        row = {"phase": "train", "epoch": self.epoch, "reward_queries": self.reward_queries,
               "time_rollout_s": t_rollout, "time_update_s": t_update, "time_epoch_s": time.time() - t0}
        if window is not None:
            row["sde_window_start"] = window[0]
        if cfg.critic_x0_reward:
            row["x0_reward_rows"] = self.x0_reward_rows
        row.update(self.reward_stats(ro))
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
        best = BestKeeper.for_run(cfg, self.rewards.names, self.out, self.processes.share_from_main,
                                  self.is_main_process)  # best.py: best/ checkpoint and collapse guard
        eval_row = self.log_eval() if cfg.eval_every and self.epoch == 0 and best.needs_eval(0) else None
        if eval_row is not None:
            best.after_eval(eval_row, lambda: self.save(best.directory, keep_last=1))
        for _ in it:
            res = self.train_epoch()
            history.append(res.metrics)
            self.log(res.metrics)
            if cfg.eval_every and (self.epoch % cfg.eval_every == 0 or self.epoch == n):
                eval_row = self.log_eval()
                best.after_eval(eval_row, lambda: self.save(best.directory, keep_last=1))
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
        tensors = {f"policy.{k}": v for k, v in self.policy_tensors().items()}
        if self.critic is not None:
            tensors.update({f"critic.{k}": v for k, v in self.critic.state_tensors().items()})
        opt_tensors, opt_meta = optimizer_tensors(self.optimizer)
        state = {"epoch": self.epoch, "reward_queries": self.reward_queries, "pretrained_value": self.pretrained_value,
                 "prompt_iterator": self.prompt_iter.state_dict(), "stat_tracker": self.estimator.state_dict(),
                 "optimizer": opt_meta, "x0_reward_rows": self.x0_reward_rows,
                 # the measured activation bytes per row: a resumed run splits its minibatches as an uninterrupted one
                 "micro_batch_bytes_per_row": dict(self.opt.batcher.bytes_per_row)}
        return tensors | opt_tensors, state

    def load_state_dict(self, tensors: dict, state: dict) -> None:
        if self.processes.sharded:  # a checkpoint's tensors are full: shard them as the parameters are (FSDP2)
            tensors = self.processes.local_tensors(tensors, self.state_dict()[0], self.optimizer)
        self.load_policy_tensors({k[7:]: v for k, v in tensors.items() if k.startswith("policy.")})
        if self.critic is not None:
            self.critic.load_state_tensors({k[7:]: v for k, v in tensors.items() if k.startswith("critic.")})
        restore_optimizer(self.optimizer, tensors, state["optimizer"])
        self.epoch, self.reward_queries = int(state["epoch"]), int(state["reward_queries"])
        self.pretrained_value = bool(state["pretrained_value"])
        self.x0_reward_rows = int(state.get("x0_reward_rows", 0))  # absent in checkpoints before critic_x0_reward
        self.prompt_iter.load_state_dict(state["prompt_iterator"])
        self.estimator.load_state_dict(state["stat_tracker"])
        self.opt.batcher.bytes_per_row = {k: float(v) for k, v in
                                          state.get("micro_batch_bytes_per_row", {}).items()}

    def export_policy_lora(self) -> dict[str, torch.Tensor]:
        if self.config.policy != "lora":
            raise ValueError("policy: full has no LoRA adapter to export: the checkpoint's policy.* tensors are the "
                             "backbone's full weights (load them with the model's load_state_dict)")
        return self.adapters.state_dict("policy")
