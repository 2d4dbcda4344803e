"""Diagnostics a user reads: the critic's accuracy per timestep bucket, and the samples' within-prompt diversity.

Pure functions of tensors; the trainer calls them on its training batch (``value_ev*``) and on a fixed held-out
batch every ``eval_every`` epochs (``eval/*``).
"""

from __future__ import annotations

import numpy as np
import torch

from .losses import explained_variance

TIMESTEP_BUCKETS = 4


def bucket_edges(num_steps: int, buckets: int = TIMESTEP_BUCKETS) -> list[tuple[int, int]]:
    """[(a, b), ...]: step k is in bucket j when a_j <= k < b_j (k = 0 is the first, noisiest step); empty
    buckets (T < buckets) are left out."""
    edges = np.linspace(0, num_steps, buckets + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def value_report(values: torch.Tensor, returns: torch.Tensor, available: torch.Tensor, names, prefix: str = "") -> dict:
    """Explained variance and calibration of a critic, per head, overall and per timestep bucket.

    values, returns: (B, T, K) predictions and Monte-Carlo returns; available: (B, K) bool (reward k applies).
    Keys (``prefix`` before each):
      ``value_ev`` / ``value_ev/<name>``: 1 − Var[R − V] / Var[R] over all (sample, step) pairs (mean over heads);
      ``value_ev_steps_a-b``: the same over steps a..b (mean over heads);
      ``value_calib_steps_a-b``: mean predicted value minus mean realised return over those steps (mean over
      heads; 0 = calibrated on average; in reward units).
    """
    k_heads = values.shape[-1]

    def per_head(sl: slice, fn) -> list[float]:
        return [fn(values[available[:, k], sl, k], returns[available[:, k], sl, k]) if available[:, k].any()
                else float("nan") for k in range(k_heads)]

    def calib(v, r):
        return float((v.double().mean() - r.double().mean()).item())

    heads = per_head(slice(None), explained_variance)
    out = {f"{prefix}value_ev": float(np.mean(heads))}
    out.update({f"{prefix}value_ev/{name}": e for name, e in zip(names, heads)})
    for a, b in bucket_edges(values.shape[1]):
        out[f"{prefix}value_ev_steps_{a}-{b - 1}"] = float(np.mean(per_head(slice(a, b), explained_variance)))
        out[f"{prefix}value_calib_steps_{a}-{b - 1}"] = float(np.mean(per_head(slice(a, b), calib)))
    return out


def within_prompt_diversity(samples: torch.Tensor, prompts) -> dict:
    """How different the samples of one prompt are, averaged over prompts with >= 2 samples.

    ``pairwise_l2``: mean L2 distance between two samples of the same prompt (over all pairs);
    ``pixel_std``: the per-pixel (per-entry) standard deviation across a prompt's samples, averaged over pixels.
    samples: (B, ...) decoded outputs.
    """
    flat = samples.detach().double().reshape(samples.shape[0], -1)
    groups: dict = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    l2, std = [], []
    for idx in groups.values():
        if len(idx) < 2:
            continue
        x = flat[idx]
        d = torch.cdist(x, x)
        n = len(idx)
        l2.append(float(d.sum() / (n * (n - 1))))
        std.append(float(x.std(dim=0, unbiased=False).mean()))
    if not l2:
        raise ValueError("within-prompt diversity needs at least one prompt with two or more samples")
    return {"pairwise_l2": float(np.mean(l2)), "pixel_std": float(np.mean(std))}
