"""Test-time steering with a value function: gradient guidance, best-of-N, SMC, and guidance + best-of-N.

Every sampler is a plain function of a denoiser callable ``denoiser(x_t, t (B,), cond) -> model output``, a
stochastic step from :mod:`critic_align.steps` (``DDIMStep``, or any object with the same call contract and
``apply_score_guidance``), x_T, timesteps and conditioning — no scheduler state (k-diffusion's style).

Steering signals:
    value_fn(x_t, t (B,), cond) -> (B,)   a value V(x_t) ≈ E[r(x0) | x_t]: the trained critic
                                          (:func:`critic_value_fn`, a weighted sum of its heads) or anything
                                          else, e.g. the exact value of the Gaussian-mixture task.
    reward_fn(samples, prompts) -> (B,)   the true reward on decoded final samples.

Layout: ``x_T`` holds G groups of N particles, **groups contiguous** (rows g·N … g·N+N−1 belong to prompt g);
``cond`` and ``prompts`` are given per group (G rows) and repeated per particle here.  Resampling only moves
particles within a group, and every per-particle tensor (latent, conditioning, last potential, ...) is
re-indexed with the same ancestor indices.

SMC (Feynman–Kac steering, Singhal et al. 2025; particle filtering with twisted potentials): the
intermediate targets are γ_t(x_t) ∝ p(x_{T:t}) · exp(λ·V(x_t)), so with a proposal q (the sampler, guided or
not) the incremental log-weight of a move x_t -> x_{t-1} is

    log w += λ·(V(x_{t-1}) − V(x_t)) + log p(x_{t-1} | x_t) − log q(x_{t-1} | x_t)

and at the end V is replaced by the true reward: the final weighted particles target
p*(x0) ∝ p(x0)·exp(λ·r(x0)), the reward-tilted distribution with temperature α = 1/λ.  p and q are the
Gaussians of the unguided and the guided step (same σ, shifted mean), so the correction is exact and
costs no extra network call.  Potential increments telescope, so V is only evaluated where resampling
may happen (and where guidance needs its gradient).  Resampling is ESS-adaptive (resample a group when
ESS < κ·N), allowed every ``resample_every`` steps and/or inside a window of the trajectory; a resampled
group's log-weights are reset to 0, the others are carried.

Cost accounting (:class:`SteerCost`): rows through the backbone (one row = one sample at one step; a CFG
denoiser doing two rows per call counts as ``backbone_rows_per_call=2``), critic forwards and backwards
(rows), reward rows, decodes, wall time.  Compare methods at equal ``equivalent_nfe``: backbone rows +
critic forward rows + 2 × critic backward rows (a LoRA critic is one backbone forward; a backward costs
about two), per output sample.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from critic_align.steps import gaussian_log_prob

from .resampling import RESAMPLING_SCHEMES, effective_sample_size, flat_ancestors, resample

ValueFn = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]
RewardFn = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]


@dataclass
class SteerCost:
    """What a steering run spent (rows = samples × calls)."""

    backbone_rows: int = 0
    critic_forward_rows: int = 0
    critic_backward_rows: int = 0
    reward_rows: int = 0
    decode_rows: int = 0
    wall_time_s: float = 0.0
    num_outputs: int = 0

    @property
    def nfe(self) -> float:
        """Backbone rows per output sample (the usual NFE)."""
        return self.backbone_rows / max(self.num_outputs, 1)

    @property
    def equivalent_nfe(self) -> float:
        """(backbone + critic forward + 2 × critic backward rows) per output sample."""
        total = self.backbone_rows + self.critic_forward_rows + 2 * self.critic_backward_rows
        return total / max(self.num_outputs, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "nfe": self.nfe, "equivalent_nfe": self.equivalent_nfe}


@dataclass
class SteerResult:
    """Output of a steering run with G groups (prompts) of N particles.

    samples:        (G, ...) the chosen final latent per group
    decoded:        (G, ...) its decoded sample (what the reward saw)
    rewards:        (G,) its reward
    particles:      (G·N, ...) every final particle (groups contiguous)
    particle_rewards: (G·N,)
    log_weights:    (G, N) final log-weights (the weighted particles target p·exp(λ r))
    ess:            (T, G) ESS before each step's resampling decision (NaN where not evaluated)
    resampled:      (T, G) bool, whether the group was resampled at that step
    cost:           what it spent
    """

    samples: torch.Tensor
    decoded: torch.Tensor
    rewards: torch.Tensor
    particles: torch.Tensor
    particle_rewards: torch.Tensor
    log_weights: torch.Tensor
    ess: torch.Tensor
    resampled: torch.Tensor
    cost: SteerCost = field(default_factory=SteerCost)


def critic_value_fn(critic, weights: Sequence[float] | torch.Tensor | None = None) -> ValueFn:
    """V(x_t) = Σ_k w_k · V_k(x_t) from a multi-head :class:`~critic_align.critic.Critic` (K heads).

    ``weights`` default to all ones for K = 1 and must be given for K > 1 (explicit: which heads, how much).
    """

    def value(x_t, t, cond):
        v = critic(x_t, t, cond)  # (B, K)
        if v.ndim != 2:
            raise ValueError(f"the critic returned shape {tuple(v.shape)}, expected (batch, num_heads)")
        if weights is None:
            if v.shape[1] != 1:
                raise ValueError(f"the critic has {v.shape[1]} heads: pass weights=[...] (one per head) to combine them")
            return v[:, 0]
        w = torch.as_tensor(weights, dtype=v.dtype, device=v.device)
        if w.shape != (v.shape[1],):
            raise ValueError(f"got {w.numel()} head weights for a critic with {v.shape[1]} heads")
        return v @ w

    return value


def _timestep_batch(t, n: int, device) -> torch.Tensor:
    return torch.as_tensor(t, device=device).expand(n)


def _check_value(v: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or v.shape != (n,):
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"{what} must return a (batch,) tensor, got {shape} for a batch of {n}")
    if not torch.isfinite(v).all():
        bad = (~torch.isfinite(v)).nonzero().flatten().tolist()[:8]
        raise ValueError(f"{what} returned non-finite values at rows {bad}; steering needs finite values")
    return v


def value_and_grad(value_fn: ValueFn, x_t, t, cond, cost: SteerCost | None = None):
    """V(x_t) (B,) and ∇_x V (B, ...) on a detached input: no backprop reaches the sampler's graph."""
    x = x_t.detach().float().requires_grad_(True)
    with torch.enable_grad():
        v = _check_value(value_fn(x, t, cond), x.shape[0], "value_fn")
        (grad,) = torch.autograd.grad(v.sum(), x)
    if cost is not None:
        cost.critic_forward_rows += x.shape[0]
        cost.critic_backward_rows += x.shape[0]
    return v.detach(), grad.detach()


def guidance_defined(step, t) -> bool:
    """False where the step's guidance formula is undefined: flow matching at σ = 1 (pure noise carries no
    information about x0, so the velocity correction σ/(1−σ)·∇V is infinite); guidance is skipped there."""
    sigma = getattr(step.schedule, "sigma", None)
    return sigma is None or bool((sigma(torch.as_tensor(t)) < 1).all())


def guided_denoiser(denoiser, step, value_fn: ValueFn, scale: float, cost: SteerCost | None = None):
    """Wrap ``denoiser`` so its output follows the score of p_t(x)·exp(scale·V(x)): classifier guidance with
    a value (guided-diffusion's ``cond_fn``), mapped to the model's parameterisation by the step's
    ``apply_score_guidance``.  Apply it to the CFG-combined denoiser."""

    def guided(x_t, t, cond):
        out = denoiser(x_t, t, cond)
        if scale == 0 or not guidance_defined(step, t):
            return out
        _, grad = value_and_grad(value_fn, x_t, t, cond, cost)
        return step.apply_score_guidance(out, x_t, t, scale * grad)

    return guided


def _repeat(cond, n: int):
    if cond is None or n == 1:
        return cond
    if hasattr(cond, "repeat_interleave"):  # a tensor or critic_align.cond.TextCond
        return cond.repeat_interleave(n, dim=0)
    raise TypeError(f"conditioning of type {type(cond).__name__} cannot be repeated per particle")


def steer(
    denoiser,
    step,
    x_T: torch.Tensor,
    timesteps: torch.Tensor,
    cond=None,
    prompts: Sequence[str] | None = None,
    *,
    num_particles: int = 1,
    reward_fn: RewardFn,
    decode: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    value_fn: ValueFn | None = None,
    guidance_scale: float = 0.0,
    potential: str | None = None,
    lam: float = 1.0,
    ess_threshold: float = 0.5,
    resample_every: int = 1,
    resample_window: tuple[float, float] = (0.0, 1.0),
    scheme: str = "systematic",
    output: str = "argmax",
    prev_timesteps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    backbone_rows_per_call: int = 1,
    progress: bool = False,
) -> SteerResult:
    """The one engine behind :func:`best_of_n`, :func:`guidance`, :func:`smc` and guidance + best-of-N.

    potential: None (no resampling: best-of-N / guidance), "value" (λ·V(x_t), SMC with the critic) or
        "x0_reward" (λ·r(decode(x̂0(x_t))), FK steering's potential: costs a decode + reward per evaluation).
    output: "argmax" (per group, the particle with the highest final reward) or "sample" (one particle per
        group drawn ∝ its final weight: a draw from the SMC approximation of p·exp(λ r)).
    """
    t0 = time.perf_counter()
    if potential not in (None, "value", "x0_reward"):
        raise ValueError(f"potential must be None, 'value' or 'x0_reward', got {potential!r}")
    if output not in ("argmax", "sample"):
        raise ValueError(f"output must be 'argmax' or 'sample', got {output!r}")
    if scheme not in RESAMPLING_SCHEMES:
        raise ValueError(f"unknown resampling scheme {scheme!r}; use one of {RESAMPLING_SCHEMES}")
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be a positive int, got {num_particles!r}")
    if not 0.0 <= ess_threshold <= 1.0:
        raise ValueError(f"ess_threshold κ must be in [0, 1] (resample when ESS < κ·N), got {ess_threshold}")
    if not isinstance(resample_every, int) or resample_every < 1:
        raise ValueError(f"resample_every must be a positive int, got {resample_every!r}")
    lo, hi = resample_window
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"resample_window must be (start, end) fractions with 0 <= start <= end <= 1, got {resample_window}")
    if (guidance_scale != 0 or potential == "value") and value_fn is None:
        raise ValueError("guidance and value potentials need a value_fn (e.g. critic_value_fn(critic))")
    if potential is not None:
        # SMC weights are density ratios of stochastic transitions: an ODE step has none
        step.require_stochastic("SMC (its weights use transition densities)")
    if potential is None and output == "sample":
        raise ValueError("output='sample' draws ∝ SMC weights; without a potential use output='argmax'")

    n = num_particles
    total = x_T.shape[0]
    if total % n:
        raise ValueError(f"x_T has {total} rows, not a multiple of num_particles={n} (groups of particles)")
    g = total // n
    if prompts is not None and len(prompts) != g:
        raise ValueError(f"got {len(prompts)} prompts for {g} groups of {n} particles (x_T has {total} rows)")
    if cond is not None and len(cond) != g:
        raise ValueError(f"cond has {len(cond)} rows for {g} groups; pass one row per group, not per particle")
    prompts_p = [p for p in (prompts if prompts is not None else [""] * g) for _ in range(n)]
    cond_p = _repeat(cond, n)
    if prev_timesteps is None:
        prev_timesteps = step.schedule.prev_timesteps(timesteps)
    num_steps = len(timesteps)
    cost = SteerCost(num_outputs=g)
    device = x_T.device

    # steps at which resampling may happen: every k-th step inside the window (step 0 allowed: x_T's
    # potential λ·V(x_T) already separates particles)
    allowed = [(k % resample_every == 0) and (lo * num_steps <= k < hi * num_steps) for k in range(num_steps)]

    x = x_T
    log_w = torch.zeros(g, n, dtype=torch.float64, device=device)
    last_g = torch.zeros(total, dtype=torch.float64, device=device)  # λ·V at the last evaluation point
    ess_hist = torch.full((num_steps, g), float("nan"))
    resampled_hist = torch.zeros(num_steps, g, dtype=torch.bool)
    iterator = range(num_steps)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="steering", leave=False)
    for k in iterator:
        t = _timestep_batch(timesteps[k], total, device)
        t_prev = _timestep_batch(prev_timesteps[k], total, device)
        with torch.no_grad():
            out = denoiser(x, t, cond_p)
        cost.backbone_rows += total * backbone_rows_per_call
        grad = None
        if guidance_scale != 0 and guidance_defined(step, t):
            v, grad = value_and_grad(value_fn, x, t, cond_p, cost)
        if potential is not None and allowed[k]:
            if potential == "value":
                if grad is not None:  # reuse the guidance forward
                    g_now = lam * v.double()
                else:
                    with torch.no_grad():
                        v = _check_value(value_fn(x, t, cond_p), total, "value_fn")
                    cost.critic_forward_rows += total
                    g_now = lam * v.double()
            else:  # x0-reward potential, FK steering's choice
                with torch.no_grad():
                    # the step's x0 prediction (scoring x itself as a dummy transition: no noise is drawn)
                    x0 = step(out, x, t, t_prev, prev_sample=x).x0_pred
                    dec = decode(x0.to(x.dtype))
                    r = _check_value(reward_fn(dec, prompts_p).to(device).float(), total, "reward_fn")
                cost.decode_rows += total
                cost.reward_rows += total
                g_now = lam * r.double()
            log_w += (g_now - last_g).view(g, n)
            last_g = g_now
            ess = effective_sample_size(log_w)
            ess_hist[k] = ess.cpu()
            do = ess < ess_threshold * n
            if bool(do.any()):
                anc = resample(log_w, scheme, generator)
                keep = torch.arange(n, device=device).expand(g, n)
                anc = torch.where(do.unsqueeze(1), anc, keep)  # only the groups below the threshold
                idx = flat_ancestors(anc)
                x, out, last_g = x[idx], out[idx], last_g[idx]
                cond_p = None if cond_p is None else cond_p[idx]
                prompts_p = [prompts_p[i] for i in idx.tolist()]
                if grad is not None:
                    grad = grad[idx]
                log_w[do] = 0.0
                resampled_hist[k] = do.cpu()
        with torch.no_grad():
            if grad is not None:
                out_q = step.apply_score_guidance(out, x, t, guidance_scale * grad)
                s_q = step(out_q, x, t, t_prev, generator=generator)
                if potential is not None:
                    # exact correction for the guided proposal: log p(x'|x) − log q(x'|x), same σ
                    s_p = step(out, x, t, t_prev, prev_sample=s_q.prev_sample)
                    corr = gaussian_log_prob(s_q.prev_sample, s_p.mean, s_p.std, "sum") - \
                        gaussian_log_prob(s_q.prev_sample, s_q.mean, s_q.std, "sum")
                    log_w += corr.double().view(g, n)
                x = s_q.prev_sample
            else:
                x = step(out, x, t, t_prev, generator=generator).prev_sample

    with torch.no_grad():
        decoded = decode(x)
        rewards = _check_value(reward_fn(decoded, prompts_p).to(device).float(), total, "reward_fn")
    cost.decode_rows += total
    cost.reward_rows += total
    if potential is not None:
        log_w += (lam * rewards.double() - last_g).view(g, n)
    if output == "argmax":
        choice = rewards.view(g, n).argmax(-1)
    else:
        w = torch.softmax(log_w, -1).cpu()
        choice = torch.multinomial(w, 1, generator=generator).squeeze(1).to(device)
    pick = choice + n * torch.arange(g, device=device)
    cost.wall_time_s = time.perf_counter() - t0
    return SteerResult(
        samples=x[pick], decoded=decoded[pick], rewards=rewards[pick], particles=x, particle_rewards=rewards,
        log_weights=log_w, ess=ess_hist, resampled=resampled_hist, cost=cost,
    )


def best_of_n(denoiser, step, x_T, timesteps, cond=None, prompts=None, *, num_particles: int, reward_fn: RewardFn,
              decode=lambda x: x, **kw) -> SteerResult:
    """N independent samples per prompt; keep the one with the highest reward."""
    return steer(denoiser, step, x_T, timesteps, cond, prompts, num_particles=num_particles, reward_fn=reward_fn,
                 decode=decode, **kw)


def guidance(denoiser, step, x_T, timesteps, cond=None, prompts=None, *, value_fn: ValueFn, scale: float,
             reward_fn: RewardFn, decode=lambda x: x, num_particles: int = 1, **kw) -> SteerResult:
    """Critic gradient guidance (one sample per prompt; with num_particles > 1 it is guidance + best-of-N)."""
    return steer(denoiser, step, x_T, timesteps, cond, prompts, num_particles=num_particles, reward_fn=reward_fn,
                 decode=decode, value_fn=value_fn, guidance_scale=scale, **kw)


def smc(denoiser, step, x_T, timesteps, cond=None, prompts=None, *, num_particles: int, reward_fn: RewardFn,
        value_fn: ValueFn | None = None, lam: float = 1.0, potential: str = "value", decode=lambda x: x,
        **kw) -> SteerResult:
    """Feynman–Kac SMC with potentials λ·V (or λ·r(x̂0)); see the module doc for the weights."""
    return steer(denoiser, step, x_T, timesteps, cond, prompts, num_particles=num_particles, reward_fn=reward_fn,
                 decode=decode, value_fn=value_fn, potential=potential, lam=lam, **kw)
