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

from ..losses import ppo_policy_loss
from ..value_data import ValueBatch, trajectory_states
from .base import OutputParam, forward_process_for, forward_update, noised_rows, policy_and_kl, row_cond


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


def critic_advantages(values: torch.Tensor, rewards: torch.Tensor, weights: torch.Tensor, clip: float) -> torch.Tensor:
    """(N,) Σ_k w_k (R_k − V_k) / std over rows, clipped to ±clip.  values, rewards: (N, K), NaN reward = absent."""
    d = torch.nan_to_num(rewards.float() - values.float()) * weights.to(values.device)
    adv = d.sum(-1)
    return (adv / (adv.std() + 1e-8)).clamp(-clip, clip) if adv.numel() > 1 else adv.clamp(-clip, clip)


class AWM:
    def __init__(self, trainer, scheduler):
        self.forward = forward_process_for(trainer, scheduler)
        self.param = OutputParam(trainer.schedule)

    @torch.no_grad()
    def _row_advantages(self, trainer, ro, rows, chunk: int = 256) -> torch.Tensor:
        dev = trainer.device
        if trainer.config.awm_advantage == "grpo":
            return ro.advantages[rows.traj.to(ro.advantages.device), rows.step.to(ro.advantages.device)].to(dev)
        values = []
        with trainer.autocast():
            for s in range(0, len(rows), chunk):
                sl = slice(s, s + chunk)
                values.append(trainer.critic(rows.x_t[sl], rows.t[sl], row_cond(ro, rows.traj[sl], dev)).float())
        return critic_advantages(torch.cat(values), ro.rewards[rows.traj.to(ro.rewards.device)].to(dev),
                                 trainer.reward_weights, trainer.config.adv_clip_max)

    def prepare(self, trainer, ro):
        """(rows, loss_fn(row indices) -> (mean loss, stats), row advantages) for one rollout."""
        cfg = trainer.config
        rows = noised_rows(trainer, ro, self.forward, cfg.ppo_epochs)
        adv = self._row_advantages(trainer, ro, rows)
        target = self.param.target(rows.x0, rows.noise, rows.t)

        def loss_fn(part):
            out, kl, stats = policy_and_kl(trainer, rows, part, ro)
            loss, st = awm_loss(out, rows.old[part], target[part], adv[part.to(adv.device)], cfg.clip_range)
            return loss + kl, {**st, **stats}

        return rows, loss_fn, adv

    def update(self, trainer, ro) -> dict:
        cfg = trainer.config
        rows, loss_fn, adv = self.prepare(trainer, ro)
        stats = forward_update(trainer, rows, loss_fn)
        stats["awm_advantage_abs_mean"] = adv.abs().mean().item()
        if trainer.critic is not None and ro.returns is not None:  # the critic learns as in a GAE run
            data = [trajectory_states(ro.latents, ro.timesteps, ro.cond, ro.returns, ro.rewards)]
            if trainer.forward_process is not None:
                from ..value_fit import perturbed_batch

                data.append(perturbed_batch(trainer, ro))
            stats.update(trainer.fit_values(ValueBatch.cat(data), cfg.ppo_epochs))
        return stats
