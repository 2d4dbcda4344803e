"""Sample-based distances between point clouds (B, d), and their noise floors.

* ``sliced_wasserstein(x, y)``: the sliced 2-Wasserstein distance with a fixed set of random
  directions (seeded, so every call uses the same projections), sqrt(mean_θ W2²(θ·x, θ·y)); equal
  sample sizes use sorted-sample matching, unequal sizes interpolate the quantile functions.
* ``mmd(x, y)``: the (biased, V-statistic) MMD with a fixed sum of RBF kernels (bandwidths in data
  units), sqrt(max(MMD², 0)).
* ``noise_floor(sampler, n, metric)``: the distance between two independent exact sample sets of the
  same size n: a method cannot be told apart from exact below it.  Report it next to every distance.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["sliced_wasserstein", "mmd", "noise_floor", "DISTANCES"]


def _directions(d: int, num: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn((num, d), generator=g, dtype=torch.float64)
    return v / v.norm(dim=1, keepdim=True)


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, num_projections: int = 256, seed: int = 0) -> float:
    x, y = x.detach().to(torch.float64).cpu(), y.detach().to(torch.float64).cpu()
    theta = _directions(x.shape[1], num_projections, seed)
    px, _ = torch.sort(x @ theta.T, dim=0)
    py, _ = torch.sort(y @ theta.T, dim=0)
    if px.shape[0] != py.shape[0]:
        q = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
        px, py = torch.quantile(px, q, dim=0), torch.quantile(py, q, dim=0)
    return math.sqrt(float(((px - py) ** 2).mean()))


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidths=(0.1, 0.3, 1.0, 3.0)) -> float:
    x, y = x.detach().to(torch.float64).cpu(), y.detach().to(torch.float64).cpu()

    def k(a, b):
        d2 = torch.cdist(a, b) ** 2
        return sum(torch.exp(-d2 / (2 * h**2)) for h in bandwidths) / len(bandwidths)

    val = k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()
    return math.sqrt(max(float(val), 0.0))


DISTANCES: dict[str, Callable] = {"sliced_w2": sliced_wasserstein, "mmd": mmd}


def noise_floor(sampler: Callable[[int, torch.Generator], torch.Tensor], n: int, metric: Callable,
                repeats: int = 5, seed: int = 12345) -> dict:
    """Distance between two independent exact sample sets of size n: {'mean', 'std', 'values'}."""
    g = torch.Generator().manual_seed(seed)
    vals = [metric(sampler(n, g), sampler(n, g)) for _ in range(repeats)]
    t = torch.tensor(vals, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std(unbiased=False)), "values": vals}
