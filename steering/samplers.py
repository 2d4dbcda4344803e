"""Test-time steering with a value function: best-of-N, gradient guidance, guidance + best-of-N, SMC, and FK steering.

The methods are the rows of :data:`METHODS` (name → function + one-line summary), the one list of their names:
:func:`steer` dispatches on it, ``critic-align steer --method`` offers its keys, and an unknown name is refused
with them.  Each method is a plain function taking only what it uses:

    base(...)                plain sampling, one sample per prompt (the reference for the others)
    best_of_n(...)           N samples per prompt, keep the highest reward
    guidance(...)            critic gradient guidance, one sample per prompt
    guidance_best_of_n(...)  guidance on N samples per prompt, keep the highest reward
    smc(...)                 Feynman–Kac SMC with the critic's value (or soft value) as potential, optionally guided
    smc_x0(...)              FK steering: SMC with the potential λ·r(decode(x̂0)) (a decode + reward call per step)

all with the positional arguments ``(denoiser, step, x_T, timesteps, cond=None, prompts=None)`` and the keywords
``reward_fn``, ``generator`` and ``options`` (:class:`SteerOptions`: decode, cost accounting, progress); the SMC
methods also take a :class:`Resampling` policy.  Every one returns a :class:`SteerResult`, as does
:func:`steering.diffusers.steer_pipeline`.

Every method is a plain function of a denoiser callable ``denoiser(x_t, t (B,), cond) -> model output`` (always
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
Resampling is ESS-adaptive (resample a group when ESS < κ·N), allowed every ``Resampling.every`` steps and/or
inside a window of the trajectory (:class:`Resampling`).

Cost accounting (:class:`SteerCost`): rows through the backbone (one row = one sample at one step; a CFG
denoiser doing two rows per call counts as ``SteerOptions(backbone_rows_per_call=2)``), critic forwards and backwards
(rows), reward rows and decodes, wall time.  Compare methods at equal ``equivalent_nfe``.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

import torch

from critic_align.steps import gaussian_log_prob
from critic_align.x0_reward import needs_x0_reward, refuse_unless_smc_value

from .particles import OUTPUTS, RESAMPLING_SCHEMES, ParticleSystem, check_log_potential, check_steering_numbers, choose
from .values import ValueFn, capped_guided_output, critic_value_fn, guidance_defined, value_and_grad

RewardFn = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]
# the log-potentials of :func:`smc`; :func:`smc_x0` is SMC with the third one, λ·r(decode(x̂0))
POTENTIALS = ("value", "soft_value")

__all__ = ["METHODS", "Method", "POTENTIALS", "Resampling", "SteerCost", "SteerOptions", "SteerResult", "base",
           "best_of_n", "critic_value_fn", "guidance", "guidance_best_of_n", "method_named", "smc", "smc_x0", "steer"]
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


@dataclass(frozen=True)
class SteerResult:
    """Output of a steering run with G groups (prompts) of N particles.

    samples:        (G, ...) the chosen final latent per group; from :func:`steering.diffusers.steer_pipeline`,
                    the chosen images (G, C, H, W) in [0, 1] as the pipeline returns them (``output_type="pt"``)
    decoded:        (G, ...) its decoded sample (what the reward saw; a pipeline's images mapped to [-1, 1])
    rewards:        (G,) its reward
    particles:      (G·N, ...) every final particle (groups contiguous; a pipeline's: every image in [0, 1])
    particle_rewards: (G·N,)
    log_weights:    (G, N) final log-weights (the weighted particles target p·exp(λ r)); zeros without SMC
    ess:            (T + 1, G) ESS before each step's resampling decision (NaN where not evaluated) and, in the
                    last row, after the final reweighting by exp(λ r): the effective number of particles the
                    output is drawn from (``final_ess``).  Row k belongs to the state step k starts from, so a
                    pipeline's row 0 (x_T, which its callback never sees) is NaN.
    resampled:      (T, G) bool, whether the group was resampled at that step
    guidance_factor: (T,) mean factor the guided mean shift was scaled by (1 = uncapped; NaN where no guidance)
    chosen:         (G,) the row of ``particles`` each group's output is (``samples == particles[chosen]``)
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
    chosen: torch.Tensor
    cost: SteerCost = field(default_factory=SteerCost)

    @property
    def final_ess(self) -> torch.Tensor:
        """(G,) ESS of the final weights (NaN without SMC)."""
        return self.ess[-1]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class SteerOptions:
    """What every method shares besides its own arguments: how final latents become samples, how the run is
    counted, and whether it shows progress.

    decode:          latents -> what ``reward_fn`` sees (default: the latents themselves)
    prev_timesteps:  (T,) the timestep each step moves to (default: ``step.schedule.prev_timesteps(timesteps)``)
    backbone_rows_per_call: rows the denoiser runs per sample and call, for the cost (2 for a CFG denoiser that
                     runs the conditional and unconditional branches in one batch)
    reward_price:    what one reward row costs in backbone rows, in ``cost.equivalent_nfe`` (see :class:`SteerCost`)
    progress:        a tqdm bar over the steps
    """

    decode: Callable[[torch.Tensor], torch.Tensor] = _identity
    prev_timesteps: torch.Tensor | None = None
    backbone_rows_per_call: int = 1
    reward_price: float = 1.0
    progress: bool = False

    def __post_init__(self):
        if not callable(self.decode):
            raise TypeError(f"SteerOptions.decode must be a callable latents -> samples, got {type(self.decode).__name__}")
        if isinstance(self.backbone_rows_per_call, bool) or not isinstance(self.backbone_rows_per_call, int) \
                or self.backbone_rows_per_call < 1:
            raise ValueError(f"SteerOptions.backbone_rows_per_call must be an int >= 1 (2 for a CFG denoiser), got "
                             f"{self.backbone_rows_per_call!r}")
        if isinstance(self.reward_price, bool) or not isinstance(self.reward_price, (int, float)) \
                or not math.isfinite(self.reward_price) or self.reward_price < 0:
            raise ValueError(f"SteerOptions.reward_price must be a finite number >= 0 (backbone rows per reward row), "
                             f"got {self.reward_price!r}")


@dataclass(frozen=True)
class Resampling:
    """When and how SMC resamples: a group whose ESS < ``ess_threshold``·N (κ·N) is resampled with ``scheme``, at
    steps k with k % ``every`` == 0 inside ``window`` (start, end), fractions of the trajectory (step k is inside
    when start·T <= k < end·T).  κ = 0 never resamples (plain sequential importance sampling)."""

    ess_threshold: float = 0.5
    every: int = 1
    window: tuple[float, float] = (0.0, 1.0)
    scheme: str = "systematic"

    def __post_init__(self):
        if not 0.0 <= self.ess_threshold <= 1.0:
            raise ValueError(f"ess_threshold κ must be in [0, 1] (resample when ESS < κ·N), got {self.ess_threshold}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"Resampling.every (resample only every k-th step) must be a positive int, got "
                             f"{self.every!r}")
        lo, hi = self.window
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"Resampling.window must be (start, end) fractions with 0 <= start <= end <= 1, got "
                             f"{self.window}")
        if self.scheme not in RESAMPLING_SCHEMES:
            raise ValueError(f"unknown resampling scheme {self.scheme!r}; use one of {RESAMPLING_SCHEMES}")

    def allowed(self, num_steps: int) -> list[bool]:
        """Per step: whether SMC evaluates its potential and may resample there (step 0 included: x_T's potential
        already separates particles)."""
        lo, hi = self.window
        return [(k % self.every == 0) and (lo * num_steps <= k < hi * num_steps) for k in range(num_steps)]


@dataclass(frozen=True)
class _Guidance:
    """Gradient guidance of the step: score += scale·∇value_fn, the shift capped at max_kl nats (None: uncapped)."""

    value_fn: ValueFn
    scale: float
    max_kl: float | None


@dataclass(frozen=True)
class _Twist:
    """SMC's log-potential ("value": λ·value_fn, "soft_value": value_fn, "x0_reward": λ·r(decode(x̂0))), its λ,
    the resampling policy and the final choice."""

    potential: str
    lam: float
    value_fn: ValueFn | None
    resampling: Resampling
    output: str


_DEFAULT_OPTIONS = SteerOptions()
_DEFAULT_RESAMPLING = Resampling()


def _guidance(value_fn: ValueFn, scale: float, max_kl: float | None) -> _Guidance | None:
    """The guidance, or None at scale 0 (no gradient is taken: w = 0 is the unguided sampler)."""
    return None if scale == 0 else _Guidance(value_fn, scale, max_kl)


# -------------------------------------------------------------------------------------------------------------
# the methods: each takes only what it uses and hands the engine a guidance and / or a twist
def base(denoiser, step, x_T: torch.Tensor, timesteps: torch.Tensor, cond=None, prompts: Sequence[str] | None = None,
         *, reward_fn: RewardFn, generator: torch.Generator | None = None,
         options: SteerOptions = _DEFAULT_OPTIONS) -> SteerResult:
    """Plain sampling: one sample per prompt (x_T has one row per prompt), scored by ``reward_fn``."""
    return _run(denoiser, step, x_T, timesteps, cond, prompts, where="base", num_particles=1, reward_fn=reward_fn,
                generator=generator, options=options)


def best_of_n(denoiser, step, x_T: torch.Tensor, timesteps: torch.Tensor, cond=None,
              prompts: Sequence[str] | None = None, *, num_particles: int, reward_fn: RewardFn,
              generator: torch.Generator | None = None, options: SteerOptions = _DEFAULT_OPTIONS) -> SteerResult:
    """N independent samples per prompt; keep the one with the highest reward (−inf: a violated hard constraint)."""
    return _run(denoiser, step, x_T, timesteps, cond, prompts, where="best_of_n", num_particles=num_particles,
                reward_fn=reward_fn, generator=generator, options=options)


def guidance(denoiser, step, x_T: torch.Tensor, timesteps: torch.Tensor, cond=None,
             prompts: Sequence[str] | None = None, *, value_fn: ValueFn, scale: float, reward_fn: RewardFn,
             max_kl: float | None = None, generator: torch.Generator | None = None,
             options: SteerOptions = _DEFAULT_OPTIONS) -> SteerResult:
    """Critic gradient guidance, one sample per prompt: score += ``scale``·∇value_fn at every step where guidance
    is defined.  ``max_kl``: cap, in nats per sample and step, on KL(guided step ‖ model step) (see
    :func:`steering.values.capped_guided_output`); None: uncapped."""
    return _run(denoiser, step, x_T, timesteps, cond, prompts, where="guidance", num_particles=1, reward_fn=reward_fn,
                generator=generator, options=options, scale=scale, guide=_guidance(value_fn, scale, max_kl))


def guidance_best_of_n(denoiser, step, x_T: torch.Tensor, timesteps: torch.Tensor, cond=None,
                       prompts: Sequence[str] | None = None, *, num_particles: int, value_fn: ValueFn, scale: float,
                       reward_fn: RewardFn, max_kl: float | None = None, generator: torch.Generator | None = None,
                       options: SteerOptions = _DEFAULT_OPTIONS) -> SteerResult:
    """:func:`guidance` on N samples per prompt; keep the one with the highest reward."""
    return _run(denoiser, step, x_T, timesteps, cond, prompts, where="guidance_best_of_n", num_particles=num_particles,
                reward_fn=reward_fn, generator=generator, options=options, scale=scale,
                guide=_guidance(value_fn, scale, max_kl))


def smc(denoiser, step, x_T: torch.Tensor, timesteps: torch.Tensor, cond=None, prompts: Sequence[str] | None = None,
        *, num_particles: int, reward_fn: RewardFn, value_fn: ValueFn, lam: float = 1.0, potential: str = "value",
        output: str = "sample", guidance_scale: float = 0.0, guidance_max_kl: float | None = 1.0,
        resampling: Resampling = _DEFAULT_RESAMPLING, generator: torch.Generator | None = None,
        options: SteerOptions = _DEFAULT_OPTIONS) -> SteerResult:
    """Feynman–Kac SMC targeting p·exp(λ·r) (the module doc has the weights).

    potential: "value"      λ·value_fn(x_t) (value_fn ≈ E[r | x_t], e.g. the critic; a critic trained with
                            ``critic_x0_reward`` also gets r̂_0 of the step's x0 prediction: a decode + reward call
                            more per particle and step),
               "soft_value" value_fn(x_t) itself, which must be log E[exp(λ·r) | x_t] at this λ (build it with
                            :mod:`steering.potentials`; one carrying a ``lam`` attribute is checked against ``lam``).
    output: "sample" (one particle per group drawn ∝ its final weight: a draw from the SMC approximation of
        p·exp(λ r), the target) or "argmax" (the particle with the highest final reward: best-of-N's choice, which
        maximises the reward and overshoots the target).
    guidance_scale: w > 0 guides the proposal (score += w·∇value_fn); its density ratio to the model's step is in
        the weights, and each step's shift is capped at ``guidance_max_kl`` nats (None: uncapped) so that the
        correction cannot collapse the weights at the last, low-noise steps.
    """
    if potential not in POTENTIALS:
        raise ValueError(f"smc: potential must be one of {POTENTIALS}, got {potential!r} (SMC with λ·r(decode(x̂0)) "
                         "is its own method, smc_x0)")
    return _run(denoiser, step, x_T, timesteps, cond, prompts, where="smc", num_particles=num_particles,
                reward_fn=reward_fn, generator=generator, options=options, scale=guidance_scale,
                guide=_guidance(value_fn, guidance_scale, guidance_max_kl),
                twist=_Twist(potential, lam, value_fn, resampling, output))


def smc_x0(denoiser, step, x_T: torch.Tensor, timesteps: torch.Tensor, cond=None,
           prompts: Sequence[str] | None = None, *, num_particles: int, reward_fn: RewardFn, lam: float = 1.0,
           output: str = "sample", resampling: Resampling = _DEFAULT_RESAMPLING,
           generator: torch.Generator | None = None, options: SteerOptions = _DEFAULT_OPTIONS) -> SteerResult:
    """FK steering (Singhal et al. 2025): SMC targeting p·exp(λ·r) with the log-potential λ·r(decode(x̂0(x_t))), the
    reward of the step's own x0 prediction — no critic, a decode + reward call per particle at every step where
    ``resampling`` allows it.  ``output`` as in :func:`smc`."""
    return _run(denoiser, step, x_T, timesteps, cond, prompts, where="smc_x0", num_particles=num_particles,
                reward_fn=reward_fn, generator=generator, options=options,
                twist=_Twist("x0_reward", lam, None, resampling, output))


@dataclass(frozen=True)
class Method:
    """One steering method: the function that runs it and a one-line summary (the CLI's help quotes it)."""

    fn: Callable[..., SteerResult]
    summary: str

    @property
    def parameters(self) -> frozenset[str]:
        """The keyword arguments it takes (after ``denoiser, step, x_T, timesteps, cond, prompts``)."""
        return frozenset(name for name, p in inspect.signature(self.fn).parameters.items()
                         if p.kind is inspect.Parameter.KEYWORD_ONLY)


# the one list of method names: steer() dispatches on it, `critic-align steer --method` offers its keys
METHODS: Mapping[str, Method] = MappingProxyType({
    "base": Method(base, "plain sampling, one sample per prompt"),
    "bon": Method(best_of_n, "best-of-N: N samples per prompt, keep the highest reward"),
    "guidance": Method(guidance, "critic gradient guidance, score += w·∇V, one sample per prompt"),
    "guidance+bon": Method(guidance_best_of_n, "gradient guidance on N samples per prompt, keep the highest reward"),
    "smc": Method(smc, "SMC toward p·exp(λ r) with the critic's value as potential, optionally guided"),
    "smc_x0": Method(smc_x0, "FK steering: SMC with potential λ·r(decode(x̂0)), a decode + reward call per step"),
})


def method_named(name: str) -> Method:
    """The :data:`METHODS` entry called ``name``; an unknown name is refused with the choices."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown steering method {name!r}; choose one of {', '.join(METHODS)}") from None


def steer(method: str, denoiser, step, x_T: torch.Tensor, timesteps: torch.Tensor, cond=None,
          prompts: Sequence[str] | None = None, **kwargs) -> SteerResult:
    """Run the method named ``method`` (a key of :data:`METHODS`): ``METHODS[method].fn(denoiser, step, x_T,
    timesteps, cond, prompts, **kwargs)``, where ``kwargs`` are that function's keyword arguments."""
    spec = method_named(method)
    unknown = sorted(set(kwargs) - spec.parameters)
    if unknown:
        raise TypeError(f"steering method {method!r} ({spec.fn.__name__}) takes no argument(s) {unknown}; it takes "
                        f"{sorted(spec.parameters)}")
    return spec.fn(denoiser, step, x_T, timesteps, cond, prompts, **kwargs)


# -------------------------------------------------------------------------------------------------------------
# the engine behind every method
def _timestep_batch(t, n: int, device) -> torch.Tensor:
    return torch.as_tensor(t, device=device).expand(n)


def _repeat(cond, n: int):
    if cond is None or n == 1:
        return cond
    if hasattr(cond, "repeat_interleave"):  # a tensor or critic_align.cond.TextCond
        return cond.repeat_interleave(n, dim=0)
    raise TypeError(f"conditioning of type {type(cond).__name__} cannot be repeated per particle")


def _check(where: str, step, num_particles: int, scale: float | None, guide: _Guidance | None,
           twist: _Twist | None) -> None:
    """The arguments' checks, before any network call (each names the method it refuses)."""
    check_steering_numbers(num_particles, scale, None if twist is None else twist.lam, where=where)
    if twist is not None and twist.output not in OUTPUTS:
        raise ValueError(f"{where}: output must be one of {OUTPUTS}, got {twist.output!r}")
    value_fns = []  # the value functions this run calls
    if guide is not None:
        value_fns.append(guide.value_fn)
    if twist is not None and twist.potential in POTENTIALS:
        value_fns.append(twist.value_fn)
    if any(fn is None for fn in value_fns):
        raise ValueError(f"{where}: guidance and value / soft_value potentials need a value_fn (e.g. "
                         "critic_value_fn(critic))")
    refuse_unless_smc_value(value_fns, where, guide is not None, None if twist is None else twist.potential)
    if twist is not None and twist.potential == "soft_value" and getattr(twist.value_fn, "lam", twist.lam) != twist.lam:
        raise ValueError(f"{where}: the soft value was built for λ={twist.value_fn.lam}, but SMC runs with "
                         f"lam={twist.lam}: build it with the same λ (the potential must be log E[exp(λ·r) | x_t] of "
                         "the target's λ)")
    if twist is not None:
        # SMC weights are density ratios of stochastic transitions: an ODE step has none
        step.require_stochastic("SMC (its weights use transition densities)")


def _run(denoiser, step, x_T: torch.Tensor, timesteps: torch.Tensor, cond, prompts: Sequence[str] | None, *,
         where: str, num_particles: int, reward_fn: RewardFn, generator: torch.Generator | None,
         options: SteerOptions, scale: float | None = None, guide: _Guidance | None = None,
         twist: _Twist | None = None) -> SteerResult:
    """Sample G groups of N particles with the step, guided by ``guide`` and weighted / resampled by ``twist``
    (None: neither), and choose one particle per group.  ``scale``: the method's guidance scale, checked even
    where it is 0 (no guide)."""
    t0 = time.perf_counter()
    _check(where, step, num_particles, scale, guide, twist)
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
    decode = options.decode
    # SMC's weights; best-of-N and plain guidance have none (κ = 0: nothing is ever resampled)
    rs = twist.resampling if twist is not None else None
    particles = ParticleSystem(g, n, rs.ess_threshold if rs else 0.0, rs.scheme if rs else "systematic", generator,
                               device)
    prompts_p = [p for p in (prompts if prompts is not None else [""] * g) for _ in range(n)]
    cond_p = _repeat(cond, n)
    prev_timesteps = options.prev_timesteps
    if prev_timesteps is None:
        prev_timesteps = step.schedule.prev_timesteps(timesteps)
    num_steps = len(timesteps)
    cost = SteerCost(num_outputs=g, reward_price=options.reward_price)
    allowed = rs.allowed(num_steps) if rs else [False] * num_steps
    lam = twist.lam if twist is not None else 1.0
    # the guidance forward's value is the potential's when both use the same function (smc's guided proposal)
    shares_value = guide is not None and twist is not None and guide.value_fn is twist.value_fn

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
        """(G·N,) log G_t(x_t) of the twist's potential (reusing the guidance forward when there is one)."""
        if twist.potential == "x0_reward":
            return lam * check_log_potential(rewards_of_x0(reward_fn, x, t, out, t_prev), total, "reward_fn").double()
        value_fn = twist.value_fn
        v = v_guidance if shares_value else None
        if v is None:
            # a critic trained with critic_x0_reward also reads r̂_0, the (G·N, K) rewards of the step's x0 prediction
            extra = ((rewards_of_x0(value_fn.x0_rewards, x, t, out, t_prev),) if needs_x0_reward(value_fn) else ())
            with torch.no_grad():
                v = check_log_potential(value_fn(x, t, cond_p, *extra), total, "value_fn")
            cost.critic_forward_rows += total
        return v.double() if twist.potential == "soft_value" else lam * v.double()

    x = x_T
    ess_hist = torch.full((num_steps + 1, g), float("nan"))
    resampled_hist = torch.zeros(num_steps, g, dtype=torch.bool)
    factor_hist = torch.full((num_steps,), float("nan"))
    iterator = range(num_steps)
    if options.progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc=f"steering ({where})", leave=False)
    for k in iterator:
        t = _timestep_batch(timesteps[k], total, device)
        t_prev = _timestep_batch(prev_timesteps[k], total, device)
        with torch.no_grad():
            out = denoiser(x, t, cond_p)
        cost.backbone_rows += total * options.backbone_rows_per_call
        grad = v = None
        if guide is not None and guidance_defined(step, t):
            v, grad = value_and_grad(guide.value_fn, x, t, cond_p, cost)
        if twist is not None and allowed[k]:
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
                out_q = step.apply_score_guidance(out, x, t, guide.scale * grad)
                out_q, factor = capped_guided_output(step, out, x, t, t_prev, out_q, guide.max_kl)
                factor_hist[k] = float(factor.float().mean())
                s_q = step(out_q, x, t, t_prev, generator=generator)
                if twist is not None:
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
    if twist is not None:
        ess_hist[num_steps] = particles.finish(lam * rewards.double()).cpu()
        pick = particles.choose(rewards, twist.output)
    else:
        pick = choose(rewards, n, "argmax")
    cost.wall_time_s = time.perf_counter() - t0
    return SteerResult(
        samples=x[pick], decoded=decoded[pick], rewards=rewards[pick], particles=x, particle_rewards=rewards,
        log_weights=particles.log_w, ess=ess_hist, resampled=resampled_hist, guidance_factor=factor_hist,
        chosen=pick, cost=cost,
    )
