"""Rewards: ``reward(samples, prompts) -> (B,) float32``, higher is better.

Samples are ``(B, C, H, W)`` float images in ``[-1, 1]``; prompts a sequence of ``B`` strings.
See :mod:`critic_align.rewards.base` for the interface and the NaN ("not applicable")
convention, and :class:`MultiReward` for evaluating and combining several rewards.
Real reward models (loaded lazily with transformers): :class:`CLIPScore`, :class:`PickScore`,
:class:`LaionAesthetic` (:mod:`critic_align.rewards.clip`), :class:`HPSv2` (HPSv2.1, :mod:`critic_align.rewards.hpsv2`);
rewards served by another process:
:class:`RemoteReward` (:mod:`critic_align.rewards.remote`, reference server in
:mod:`critic_align.rewards.remote_server`).
"""

from critic_align.rewards.base import (
    FunctionReward,
    MultiReward,
    Reward,
    RewardError,
    check_reward_output,
)
from critic_align.rewards.clip import CLIPScore, LaionAesthetic, PickScore
from critic_align.rewards.composition import CompositionCorrect, CompositionScore
from critic_align.rewards.digits import DigitCorrect, DigitProb
from critic_align.rewards.hpsv2 import HPSv2
from critic_align.rewards.image import (
    Boldness,
    JpegCompressibility,
    JpegIncompressibility,
    jpeg_size_kb,
)
from critic_align.rewards.remote import RemoteReward

__all__ = [
    "Boldness",
    "CLIPScore",
    "CompositionCorrect",
    "CompositionScore",
    "DigitCorrect",
    "DigitProb",
    "FunctionReward",
    "HPSv2",
    "JpegCompressibility",
    "JpegIncompressibility",
    "LaionAesthetic",
    "MultiReward",
    "PickScore",
    "RemoteReward",
    "Reward",
    "RewardError",
    "check_reward_output",
    "jpeg_size_kb",
]
