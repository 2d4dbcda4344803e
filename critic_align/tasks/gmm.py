"""A 2-D Gaussian-mixture task with exact references: the "physical limit" for every method (issue #4).

Reference p0 = Σ_k π_k N(μ_k, s_k² I) in R^d (d = 2 here; every formula holds for any d).  Under a VP
forward process x_t = √ᾱ x0 + √(1−ᾱ) ε everything below is closed form:

* marginal     p_t = Σ_k π_k N(√ᾱ μ_k, v_k I),  v_k = ᾱ s_k² + 1 − ᾱ;
* exact noise  ε*(x, t) = −√(1−ᾱ) ∇ log p_t(x) = √(1−ᾱ) Σ_k γ_k(x) (x − √ᾱ μ_k) / v_k,
  γ_k(x) ∝ π_k N(x; √ᾱ μ_k, v_k I) (the responsibilities);
* posterior    p(x0 | x_t) = Σ_k γ_k(x_t) N(m_k, τ_k² I),
  m_k = μ_k + (s_k² √ᾱ / v_k)(x_t − √ᾱ μ_k),  τ_k² = s_k² (1 − ᾱ) / v_k;
* values       for r(x) = w·x:  E[r | x_t] = Σ_k γ_k w·m_k and the soft value
  α log E[exp(r/α) | x_t] = α log Σ_k γ_k exp(w·m_k/α + τ_k² |w|² / (2α²));
  for the box indicator r(x) = 1[lo ≤ x ≤ hi]:  E[r | x_t] = Σ_k γ_k Π_d [Φ((hi_d − m_kd)/τ_k) − Φ((lo_d − m_kd)/τ_k)]
  and, as r ∈ {0, 1}, the soft value is α log(1 + (e^{1/α} − 1) E[r | x_t]);
* tilted target p*(x) ∝ p0(x) exp(r(x)/α).  For r = w·x, completing the square per component,
  N(x; μ, s² I) e^{w·x/α} = exp(w·μ/α + s²|w|²/(2α²)) N(x; μ + s² w/α, s² I), so
  p* = Σ_k π*_k N(μ_k + s_k² w/α, s_k² I) with π*_k ∝ π_k exp(w·μ_k/α + s_k² |w|² / (2α²)).
  The s_k²|w|²/(2α²) term is the same for every k when all components share one s, and then cancels
  (DESIGN.md's sketch "π_k exp(w·μ_k/α)" is that special case); with unequal s_k it does not.
  For a bounded reward (the box) the tilted density is p0·e^{r/α}/Z on a grid (``grid_density``), with
  Z = 1 + (e^{1/α} − 1) P0(box) exact, and exact samples come from rejection sampling
  (``sample_tilted_bounded``: propose from p0, accept with prob e^{(r − r_max)/α}).

The engine's last transition targets the noise level ᾱ_0 (``NoiseSchedule.final_alpha_cumprod``), not
ᾱ = 1, so the distribution a perfect model's final sample has is p0 noised to ᾱ_0 — again a mixture,
``mixture.noised(ᾱ_0)``.  By the Markov property x_t | x_final ~ N(√(ᾱ_t/ᾱ_0) x_final, (1 − ᾱ_t/ᾱ_0) I),
so exact values of the *final* sample are ``mixture.noised(ᾱ_0).posterior(x_t, ᾱ_t/ᾱ_0)``;
:class:`GMMTask` does this bookkeeping (``final_mixture``, ``value_*``).

What is *not* exact: a DDIM/DDPM sampler with finitely many steps, even with the exact ε, only
approximates p(x_{t-1} | x_t) by a Gaussian, so its final samples (and its value function) differ
from the exact ones by a discretisation error; the benchmarks measure it against the noise floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import BaseTask

__all__ = ["GaussianMixture", "LinearReward", "BoxReward", "GMMTask", "AnalyticEpsilon", "default_mixture",
           "grid_density", "sample_tilted_bounded"]


def _as_abar(abar, x: torch.Tensor) -> torch.Tensor:
    """ᾱ as a (B, 1) float64 column (a scalar is broadcast)."""
    a = torch.as_tensor(abar, dtype=torch.float64, device=x.device)
    if a.ndim == 0:
        a = a.expand(x.shape[0])
    return a.reshape(-1, 1)


@dataclass(frozen=True)
class GaussianMixture:
    """Σ_k π_k N(μ_k, s_k² I).  means (K, d), weights (K,) (normalised here), stds (K,) or a float."""

    means: torch.Tensor
    weights: torch.Tensor
    stds: torch.Tensor

    def __post_init__(self):
        means = torch.as_tensor(self.means, dtype=torch.float64)
        k = means.shape[0]
        weights = torch.as_tensor(self.weights, dtype=torch.float64).reshape(k)
        stds = torch.as_tensor(self.stds, dtype=torch.float64)
        stds = stds.expand(k).clone() if stds.ndim == 0 else stds.reshape(k)
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("mixture weights must be >= 0 and not all zero")
        if (stds <= 0).any():
            raise ValueError("component stds must be > 0")
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "weights", weights / weights.sum())
        object.__setattr__(self, "stds", stds)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    # -- density and sampling -------------------------------------------------------------------------
    def _component_log_probs(self, x: torch.Tensor, means: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """(B, K) log π_k + log N(x; means_k, var_k I); means (B or 1, K, d), var (B or 1, K)."""
        d = self.dim
        sq = ((x[:, None, :] - means) ** 2).sum(-1)
        return self.weights.log() - sq / (2 * var) - 0.5 * d * torch.log(2 * math.pi * var)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        lp = self._component_log_probs(x, self.means[None], (self.stds**2)[None])
        return torch.logsumexp(lp, dim=1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn((n, self.dim), generator=generator, dtype=torch.float64)
        return self.means[comp] + self.stds[comp, None] * z

    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    # -- the forward process -------------------------------------------------------------------------
    def noised(self, abar: float) -> "GaussianMixture":
        """The marginal at noise level ᾱ (a scalar): Σ π_k N(√ᾱ μ_k, (ᾱ s_k² + 1 − ᾱ) I)."""
        a = float(abar)
        return GaussianMixture(math.sqrt(a) * self.means, self.weights, (a * self.stds**2 + 1 - a).sqrt())

    def _marginal_parts(self, x: torch.Tensor, abar):
        a = _as_abar(abar, x)                               # (B, 1)
        var = a * self.stds[None] ** 2 + 1 - a              # (B, K)
        centers = a.sqrt()[:, :, None] * self.means[None]   # (B, K, d)
        return a, var, centers

    def log_prob_t(self, x: torch.Tensor, abar) -> torch.Tensor:
        """log p_t(x) at noise level ᾱ (scalar or (B,))."""
        x = x.to(torch.float64)
        _, var, centers = self._marginal_parts(x, abar)
        return torch.logsumexp(self._component_log_probs(x, centers, var), dim=1)

    def responsibilities(self, x: torch.Tensor, abar) -> torch.Tensor:
        """(B, K) γ_k(x) ∝ π_k N(x; √ᾱ μ_k, v_k I)."""
        x = x.to(torch.float64)
        _, var, centers = self._marginal_parts(x, abar)
        return torch.softmax(self._component_log_probs(x, centers, var), dim=1)

    def score(self, x: torch.Tensor, abar) -> torch.Tensor:
        """∇_x log p_t(x) = −Σ_k γ_k (x − √ᾱ μ_k) / v_k."""
        x = x.to(torch.float64)
        _, var, centers = self._marginal_parts(x, abar)
        gamma = torch.softmax(self._component_log_probs(x, centers, var), dim=1)
        return -((gamma / var)[:, :, None] * (x[:, None, :] - centers)).sum(1)

    def eps(self, x: torch.Tensor, abar) -> torch.Tensor:
        """The exact noise prediction ε*(x, t) = −√(1−ᾱ) ∇ log p_t(x) (float64)."""
        a = _as_abar(abar, x)
        return -(1 - a).sqrt() * self.score(x, abar)

    def posterior(self, x_t: torch.Tensor, abar):
        """p(x0 | x_t) = Σ γ_k N(m_k, τ_k² I): returns (γ (B, K), m (B, K, d), τ² (B, K))."""
        x = x_t.to(torch.float64)
        a, var, centers = self._marginal_parts(x, abar)
        gamma = torch.softmax(self._component_log_probs(x, centers, var), dim=1)
        s2 = self.stds[None] ** 2
        gain = s2 * a.sqrt() / var                                   # (B, K)
        m = self.means[None] + gain[:, :, None] * (x[:, None, :] - centers)
        tau2 = s2 * (1 - a) / var
        return gamma, m, tau2

    def posterior_mean(self, x_t: torch.Tensor, abar) -> torch.Tensor:
        gamma, m, _ = self.posterior(x_t, abar)
        return (gamma[:, :, None] * m).sum(1)

    def sample_posterior(self, x_t: torch.Tensor, abar, n: int, generator=None) -> torch.Tensor:
        """(B, n, d) exact samples of x0 | x_t."""
        gamma, m, tau2 = self.posterior(x_t, abar)
        b = x_t.shape[0]
        comp = torch.multinomial(gamma, n, replacement=True, generator=generator)       # (B, n)
        idx = torch.arange(b)[:, None]
        z = torch.randn((b, n, self.dim), generator=generator, dtype=torch.float64)
        return m[idx, comp] + tau2[idx, comp].sqrt()[..., None] * z

    # -- tilting ------------------------------------------------------------------------------------
    def tilt_linear(self, w, alpha: float) -> "GaussianMixture":
        """The exact p*(x) ∝ p(x) exp(w·x/α): means μ_k + s_k² w/α, weights ∝ π_k e^{w·μ_k/α + s_k²|w|²/(2α²)}."""
        w = torch.as_tensor(w, dtype=torch.float64)
        s2 = self.stds**2
        logw = self.weights.log() + self.means @ w / alpha + s2 * (w @ w) / (2 * alpha**2)
        return GaussianMixture(self.means + s2[:, None] * w[None] / alpha, torch.softmax(logw, 0), self.stds)

    def box_probability(self, lo, hi) -> torch.Tensor:
        """P(lo ≤ x ≤ hi) under the mixture (a scalar tensor)."""
        gamma = self.weights[None]
        return _box_prob(gamma, self.means[None], (self.stds**2)[None], lo, hi)[0]


def _box_prob(gamma, m, tau2, lo, hi) -> torch.Tensor:
    """(B,) Σ_k γ_k Π_d [Φ((hi_d − m_kd)/τ_k) − Φ((lo_d − m_kd)/τ_k)]."""
    lo = torch.as_tensor(lo, dtype=torch.float64)
    hi = torch.as_tensor(hi, dtype=torch.float64)
    tau = tau2.sqrt()[..., None]
    normal = torch.distributions.Normal(torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64))
    p = normal.cdf((hi - m) / tau) - normal.cdf((lo - m) / tau)    # (B, K, d); ±inf bounds give 0/1
    return (gamma * p.prod(-1)).sum(1)


# ---------------------------------------------------------------------------------------------------
# rewards with exact values


class LinearReward:
    """r(x) = w·x.  Call on (B, d) samples -> (B,) float32 (use it inside a FunctionReward)."""

    name = "linear"

    def __init__(self, w):
        self.w = torch.as_tensor(w, dtype=torch.float64)

    def __call__(self, samples, prompts=None) -> torch.Tensor:
        return (samples.to(torch.float64) @ self.w.to(samples.device)).float()

    def value(self, mixture: GaussianMixture, x_t, abar) -> torch.Tensor:
        gamma, m, _ = mixture.posterior(x_t, abar)
        return (gamma * (m @ self.w)).sum(1)

    def soft_value(self, mixture: GaussianMixture, x_t, abar, alpha: float) -> torch.Tensor:
        gamma, m, tau2 = mixture.posterior(x_t, abar)
        log_mgf = m @ self.w / alpha + tau2 * (self.w @ self.w) / (2 * alpha**2)
        return alpha * torch.logsumexp(gamma.log() + log_mgf, dim=1)

    def tilt(self, mixture: GaussianMixture, alpha: float) -> GaussianMixture:
        return mixture.tilt_linear(self.w, alpha)


class BoxReward:
    """r(x) = 1[lo ≤ x ≤ hi] (bounds may be ±inf: a half-plane or a quadrant).  Non-differentiable."""

    name = "box"
    r_max = 1.0

    def __init__(self, lo, hi):
        self.lo = torch.as_tensor(lo, dtype=torch.float64)
        self.hi = torch.as_tensor(hi, dtype=torch.float64)

    def __call__(self, samples, prompts=None) -> torch.Tensor:
        x = samples.detach().to(torch.float64)
        inside = ((x >= self.lo.to(x.device)) & (x <= self.hi.to(x.device))).all(dim=1)
        return inside.float()

    def value(self, mixture: GaussianMixture, x_t, abar) -> torch.Tensor:
        gamma, m, tau2 = mixture.posterior(x_t, abar)
        return _box_prob(gamma, m, tau2, self.lo, self.hi)

    def soft_value(self, mixture: GaussianMixture, x_t, abar, alpha: float) -> torch.Tensor:
        p = self.value(mixture, x_t, abar)
        return alpha * torch.log1p(math.expm1(1 / alpha) * p)

    def log_normalizer(self, mixture: GaussianMixture, alpha: float) -> float:
        """log Z, Z = E_p0[e^{r/α}] = 1 + (e^{1/α} − 1) P0(box), exact."""
        return math.log1p(math.expm1(1 / alpha) * float(mixture.box_probability(self.lo, self.hi)))


def grid_density(mixture: GaussianMixture, reward, alpha: float | None, lim: float = 5.0, n: int = 400):
    """The (tilted) density on an n×n grid over [−lim, lim]²: returns (xs (n,), density (n, n) [iy, ix],
    log Z by quadrature).  alpha=None gives p0 itself.  Z is the grid's Riemann sum (numerical integration)."""
    xs = torch.linspace(-lim, lim, n, dtype=torch.float64)
    gy, gx = torch.meshgrid(xs, xs, indexing="ij")
    pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    logp = mixture.log_prob(pts)
    if alpha is not None:
        logp = logp + reward(pts).to(torch.float64) / alpha
    cell = float((xs[1] - xs[0]) ** 2)
    log_z = float(torch.logsumexp(logp, 0)) + math.log(cell)
    return xs, (logp - log_z).exp().reshape(n, n), log_z


def sample_tilted_bounded(mixture: GaussianMixture, reward, alpha: float, n: int,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Exact samples of p0·e^{r/α}/Z for a reward bounded by ``reward.r_max``, by rejection from p0."""
    out, have = [], 0
    while have < n:
        x = mixture.sample(max(2 * (n - have), 256), generator)
        u = torch.rand(x.shape[0], generator=generator, dtype=torch.float64)
        keep = u < torch.exp((reward(x).to(torch.float64) - reward.r_max) / alpha)
        out.append(x[keep])
        have += int(keep.sum())
    return torch.cat(out)[:n]


def default_mixture() -> GaussianMixture:
    """Eight components on a ring of radius 2 (unequal weights), s = 0.25."""
    k = 8
    ang = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    means = 2.0 * torch.stack([ang.cos(), ang.sin()], dim=1)
    weights = torch.tensor([3, 1, 2, 1, 3, 1, 2, 1], dtype=torch.float64)
    return GaussianMixture(means, weights, 0.25)


# ---------------------------------------------------------------------------------------------------
# the perfect pretrained model and the task


class AnalyticEpsilon(nn.Module):
    """ε*(x, t) for a mixture under a schedule's ᾱ_t (integer t, as the engine passes): no parameters."""

    def __init__(self, mixture: GaussianMixture, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.mixture = mixture
        self.register_buffer("alphas_cumprod", torch.as_tensor(alphas_cumprod, dtype=torch.float64).clone())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).long()
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        abar = self.alphas_cumprod[t]
        return self.mixture.eps(x.detach().cpu(), abar.cpu()).to(device=x.device, dtype=x.dtype)


def make_scheduler(num_train_timesteps: int = 1000):
    """The task's diffusers DDPM scheduler: linear betas, ε-prediction, no clipping, trailing spacing."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear", clip_sample=False,
                         prediction_type="epsilon", timestep_spacing="trailing")


class GMMTask(BaseTask):
    """The vector-data task for :class:`critic_align.trainer.Trainer`: samples are (B, 2), unconditional.

    ``prompts = ("",)``, ``encode`` returns None (no conditioning; use guidance_scale 1.0), ``decode`` is
    the identity.  ``final_mixture`` is the exact law of a perfect model's final sample (p0 noised to
    ᾱ_0, see the module doc) and ``value``/``soft_value``/``tilted`` give the exact references for it.
    """

    name = "gmm"
    prompts = ("",)

    def __init__(self, mixture: GaussianMixture | None = None, scheduler=None):
        from ..steps import NoiseSchedule

        self.mixture = mixture if mixture is not None else default_mixture()
        self.scheduler = scheduler if scheduler is not None else make_scheduler()
        self.schedule = NoiseSchedule.from_scheduler(self.scheduler)
        self.latent_shape = (self.mixture.dim,)
        self.abar_final = float(self.schedule.final_alpha_cumprod)
        self.final_mixture = self.mixture.noised(self.abar_final)

    def encode(self, prompts):
        return None

    def null_cond(self, n):
        return None

    def decode(self, latents):
        return latents

    def analytic_eps(self) -> AnalyticEpsilon:
        return AnalyticEpsilon(self.mixture, self.schedule.alphas_cumprod)

    def _rel_abar(self, t) -> torch.Tensor:
        """ᾱ_t / ᾱ_0: the noise level of x_t relative to the final sample's law."""
        return self.schedule.alpha_bar(torch.as_tensor(t)).to(torch.float64) / self.abar_final

    def value(self, reward, x_t, t) -> torch.Tensor:
        """Exact E[r(x_final) | x_t] for integer timesteps t (scalar or (B,))."""
        return reward.value(self.final_mixture, x_t, self._rel_abar(t))

    def soft_value(self, reward, x_t, t, alpha: float) -> torch.Tensor:
        return reward.soft_value(self.final_mixture, x_t, self._rel_abar(t), alpha)

    def sample_reference(self, n: int, generator=None) -> torch.Tensor:
        return self.final_mixture.sample(n, generator)

    def sample_tilted(self, reward, alpha: float, n: int, generator=None) -> torch.Tensor:
        """Exact samples of the tilted target p_final·e^{r/α}/Z."""
        if isinstance(reward, LinearReward):
            return reward.tilt(self.final_mixture, alpha).sample(n, generator)
        return sample_tilted_bounded(self.final_mixture, reward, alpha, n, generator)
