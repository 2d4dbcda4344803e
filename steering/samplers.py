"""Test-time steering with a value function: gradient guidance, best-of-N, SMC, and guidance + best-of-N.

Every sampler is a plain function of a denoiser callable ``denoiser(x_t, t (B,), cond) -> model output`` (always
called under ``torch.no_grad``), a stochastic step from :mod:`critic_align.steps` (``DDIMStep``,
``FlowMatchSDEStep``, or any object with the same call contract and ``apply_score_guidance``), x_T, timesteps
and conditioning — no scheduler state (k-diffusion's style).

Steering signals (the input convention is :mod:`steering.values`'s: value functions see what the denoiser
sees, ``noise_level(step, t)`` gives ᾱ / σ):
    value_fn(x_t, t (B,), cond) -> (B,)   a value: V(x_t) ≈ E[r(x0) | x_t] (``potential="value"``: the trained
                                          critic, :func:`critic_value_fn`) or the soft value
                                          log E[exp(λ·r(x0)) | x_t] (``potential="soft_value"``, built by
                                          :mod:`steering.potentials`), or an exact one (the mixture task).
    reward_fn(samples, prompts) -> (B,)   the true reward on decoded final samples; −inf marks a sample that
                                          violates a hard constraint (weight 0).

Layout: ``x_T`` holds G groups of N particles, **groups contiguous** (rows g·N … g·N+N−1 belong to prompt g);
``cond`` and ``prompts`` are given per group (G rows) and repeated per particle here.  Resampling only moves
particles within a group, and every per-particle tensor (latent, conditioning, last potential, ...) is
re-indexed with the same ancestor indices.

SMC (Feynman–Kac steering, Singhal et al. 2025; twisted particle filtering): the intermediate targets are
γ_t(x_t) ∝ p(x_{T:t}) · G_t(x_t) for a log-potential log G_t, so with a proposal q (the sampler, guided or not)
the incremental log-weight of a move x_t -> x_{t-1} is

    log w += log G_{t-1}(x_{t-1}) − log G_t(x_t) + log p(x_{t-1} | x_t) − log q(x_{t-1} | x_t)

and at the end log G is replaced by λ·r(x0): the final weighted particles target p*(x0) ∝ p(x0)·exp(λ·r(x0)),
the reward-tilted distribution with temperature α = 1/λ, **whatever the potential**; the potential decides how
many particles survive.  The optimal one is the soft value log E[exp(λ·r(x0)) | x_t] (then every incremental
weight of the exact sampler is 1); λ·E[r | x_t] is its first-order approximation, good for small λ·spread(r)
and poor for sharp rewards at large λ.  The weights, ESS, resampling and final choice are
:mod:`steering.particles`' (one engine for every path).  p and q are the Gaussians of the unguided and the
guided step (same σ, shifted mean), so the correction is exact and costs no extra network call; with
``guidance_max_kl`` the shift is capped per step so the correction cannot collapse the weights near t = 0.
Resampling is ESS-adaptive (resample a group when ESS < κ·N), allowed every ``resample_every`` steps and/or
inside a window of the trajectory.

Cost accounting (:class:`SteerCost`): rows through the backbone (one row = one sample at one step; a CFG
denoiser doing two rows per call counts as ``backbone_rows_per_call=2``), critic forwards and backwards
(rows), reward rows and decodes, wall time.  Compare methods at equal ``equivalent_nfe``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from critic_align.steps import gaussian_log_prob

from .particles import OUTPUTS, RESAMPLING_SCHEMES, ParticleSystem, check_log_potential, check_steering_numbers, choose
from .values import ValueFn, capped_guided_output, critic_value_fn, guidance_defined, value_and_grad

RewardFn = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]
POTENTIALS = ("value", "soft_value", "x0_reward")

__all__ = ["SteerCost", "SteerResult", "steer", "best_of_n", "guidance", "smc", "critic_value_fn", "POTENTIALS"]


@dataclass
class SteerCost:
    """What a steering run spent (rows = samples × calls).

    reward_price: what one reward row (a decode + a reward call) costs in backbone rows, for ``equivalent_nfe``.
        The default 1.0 says "a reward call costs one denoiser call"; set it to the measured ratio for your
        decoder and reward model (a VAE decode + CLIP can cost several UNet calls; the digits classifier far
        less than one).
    """

    backbone_rows: int = 0
    critic_forward_rows: int = 0
    critic_backward_rows: int = 0
    reward_rows: int = 0
    decode_rows: int = 0
    wall_time_s: float = 0.0
    num_outputs: int = 0
    reward_price: float = 1.0

    def _per_output(self, rows: float) -> float:
        return rows / max(self.num_outputs, 1)

    @property
    def nfe(self) -> float:
        """Backbone rows per output sample (the usual NFE)."""
        return self._per_output(self.backbone_rows)

    @property
    def equivalent_nfe(self) -> float:
        """(backbone + critic forward + 2 × critic backward + reward_price × reward rows) per output sample: a
        critic forward costs one backbone call (a LoRA critic runs the same backbone), a backward about two."""
        total = (self.backbone_rows + self.critic_forward_rows + 2 * self.critic_backward_rows
                 + self.reward_price * self.reward_rows)
        return self._per_output(total)

    def to_dict(self) -> dict:
        per = {f"{k}_per_output": self._per_output(getattr(self, k)) for k in
               ("critic_forward_rows", "critic_backward_rows", "reward_rows", "decode_rows")}
        return {**asdict(self), **per, "nfe": self.nfe, "equivalent_nfe": self.equivalent_nfe}


@dataclass
class SteerResult:
    """Output of a steering run with G groups (prompts) of N particles.

    samples:        (G, ...) the chosen final latent per group
    decoded:        (G, ...) its decoded sample (what the reward saw)
    rewards:        (G,) its reward
    particles:      (G·N, ...) every final particle (groups contiguous)
    particle_rewards: (G·N,)
    log_weights:    (G, N) final log-weights (the weighted particles target p·exp(λ r)); zeros without SMC
    ess:            (T + 1, G) ESS before each step's resampling decision (NaN where not evaluated) and, in the
                    last row, after the final reweighting by exp(λ r): the effective number of particles the
                    output is drawn from (``final_ess``)
    resampled:      (T, G) bool, whether the group was resampled at that step
    guidance_factor: (T,) mean factor the guided mean shift was scaled by (1 = uncapped; NaN where no guidance)
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
    guidance_factor: torch.Tensor
    cost: SteerCost = field(default_factory=SteerCost)

    @property
    def final_ess(self) -> torch.Tensor:
        """(G,) ESS of the final weights (NaN without SMC)."""
        return self.ess[-1]


def _timestep_batch(t, n: int, device) -> torch.Tensor:
    return torch.as_tensor(t, device=device).expand(n)


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
    guidance_max_kl: float | None = None,
    potential: str | None = None,
    lam: float = 1.0,
    ess_threshold: float = 0.5,
    resample_every: int = 1,
    resample_window: tuple[float, float] = (0.0, 1.0),
    scheme: str = "systematic",
    output: str | None = None,
    prev_timesteps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    backbone_rows_per_call: int = 1,
    reward_price: float = 1.0,
    progress: bool = False,
) -> SteerResult:
    """The one engine behind :func:`best_of_n`, :func:`guidance`, :func:`smc` and guidance + best-of-N.

    potential: None (no weights: best-of-N / guidance), or SMC with the log-potential
        "value":      λ·value_fn(x_t)  (value_fn ≈ E[r | x_t], e.g. the critic; a critic trained with
                      ``critic_x0_reward`` also gets r̂_0 of the step's x0 prediction: a decode + reward call more),
        "soft_value": value_fn(x_t) itself, which must be log E[exp(λ·r) | x_t] at this λ (build it with
                      :mod:`steering.potentials`; one carrying a ``lam`` attribute is checked against ``lam``),
        "x0_reward":  λ·r(decode(x̂0(x_t)))  (FK steering's potential: a decode + reward call per evaluation).
    guidance_scale: w in score += w·∇value_fn (0: no guidance).  With SMC, the guided step is the proposal and
        its density ratio to the model's step is in the weights.
    guidance_max_kl: cap, in nats per particle and step, on KL(guided step ‖ model step) (see
        :func:`steering.values.capped_guided_output`); None: uncapped.  :func:`smc` defaults it to 1.0.
    output: "sample" (one particle per group drawn ∝ its final weight: a draw from the SMC approximation of
        p·exp(λ r), the target) or "argmax" (the particle with the highest final reward: best-of-N's choice,
        which maximises the reward rather than sampling the target).  None: "sample" for SMC, "argmax" otherwise.
    reward_price: backbone-call price of one reward row in ``cost.equivalent_nfe`` (see :class:`SteerCost`).
    """
    t0 = time.perf_counter()
    if potential not in (None, *POTENTIALS):
        raise ValueError(f"potential must be None or one of {POTENTIALS}, got {potential!r}")
    if output is None:
        output = "argmax" if potential is None else "sample"
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if scheme not in RESAMPLING_SCHEMES:
        raise ValueError(f"unknown resampling scheme {scheme!r}; use one of {RESAMPLING_SCHEMES}")
    check_steering_numbers(num_particles, guidance_scale, lam, where="steer")
    if not 0.0 <= ess_threshold <= 1.0:
        raise ValueError(f"ess_threshold κ must be in [0, 1] (resample when ESS < κ·N), got {ess_threshold}")
    if not isinstance(resample_every, int) or resample_every < 1:
        raise ValueError(f"resample_every must be a positive int, got {resample_every!r}")
    lo, hi = resample_window
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"resample_window must be (start, end) fractions with 0 <= start <= end <= 1, got {resample_window}")
    if (guidance_scale != 0 or potential in ("value", "soft_value")) and value_fn is None:
        raise ValueError("guidance and value / soft_value potentials need a value_fn (e.g. critic_value_fn(critic))")
    if getattr(value_fn, "needs_x0_reward", False) and (guidance_scale != 0 or potential != "value"):
        raise ValueError("this value_fn's critic reads r(decode(x0_pred)) (critic_x0_reward): steer can use it only "
                         "as an SMC potential (potential='value', guidance_scale=0); for guidance use a critic trained "
                         "with critic_x0_reward: false")
    if potential == "soft_value" and getattr(value_fn, "lam", lam) != lam:
        raise ValueError(f"the soft value was built for λ={value_fn.lam}, but SMC runs with lam={lam}: build it with "
                         "the same λ (the potential must be log E[exp(λ·r) | x_t] of the target's λ)")
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
    device = x_T.device
    # SMC's weights; best-of-N and plain guidance have none (κ = 0: nothing is ever resampled)
    particles = ParticleSystem(g, n, ess_threshold if potential is not None else 0.0, scheme, generator, device)
    prompts_p = [p for p in (prompts if prompts is not None else [""] * g) for _ in range(n)]
    cond_p = _repeat(cond, n)
    if prev_timesteps is None:
        prev_timesteps = step.schedule.prev_timesteps(timesteps)
    num_steps = len(timesteps)
    cost = SteerCost(num_outputs=g, reward_price=reward_price)

    # steps at which resampling may happen: every k-th step inside the window (step 0 allowed: x_T's
    # potential already separates particles)
    allowed = [(k % resample_every == 0) and (lo * num_steps <= k < hi * num_steps) for k in range(num_steps)]

    def rewards_of_x0(fn, x, t, out, t_prev):
        """fn(decode(x̂0), prompts) of the step's x0 prediction at x (scoring x itself as a dummy transition: no
        noise is drawn), counted as one decode + reward row per particle."""
        with torch.no_grad():
            x0 = step(out, x, t, t_prev, prev_sample=x).x0_pred
            r = fn(decode(x0.to(x.dtype)), prompts_p).to(device).float()
        cost.decode_rows += total
        cost.reward_rows += total
        return r

    def log_potential(x, t, out, t_prev, v_guidance):
        """(G·N,) log G_t(x_t) of the chosen potential (reusing the guidance forward when there is one)."""
        if potential == "x0_reward":
            return lam * check_log_potential(rewards_of_x0(reward_fn, x, t, out, t_prev), total, "reward_fn").double()
        v = v_guidance
        if v is None:
            # a critic trained with critic_x0_reward also reads r̂_0, the (G·N, K) rewards of the step's x0 prediction
            extra = ((rewards_of_x0(value_fn.x0_rewards, x, t, out, t_prev),)
                     if getattr(value_fn, "needs_x0_reward", False) else ())
            with torch.no_grad():
                v = check_log_potential(value_fn(x, t, cond_p, *extra), total, "value_fn")
            cost.critic_forward_rows += total
        return v.double() if potential == "soft_value" else lam * v.double()

    x = x_T
    ess_hist = torch.full((num_steps + 1, g), float("nan"))
    resampled_hist = torch.zeros(num_steps, g, dtype=torch.bool)
    factor_hist = torch.full((num_steps,), float("nan"))
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
        grad = v = None
        if guidance_scale != 0 and guidance_defined(step, t):
            v, grad = value_and_grad(value_fn, x, t, cond_p, cost)
        if potential is not None and allowed[k]:
            particles.twist(log_potential(x, t, out, t_prev, v))
            idx = particles.maybe_resample()
            ess_hist[k] = particles.ess_history[-1]
            resampled_hist[k] = particles.resampled_history[-1]
            if idx is not None:
                x, out = x[idx], out[idx]
                cond_p = None if cond_p is None else cond_p[idx]
                prompts_p = [prompts_p[i] for i in idx.tolist()]
                if grad is not None:
                    grad = grad[idx]
        with torch.no_grad():
            if grad is not None:
                out_q = step.apply_score_guidance(out, x, t, guidance_scale * grad)
                out_q, factor = capped_guided_output(step, out, x, t, t_prev, out_q, guidance_max_kl)
                factor_hist[k] = float(factor.float().mean())
                s_q = step(out_q, x, t, t_prev, generator=generator)
                if potential is not None:
                    # exact correction for the guided proposal: log p(x'|x) − log q(x'|x), same σ
                    s_p = step(out, x, t, t_prev, prev_sample=s_q.prev_sample)
                    particles.reweight(gaussian_log_prob(s_q.prev_sample, s_p.mean, s_p.std, "sum")
                                       - gaussian_log_prob(s_q.prev_sample, s_q.mean, s_q.std, "sum"))
                x = s_q.prev_sample
            else:
                x = step(out, x, t, t_prev, generator=generator).prev_sample

    with torch.no_grad():
        decoded = decode(x)
        rewards = check_log_potential(reward_fn(decoded, prompts_p).to(device).float(), total, "reward_fn")
    cost.decode_rows += total
    cost.reward_rows += total
    if potential is not None:
        ess_hist[num_steps] = particles.finish(lam * rewards.double()).cpu()
        pick = particles.choose(rewards, output)
    else:
        pick = choose(rewards, n, output)
    cost.wall_time_s = time.perf_counter() - t0
    return SteerResult(
        samples=x[pick], decoded=decoded[pick], rewards=rewards[pick], particles=x, particle_rewards=rewards,
        log_weights=particles.log_w, ess=ess_hist, resampled=resampled_hist, guidance_factor=factor_hist, cost=cost,
    )


def best_of_n(denoiser, step, x_T, timesteps, cond=None, prompts=None, *, num_particles: int, reward_fn: RewardFn,
              decode=lambda x: x, **kw) -> SteerResult:
    """N independent samples per prompt; keep the one with the highest reward (−inf: a violated hard constraint)."""
    return steer(denoiser, step, x_T, timesteps, cond, prompts, num_particles=num_particles, reward_fn=reward_fn,
                 decode=decode, **kw)


def guidance(denoiser, step, x_T, timesteps, cond=None, prompts=None, *, value_fn: ValueFn, scale: float,
             reward_fn: RewardFn, decode=lambda x: x, num_particles: int = 1, **kw) -> SteerResult:
    """Critic gradient guidance (one sample per prompt; with num_particles > 1 it is guidance + best-of-N)."""
    return steer(denoiser, step, x_T, timesteps, cond, prompts, num_particles=num_particles, reward_fn=reward_fn,
                 decode=decode, value_fn=value_fn, guidance_scale=scale, **kw)


def smc(denoiser, step, x_T, timesteps, cond=None, prompts=None, *, num_particles: int, reward_fn: RewardFn,
        value_fn: ValueFn | None = None, lam: float = 1.0, potential: str = "value", decode=lambda x: x,
        output: str = "sample", guidance_max_kl: float | None = 1.0, **kw) -> SteerResult:
    """Feynman–Kac SMC targeting p·exp(λ·r) (see the module doc for the weights and :func:`steer` for the options).

    By default it returns a *sample* of the target: one particle per group drawn ∝ its final weight.
    ``output="argmax"`` returns the highest-reward particle instead (best-of-N's choice: it maximises the reward
    and overshoots the target).  With guidance (``guidance_scale``), each step's guided shift is capped at
    ``guidance_max_kl`` nats (1.0; None: uncapped) so the proposal correction does not collapse the weights."""
    return steer(denoiser, step, x_T, timesteps, cond, prompts, num_particles=num_particles, reward_fn=reward_fn,
                 decode=decode, value_fn=value_fn, potential=potential, lam=lam, output=output,
                 guidance_max_kl=guidance_max_kl, **kw)
