"""What the trainer needs from a task: the :class:`Task` protocol, and :class:`BaseTask` with its defaults.

A task supplies the prompts, the latent shape, the conditioning of a batch of prompts (``encode``) and of the
unconditional branch of classifier-free guidance (``null_cond``), and ``decode`` from final latents to what the
rewards score (images in [-1, 1]).  ``to(device)`` moves what the task holds on a device (a pipeline's frozen text
encoders and VAE); ``grid_prompts`` and ``grid_scale`` say what sample grids show.  Subclass :class:`BaseTask` to
get the defaults of the last three (nothing to move, every prompt, 4x upscaled).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

TASK_MEMBERS = ("prompts", "latent_shape", "encode", "null_cond", "decode", "to", "grid_prompts", "grid_scale")


@runtime_checkable
class Task(Protocol):
    prompts: Sequence[str]
    """The training prompts (the trainer draws ``batch_size / group_size`` of them per epoch)."""
    latent_shape: tuple[int, ...]
    """Shape of one sample's latent (without the batch dimension)."""
    grid_prompts: Sequence[str]
    """The prompts a sample grid shows, one row each."""
    grid_scale: int
    """Pixel upscaling of sample grids (1 for images already large)."""

    def encode(self, prompts: Sequence[str]) -> Any:
        """(B, ...) conditioning of a batch of prompts (a tensor, a :class:`~critic_align.cond.TextCond`, or None)."""

    def null_cond(self, n: int) -> Any:
        """The unconditional conditioning of ``n`` samples (classifier-free guidance)."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, *latent_shape) final latents -> what the rewards score."""

    def to(self, device) -> "Task":
        """Move what the task holds to ``device``; returns the task."""


class BaseTask:
    """Defaults for a task's optional members: nothing to move, grids show every prompt, upscaled 4x."""

    grid_scale = 4

    def decode_differentiable(self, latents):
        """:meth:`decode` with autograd on (the grafted critic's path from x_t to the reward network); a task whose
        ``decode`` runs under ``torch.no_grad`` overrides this."""
        return self.decode(latents)

    @property
    def grid_prompts(self) -> tuple[str, ...]:
        return tuple(self.prompts)

    def to(self, device) -> "BaseTask":
        return self


def check_task(task) -> None:
    """Raise a TypeError naming what ``task`` lacks of the :class:`Task` protocol."""
    missing = [m for m in TASK_MEMBERS if not hasattr(task, m)]
    if missing:
        raise TypeError(f"task {type(task).__name__} lacks {missing} of the Task protocol (critic_align.tasks.base); "
                        "subclass critic_align.tasks.base.BaseTask for defaults of to, grid_prompts and grid_scale")
