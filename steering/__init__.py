"""Test-time steering with a learned critic (or any value / reward callable): see :mod:`steering.samplers`.

``steer(method, denoiser, step, x_T, timesteps, cond, prompts, **kwargs)`` runs one of :data:`METHODS` (name →
function + summary: base, bon, guidance, guidance+bon, smc, smc_x0); each function can also be called directly.

Modules: :mod:`steering.particles` (the one particle engine: weights, ESS, resampling, final choice),
:mod:`steering.values` (the value-function convention, ∇V, guided proposals), :mod:`steering.potentials`
(soft-value potentials from a critic), :mod:`steering.samplers` (plain samplers), :mod:`steering.diffusers`
(any diffusers pipeline).
"""

from .particles import (
    RESAMPLING_SCHEMES,
    ParticleSystem,
    effective_sample_size,
    flat_ancestors,
    multinomial,
    normalize_log_weights,
    resample,
    residual,
    stratified,
    systematic,
)
from .potentials import binary_soft_value, exp_reward_target, exp_soft_value
from .samplers import (
    METHODS,
    POTENTIALS,
    Method,
    Resampling,
    SteerCost,
    SteerOptions,
    SteerResult,
    base,
    best_of_n,
    guidance,
    guidance_best_of_n,
    method_named,
    smc,
    smc_x0,
    steer,
)
from .values import NoiseLevel, critic_value_fn, guidance_defined, guided_denoiser, noise_level, value_and_grad

__all__ = [
    "RESAMPLING_SCHEMES", "ParticleSystem", "effective_sample_size", "flat_ancestors", "multinomial",
    "normalize_log_weights", "resample", "residual", "stratified", "systematic", "NoiseLevel", "critic_value_fn",
    "guidance_defined", "guided_denoiser", "noise_level", "value_and_grad", "binary_soft_value", "exp_reward_target",
    "exp_soft_value", "METHODS", "Method", "POTENTIALS", "Resampling", "SteerCost", "SteerOptions", "SteerResult", "base",
    "best_of_n", "guidance", "guidance_best_of_n", "method_named", "smc", "smc_x0", "steer",
]
