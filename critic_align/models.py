"""The networks of a run as the stages see them: one record, no trainer.

:class:`Models` is what sampling, scoring the critic and the update need of the networks: the backbone adapter with
its LoRA adapters (the policy's, the critic's), the critic (or None), the stochastic step, classifier-free guidance,
mixed precision and the device.  Stages receive it with the batch and the config section they need.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from .backbones.base import BackboneAdapter
from .backbones.lora import LoraAdapters
from .critic import Critic
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

    def values(self, x_t, t, cond, x0_reward=None) -> torch.Tensor:
        """The critic's (N, K) values, under the run's autocast."""
        with self.autocast():
            return self.critic(x_t, t, cond, x0_reward)
