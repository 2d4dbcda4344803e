"""Soft-value SMC potentials from a critic: log E[exp(λ·r(x0)) | x_t], the optimal twist for p·exp(λ·r).

Two ways to get it from the same :class:`~critic_align.critic.Critic` class the trainer already fits (a value
head regresses a Monte-Carlo target on noisy latents; only the target changes):

* **0/1 rewards** (a constraint, GenEval-style correctness): a head trained on the 0/1 reward itself learns
  P(r = 1 | x_t) = E[r | x_t], and then, exactly,

      log E[exp(λ·r) | x_t] = log(1 + (e^λ − 1)·P(r = 1 | x_t))            (:func:`binary_soft_value`)

* **any reward**: a head trained on the transformed target exp(λ·(r − c)) (:func:`exp_reward_target`) learns
  E[exp(λ·(r − c)) | x_t], whose log plus λ·c is the soft value (:func:`exp_soft_value`).  c is a fixed upper
  reference of the reward (its maximum, or a high quantile of the base model's rewards): it keeps the target in
  (0, ~1] so exp(λ·r) cannot overflow, and it must stay fixed during training (a moving c changes the target).

Each helper returns a value function in :mod:`steering.values`'s convention that returns the log-potential
directly; pass it with ``potential="soft_value"`` and the same ``lam`` (checked through its ``lam`` attribute).
"""

from __future__ import annotations

import math

import torch

from .values import ValueFn

__all__ = ["binary_soft_value", "exp_soft_value", "exp_reward_target", "SoftValueFn"]


class SoftValueFn:
    """A value function returning log E[exp(λ·r) | x_t]; ``lam`` records the λ it was built for."""

    def __init__(self, fn, lam: float, description: str):
        self.fn, self.lam, self.description = fn, float(lam), description

    def __call__(self, x, t, cond) -> torch.Tensor:
        return self.fn(x, t, cond)

    def __repr__(self) -> str:
        return f"SoftValueFn({self.description}, lam={self.lam})"


def _check_lam(lam: float) -> float:
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam > 0):
        raise ValueError(f"λ must be a finite number > 0, got {lam!r}")
    return float(lam)


def binary_soft_value(prob_fn: ValueFn, lam: float) -> SoftValueFn:
    """log(1 + (e^λ − 1)·p(x_t)) for a 0/1 reward, with p = ``prob_fn`` ≈ P(r = 1 | x_t) (a critic head trained on
    the 0/1 reward).  A regression head can step slightly outside [0, 1]; p is clamped to it (a probability
    cannot be negative, and log(1 + (e^λ − 1)·p) needs p > −1/(e^λ − 1)), which is where the exact value lives."""
    lam = _check_lam(lam)
    scale = math.expm1(lam)

    def fn(x, t, cond):
        p = prob_fn(x, t, cond)
        return torch.log1p(scale * p.double().clamp(0.0, 1.0))

    return SoftValueFn(fn, lam, "binary: log(1 + (e^λ − 1)·P(r=1|x_t))")


def exp_soft_value(exp_value_fn: ValueFn, lam: float, c: float, v_min: float | None = None) -> SoftValueFn:
    """log(V(x_t)) + λ·c for a head V trained on exp(λ·(r − c)) (:func:`exp_reward_target`, same λ and c).

    A regression head can undershoot to V <= 0 where the true value is tiny.  ``v_min=None``: such a particle gets
    −inf (weight 0: the critic says it cannot reach the reward region).  ``v_min`` > 0: V is floored there, i.e.
    the potential never says less than λ·(r_min − c) + λ·c = λ·r_min for r_min = c + log(v_min)/λ — choose r_min as
    the lowest reward worth distinguishing (a floor keeps a prompt's particles alive when the critic undershoots
    on all of them)."""
    lam = _check_lam(lam)
    if v_min is not None and not v_min > 0:
        raise ValueError(f"v_min must be > 0 (or None for -inf at V <= 0), got {v_min!r}")

    def fn(x, t, cond):
        v = exp_value_fn(x, t, cond).double()
        if v_min is not None:
            return v.clamp(min=v_min).log() + lam * c
        return torch.where(v > 0, v.clamp(min=1e-300).log(), torch.full_like(v, -math.inf)) + lam * c

    floor = "" if v_min is None else f", V >= {v_min:g}"
    return SoftValueFn(fn, lam, f"exp-target: log E[exp(λ(r − {c}))|x_t] + λ·{c}{floor}")


def exp_reward_target(reward_fn, lam: float, c: float):
    """The training target exp(λ·(r − c)) of a soft-value head, as a reward function ``(samples, prompts) -> (B,)``
    (wrap it in :class:`critic_align.rewards.FunctionReward` to give the trainer one head per target).  A reward
    above c gives a target above 1 (fine, but choose c ≥ the rewards you expect so exp cannot overflow)."""
    lam = _check_lam(lam)

    def target(samples, prompts=None):
        r = reward_fn(samples, prompts)
        return torch.exp(lam * (r.double() - c)).to(r.dtype)

    return target
