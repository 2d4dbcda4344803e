"""Particle weights, effective sample size and resampling, within groups of particles.

Particles are laid out as (G, N): G groups (one per prompt) of N particles.  Resampling never moves a
particle across groups.  Every scheme returns ancestor indices (G, N) into the group's particles and is
unbiased: E[#copies of particle i] = N · w_i.  Variance (of the copy counts) decreases from multinomial to
stratified/residual to systematic (Douc, Cappé & Moulines 2005); systematic is the default.
"""

from __future__ import annotations

import torch

RESAMPLING_SCHEMES = ("systematic", "stratified", "residual", "multinomial")


def normalize_log_weights(log_w: torch.Tensor) -> torch.Tensor:
    """(G, N) log-weights -> (G, N) float64 normalised weights (each row sums to 1), computed stably."""
    _check_log_weights(log_w)
    return torch.softmax(log_w.double(), dim=-1)


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """(G, N) log-weights -> (G,) ESS = (Σ w)² / Σ w², in [1, N] (Kong 1992)."""
    _check_log_weights(log_w)
    w = torch.softmax(log_w.double(), dim=-1)
    return (1.0 / (w**2).sum(-1)).to(torch.float32)


def _check_log_weights(log_w: torch.Tensor) -> None:
    if log_w.ndim != 2:
        raise ValueError(f"log-weights must have shape (groups, particles), got {tuple(log_w.shape)}")
    if torch.isnan(log_w).any():
        raise ValueError("log-weights contain NaN (a NaN value or reward?); check the potential function")
    if torch.isposinf(log_w).any():
        raise ValueError("log-weights contain +inf; check the potential function and λ")
    if torch.isneginf(log_w).all(-1).any():
        raise ValueError("every particle of a group has weight 0 (log-weight -inf); nothing to resample from")


def _uniforms(g: int, n: int, generator, device, stratified: bool) -> torch.Tensor:
    """Sorted points in [0, 1): (k + u_k)/N with one shared u (systematic) or independent u_k (stratified)."""
    base = torch.arange(n, dtype=torch.float64, device=device).expand(g, n)
    shape = (g, n) if stratified else (g, 1)
    u = torch.rand(shape, generator=generator, dtype=torch.float64, device="cpu").to(device)
    return (base + u) / n


def _search(weights: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    cdf = weights.cumsum(-1)
    cdf = cdf / cdf[:, -1:]  # guard against round-off: the last edge is exactly 1
    return torch.searchsorted(cdf, points, right=True).clamp(max=weights.shape[-1] - 1)


def systematic(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return _search(weights.double(), _uniforms(*weights.shape, generator, weights.device, stratified=False))


def stratified(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return _search(weights.double(), _uniforms(*weights.shape, generator, weights.device, stratified=True))


def multinomial(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    w = weights.double().cpu()
    idx = torch.multinomial(w, weights.shape[-1], replacement=True, generator=generator)
    return idx.sort(-1).values.to(weights.device)


def residual(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """floor(N·w_i) deterministic copies, the remaining R slots drawn multinomially from the residuals."""
    g, n = weights.shape
    w = weights.double().cpu()
    counts = torch.floor(n * w).long()
    remaining = n - counts.sum(-1)
    resid = n * w - counts
    out = torch.empty(g, n, dtype=torch.long)
    for row in range(g):  # G is the number of prompts: a short loop, the particle work is vectorised
        idx = torch.repeat_interleave(torch.arange(n), counts[row])
        r = int(remaining[row])
        if r > 0:
            extra = torch.multinomial(resid[row] / resid[row].sum(), r, replacement=True, generator=generator)
            idx = torch.cat([idx, extra])
        out[row] = idx.sort().values
    return out.to(weights.device)


_SCHEMES = {"systematic": systematic, "stratified": stratified, "residual": residual, "multinomial": multinomial}


def resample(log_w: torch.Tensor, scheme: str = "systematic", generator: torch.Generator | None = None) -> torch.Tensor:
    """Ancestor indices (G, N) for (G, N) log-weights, drawn within each group by ``scheme``."""
    if scheme not in _SCHEMES:
        raise ValueError(f"unknown resampling scheme {scheme!r}; use one of {RESAMPLING_SCHEMES}")
    return _SCHEMES[scheme](normalize_log_weights(log_w).double(), generator)


def flat_ancestors(ancestors: torch.Tensor) -> torch.Tensor:
    """(G, N) within-group ancestor indices -> (G·N,) indices into the flat particle batch (groups contiguous)."""
    g, n = ancestors.shape
    return (ancestors + n * torch.arange(g, device=ancestors.device).unsqueeze(1)).reshape(-1)
