"""``algorithm: awm``: advantage-weighted matching (Xue et al.; scxue/advantage_weighted_matching,
scripts/train_sd3_awm.py).

The policy-gradient surrogate with the diffusion model's own training loss as the log-likelihood: on x_t ~ q(x_t|x_0)
of the final samples, log p̃_θ = −mean_dims (out_θ − target)², target the forward process's (v = ε − x_0 for flow
matching; ε / v / x_0 for VP prediction types), and the clipped ratio exp(log p̃_θ − log p̃_old) weighted by the
advantage (their ``exp_first`` loss with ``weighting='Uniform'``).  On-policy (ratio 1) its gradient is
A·∇ mean (out_θ − target)²: the denoising loss weighted by the advantage, which is where the name comes from.

``awm_advantage``:
- 'grpo': the configured estimator's advantage of the row's trajectory (group-relative, as in their code).
- 'critic': a per-timestep, value-based advantage on the very state the loss is taken at,
  A = Σ_k w_k (R_k − V_k(x_t, t)), with the critic (trained as in GAE runs: value pretraining, then a value step
  on the rollout's states (and perturbed states if configured) after each policy update) evaluated at the
  forward-noised x_t before the update, divided by its std over the rows (so its scale matches GRPO's ≈ 1), and
  clipped to ±adv_clip_max.
"""

from __future__ import annotations

import torch

from ..estimators.row_critic import critic_advantages
from ..losses import ppo_policy_loss
from .base import OutputParam, fit_critic_after, forward_process_for, forward_update, noised_rows, policy_and_kl, row_advantages

__all__ = ["AWM", "awm_loss", "critic_advantages", "matching_log_prob"]


def matching_log_prob(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) −mean over dims of (out − target)²: the denoising loss as a log-likelihood surrogate."""
    return -((out.float() - target.float()) ** 2).mean(dim=tuple(range(1, out.ndim)))


def awm_loss(out: torch.Tensor, old: torch.Tensor, target: torch.Tensor, advantages: torch.Tensor,
             clip_range: float) -> tuple[torch.Tensor, dict]:
    """The AWM loss, a mean over rows: PPO's clipped surrogate on ratio exp(log p̃_θ − log p̃_old).

    out, old, target: (N, *S); advantages: (N,).  Returns (loss, stats)."""
    loss, st = ppo_policy_loss(matching_log_prob(out, target), matching_log_prob(old, target).detach(),
                               advantages, clip_range)
    return loss, {"policy_loss": loss.item(), "approx_kl": st.approx_kl, "clip_fraction": st.clip_fraction,
                  "ratio_mean": st.ratio_mean, "ratio_max": st.ratio_max, "ratio_min": st.ratio_min,
                  "matching_loss": -matching_log_prob(out.detach(), target).mean().item()}


class AWM:
    # the config fields only this one reads (config.py refuses them, set, with another: never silently ignored)
    arguments = ("awm_advantage", "clip_range")

    def __init__(self, schedule, scheduler, config):
        self.forward = forward_process_for(schedule, scheduler, config.num_inference_steps)
        self.param = OutputParam(schedule)

    def _row_advantages(self, ctx, ro, rows) -> torch.Tensor:  # an instance method: a benchmark can replace it
        return row_advantages(ctx, ro, rows, ctx.config.awm_advantage)

    def prepare(self, ctx, ro):
        """(rows, loss_fn(row indices) -> (mean loss, stats), row advantages) for one rollout (this process's)."""
        cfg = ctx.config
        rows = noised_rows(ctx, ro, self.forward, cfg.ppo_epochs)
        adv = self._row_advantages(ctx, ro, rows)
        target = self.param.target(rows.x0, rows.noise, rows.t)

        def loss_fn(part):
            out, kl, stats = policy_and_kl(ctx, rows, part, ro)
            loss, st = awm_loss(out, rows.old[part], target[part], adv[part.to(adv.device)], cfg.clip_range)
            return loss + kl, {**st, **stats}

        return rows, loss_fn, adv

    def update(self, ctx, ro) -> dict:
        rows, loss_fn, adv = self.prepare(ctx, ro)
        stats = forward_update(ctx, rows, loss_fn)
        every = ctx.opt.processes.gather_uneven(adv)
        stats["awm_advantage_abs_mean"] = every.abs().mean().item()
        return fit_critic_after(ctx, ro, stats)  # the critic learns as in a GAE run
