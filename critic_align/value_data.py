"""Value data beyond the rollout's own states: forward-perturbed states (DiffAC, arXiv 2403.04154).

Every finished sample x_0 with reward R(x_0) gives free value data: noise it to a timestep t of the sampler
with the scheduler's own forward process, x_t ~ q(x_t | x_0), and regress V(x_t, t, c) on R(x_0).  It costs
no reward query.

What it teaches: regression on pairs (x_t, R(x_0)) with x_0 ~ p_θ (the policy's samples) and x_t ~ q(x_t | x_0)
converges to E[R(x_0) | x_t] under the joint p_θ(x_0)·q(x_t | x_0), i.e. under the *forward-process
posterior* of the policy's sample distribution.  The policy's own value is E[R | x_t] under its *reverse*
process from x_t.  The two agree when the sampler is the exact reverse of q for p_θ (a perfect model, no
discretisation error); they differ for a coarse sampler (20 steps), for a fine-tuned policy (which is no
longer the reverse of anything q defines), and in which states are seen: q(x_t | x_0)'s marginal, not the
sampler's, so off-trajectory states are covered too (useful for guidance, which moves x_t off the sampler's
path).  ``benchmarks/critic_quality.py`` measures whether it helps on the sampler's own states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cond import TextCond
from .steps import FlowMatchSchedule
from .x0_reward import head_input_rows


@dataclass(frozen=True)
class ValueBatch:
    """Rows of value-regression data.

    x:          (N, *S) noisy latents
    t:          (N,) their timesteps (the sampler's values: int for VP schedulers, σ·N floats for flow matching)
    cond:       (M, ...) the conditioning of the M source samples (tensor or TextCond), or None
    cond_index: (N,) long, row i's conditioning is cond[cond_index[i]] (no copy of large text embeddings)
    returns:    (N, K) value targets, NaN-free (a missing reward's target is 0 and masked)
    mask:       (N, K) bool, False where reward k does not apply to the row
    x0_reward:  (N, K) r(decode(x̂0(x))) of each row, the value head's extra input when it reads one
                (:mod:`critic_align.x0_reward`; None without it)
    ids:        (N,) long, each row's index among the whole batch's rows (every process's): with rank-local rollouts
                a process holds some of them, and the value fit's shuffle runs over all of them
                (:func:`critic_align.value_fit.fit_values`); ``arange(N)`` for one process's batch
    """

    x: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor | TextCond | None
    cond_index: torch.Tensor
    returns: torch.Tensor
    mask: torch.Tensor
    x0_reward: torch.Tensor | None = None
    ids: torch.Tensor | None = None

    def __post_init__(self):
        if self.ids is None:
            object.__setattr__(self, "ids", torch.arange(self.x.shape[0]))

    def __len__(self) -> int:
        return self.x.shape[0]

    def rows(self, index: torch.Tensor):
        """(x, t, cond, returns, mask, x0_reward) of the rows ``index``."""
        # each field indexed on its own device (the index may live on the model's device, cond_index on the CPU)
        take = lambda v: v[index.to(v.device)]  # noqa: E731
        cond = None if self.cond is None else self.cond[take(self.cond_index).to(self.cond.device)]
        x0r = None if self.x0_reward is None else take(self.x0_reward)
        return take(self.x), take(self.t), cond, take(self.returns), take(self.mask), x0r

    @staticmethod
    def cat(batches: list["ValueBatch"]) -> "ValueBatch":
        """Rows of several batches that share one ``cond`` (e.g. a rollout's states and its perturbed states)."""
        first = batches[0]
        if any(b.cond is not first.cond for b in batches):
            raise ValueError("ValueBatch.cat needs batches built on the same cond object")
        if len({b.x0_reward is None for b in batches}) > 1:
            raise ValueError("ValueBatch.cat: some batches carry x0_reward and some do not")
        x0r = None if first.x0_reward is None else torch.cat([b.x0_reward for b in batches])
        return ValueBatch(torch.cat([b.x for b in batches]), torch.cat([b.t for b in batches]), first.cond,
                          torch.cat([b.cond_index for b in batches]), torch.cat([b.returns for b in batches]),
                          torch.cat([b.mask for b in batches]), x0r, torch.cat([b.ids for b in batches]))


def trajectory_states(latents: torch.Tensor, timesteps: torch.Tensor, cond, returns: torch.Tensor,
                      rewards: torch.Tensor, x0_rewards: torch.Tensor | None = None, first: int = 0) -> ValueBatch:
    """Every state a rollout visited before a step, with its return: latents (B, T+1, *S), timesteps (T,),
    returns (B, T, K), rewards (B, K) (NaN = not applicable), x0_rewards (B, T, K) or None (the head's extra input).
    Row b·T + k is trajectory b's state k; ``first``: the index of trajectory 0 in the whole batch (its rows' ``ids``
    start at first·T)."""
    b, t = returns.shape[:2]
    x = latents[:, :-1].reshape(b * t, *latents.shape[2:])
    mask = (~torch.isnan(rewards.float()))[:, None, :].expand(b, t, -1).reshape(b * t, -1)
    return ValueBatch(x, timesteps.to(x.device).repeat(b), cond, torch.arange(b).repeat_interleave(t),
                      returns.reshape(b * t, -1).float(), mask,
                      head_input_rows(x0_rewards, x.device),
                      torch.arange(first * t, (first + b) * t))


class ForwardProcess:
    """The diffusers scheduler's own forward process q(x_t | x_0) at the sampler's timesteps.

    VP (DDPM / DDIM configs): ``DDPMScheduler.add_noise`` = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε.
    Flow matching (``FlowMatchEulerDiscreteScheduler``): ``scale_noise`` = (1 − σ)·x_0 + σ·ε, after
    ``set_timesteps(num_inference_steps)`` so the sampler's timesteps are the ones it knows (given a
    :class:`~critic_align.steps.FlowMatchSchedule`, its own grid: ``FlowMatchSchedule.diffusers_scheduler``).
    """

    def __init__(self, scheduler_or_config, num_inference_steps: int):
        from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

        if isinstance(scheduler_or_config, FlowMatchSchedule):  # a task's own grid (FLUX: sigmas at its mu)
            self.kind = "flow"
            self.scheduler = scheduler_or_config.diffusers_scheduler(num_inference_steps)
            return
        config = dict(getattr(scheduler_or_config, "config", scheduler_or_config))
        if "beta_schedule" in config or "trained_betas" in config:
            self.kind = "vp"
            self.scheduler = DDPMScheduler.from_config(config)
        else:
            self.kind = "flow"
            self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
            self.scheduler.set_timesteps(num_inference_steps)

    def __call__(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t for clean ``x0`` (N, *S), ``noise`` (N, *S) and timesteps ``t`` (N,)."""
        if self.kind == "vp":
            return self.scheduler.add_noise(x0, noise, t.long().cpu()).to(x0.dtype)
        # scale_noise looks each timestep up in its own schedule (float equality): pass them as the sampler has them
        return self.scheduler.scale_noise(x0, t.to(self.scheduler.timesteps.dtype).cpu(), noise).to(x0.dtype)


def perturbed_states(forward: ForwardProcess, final: torch.Tensor, rewards: torch.Tensor, cond, timesteps: torch.Tensor,
                     per_sample: int, generator: torch.Generator, gamma: float = 1.0, shard: slice | None = None,
                     batch_size: int | None = None, first_id: int = 0) -> ValueBatch:
    """``per_sample`` forward-perturbed states of every finished sample, at timesteps drawn uniformly from the
    sampler's ``timesteps`` (T,), each with target γ^(T−1−k)·R(x_0) for the k-th timestep (the Monte-Carlo
    return's discount at that step; R itself for γ = 1).

    final: (B, *S) x_0 of the rollout; rewards: (B, K) with NaN = not applicable.  Returns B·per_sample rows,
    sample-major (row i·per_sample + j is sample i's j-th state).

    Rank-local: ``final`` and ``rewards`` are the ``shard`` of a batch of ``batch_size`` samples; the timesteps and
    the noise are drawn for the whole batch (the generator stays in step on every process, and each row's draw does
    not depend on the number of processes) and this shard's rows kept; ``ids`` are ``first_id`` + the row's index
    among the whole batch's perturbed rows.
    """
    b = final.shape[0]
    shard = slice(0, b) if shard is None else shard
    total = (b if batch_size is None else batch_size) * per_sample
    rows_g = slice(shard.start * per_sample, shard.stop * per_sample)
    idx = torch.randint(0, timesteps.shape[0], (total,), generator=generator)[rows_g]
    t = timesteps.cpu()[idx]
    noise = torch.randn((total, *final.shape[1:]), generator=generator)[rows_g].to(final.device)
    x0 = final.repeat_interleave(per_sample, dim=0)
    x_t = forward(x0, noise, t)
    rows = torch.arange(b).repeat_interleave(per_sample)
    disc = (gamma ** (timesteps.shape[0] - 1 - idx).double()).float().to(rewards.device)
    r = rewards[rows.to(rewards.device)].float() * disc[:, None]
    mask = ~torch.isnan(r)
    return ValueBatch(x_t, t.to(final.device), cond, rows, torch.nan_to_num(r), mask,
                      ids=first_id + torch.arange(rows_g.start, rows_g.stop))
