"""What the forward-process algorithms (NFT, AWM) share: training rows on forward-noised final samples, the
model-output parameterisation, the optional KL to the base model, and the update loop.

Neither algorithm needs the sampler's log-probs: the rollout is only the source of final samples x_0 and their
rewards.  Each (trajectory, step) pair chosen by :func:`critic_align.update.pairs` (``timestep_fraction`` of each
trajectory's steps) becomes one row: x_0 of that trajectory noised to that step's timestep with the scheduler's
own forward process q(x_t | x_0) (:class:`critic_align.value_data.ForwardProcess`).  The policy's output on
every row is recorded before the first optimiser step (``old``): the "old" policy is the sampling policy, which
is DiffusionNFT's ``decay_type=0`` (their other settings keep an EMA of the policy as the old one; not built here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..steps import FlowMatchSchedule, NoiseSchedule
from ..update import UpdateContext, local_rows, minibatch_steps, pairs


@dataclass(frozen=True)
class NoisedRows:
    """This process's rows of forward-noised training data; the whole batch has G = passes · (trajectories · steps
    trained per trajectory) rows, N of them this process's (those of its trajectories).

    traj:  (N,) long, the trajectory of each row in this process's rollout (its x_0, reward, advantage, conditioning)
    step:  (N,) long, the index of the row's timestep in the sampler's grid
    t:     (N,) the timestep (the sampler's values)
    x0:    (N, *S) the clean final sample
    noise: (N, *S) the forward-process noise ε
    x_t:   (N, *S) q(x_t | x_0) with that noise
    old:   (N, *S) the sampling policy's model output at (x_t, t), no gradient
    owner: (G,) long, each of the whole batch's rows' index among these N rows, −1 for another process's
    """

    traj: torch.Tensor
    step: torch.Tensor
    t: torch.Tensor
    x0: torch.Tensor
    noise: torch.Tensor
    x_t: torch.Tensor
    old: torch.Tensor
    owner: torch.Tensor

    def __len__(self) -> int:
        return self.traj.shape[0]


@dataclass(frozen=True)
class OutputParam:
    """The model output's parameterisation, per row: x̂_0 = a·x_t + b·out (linear in the output for every
    supported kind, so a mixture of outputs is the same mixture of x̂_0), and the output's regression target.

    kind: 'flow' (velocity v = ε − x_0, x_t = (1−σ)x_0 + σε) or a VP prediction type ('epsilon',
    'v_prediction', 'sample'; x_t = sqrt(ᾱ)x_0 + sqrt(1−ᾱ)ε).  x̂_0 is not clipped (``clip_sample`` is a
    sampling-time clamp; the losses use the exact linear map)."""

    schedule: FlowMatchSchedule | NoiseSchedule

    @property
    def kind(self) -> str:
        return "flow" if isinstance(self.schedule, FlowMatchSchedule) else self.schedule.prediction_type

    def _coefs(self, t: torch.Tensor, like: torch.Tensor):
        shape = (-1, *([1] * (like.ndim - 1)))
        if self.kind == "flow":
            s = self.schedule.sigma(t).to(like).view(shape)
            return torch.ones_like(s), -s, s
        ab = self.schedule.alpha_bar(t).to(like).view(shape)
        return ab.sqrt(), (1 - ab).sqrt(), None

    def x0_coefs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b), each (N, 1, ..., 1): x̂_0 = a·x_t + b·out."""
        c1, c2, _ = self._coefs(t, like)
        if self.kind == "flow":
            return c1, c2
        sa, s1a = c1, c2
        if self.kind == "epsilon":
            return 1 / sa, -s1a / sa
        if self.kind == "v_prediction":
            return sa, -s1a
        return torch.zeros_like(sa), torch.ones_like(sa)  # "sample"

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The output the forward process implies: v = ε − x_0 (flow), ε, sqrt(ᾱ)ε − sqrt(1−ᾱ)x_0, or x_0."""
        if self.kind == "flow":
            return noise - x0
        sa, s1a, _ = self._coefs(t, x0)
        return {"epsilon": noise, "v_prediction": sa * noise - s1a * x0, "sample": x0}[self.kind]


def forward_process_for(schedule, scheduler, num_inference_steps: int):
    """The scheduler's forward process at the sampler's timesteps (a task's own flow grid where it has one)."""
    from ..value_data import ForwardProcess

    src = schedule if isinstance(schedule, FlowMatchSchedule) else scheduler
    return ForwardProcess(src, num_inference_steps)


@torch.no_grad()
def noised_rows(ctx: UpdateContext, ro, forward, passes: int, chunk: int = 256) -> NoisedRows:
    """``passes`` shuffled sets of the whole batch's (trajectory, step) rows, forward-noised, with the current
    policy's output; this process keeps the rows of its trajectories (``ro`` is its shard).  The noise is drawn for
    every row from the shared generator, so a row's noise does not depend on the number of processes."""
    p = torch.cat([pairs(ctx.generator, ctx.batch_size, ro.num_steps, ctx.config.timestep_fraction, ctx.strata)
                   for _ in range(passes)])
    dev = ctx.device
    noise = torch.randn((len(p), *ro.final.shape[1:]), generator=ctx.generator)
    mine = (p[:, 0] >= ctx.shard.start) & (p[:, 0] < ctx.shard.stop)
    owner = torch.full((len(p),), -1, dtype=torch.long)
    owner[mine] = torch.arange(int(mine.sum()))
    traj, step = p[mine, 0] - ctx.shard.start, p[mine, 1]
    x0 = ro.final[traj.to(ro.final.device)].to(dev)
    noise = noise[mine].to(dev)
    t = ro.timesteps[step].to(dev)
    x_t = forward(x0, noise, t).to(dev)
    old = []
    for s in range(0, len(traj), chunk):
        sl = slice(s, s + chunk)
        old.append(ctx.models.policy_output(x_t[sl], t[sl], row_cond(ro, traj[sl], dev)).float())
    return NoisedRows(traj, step, t, x0, noise, x_t, torch.cat(old), owner)


def row_cond(ro, traj: torch.Tensor, device):
    return None if ro.cond is None else ro.cond[traj.to(device)]


@torch.no_grad()
def row_advantages(ctx: UpdateContext, ro, rows: NoisedRows, source: str, chunk: int = 256) -> torch.Tensor:
    """(N,) the advantage of each forward-noised row (NFT's ``nft_advantage``, AWM's ``awm_advantage``): 'grpo', the
    configured estimator's advantage of the row's trajectory; 'critic', the critic's per-row advantage on the very
    state the loss is taken at (:func:`critic_align.estimators.row_critic.critic_advantages`)."""
    from ..estimators.row_critic import critic_advantages

    dev = ctx.device
    if source == "grpo":
        return ro.advantages[rows.traj.to(ro.advantages.device), rows.step.to(ro.advantages.device)].to(dev)
    values = [ctx.models.values(rows.x_t[s:s + chunk], rows.t[s:s + chunk], row_cond(ro, rows.traj[s:s + chunk], dev))
              .float() for s in range(0, len(rows), chunk)]
    values = torch.cat(values) if values else rows.x_t.new_zeros((0, len(ctx.reward_names)))
    return critic_advantages(values, ro.rewards[rows.traj.to(ro.rewards.device)].to(dev), ctx.reward_weights,
                             ctx.config.adv_clip_max, ctx.opt.processes.gather_uneven)


def fit_critic_after(ctx: UpdateContext, ro, stats: dict) -> dict:
    """A forward-process algorithm's value step after its policy update, when it reads a critic (as in a GAE run:
    the rollout's states and returns, ``ppo_epochs`` passes)."""
    from ..value_fit import fit_values, rollout_value_data

    if ctx.models.critic is not None and ro.returns is not None:
        vb, total = rollout_value_data(ctx, ro, ro.returns)
        stats.update(fit_values(ctx, vb, ctx.config.ppo_epochs, total_rows=total))
    return stats


def policy_and_kl(ctx: UpdateContext, rows: NoisedRows, part: torch.Tensor, ro) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(the policy's output on rows ``part`` (with gradient), the KL penalty term (0 without ``kl_coef``), stats).

    The KL to the base model of two Gaussians sharing a variance is ∝ the squared output difference; like
    DiffusionNFT's and AWM's ``beta`` term it is the per-row mean squared difference of the outputs."""
    models, kl_coef = ctx.models, ctx.config.kl_coef
    x_t, t, cond = rows.x_t[part], rows.t[part], row_cond(ro, rows.traj[part], ctx.device)
    out = models.policy_output(x_t, t, cond).float()
    if kl_coef == 0:
        return out, out.new_zeros(()), {}
    with torch.no_grad():
        ref = models.reference_output(x_t, t, cond).float()
    kl = ((out - ref) ** 2).mean(dim=tuple(range(1, out.ndim))).mean()
    return out, kl_coef * kl, {"kl_to_ref": kl.item()}


def forward_update(ctx: UpdateContext, rows: NoisedRows, loss_fn) -> dict:
    """One optimiser step per ``minibatch_size`` of the whole batch's rows (already shuffled), through the shared
    :func:`critic_align.update.minibatch_steps` (micro-batches, the engine's gradient sync, guards)."""
    mbs = ctx.config.minibatch_size
    idx = torch.arange(len(rows.owner))
    return minibatch_steps(ctx.opt, [idx[s:s + mbs] for s in range(0, len(idx), mbs)], loss_fn,
                           local_rows(rows.owner), torch.zeros(1, dtype=torch.long))


def build_algorithm(name: str, schedule, scheduler, config):
    """The algorithm ``name`` (:data:`critic_align.registry.ALGORITHMS`)."""
    from ..registry import ALGORITHMS, lookup, resolve

    return resolve(lookup(ALGORITHMS, name, "algorithm"))(schedule, scheduler, config)
