"""The Trainer's argument checks: a wrong type gets a sentence naming what was expected and an example, before
anything is built (instead of an AttributeError deep inside, or a failure reported much later)."""

from __future__ import annotations


def _kind(x) -> str:
    return f"a {type(x).__module__.split('.')[0]}.{type(x).__qualname__}" if x is not None else "None"


def check_trainer_args(config, task, adapter, scheduler, rewards, eval_rewards=None) -> None:
    """Raise TypeError for an argument of the wrong type, naming the expected type with an example."""
    import torch.nn as nn

    from .backbones.base import BackboneAdapter
    from .config import PPOConfig
    from .rewards.base import MultiReward, Reward

    if not isinstance(config, PPOConfig):
        hint = " (build it from the dict: PPOConfig(**d) or PPOConfig.from_dict(d))" if isinstance(config, dict) else ""
        raise TypeError(f"Trainer(config=...) takes a critic_align.PPOConfig, got {_kind(config)}{hint}; e.g. "
                        "PPOConfig(num_epochs=10, output_dir='runs/mine')")
    if not isinstance(adapter, BackboneAdapter):
        if isinstance(adapter, nn.Module):
            raise TypeError(f"Trainer(adapter=...) takes a BackboneAdapter wrapping the model, got the raw module "
                            f"{type(adapter).__name__}; wrap it, e.g. UNetAdapter(unet) for a diffusers UNet2DModel "
                            "(critic_align.backbones: UNetAdapter, DiTAdapter, FluxAdapter, MLPAdapter)")
        raise TypeError(f"Trainer(adapter=...) takes a critic_align.backbones.BackboneAdapter, got {_kind(adapter)}; "
                        "e.g. UNetAdapter(unet)")
    for name, value, optional in (("rewards", rewards, False), ("eval_rewards", eval_rewards, True)):
        if isinstance(value, MultiReward) or (optional and value is None):
            continue
        if isinstance(value, Reward):
            fix = f"wrap it: {name}=MultiReward([{type(value).__name__}(...)])"
        elif isinstance(value, (list, tuple)):
            fix = f"wrap the list: {name}=MultiReward([...]) (optionally with weights: MultiReward(rewards, [1.0, 0.5]))"
        else:
            fix = f"e.g. {name}=MultiReward([DigitProb()])"
        raise TypeError(f"Trainer({name}=...) takes a critic_align.rewards.MultiReward"
                        f"{' or None' if optional else ''}, got {_kind(value)}; {fix}")
    from .steps import FlowMatchSchedule

    if not isinstance(scheduler, FlowMatchSchedule) and (not hasattr(scheduler, "config")
                                                          or not hasattr(scheduler, "timesteps")):
        raise TypeError(f"Trainer(scheduler=...) takes a diffusers scheduler (or a task's FlowMatchSchedule), got "
                        f"{_kind(scheduler)}; e.g. DDPMScheduler(num_train_timesteps=1000) or "
                        "FlowMatchEulerDiscreteScheduler()")
    if task is None or isinstance(task, (str, nn.Module)):
        raise TypeError(f"Trainer(task=...) takes a critic_align task (prompts, latent_shape, encode / null_cond / "
                        f"decode), got {_kind(task)}; e.g. DigitsTask() (critic_align.tasks)")
    if config.eval_every and config.best_metric is not None and config.best_metric.startswith("eval/reward/"):
        names = list(rewards.names) + (list(eval_rewards.names) if eval_rewards is not None else [])
        if config.best_metric.removeprefix("eval/reward/") not in names:
            raise ValueError(f"config field best_metric={config.best_metric!r}: no such reward in this run; use one of "
                             f"{[f'eval/reward/{n}' for n in names]} (or another eval/* key)")


def check_process_count(accelerator, world: int) -> None:
    """The launch's process count (``WORLD_SIZE``) must be the one accelerate sees: otherwise every process would
    train alone and write the same run directory."""
    if world != accelerator.num_processes:
        raise RuntimeError(
            f"launched as {world} processes (WORLD_SIZE={world}) but accelerate sees "
            f"{accelerator.num_processes}: every process would train alone and write the same run directory. "
            "Create the accelerate state for the launch (on CPU: ACCELERATE_USE_CPU=1 or Accelerator(cpu=True)) "
            "before building the Trainer, or pass it as accelerator=")
