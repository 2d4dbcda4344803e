"""AWM's critic advantage (``awm_advantage: critic``): a per-row, value-based advantage on the very state a
forward-process loss is taken at, A = Σ_k w_k (R_k − V_k(x_t, t)), divided by its std over the whole batch's rows
(so its scale matches GRPO's ≈ 1) and clipped.  Rows, not (B, T) pairs: NFT / AWM train on forward-noised states of
the final samples, which are not the sampler's states."""

from __future__ import annotations

from typing import Callable

import torch


def critic_advantages(values: torch.Tensor, rewards: torch.Tensor, weights: torch.Tensor, clip: float,
                      gather: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> torch.Tensor:
    """(N,) Σ_k w_k (R_k − V_k) / std over rows, clipped to ±clip.  values, rewards: (N, K), NaN reward = absent.
    gather: every process's rows of a (n,) tensor (the std is the whole batch's); identity for one process."""
    d = torch.nan_to_num(rewards.float() - values.float()) * weights.to(values.device)
    adv = d.sum(-1)
    every = gather(adv)
    return (adv / (every.std() + 1e-8)).clamp(-clip, clip) if every.numel() > 1 else adv.clamp(-clip, clip)
