"""Training algorithms: one file each, chosen by name (``PPOConfig.algorithm``) from :data:`ALGORITHMS`.

Every algorithm shares the rollout (:mod:`critic_align.collect`), the rewards, the advantage estimators, the
checkpoints, resume and the multi-process gradient sum (:func:`critic_align.update.minibatch_steps`); it owns
only its update: ``update(ctx, ro) -> stats`` (``ctx``: the :class:`~critic_align.update.UpdateContext`).

- ``ppo``: the clipped policy gradient on the sampler's own transitions (:mod:`critic_align.update`).
- ``nft``: DiffusionNFT (arXiv 2509.16117), the flow-matching loss on forward-noised samples, split into implicit
  positive and negative policies by the reward (:mod:`.nft`).
- ``awm``: advantage-weighted matching, the flow-matching / denoising loss weighted by the advantage (:mod:`.awm`).
"""

from .base import NoisedRows, build_algorithm

__all__ = ["NoisedRows", "build_algorithm"]
