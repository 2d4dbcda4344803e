"""Test-time steering with a learned critic (or any value / reward callable): see :mod:`steering.samplers`."""

from .resampling import (
    RESAMPLING_SCHEMES,
    effective_sample_size,
    flat_ancestors,
    multinomial,
    normalize_log_weights,
    resample,
    residual,
    stratified,
    systematic,
)
from .samplers import (
    SteerCost,
    SteerResult,
    best_of_n,
    critic_value_fn,
    guidance,
    guided_denoiser,
    smc,
    steer,
    value_and_grad,
)

__all__ = [
    "RESAMPLING_SCHEMES", "effective_sample_size", "flat_ancestors", "multinomial", "normalize_log_weights",
    "resample", "residual", "stratified", "systematic", "SteerCost", "SteerResult", "best_of_n",
    "critic_value_fn", "guidance", "guided_denoiser", "smc", "steer", "value_and_grad",
]
