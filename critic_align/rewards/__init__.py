"""Rewards: ``reward(samples, prompts) -> (B,) float32``, higher is better.

Samples are ``(B, C, H, W)`` float images in ``[-1, 1]``; prompts a sequence of ``B`` strings.
See :mod:`critic_align.rewards.base` for the interface and the NaN ("not applicable")
convention, and :class:`MultiReward` for evaluating and combining several rewards.
"""

from critic_align.rewards.base import (
    FunctionReward,
    MultiReward,
    Reward,
    RewardError,
    check_reward_output,
)
from critic_align.rewards.digits import DigitCorrect, DigitProb
from critic_align.rewards.image import (
    Boldness,
    JpegCompressibility,
    JpegIncompressibility,
    jpeg_size_kb,
)

__all__ = [
    "Boldness",
    "DigitCorrect",
    "DigitProb",
    "FunctionReward",
    "JpegCompressibility",
    "JpegIncompressibility",
    "MultiReward",
    "Reward",
    "RewardError",
    "check_reward_output",
    "jpeg_size_kb",
]
