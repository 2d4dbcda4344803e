"""The trainer: owns a run's state and reads its loop top to bottom.  The stages are functions of what they need (the
networks, :class:`~critic_align.models.Models`; a batch; the config) in their own modules; only this module and the entry
points (:mod:`critic_align.api`, the command line) know the trainer.  An epoch: collect (this process's trajectories, (B,
K) rewards) → values (B, T, K) → estimate (advantages on the whole batch) → update → log (:mod:`critic_align.runio`)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from . import checkpoint, collect, metrics, runio, value_fit
from .algorithms import build_algorithm
from .backbones.base import BackboneAdapter
from .best import BestKeeper
from .checks import check_process_count, check_trainer_args
from .config import PPOConfig
from .distributed import Processes, seed_everything
from .estimators import build_estimator, estimate
from .guard import RunPlace, check_reward_magnitude, check_update, check_weights, phase
from .launch import check_launch
from .models import build_models
from .prompts import PromptIterator
from .rewards.base import MultiReward
from .rollout import Rollout
from .runlock import RunLock
from .sde_window import Window, draw_window
from .steps import step_for_run
from .tasks.base import check_task
from .update import UpdateContext, build_optimization
from .value_data import ForwardProcess
from .value_source import ValueSource
from .x0_reward import X0Readout


@dataclass
class EpochResult:
    epoch: int
    metrics: dict


class Trainer:
    """Post-train the model ``adapter`` wraps for ``task`` (prompts, latent shape, encode / null_cond / decode) on ``rewards``
    (a :class:`MultiReward`: one critic head each); ``eval_rewards``: reported, not trained on (e.g. ``digit_correct``)."""

    def __init__(self, config: PPOConfig, task, adapter: BackboneAdapter, scheduler, rewards: MultiReward,
                 eval_rewards: MultiReward | None = None, accelerator=None):
        check_trainer_args(config, task, adapter, scheduler, rewards, eval_rewards)  # checks.py: types, with examples
        self.config, self.task, self.rewards, self.eval_rewards = config, task, rewards, eval_rewards
        check_launch(config)  # what the launcher asked for, before the engine is made (critic_align/launch.py)
        # mixed precision is our autocast (accelerate's state is process-wide); cpu=True lets accelerate see a CPU torchrun
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        check_process_count(self.accelerator, int(os.environ.get("WORLD_SIZE", "1")))
        self.processes, self.device = Processes(self.accelerator), self.accelerator.device  # the engine: distributed.py
        seed_everything(config.seed)
        config.check_run(rewards.names, self.processes.num_processes, model=adapter.model)
        self.rewards = rewards if config.reward_weights is None else MultiReward(rewards.rewards, config.reward_weights)
        self.reward_weights = self.rewards.weights.float()
        self.step = step_for_run(scheduler, config)  # DDIMStep(eta) | FlowMatchSDEStep(sde_noise_level)
        self.schedule, self.timesteps = self.step.schedule, self.step.schedule.timesteps(config.num_inference_steps)
        check_task(task)
        self.prompt_iter = PromptIterator(task.prompts, seed=config.seed)  # checks the prompts before they are used
        self.estimator, self.x0 = build_estimator(config), X0Readout.from_config(config)  # x0: the value head's read-out
        self.values_from = ValueSource.from_config(config, self.estimator, self.processes)  # none / critic / oracle
        self.models = build_models(config, task, adapter, self.step, self.timesteps, self.rewards,
                                   self.values_from.builds_critic, self.device)  # on the device, with the LoRA and critic
        self.adapter, self.adapters, self.critic = self.models.adapter, self.models.adapters, self.models.critic
        self.forward_process = (ForwardProcess(scheduler, config.num_inference_steps)
                                if self.critic is not None and config.value_perturbed_per_sample else None)
        self.algorithm = build_algorithm(config.algorithm, self.schedule, scheduler, config)  # algorithms/, by name
        self.base_digest = checkpoint.base_digest(self.adapter.model)  # before the engine: FSDP shards the base
        self.optimizer, self.opt = build_optimization(  # the optimiser and the engine (DDP with several processes)
            config, self.models, self.processes,
            lambda losses, norms: check_update(losses, norms, self.num_processes, self.place()),
            lambda: check_weights(self.models, self.trainable, self.place()))
        self.policy_params, self.critic_params = self.opt.policy_params, self.opt.critic_params
        self.epoch, self.reward_queries, self.pretrained_value, self.x0_reward_rows = 0, 0, False, 0  # x0: the read-out's
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)
        self.out = Path(config.output_dir)
        self.log = runio.RunLog(self.out, config.log_tensorboard, enabled=self.is_main_process, log_with=config.log_with,
                                config=config.to_dict())
        self.lock = RunLock(self.out, self.processes)  # one writer per run directory (critic_align/runlock.py)
        self.files = runio.RunFiles(self.out, self.log, self.lock, self.processes, self.generator)  # saving, loading

    num_processes = property(lambda self: self.processes.num_processes)
    is_main_process = property(lambda self: self.processes.is_main_process)
    trainable = property(lambda self: list({id(p): p for p in self.policy_params + self.critic_params}.values()))
    policy_output = property(lambda self: self.models.policy_output)
    reference_output = property(lambda self: self.models.reference_output)

    def context(self, batch_size: int) -> UpdateContext:
        """What an update of a batch of ``batch_size`` trajectories reads (:class:`~critic_align.update.UpdateContext`)."""
        return UpdateContext(self.models, self.opt, self.config, self.generator, self.processes.shard(batch_size),
                             batch_size, tuple(self.rewards.names), self.reward_weights, self.forward_process)

    def place(self) -> RunPlace:
        """Where the run stands, for the finiteness guard's message (:mod:`critic_align.guard`)."""
        return RunPlace(phase(self.critic is not None, self.pretrained_value, self.epoch), self.out, self.config)

    def signature(self) -> checkpoint.RunSignature:
        """What a checkpoint records of this run and a resume is checked against (:mod:`critic_align.checkpoint`)."""
        return checkpoint.RunSignature(self.config, checkpoint.model_fingerprint(self.models, self.base_digest),
                                       checkpoint.run_identity(self.task, self.rewards, self.eval_rewards))

    # ---------------------------------------------------------------- the stages, called with what they need
    def rollout(self, prompts, x_T=None, generator: torch.Generator | None = None, count: bool = True,
                window: Window | tuple[int, int] | None = None) -> Rollout:
        """This process's shard of trajectories of the current policy for ``prompts`` (the whole batch), scored
        (``count``: add the whole batch to reward_queries); ``window``: an SDE window (:func:`sde_window.draw_window`)."""
        cfg, prompts = self.config, list(prompts)
        ro = collect.collect(self.models, self.task, self.rewards, self.timesteps, prompts,
                             self.processes.shard(len(prompts)), self.generator if generator is None else generator,
                             cfg.sample_chunk_size, cfg.overlap_rewards, self.x0, x_T, Window.of(window))
        check_reward_magnitude(self.processes.gather(ro.rewards), self.rewards.names)  # every process raises together
        self.reward_queries += len(prompts) if count else 0
        self.x0_reward_rows += self.x0.rows(ro.batch_size, ro.num_steps) * self.num_processes
        return ro

    def compute_advantages(self, ro: Rollout, prompts=None) -> Rollout:
        """``ro`` with advantages (with a critic: values, returns) from the whole batch (:func:`estimators.estimate`)."""
        values, queries = self.values_from.values(self.models, self.task, self.rewards, self.timesteps, ro, self.generator)
        self.reward_queries += queries  # value_source: oracle with oracle_counted
        return estimate(self.estimator, ro, values, self.reward_weights, self.processes, self.config.adv_clip_max, prompts)

    def update(self, ro: Rollout) -> dict:
        """The configured algorithm's update (``config.algorithm``: ppo / nft / awm) on a rollout with advantages."""
        return self.algorithm.update(self.context(ro.batch_size * self.num_processes), ro)

    def pretrain_value(self) -> list[dict]:
        """Value pretraining on rollouts of the frozen initial policy (:func:`critic_align.value_fit.pretrain_value`)."""
        cfg = self.config
        if self.critic is None or cfg.value_pretrain_epochs == 0:
            return []
        batches = (lambda: self.rollout(self.prompt_iter.batch(cfg.prompts_per_epoch, cfg.group_size),
                                        window=draw_window(cfg, self.generator)))
        critic_group = self.optimizer.param_groups[-1]  # its learning rate decays during pretraining (if configured)
        logs = value_fit.pretrain_value(self.context(cfg.batch_size), batches, self.value_report, critic_group, self.log,
                                        cfg.progress, lambda: self.reward_queries, self.is_main_process)
        self.pretrained_value = True
        return logs

    def value_report(self, ro: Rollout, values: torch.Tensor, prefix: str = "") -> dict:
        """The critic's explained variance and calibration on the whole batch (:func:`metrics.critic_report`)."""
        gather = self.processes.gather
        return metrics.critic_report(gather(values), gather(ro.rewards), self.rewards.names, self.config.gamma, prefix)

    def sample(self, prompts, seed: int = 1234, use_policy: bool = True) -> torch.Tensor:
        use_policy = self.models.sampled_policy(use_policy, trained=self.epoch > 0)  # policy: full has no base
        return collect.sample_images(self.models, self.task, self.timesteps, prompts, seed, use_policy)

    # ---------------------------------------------------------------- the loop
    def train_epoch(self) -> EpochResult:
        cfg, t0 = self.config, time.time()
        window = draw_window(cfg, self.generator)  # the epoch's SDE window (sde_window.py), or EVERY_STEP
        prompts = self.prompt_iter.batch(cfg.prompts_per_epoch, cfg.group_size)
        ro = self.rollout(prompts, window=window)  # collect
        t_rollout = time.time() - t0
        if self.critic is not None and self.epoch == 0 and not self.pretrained_value:  # no value pretraining:
            self.critic.head.set_output_scale(self.processes.gather(ro.rewards))  # standardise on the first batch
        ro = self.compute_advantages(ro, prompts)  # values, estimate
        t1 = time.time()
        stats = self.update(ro)  # update
        if self.forward_process is not None and cfg.value_perturbed_coef > 0:
            stats.update(value_fit.fit_perturbed(self.context(cfg.batch_size), ro))
        self.epoch += 1  # log
        row = {"phase": "train", "epoch": self.epoch, "reward_queries": self.reward_queries,
               "time_rollout_s": t_rollout, "time_update_s": time.time() - t1, "time_epoch_s": time.time() - t0}
        row.update(window.metrics() | self.x0.metrics(self.x0_reward_rows) | self.values_from.metrics())
        row.update(metrics.reward_stats(ro, self.rewards.names, self.eval_rewards, self.processes))
        if ro.values is not None:
            row.update(self.value_report(ro, ro.values))
        return EpochResult(self.epoch, row | stats)

    def train(self, num_epochs: int | None = None) -> list[dict]:
        cfg, history = self.config, []
        runio.begin(self.files, cfg)  # the run directory's lock, config.json
        if self.critic is not None and not self.pretrained_value:
            self.pretrain_value()
            if cfg.checkpoint_every:
                self.save()  # epoch 0: a kill during epoch 1 does not repeat value pretraining
        n = num_epochs if num_epochs is not None else cfg.num_epochs
        it = runio.progress(range(self.epoch, n), cfg, self.is_main_process)
        best = BestKeeper.for_run(cfg, self.rewards.names, self.out, self.processes.share_from_main, self.is_main_process)
        eval_row = self.log_eval(best) if cfg.eval_every and self.epoch == 0 and best.needs_eval(0) else None
        for _ in it:
            res = self.train_epoch()
            history.append(res.metrics)
            self.log(res.metrics)
            if cfg.eval_every and (self.epoch % cfg.eval_every == 0 or self.epoch == n):
                eval_row = self.log_eval(best)
            runio.show_progress(it, res.metrics, eval_row, self.rewards.names[0])
            if cfg.grid_every and self.epoch % cfg.grid_every == 0:
                self.save_grid(self.out / "grids" / f"epoch_{self.epoch:04d}.png")
            if (cfg.checkpoint_every and self.epoch % cfg.checkpoint_every == 0) or self.epoch == n:
                self.save()
        return history

    def evaluate(self) -> dict:
        """Metrics on the fixed held-out batch (:func:`metrics.evaluate`)."""
        cfg = self.config  # with the x0 read-out the held-out batch's x0 predictions are scored too:
        self.x0_reward_rows += self.x0.rows(cfg.eval_prompts * cfg.eval_per_prompt, len(self.timesteps))
        return metrics.evaluate(self.models, self.task, self.rewards, self.eval_rewards, self.timesteps, cfg, self.processes,
                                self.x0)

    def log_eval(self, best: BestKeeper | None = None) -> dict:
        """The held-out evaluation, logged; with ``best``, the best checkpoint kept and a collapse stopped (best.py)."""
        row = {"phase": "eval", "epoch": self.epoch, "reward_queries": self.reward_queries, **self.evaluate()}
        self.log(row)
        if best is not None:
            best.after_eval(row, lambda: self.save(best.directory, keep_last=1))
        return row

    # ---------------------------------------------------------------- state and outputs
    def save_grid(self, path, per_prompt: int = 8, use_policy: bool = True) -> Path | None:
        """A PNG grid of samples per prompt, written by the main process (the others return None; :func:`runio.save_grid`)."""
        return runio.save_grid(self.models, self.task, self.timesteps, path, self.log, self.reward_queries, self.processes,
                               per_prompt, self.models.sampled_policy(use_policy, trained=self.epoch > 0))

    def save(self, directory=None, keep_last: int | None = None) -> Path | None:
        """Checkpoint on every process (:func:`runio.save`): only weights that pass the finiteness guard are written."""
        check_weights(self.models, self.trainable, self.place(), "before writing a checkpoint")
        return runio.save(self.files, *self.state_dict(), self.signature(), directory, keep_last)

    def load(self, path, resume: bool = True) -> None:
        """Restore a checkpoint on every process: continue the run exactly, or reuse its networks (:func:`runio.load`)."""
        runio.load(self.files, path, self.signature(), self.load_state_dict, resume)

    def state_dict(self) -> tuple[dict, dict]:
        """(tensors, state): the policy LoRA, the critic and the optimiser's tensors; the counters, the prompt iterator,
        the estimator's state (DDPO's buffers) and the optimiser's groups (a checkpoint adds RNG states and more)."""
        opt_tensors, opt_meta = checkpoint.optimizer_tensors(self.optimizer)
        state = {"epoch": self.epoch, "reward_queries": self.reward_queries, "pretrained_value": self.pretrained_value,
                 "prompt_iterator": self.prompt_iter.state_dict(), "stat_tracker": self.estimator.state_dict(),
                 "optimizer": opt_meta, "x0_reward_rows": self.x0_reward_rows, "value_source": self.values_from.state_dict(),
                 "micro_batch_bytes_per_row": dict(self.opt.batcher.bytes_per_row)}  # a resume splits minibatches alike
        return checkpoint.model_tensors(self.models) | opt_tensors, state

    def load_state_dict(self, tensors: dict, state: dict) -> None:
        checkpoint.load_run_tensors(self.models, self.optimizer, tensors, state["optimizer"], self.processes)
        self.epoch, self.reward_queries = int(state["epoch"]), int(state["reward_queries"])
        self.pretrained_value, self.x0_reward_rows = bool(state["pretrained_value"]), int(state.get("x0_reward_rows", 0))
        self.prompt_iter.load_state_dict(state["prompt_iterator"])
        self.values_from.load_state_dict(state.get("value_source"))  # both absent in older checkpoints
        self.estimator.load_state_dict(state["stat_tracker"])
        self.opt.batcher.bytes_per_row = {k: float(v) for k, v in state.get("micro_batch_bytes_per_row", {}).items()}
