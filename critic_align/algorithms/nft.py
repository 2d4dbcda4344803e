"""``algorithm: nft``: DiffusionNFT (Zheng et al., arXiv 2509.16117; NVlabs/DiffusionNFT, scripts/train_nft_sd3.py).

RL on the forward process.  Sample with the step (no log-probs used), score, turn each sample's advantage into
an optimality probability r ∈ [0, 1], noise the final samples forward to the sampler's timesteps, and fit two
implicit policies built from the trained output v_θ and the frozen sampling policy's v_old:

    v⁺ = β·v_θ + (1−β)·v_old          (the positive policy: pulled towards well-rewarded samples)
    v⁻ = (1+β)·v_old − β·v_θ          (the negative policy: pulled towards badly-rewarded samples)

with the x_0-space flow-matching loss of each, adaptively weighted (their code: divided by the row's detached
mean |x̂_0 − x_0|), and mixed by r:

    L = adv_clip_max · mean_rows[ (r·L⁺ + (1−r)·L⁻) / β ]

r = clip(A / adv_clip_max / 2 + 1/2, 0, 1) from the row's advantage A, clipped to ±adv_clip_max.  ``nft_advantage``:
'grpo', the configured estimator's advantage of the row's trajectory (GRPO's group-normalised reward: the paper's
normalised reward); 'critic', the critic's per-row advantage on the forward-noised state the loss is taken at,
A = Σ_k w_k (R_k − V_k(x_t, t)) / its std over the batch's rows (as AWM's ``awm_advantage: critic``; needs
advantage: gae, which builds the critic; the critic then takes a value step after each update).  NFT's r is a
per-row weight, so it admits a per-timestep advantage: r then says how much better than expected *from this noisy
state* the sample turned out, not how it ranks in its group.  Since v⁺ + v⁻ = 2·v_old, fitting v⁺ to the good
samples and v⁻ to the bad ones moves v_θ towards good and away from bad; at v_θ = v_old both equal v_old.

Model outputs: velocity (flow matching) as in the paper; the ε-, v- and x_0-prediction UNets carry over exactly,
because x̂_0 is linear in the output for each of them (:class:`~critic_align.algorithms.base.OutputParam`), so the
mixed outputs are the mixed x̂_0 and the loss is the same x_0-space loss.  What does not carry over: the adaptive
weighting was tuned for flow matching's x̂_0 errors (ε-prediction's x̂_0 error blows up as ᾱ → 0 at the noisiest
step, where the weight then shrinks that row's gradient), and DiffusionNFT's EMA "old" policy (decay_type 1/2).
"""

from __future__ import annotations

import torch

from .base import OutputParam, fit_critic_after, forward_process_for, forward_update, noised_rows, policy_and_kl, row_advantages


def optimality(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """r = clip(clip(A, ±m) / m / 2 + 1/2, 0, 1): A = 0 → 1/2, A = ±m → 1 / 0."""
    a = advantages.clamp(-adv_clip_max, adv_clip_max)
    return (a / adv_clip_max / 2 + 0.5).clamp(0, 1)


def nft_loss(out: torch.Tensor, old: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, a: torch.Tensor,
             b: torch.Tensor, r: torch.Tensor, beta: float, scale: float) -> tuple[torch.Tensor, dict]:
    """The DiffusionNFT loss, a mean over rows.

    out, old: (N, *S) the trained and the old model output; x_t, x0: (N, *S); a, b: broadcastable to (N, *S),
    x̂_0 = a·x_t + b·output; r: (N,) optimality in [0, 1]; beta: the mixing β > 0; scale: their ``adv_clip_max``
    factor.  Returns (loss, stats)."""
    dims = tuple(range(1, x0.ndim))
    old = old.detach()
    pos = beta * out + (1 - beta) * old
    neg = (1 + beta) * old - beta * out
    x0_pos, x0_neg = a * x_t + b * pos, a * x_t + b * neg

    def weighted(x0_hat):
        with torch.no_grad():  # adaptive weighting: the row's own mean absolute error, no gradient
            w = (x0_hat.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp(min=1e-5)
        return ((x0_hat - x0) ** 2 / w).mean(dim=dims)

    l_pos, l_neg = weighted(x0_pos), weighted(x0_neg)
    per_row = (r * l_pos + (1 - r) * l_neg) / beta
    loss = (per_row * scale).mean()
    with torch.no_grad():
        stats = {"policy_loss": loss.item(), "nft_positive_loss": l_pos.mean().item(),
                 "nft_negative_loss": l_neg.mean().item(), "nft_r_mean": r.float().mean().item(),
                 "old_deviate": ((out - old) ** 2).mean().item(), "old_deviate_max": ((out - old) ** 2).max().item()}
    return loss, stats


class NFT:
    """The glue: rows of forward-noised final samples, their r, and the loss through the shared update loop."""

    # the config fields only this one reads (config.py refuses them, set, with another: never silently ignored)
    arguments = ("nft_beta", "nft_advantage")

    def __init__(self, schedule, scheduler, config):
        self.forward = forward_process_for(schedule, scheduler, config.num_inference_steps)
        self.param = OutputParam(schedule)

    def prepare(self, ctx, ro):
        """(rows, loss_fn(row indices) -> (mean loss, stats)) for one rollout (this process's shard)."""
        cfg = ctx.config
        rows = noised_rows(ctx, ro, self.forward, cfg.ppo_epochs)
        r = optimality(row_advantages(ctx, ro, rows, cfg.nft_advantage), cfg.adv_clip_max).to(ctx.device)

        def loss_fn(part):
            out, kl, stats = policy_and_kl(ctx, rows, part, ro)
            a, b = self.param.x0_coefs(rows.t[part], rows.x0)
            loss, st = nft_loss(out, rows.old[part], rows.x_t[part], rows.x0[part], a, b, r[part.to(r.device)],
                                cfg.nft_beta, cfg.adv_clip_max)
            return loss + kl, {**st, **stats}

        return rows, loss_fn

    def update(self, ctx, ro) -> dict:
        return fit_critic_after(ctx, ro, forward_update(ctx, *self.prepare(ctx, ro)))
