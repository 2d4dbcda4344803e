"""The networks of a run as the stages see them: one record, no trainer.

:class:`Models` is what sampling, scoring the critic and the update need of the networks: the backbone adapter with
its LoRA adapters (the policy's, the critic's), the critic (or None), the stochastic step, classifier-free guidance,
mixed precision, the device and what the policy trains (``policy``: its LoRA, or the whole backbone).  Stages receive
it with the batch and the config section they need.  :func:`build_models` makes a run's: the policy's LoRA on the
frozen base (or the backbone itself, trainable), and the critic its estimator needs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Callable

import torch

from .backbones.base import BackboneAdapter
from .backbones.lora import LoraAdapters
from .critic import Critic, build_run_critic
from .rollout import cfg_denoiser


@dataclass(frozen=True)
class Models:
    """adapter: the shared frozen base (``adapter.model``) with the LoRA adapters ``adapters`` ('policy', and 'critic'
    for a LoRA critic); critic: the value function or None (an estimator that needs no values); step: the stochastic
    step (``critic_align.steps``); guidance_scale / null_cond: classifier-free guidance (1.0: off; ``null_cond(n)``
    the unconditional conditioning); mixed_precision: 'no' | 'bf16'; device: where the forwards run."""

    adapter: BackboneAdapter
    adapters: LoraAdapters
    critic: Critic | None
    step: object
    guidance_scale: float
    null_cond: Callable[[int], object]
    mixed_precision: str
    device: torch.device
    policy: str = "lora"
    """'lora': the policy is the base with the 'policy' adapter; 'full': the backbone itself (no frozen copy kept)."""

    def autocast(self):
        """bf16 autocast for forwards when ``mixed_precision='bf16'``; otherwise a no-op."""
        if self.mixed_precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def policy_output(self, x_t, t, cond):
        """The policy's model output (CFG-combined when guidance_scale != 1)."""
        with self.adapters.using("policy") if self.policy == "lora" else contextlib.nullcontext(), self.autocast():
            return cfg_denoiser(self.adapter.predict, self.guidance_scale, self.null_cond)(x_t, t, cond)

    def reference_output(self, x_t, t, cond):
        """The frozen base model's output (the KL reference, the 'before' grid)."""
        if self.policy == "full":
            raise ValueError("policy: full trains the base weights and keeps no frozen copy of them: there is no "
                             "reference output (the config refuses kl_coef > 0 with it)")
        with self.adapters.disabled(), self.autocast():
            return cfg_denoiser(self.adapter.predict, self.guidance_scale, self.null_cond)(x_t, t, cond)

    def sampled_policy(self, use_policy: bool, trained: bool) -> bool:
        """``use_policy`` as sampling can honour it: ``policy: full`` keeps no frozen base, so the base is the policy
        until training moved it (``trained``: an update ran; value pretraining does not move the policy) and cannot
        be sampled after that."""
        if use_policy or self.policy == "lora":
            return use_policy
        if trained:
            raise ValueError("policy: full keeps no frozen copy of the base: the base model cannot be sampled after "
                             "training started (use_policy=True)")
        return True

    def policy_parameters(self) -> list[torch.nn.Parameter]:
        """What the policy trains: its LoRA adapter's tensors, or every backbone weight (``policy: full``)."""
        return self.adapters.parameters("policy") if self.policy == "lora" else list(self.adapter.model.parameters())

    def policy_tensors(self) -> dict[str, torch.Tensor]:
        """The policy's tensors as a checkpoint holds them (without the "policy." prefix): the LoRA adapter's (peft's
        names), or the backbone's whole state dict (``policy: full``)."""
        if self.policy == "lora":
            return self.adapters.state_dict("policy")
        return {k: v.detach() for k, v in self.adapter.model.state_dict().items()}

    def policy_lora(self) -> dict[str, torch.Tensor]:
        """The policy's LoRA adapter tensors (peft's names), to export; ``policy: full`` has none (refused)."""
        if self.policy != "lora":
            raise ValueError("policy: full has no LoRA adapter to export: the checkpoint's policy.* tensors are the "
                             "backbone's full weights (load them with the model's load_state_dict)")
        return self.adapters.state_dict("policy")

    def load_policy_tensors(self, tensors: dict) -> None:
        """Load :meth:`policy_tensors` (a checkpoint's, without the prefix) into the policy."""
        if self.policy == "lora":
            self.adapters.load_state_dict("policy", tensors)
        else:
            self.adapter.model.load_state_dict(tensors)

    def values(self, x_t, t, cond, x0_reward=None) -> torch.Tensor:
        """The critic's (N, K) values, under the run's autocast."""
        with self.autocast():
            return self.critic(x_t, t, cond, x0_reward)


def build_models(config, task, adapter: BackboneAdapter, step, timesteps: torch.Tensor, rewards, needs_critic: bool,
                 device) -> Models:
    """A run's networks on ``device``: the task's frozen parts (e.g. a pipeline's text encoders and VAE), the frozen
    base of ``adapter`` with the policy's LoRA adapter (active; ``policy: full``: no adapter, every backbone weight
    trains), and when the estimator ``needs_critic`` the critic the config asks for
    (:func:`~critic_align.critic.build_run_critic`, one head per trained reward, probed at the first of the run's
    ``timesteps``); channels-last weights and gradient checkpointing as configured."""
    if torch.device(device).type == "cuda":  # process-wide; see the config field's note
        torch.backends.cuda.enable_cudnn_sdp(config.cudnn_attention)
    task.to(device)
    adapter = adapter.to(device).requires_grad_(False)
    if config.channels_last:  # 4-D weights only; before the LoRA layers and the critic's copies are made
        adapter.model.to(memory_format=torch.channels_last)
    adapters = LoraAdapters(adapter.model, fused=config.fused_lora)
    if config.policy == "lora":
        adapters.add("policy", rank=config.lora_rank, alpha=config.lora_alpha, target_modules=config.lora_target_modules)
    models = Models(adapter, adapters, None, step, config.guidance_scale, lambda n: task.null_cond(n).to(device),
                    config.mixed_precision, device, config.policy)
    if needs_critic:
        models = replace(models, critic=build_run_critic(config, task, models, step.schedule, rewards, timesteps[:1]))
    if config.policy == "lora":
        adapters.activate("policy")
    else:  # policy: full: every backbone weight trains (a 'full' critic has its own copy, made above)
        adapter.model.requires_grad_(True)
    if config.gradient_checkpointing:  # after the critic: a 'full' critic's copy gets its own switch
        adapters.enable_gradient_checkpointing()
        if models.critic is not None and models.critic.mode == "full":
            models.critic.backbone.model.enable_gradient_checkpointing()
    return models
