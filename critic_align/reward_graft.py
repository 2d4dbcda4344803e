"""The split of a reward network that the reward-grafted critic (:mod:`critic_align.grafted`) runs: its own module so
that the grafts of each reward family (:mod:`critic_align.grafted_clip`) and the critic that dispatches to them do
not import each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["RewardGraft"]


@dataclass
class RewardGraft:
    """A reward network split at its graft layer.  ``early``: image -> graft activations (B, C, H, W); ``late``:
    graft activations -> logits; ``readout(logits, cond, image) -> (B,)`` the reward's value from the logits, the
    task's conditioning and the decoded image x̂0 itself (for what the reward computes from pixels, not from the
    network); ``channels``, ``size``: the graft layer's C and (H, W)."""

    early: nn.Module
    late: nn.Module
    readout: Callable[[torch.Tensor, object, torch.Tensor], torch.Tensor]
    channels: int
    size: tuple[int, int]
