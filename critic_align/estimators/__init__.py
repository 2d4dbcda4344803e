"""Advantage estimators: one file each, chosen by name (``PPOConfig.advantage``) from :data:`ESTIMATORS`.

An estimator is an object with ``compute(batch, values) -> (advantages (B, T), returns (B, T, K) | None)``
(:class:`~critic_align.estimators.base.Estimator`).  Adding one is one file plus its line in
:data:`critic_align.registry.ESTIMATORS`; the trainer builds a critic when the estimator ``needs_values``.
"""

from .base import Estimator, ScoredBatch, build_estimator, estimate, estimator_class

__all__ = ["Estimator", "ScoredBatch", "build_estimator", "estimate", "estimator_class"]
