"""Value functions and value guidance: the one input convention, the noise-level mapping, ∇V, a guided proposal.

The value-function convention (every path: the methods of :mod:`steering.samplers`,
:class:`steering.diffusers.SMCCallback`, :class:`steering.diffusers.ScoreGuidedScheduler`)::

    value_fn(x, t, cond) -> (B,)

* ``x`` is **what the denoiser sees**: the model input.  VP schedulers (DDPM, DDIM, LCM, ...): the latents
  x = √ᾱ·x0 + √(1−ᾱ)·ε.  σ-parameterised Euler-family schedulers: the scaled input x/√(1+σ²) (diffusers'
  ``scale_model_input``), which is VP with ᾱ = 1/(1+σ²) — a critic trained on VP latents sees the same scale.
  Flow matching: the latents x = (1−σ)·x0 + σ·ε.
* ``t`` is the denoiser's timestep, (B,): integers for VP / Euler schedulers, σ·num_train_timesteps (floats)
  for flow matching.  :func:`noise_level` maps it to ᾱ and σ for value functions that need them (e.g. the
  exact value of the Gaussian-mixture task).
* ``cond`` is the positive (non-CFG) conditioning per row, in the backbone adapter's format: None for
  unconditional models, a (B, ...) tensor (class labels, SD1.5 prompt embeddings), or a
  :class:`critic_align.cond.TextCond` (SD3: prompt embeddings + pooled projections).

A trained :class:`~critic_align.critic.Critic` follows this convention (:func:`critic_value_fn`).  Values used
for guidance must be finite and differentiable in x; values used only as SMC potentials may be −inf (a hard
constraint).  The denoiser itself is always called under ``torch.no_grad``; ∇V is taken on a detached copy of
x (:func:`value_and_grad`), so no gradient ever reaches the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from critic_align.x0_reward import reads_x0_reward

from .particles import check_log_potential

ValueFn = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


@dataclass(frozen=True)
class NoiseLevel:
    """The noise level of a model input at timestep t: (B,) float64 tensors.

    alpha_bar: ᾱ of the VP-equivalent input (VP: the schedule's ᾱ_t; Euler family: 1/(1+σ²);
               flow: (1−σ)²/((1−σ)² + σ²), the ᾱ of x/√((1−σ)² + σ²)).
    sigma:     the sampler's own σ (VP: √((1−ᾱ)/ᾱ), its VE-equivalent; Euler family: σ; flow: σ ∈ [0, 1]).
    """

    alpha_bar: torch.Tensor
    sigma: torch.Tensor


def noise_level(step, t) -> NoiseLevel:
    """ᾱ and σ at the timesteps ``t`` of a step from :mod:`critic_align.steps` (DDIMStep's NoiseSchedule or
    FlowMatchSDEStep's FlowMatchSchedule)."""
    schedule = step.schedule
    if hasattr(schedule, "alpha_bar"):
        a = schedule.alpha_bar(torch.as_tensor(t)).to(torch.float64)
        return NoiseLevel(alpha_bar=a, sigma=((1 - a) / a).sqrt())
    if hasattr(schedule, "sigma"):
        s = schedule.sigma(torch.as_tensor(t))
        return NoiseLevel(alpha_bar=(1 - s) ** 2 / ((1 - s) ** 2 + s**2), sigma=s)
    raise TypeError(f"{type(schedule).__name__}: no timestep -> noise-level mapping (needs alpha_bar or sigma)")


def _combine_heads(v: torch.Tensor, weights) -> torch.Tensor:
    """(B,) Σ_k w_k · v_k of (B, K) head values (weights None: K must be 1)."""
    if v.ndim != 2:
        raise ValueError(f"the critic returned shape {tuple(v.shape)}, expected (batch, num_heads)")
    if weights is None:
        if v.shape[1] != 1:
            raise ValueError(f"the critic has {v.shape[1]} heads: pass weights=[...] (one per head) to combine them")
        return v[:, 0]
    w = torch.as_tensor(weights, dtype=v.dtype, device=v.device)
    if w.shape != (v.shape[1],):
        raise ValueError(f"got {w.numel()} head weights for a critic with {v.shape[1]} heads")
    return v @ w


class X0CriticValueFn:
    """V(x_t) = Σ_k w_k · V_k(x_t, r̂_0) of a critic trained with ``critic_x0_reward``: its head also reads
    r̂_0 = r(decode(x̂0(x_t))), the (B, K) rewards it was trained on, of the sampler's x0 prediction at x_t.

    Called as ``value_fn(x, t, cond, x0_reward)``; :func:`steering.smc` supplies ``x0_reward`` for SMC potentials
    (``potential="value"``) from the step's own x0 prediction — one decode + ``x0_rewards`` call per particle and
    step, counted in the cost.  Gradient guidance cannot use it (∇_x r̂_0 would need a differentiable decode and
    reward), nor can the diffusers callbacks, which see a state without the denoiser's output at it.  The steering
    code asks :func:`critic_align.x0_reward.needs_x0_reward`, which reads ``needs_x0_reward``."""

    needs_x0_reward = True

    def __init__(self, critic, weights, x0_rewards):
        if not callable(x0_rewards):
            raise ValueError("a critic trained with critic_x0_reward needs x0_rewards=fn(decoded, prompts) -> (B, K): "
                             "the rewards of its heads (e.g. the trainer's rewards), to score the x0 predictions")
        self.critic, self.weights, self.x0_rewards = critic, weights, x0_rewards

    def __call__(self, x_t, t, cond, x0_reward=None):
        if x0_reward is None:
            raise ValueError("this critic reads r(decode(x0_pred)) next to the latent (critic_x0_reward): only "
                             "steering.smc (potential='value') supplies it; guidance, soft-value potentials "
                             "and the diffusers callbacks need a critic trained with critic_x0_reward: false")
        return _combine_heads(self.critic(x_t, t, cond, x0_reward=x0_reward), self.weights)


def critic_value_fn(critic, weights: Sequence[float] | torch.Tensor | None = None, x0_rewards=None) -> ValueFn:
    """V(x_t) = Σ_k w_k · V_k(x_t) from a multi-head :class:`~critic_align.critic.Critic` (K heads).

    ``weights`` default to all ones for K = 1 and must be given for K > 1 (explicit: which heads, how much).
    A critic trained with ``critic_x0_reward`` gives an :class:`X0CriticValueFn` and needs ``x0_rewards``
    (``fn(decoded, prompts) -> (B, K)``, the rewards its heads were trained on).
    """
    if reads_x0_reward(critic):
        return X0CriticValueFn(critic, weights, x0_rewards)
    if x0_rewards is not None:
        raise ValueError("x0_rewards is only for a critic trained with critic_x0_reward; this one reads the latent only")

    def value(x_t, t, cond):
        return _combine_heads(critic(x_t, t, cond), weights)

    return value


def value_and_grad(value_fn: ValueFn, x_t, t, cond, cost=None):
    """V(x_t) (B,) and ∇_x V (B, ...) on a detached input: no backprop reaches the sampler's graph.
    ``cost`` (a :class:`steering.samplers.SteerCost`) counts one critic forward and one backward per row."""
    x = x_t.detach().float().requires_grad_(True)
    with torch.enable_grad():
        v = check_log_potential(value_fn(x, t, cond), x.shape[0], "value_fn (used for guidance)", allow_neg_inf=False)
        (grad,) = torch.autograd.grad(v.sum(), x)
    if cost is not None:
        cost.critic_forward_rows += x.shape[0]
        cost.critic_backward_rows += x.shape[0]
    return v.detach(), grad.detach()


def guidance_defined(step, t) -> bool:
    """False where the step's guidance formula is undefined: flow matching at σ = 1 (pure noise carries no
    information about x0, so the velocity correction σ/(1−σ)·∇V is infinite); guidance is skipped there."""
    sigma = getattr(step.schedule, "sigma", None)
    return sigma is None or bool((sigma(torch.as_tensor(t)) < 1).all())


def guided_denoiser(denoiser, step, value_fn: ValueFn, scale: float, cost=None):
    """Wrap ``denoiser`` so its output follows the score of p_t(x)·exp(scale·V(x)): classifier guidance with
    a value (guided-diffusion's ``cond_fn``), mapped to the model's parameterisation by the step's
    ``apply_score_guidance`` (:func:`critic_align.steps.score_guided_output`).  Apply it to the CFG-combined
    denoiser."""

    def guided(x_t, t, cond):
        out = denoiser(x_t, t, cond)
        if scale == 0 or not guidance_defined(step, t):
            return out
        _, grad = value_and_grad(value_fn, x_t, t, cond, cost)
        return step.apply_score_guidance(out, x_t, t, scale * grad)

    return guided


def capped_guided_output(step, out, x, t, t_prev, guided_out, max_kl: float | None):
    """The guided model output with its mean shift scaled down, per particle, so that one step's
    KL(q ‖ p) = ‖μ_q − μ_p‖² / (2σ²) is at most ``max_kl`` nats (None: no cap).  Returns (output, (B,) factor).

    Why: an SMC step with a guided proposal q pays the weight p(x'|x)/q(x'|x), whose log has variance ≈ 2·KL.
    Near the end of sampling σ is tiny next to the guidance shift, the KL explodes and the weights collapse onto
    a few particles.  Scaling the shift by min(1, √(max_kl / KL)) keeps every step's proposal close to p (a
    tempered guidance that vanishes where σ is too small); the factor depends on x only, so q is still a valid
    proposal and the SMC correction (computed from the capped q) stays exact."""
    if max_kl is None:
        return guided_out, torch.ones(x.shape[0], device=x.device)
    if max_kl <= 0:
        raise ValueError(f"guidance_max_kl must be > 0 nats (or None for no cap), got {max_kl}")
    p = step(out, x, t, t_prev, prev_sample=x)  # scoring a dummy transition: means and std, no noise drawn
    q = step(guided_out, x, t, t_prev, prev_sample=x)
    kl = ((q.mean - p.mean) ** 2 / (2 * p.std**2)).flatten(1).sum(1)
    factor = torch.where(kl > max_kl, (max_kl / kl.clamp(min=1e-30)).sqrt(), torch.ones_like(kl))
    shape = (-1,) + (1,) * (out.ndim - 1)
    capped = out + factor.view(shape).to(out.dtype) * (guided_out - out)
    return capped, factor
