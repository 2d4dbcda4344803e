"""Stateless stochastic denoising steps that both sample and score a transition.

The denoising MDP: state s_t = (x_t, t, c), action a_t = x_{t-1} ~ p_θ(x_{t-1} | x_t, c), a Gaussian
N(μ_θ(x_t, t), σ_t² I).  One function call either *samples* x_{t-1} (``prev_sample=None``) or *scores*
a stored one, and always returns the Gaussian's mean, std, the x0 prediction and the log-probability.

Everything is built from a diffusers scheduler's *config* (``alphas_cumprod`` from the betas,
``prediction_type``, clipping, timestep spacing; the timestep grid read from diffusers' own ``set_timesteps``
on a fresh scheduler, once per step count) and never touches the scheduler's hidden step counter,
so a step can be evaluated for any batch of (x_t, t, t_prev) triples in any order — e.g. a PPO
minibatch that mixes timesteps.

Two families: :class:`DDIMStep` over a VP :class:`NoiseSchedule` (ε / v / x0 prediction), and
:class:`FlowMatchSDEStep` over a :class:`FlowMatchSchedule` (rectified flow, velocity prediction, the SDE
of Flow-GRPO).  :func:`make_step` picks one from a scheduler's config.  Both have the same call contract.

Log-probabilities
-----------------
``log_prob`` is the exact log-density of the diagonal Gaussian, **summed** over all non-batch
dimensions by default (``reduction="sum"``): this is what importance weights (SMC), KL terms and
density ratios need.  ``reduction="mean"`` divides by the number of dimensions, as ddpo-pytorch and
Flow-GRPO do for the PPO ratio: the ratio then is the geometric mean of per-dimension ratios, so the
clip range does not depend on the image size.  The trainer's ``log_prob_reduction`` picks one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def step_noise(x: torch.Tensor, generator: torch.Generator | None, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise of ``x``'s shape on ``x``'s device, drawn from ``generator`` on the generator's own
    device (a CPU generator drives a CUDA rollout: the same seed gives the same trajectories on every device);
    without a generator, from the global RNG of ``x``'s device."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=dtype).to(x.device)


@dataclass(frozen=True)
class StepOutput:
    """Result of one transition x_t -> x_{t-1}.

    prev_sample: (B, ...) the sampled (or given) x_{t-1}.
    log_prob:    (B,) log p(x_{t-1} | x_t), reduced over non-batch dims as requested; None for a
                 deterministic step (eta = 0), which has no density.
    mean:        (B, ...) the Gaussian mean μ.
    std:         (B, 1, ..., 1) the Gaussian std σ_t (broadcastable to x).
    x0_pred:     (B, ...) the model's prediction of the clean sample (after clipping, if configured).
    eps_pred:    (B, ...) the implied noise prediction (consistent with ``x0_pred``).
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor | None
    mean: torch.Tensor
    std: torch.Tensor
    x0_pred: torch.Tensor
    eps_pred: torch.Tensor


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """log N(x; mean, std² I) per sample, summed (or averaged) over all non-batch dimensions."""
    std = std.expand_as(mean) if std.shape != mean.shape else std
    lp = -((x.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    lp = lp.flatten(1)
    if reduction == "sum":
        return lp.sum(1)
    if reduction == "mean":
        return lp.mean(1)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


@functools.lru_cache(maxsize=64)
def _ddim_timesteps(num_train_timesteps: int, spacing: str, steps_offset: int, n: int) -> tuple[int, ...]:
    """diffusers' ``DDIMScheduler.set_timesteps(n)`` for this spacing (the grid of our DDIM step, whatever the
    config's scheduler class: DDPM's ``set_timesteps`` spaces identically).  Cached: schedules are frozen."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=num_train_timesteps, timestep_spacing=spacing,
                              steps_offset=steps_offset)
    scheduler.set_timesteps(n)
    return tuple(int(t) for t in scheduler.timesteps)


SIGMA_GRIDS = ("scheduler", "linspace")


def _flow_scheduler(num_train_timesteps: int, shift: float, shift_terminal: float | None, use_dynamic_shifting: bool,
                    time_shift_type: str, mu: float | None, sigma_grid: str, n: int):
    """A fresh diffusers ``FlowMatchEulerDiscreteScheduler`` after ``set_timesteps`` for an n-step sampler:
    ``set_timesteps(n)`` (sigma_grid 'scheduler', what SD3's pipeline does) or ``set_timesteps(sigmas=
    np.linspace(1, 1/n, n), mu=mu)`` (sigma_grid 'linspace', what ``FluxPipeline`` does)."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift,
                                                shift_terminal=shift_terminal,
                                                use_dynamic_shifting=use_dynamic_shifting,
                                                time_shift_type=time_shift_type)
    if sigma_grid == "linspace":
        scheduler.set_timesteps(n, sigmas=np.linspace(1.0, 1 / n, n), mu=mu)  # FluxPipeline.__call__, step 5
    else:
        scheduler.set_timesteps(n, mu=mu)
    return scheduler


@functools.lru_cache(maxsize=64)
def _flow_grid(*key):
    """diffusers' own grid (see :func:`_flow_scheduler`): (timesteps σ·N, sigmas without the final 0), float32
    values.  Cached: schedules are frozen."""
    scheduler = _flow_scheduler(*key)
    return (tuple(float(t) for t in scheduler.timesteps.to(torch.float32)),
            tuple(float(x) for x in scheduler.sigmas[:-1].to(torch.float32)))


@dataclass(frozen=True)
class NoiseSchedule:
    """The discrete VP noise schedule of a diffusers DDPM/DDIM scheduler config.

    alphas_cumprod: (N,) ᾱ_t for t = 0..N-1 (float64 for accuracy).
    final_alpha_cumprod: ᾱ used for the last transition's target ("t_prev = -1").  We use ᾱ_0, never
        1.0 (DDIM's ``set_alpha_to_one``): with 1.0 the final transition has zero variance and no
        log-probability, so it could be neither trained nor importance-weighted.
    """

    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    timestep_spacing: str = "leading"
    steps_offset: int = 0

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {self.prediction_type!r} is not supported; use one of {PREDICTION_TYPES}"
            )
        if self.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(f"timestep_spacing {self.timestep_spacing!r}: use 'leading', 'trailing' or 'linspace'")

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def final_alpha_cumprod(self) -> torch.Tensor:
        return self.alphas_cumprod[0]

    @classmethod
    def from_scheduler(cls, scheduler_or_config) -> "NoiseSchedule":
        """Build from a diffusers scheduler (DDPM, DDIM, Euler-ancestral, ...) or its config dict."""
        config = getattr(scheduler_or_config, "config", scheduler_or_config)
        config = dict(config)
        if "shift" in config or "use_dynamic_shifting" in config:
            raise ValueError(
                "this is a flow-matching scheduler config (it has sigmas/shift, not betas); "
                "NoiseSchedule needs a DDPM/DDIM-style (VP) scheduler"
            )
        for key, bad in (("rescale_betas_zero_snr", True), ("thresholding", True)):
            if config.get(key) == bad:
                raise ValueError(
                    f"scheduler config has {key}={bad}, which NoiseSchedule does not reproduce; "
                    f"set {key}=False (or add support for it) rather than train on a mismatched schedule"
                )
        from diffusers import DDPMScheduler

        # DDPMScheduler computes betas -> alphas_cumprod for every beta_schedule diffusers knows.
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
        ddpm = DDPMScheduler(**{k: config[k] for k in keys if k in config})
        return cls(
            alphas_cumprod=ddpm.alphas_cumprod.to(torch.float64),
            prediction_type=config.get("prediction_type", "epsilon"),
            clip_sample=bool(config.get("clip_sample", False)),
            clip_sample_range=float(config.get("clip_sample_range", 1.0)),
            timestep_spacing=config.get("timestep_spacing", "leading"),
            steps_offset=int(config.get("steps_offset", 0)),
        )

    def timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """(T,) descending int64 timesteps: diffusers' own ``DDIMScheduler.set_timesteps`` for this spacing (read
        once per step count; the step itself never touches a scheduler)."""
        n, t_max = int(num_inference_steps), self.num_train_timesteps
        if not 1 <= n <= t_max:
            raise ValueError(f"num_inference_steps must be in [1, {t_max}], got {num_inference_steps}")
        ts = torch.tensor(_ddim_timesteps(t_max, self.timestep_spacing, self.steps_offset, n), dtype=torch.long)
        if ts.max() >= t_max:
            raise ValueError(f"timesteps reach {int(ts.max())} >= num_train_timesteps={t_max} "
                             f"(steps_offset={self.steps_offset} with {n} steps); use fewer steps or trailing spacing")
        return ts

    def prev_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(T,) the target timestep of each transition: the next entry, and -1 after the last."""
        return torch.cat([timesteps[1:], timesteps.new_tensor([-1])])

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ_t for integer t (any shape); t = -1 means the final target ᾱ_0 (see class doc)."""
        t = torch.as_tensor(t, dtype=torch.long, device=self.alphas_cumprod.device)
        acp = self.alphas_cumprod
        return torch.where(t >= 0, acp[t.clamp(min=0)], self.final_alpha_cumprod)


def _per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or (B,) tensor to (B, 1, ..., 1) in ``like``'s dtype and device."""
    value = value.to(device=like.device, dtype=like.dtype)
    if value.ndim == 0:
        value = value.expand(like.shape[0])
    if value.shape[0] != like.shape[0]:
        raise ValueError(f"got {value.shape[0]} timesteps for a batch of {like.shape[0]}")
    return value.view(-1, *([1] * (like.ndim - 1)))


def predict_x0_eps(schedule: NoiseSchedule, model_output, x_t, alpha_bar_t):
    """Convert a model output (ε, v or x0 parameterisation) to (x0_pred, eps_pred), with clipping."""
    a = alpha_bar_t
    sa, s1a = a.sqrt(), (1 - a).sqrt()
    if schedule.prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - s1a * eps) / sa
    elif schedule.prediction_type == "v_prediction":
        x0 = sa * x_t - s1a * model_output
        eps = sa * model_output + s1a * x_t
    else:  # "sample"
        x0 = model_output
        eps = (x_t - sa * x0) / s1a
    if schedule.clip_sample:
        r = schedule.clip_sample_range
        x0 = x0.clamp(-r, r)
        # keep ε consistent with the clipped x0 (diffusers' DDIM with use_clipped_model_output=True)
        eps = (x_t - sa * x0) / s1a
    return x0, eps


@dataclass(frozen=True)
class DDIMStep:
    """Stochastic DDIM step (Song et al. 2021, eq. 12) with noise level ``eta``; eta = 1 is DDPM-like.

    σ_t = η · sqrt((1 − ᾱ_prev)/(1 − ᾱ_t)) · sqrt(1 − ᾱ_t/ᾱ_prev)
    μ   = sqrt(ᾱ_prev) · x̂0 + sqrt(1 − ᾱ_prev − σ_t²) · ε̂
    x_{t-1} = μ + σ_t · z,   z ~ N(0, I)

    Call it as ``step(model_output, x_t, t, t_prev, prev_sample=None, generator=None)``; ``t`` and
    ``t_prev`` are ints or (B,) int tensors (t_prev = -1 for the final transition).  Stateless.
    """

    schedule: NoiseSchedule
    eta: float = 1.0
    reduction: str = "sum"

    def __post_init__(self):
        if not (isinstance(self.eta, (int, float)) and math.isfinite(self.eta)) or self.eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {self.eta!r}")
        if self.reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {self.reduction!r}")

    @property
    def is_stochastic(self) -> bool:
        return self.eta > 0

    def ode(self) -> "DDIMStep":
        """The deterministic step of the same sampler (eta = 0: DDIM's ODE update)."""
        return dataclasses.replace(self, eta=0.0)

    def require_stochastic(self, what: str = "this operation") -> None:
        if not self.is_stochastic:
            raise ValueError(
                f"{what} needs a stochastic policy, but the step is deterministic (eta=0, an ODE sampler) "
                "and has no transition log-probability; use eta > 0 (eta=1.0 is DDPM-like)"
            )

    def __call__(self, model_output, x_t, t, t_prev, prev_sample=None, generator=None) -> StepOutput:
        if model_output.shape != x_t.shape:
            raise ValueError(f"model output shape {tuple(model_output.shape)} != sample shape {tuple(x_t.shape)}")
        if not self.is_stochastic and prev_sample is not None:
            self.require_stochastic("scoring a stored transition")
        t = torch.as_tensor(t, device=x_t.device)
        t_prev = torch.as_tensor(t_prev, device=x_t.device)
        # compute in float32 at least (fp16 variances underflow near t = 0)
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        x = x_t.to(dtype)
        out = model_output.to(dtype)
        a_t = _per_sample(self.schedule.alpha_bar(t), x)
        a_prev = _per_sample(self.schedule.alpha_bar(t_prev), x)
        x0, eps = predict_x0_eps(self.schedule, out, x, a_t)
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = self.eta * variance.clamp(min=0).sqrt()
        if self.is_stochastic and bool((std <= 0).any()):
            raise ValueError(
                "a transition has zero variance (t_prev >= t?); check that timesteps are strictly "
                f"decreasing, got t={t.tolist()} t_prev={t_prev.tolist()}"
            )
        direction = (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
        mean = a_prev.sqrt() * x0 + direction
        if not self.is_stochastic:  # eta = 0: the deterministic DDIM (ODE) update, no density
            return StepOutput(prev_sample=mean.to(x_t.dtype), log_prob=None, mean=mean, std=std, x0_pred=x0,
                              eps_pred=eps)
        if prev_sample is None:
            noise = step_noise(x, generator, dtype)
            # round to the storage dtype *before* scoring, so re-scoring the stored sample is exact
            prev_sample = (mean + std * noise).to(x_t.dtype).to(dtype)
        else:
            if prev_sample.shape != x_t.shape:
                raise ValueError(f"prev_sample shape {tuple(prev_sample.shape)} != x_t shape {tuple(x_t.shape)}")
            prev_sample = prev_sample.to(dtype)
        log_prob = gaussian_log_prob(prev_sample, mean, std, self.reduction)
        return StepOutput(
            prev_sample=prev_sample.to(x_t.dtype), log_prob=log_prob, mean=mean, std=std, x0_pred=x0, eps_pred=eps
        )

    def apply_score_guidance(self, model_output, x_t, t, grad) -> torch.Tensor:
        """The model output whose implied score is the model's score plus ``grad`` (see :func:`score_guided_output`).
        Guidance by a value V with scale w is ``grad = w·∇V(x_t)`` (classifier guidance, Dhariwal & Nichol)."""
        t = torch.as_tensor(t, device=x_t.device)
        a = _per_sample(self.schedule.alpha_bar(t), x_t)
        return score_guided_output(model_output, grad, self.schedule.prediction_type, alpha_bar=a)


def score_guided_output(model_output, grad, prediction_type: str, *, alpha_bar=None, sigma=None) -> torch.Tensor:
    """The model output whose implied score is the model's score plus ``grad`` (= ∇_x log of a potential at the
    model's input x).  The one implementation of score guidance: the steps and the diffusers scheduler wrapper
    (:class:`steering.diffusers.ScoreGuidedScheduler`) all call it.

    VP inputs x = √ᾱ·x0 + √(1−ᾱ)·ε (``alpha_bar`` broadcastable to the output): the score is −ε̂/√(1−ᾱ), so
        "epsilon":       ε' = ε̂ − √(1−ᾱ)·g
        "v_prediction":  v' = v − √(1−ᾱ)/√ᾱ · g          (v = √ᾱ·ε − √(1−ᾱ)·x0)
        "sample":        x0' = x0 + (1−ᾱ)/√ᾱ · g        (Tweedie: x̂0 = (x + (1−ᾱ)·score)/√ᾱ)
    (σ-parameterised Euler-family latents x = x0 + σ·ε enter as their VP-scaled model input x/√(1+σ²), with
    ᾱ = 1/(1+σ²) and ``grad`` taken with respect to that input.)
    Flow matching x = (1−σ)·x0 + σ·ε, velocity v = ε − x0 (``sigma`` broadcastable):
        "flow":          v' = v − σ/(1−σ) · g
    since the score is −ε̂/σ with ε̂ = x + (1−σ)·v and Tweedie gives x̂0 = (x + σ²·score)/(1−σ), so adding g gives
    ε' = ε̂ − σ·g and x̂0' = x̂0 + σ²/(1−σ)·g.  Undefined at σ = 1 (pure noise carries no information about
    x0): that raises; skip guidance on such a step.
    """
    dtype = torch.promote_types(model_output.dtype, torch.float32)
    out, g = model_output.to(dtype), grad.to(dtype)
    if g.shape != out.shape:
        raise ValueError(f"shapes differ: model output {tuple(out.shape)}, grad {tuple(g.shape)}")
    if prediction_type == "flow":
        if sigma is None:
            raise ValueError("flow-matching guidance needs sigma")
        s = torch.as_tensor(sigma, device=out.device).to(dtype)
        if bool((s >= 1).any()) or bool((s <= 0).any()):
            raise ValueError(f"score guidance in velocity form needs 0 < σ < 1, got σ = {s.flatten().tolist()} "
                             "(at σ = 1 the velocity correction σ/(1−σ)·grad is infinite; skip that step)")
        guided = out - s / (1 - s) * g
    elif prediction_type in PREDICTION_TYPES:
        if alpha_bar is None:
            raise ValueError(f"VP guidance ({prediction_type}) needs alpha_bar")
        a = torch.as_tensor(alpha_bar, device=out.device).to(dtype)
        if prediction_type == "epsilon":
            guided = out - (1 - a).sqrt() * g
        elif prediction_type == "v_prediction":
            guided = out - ((1 - a) / a).sqrt() * g
        else:
            guided = out + (1 - a) / a.sqrt() * g
    else:
        raise ValueError(f"no score-guidance formula for prediction type {prediction_type!r}; use one of "
                         f"{PREDICTION_TYPES + ('flow',)}")
    return guided.to(model_output.dtype)


def gaussian_kl(mean_p, mean_q, std, reduction: str = "sum") -> torch.Tensor:
    """KL(N(mean_p, σ²) || N(mean_q, σ²)) per sample for equal isotropic stds: ||μ_p − μ_q||² / (2σ²)."""
    kl = ((mean_p - mean_q) ** 2 / (2 * std**2)).flatten(1)
    return kl.sum(1) if reduction == "sum" else kl.mean(1)


# ------------------------------------------------------------------------------------------------------
# Flow matching (rectified flow): x_σ = (1 − σ)·x0 + σ·ε, the model predicts the velocity v = ε − x0.

FLOW_UNSUPPORTED = (("invert_sigmas", True), ("use_karras_sigmas", True), ("use_exponential_sigmas", True),
                    ("use_beta_sigmas", True), ("stochastic_sampling", True), ("use_flow_sigmas", True))


@dataclass(frozen=True)
class FlowMatchSchedule:
    """The sigma schedule of a diffusers ``FlowMatchEulerDiscreteScheduler`` config, without its step counter.

    Timesteps are ``σ · num_train_timesteps`` (floats, what diffusers' pipelines pass to the transformer),
    and a step maps a timestep back to σ = t / num_train_timesteps, so any batch of (t, t_prev) pairs can
    be evaluated in any order.  The final transition targets σ = 0 (``t_prev = 0``).

    ``timesteps(n)`` / ``sigmas(n)`` are read from a fresh ``FlowMatchEulerDiscreteScheduler``'s own
    ``set_timesteps`` (cached per n), so they follow diffusers exactly, quirks included:

    sigma_grid: 'scheduler' = ``set_timesteps(n)`` (SD3's pipeline); 'linspace' = ``set_timesteps(sigmas=
        np.linspace(1, 1/n, n), mu=mu)``, the grid ``FluxPipeline`` passes.
    use_dynamic_shifting / time_shift_type / mu: resolution-dependent shifting (FLUX.1-dev's config): the sigmas
        are shifted by ``time_shift(mu, 1, σ)`` instead of ``shift``; mu depends on the image's token count, so it
        is given here (:func:`critic_align.tasks.flux.flux_mu` computes it as ``FluxPipeline`` does) and a dynamic
        config without mu is refused.
    Inverted sigmas, Karras/exponential/beta sigmas, ``use_flow_sigmas`` and ``stochastic_sampling`` are refused
    rather than silently mismatched; ``shift_terminal`` is supported.
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    shift_terminal: float | None = None
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    mu: float | None = None
    sigma_grid: str = "scheduler"

    def __post_init__(self):
        if not (isinstance(self.num_train_timesteps, int) and self.num_train_timesteps >= 1):
            raise ValueError(f"num_train_timesteps must be an int >= 1, got {self.num_train_timesteps!r}")
        if not (isinstance(self.shift, (int, float)) and math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift must be a finite number > 0, got {self.shift!r}")
        if self.shift_terminal is not None and not 0 <= self.shift_terminal < 1:
            raise ValueError(f"shift_terminal must be in [0, 1) or None, got {self.shift_terminal!r}")
        if self.sigma_grid not in SIGMA_GRIDS:
            raise ValueError(f"sigma_grid {self.sigma_grid!r}: use one of {SIGMA_GRIDS}")
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type {self.time_shift_type!r}: use 'exponential' or 'linear'")
        if self.use_dynamic_shifting and self.mu is None:
            raise ValueError(
                "the scheduler config has use_dynamic_shifting=True: its sigmas depend on the image resolution "
                "through mu, so pass mu (FluxPipeline's calculate_shift of the latent token count; "
                "critic_align.tasks.flux.flux_mu) or use a config with use_dynamic_shifting=False")
        if self.mu is not None and not (isinstance(self.mu, (int, float)) and math.isfinite(self.mu)):
            raise ValueError(f"mu must be a finite number or None, got {self.mu!r}")
        if self.mu is not None and not self.use_dynamic_shifting:
            raise ValueError("mu is given but the scheduler config has use_dynamic_shifting=False, where diffusers "
                             "ignores mu; pass mu=None")

    @classmethod
    def from_scheduler(cls, scheduler_or_config, mu: float | None = None,
                       sigma_grid: str = "scheduler") -> "FlowMatchSchedule":
        """Build from a diffusers ``FlowMatchEulerDiscreteScheduler`` or its config dict (``mu`` and ``sigma_grid``:
        see the class doc)."""
        config = dict(getattr(scheduler_or_config, "config", scheduler_or_config))
        if "beta_schedule" in config or "trained_betas" in config:
            raise ValueError("this is a DDPM/DDIM-style (VP) scheduler config (it has betas); use NoiseSchedule")
        for key, bad in FLOW_UNSUPPORTED:
            if config.get(key) == bad:
                raise ValueError(
                    f"scheduler config has {key}={bad}, which FlowMatchSchedule does not reproduce; set {key}=False "
                    "(or add support for it) rather than train on a mismatched schedule"
                )
        return cls(num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                   shift=float(config.get("shift", 1.0)), shift_terminal=config.get("shift_terminal") or None,
                   use_dynamic_shifting=bool(config.get("use_dynamic_shifting", False)),
                   time_shift_type=config.get("time_shift_type", "exponential"),
                   mu=None if mu is None else float(mu), sigma_grid=sigma_grid)

    def sigmas(self, num_inference_steps: int) -> torch.Tensor:
        """(n,) float32 descending σ of an n-step sampler (without the final 0): diffusers' own
        ``FlowMatchEulerDiscreteScheduler.set_timesteps`` (shift, dynamic shift and shift_terminal included)."""
        return torch.tensor(self._grid(num_inference_steps)[1], dtype=torch.float32)

    def timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """(n,) float32 descending timesteps σ·N, exactly diffusers' ``scheduler.timesteps``."""
        return torch.tensor(self._grid(num_inference_steps)[0], dtype=torch.float32)

    def _key(self, num_inference_steps: int) -> tuple:
        n = int(num_inference_steps)
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        return (self.num_train_timesteps, self.shift, self.shift_terminal, self.use_dynamic_shifting,
                self.time_shift_type, self.mu, self.sigma_grid, n)

    def _grid(self, num_inference_steps: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return _flow_grid(*self._key(num_inference_steps))

    def diffusers_scheduler(self, num_inference_steps: int):
        """A fresh diffusers ``FlowMatchEulerDiscreteScheduler`` whose ``set_timesteps`` was called for this grid
        (its ``timesteps`` are this schedule's; e.g. for its ``scale_noise``, the forward process)."""
        return _flow_scheduler(*self._key(num_inference_steps))

    def prev_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(n,) the target timestep of each transition: the next entry, and 0 (σ = 0, clean data) after the last."""
        return torch.cat([timesteps[1:], timesteps.new_zeros(1)])

    def sigma(self, t) -> torch.Tensor:
        """σ = t / num_train_timesteps (float64) for timesteps of any shape."""
        return torch.as_tensor(t).to(torch.float64) / self.num_train_timesteps


def predict_x0_flow(velocity, x_t, sigma):
    """The rectified flow's x0 prediction x_t − σ·v (x_σ = (1 − σ)·x0 + σ·ε, v = ε − x0; ``sigma`` broadcastable)."""
    return x_t - sigma * velocity


def predict_x0(schedule, model_output, x_t, t):
    """x̂0 of a model output at timesteps ``t`` (B,) under either family's schedule: :func:`predict_x0_flow` for a
    :class:`FlowMatchSchedule`, else :func:`predict_x0_eps` (with its clipping).  Computed in float32 at least."""
    dtype = torch.promote_types(x_t.dtype, torch.float32)
    x, out = x_t.to(dtype), model_output.to(dtype)
    t = torch.as_tensor(t).cpu()
    if isinstance(schedule, FlowMatchSchedule):
        return predict_x0_flow(out, x, _per_sample(schedule.sigma(t), x))
    return predict_x0_eps(schedule, out, x, _per_sample(schedule.alpha_bar(t), x))[0]


@dataclass(frozen=True)
class FlowMatchSDEStep:
    """The SDE form of the rectified-flow sampler with Gaussian transitions (Flow-GRPO, Liu et al. 2025, eq. 9).

    With σ = t/N, σ' = t_prev/N, dt = σ' − σ < 0, velocity v = model output and noise level a:

        σ_t     = a · sqrt(σ / (1 − σ))          (σ = 1 uses σ' in the denominator, as Flow-GRPO does by
                                                  taking the schedule's second sigma there)
        μ       = x · (1 + σ_t²/(2σ) · dt) + v · (1 + σ_t²(1 − σ)/(2σ)) · dt
        std     = σ_t · sqrt(−dt)
        x_prev  = μ + std · z,  z ~ N(0, I)

    a = 0 is the deterministic Euler ODE step x + dt·v (diffusers' ``FlowMatchEulerDiscreteScheduler.step``),
    which has no log-probability.  x0_pred = x − σ·v and eps_pred = x + (1 − σ)·v.  The call contract is
    :class:`DDIMStep`'s: ``step(model_output, x_t, t, t_prev, prev_sample=None, generator=None)`` with
    float timesteps σ·N (t_prev = 0 for the final transition), stateless, returns :class:`StepOutput`.
    """

    schedule: FlowMatchSchedule
    noise_level: float = 0.7
    reduction: str = "sum"

    def __post_init__(self):
        if not (isinstance(self.noise_level, (int, float)) and math.isfinite(self.noise_level)) or self.noise_level < 0:
            raise ValueError(f"noise_level must be a finite number >= 0, got {self.noise_level!r}")
        if self.reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {self.reduction!r}")

    @property
    def is_stochastic(self) -> bool:
        return self.noise_level > 0

    def ode(self) -> "FlowMatchSDEStep":
        """The deterministic step of the same sampler (noise level 0: the Euler ODE step)."""
        return dataclasses.replace(self, noise_level=0.0)

    def require_stochastic(self, what: str = "this operation") -> None:
        if not self.is_stochastic:
            raise ValueError(
                f"{what} needs a stochastic policy, but the step is deterministic (noise_level=0, the Euler ODE "
                "sampler) and has no transition log-probability; use noise_level > 0 (Flow-GRPO uses 0.7)"
            )

    def _sigmas(self, t, t_prev, x):
        sigma = self.schedule.sigma(torch.as_tensor(t, device=x.device))
        sigma_prev = self.schedule.sigma(torch.as_tensor(t_prev, device=x.device))
        if bool((sigma <= 0).any()) or bool((sigma > 1).any()):
            raise ValueError(f"timesteps must be in (0, {self.schedule.num_train_timesteps}] (σ in (0, 1]), got "
                             f"{torch.as_tensor(t).tolist()}")
        if bool((sigma_prev >= sigma).any()) or bool((sigma_prev < 0).any()):
            raise ValueError("each transition must go to a strictly smaller σ >= 0 (t_prev < t); got "
                             f"t={torch.as_tensor(t).tolist()} t_prev={torch.as_tensor(t_prev).tolist()}")
        return _per_sample(sigma, x), _per_sample(sigma_prev, x)

    def __call__(self, model_output, x_t, t, t_prev, prev_sample=None, generator=None) -> StepOutput:
        if model_output.shape != x_t.shape:
            raise ValueError(f"model output shape {tuple(model_output.shape)} != sample shape {tuple(x_t.shape)}")
        if not self.is_stochastic and prev_sample is not None:
            self.require_stochastic("scoring a stored transition")
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        x = x_t.to(dtype)
        v = model_output.to(dtype)
        sigma, sigma_prev = self._sigmas(t, t_prev, x)
        dt = sigma_prev - sigma
        x0 = predict_x0_flow(v, x, sigma)
        eps = x + (1 - sigma) * v
        if not self.is_stochastic:  # the Euler ODE step, as diffusers' FlowMatchEulerDiscreteScheduler.step
            mean = x + dt * v
            return StepOutput(prev_sample=mean.to(x_t.dtype), log_prob=None, mean=mean, std=torch.zeros_like(sigma),
                              x0_pred=x0, eps_pred=eps)
        denom = torch.where(sigma >= 1, sigma_prev, sigma)
        std_t = self.noise_level * (sigma / (1 - denom)).sqrt()
        mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
        std = std_t * (-dt).sqrt()
        if prev_sample is None:
            noise = step_noise(x, generator, dtype)
            # round to the storage dtype *before* scoring, so re-scoring the stored sample is exact
            prev_sample = (mean + std * noise).to(x_t.dtype).to(dtype)
        else:
            if prev_sample.shape != x_t.shape:
                raise ValueError(f"prev_sample shape {tuple(prev_sample.shape)} != x_t shape {tuple(x_t.shape)}")
            prev_sample = prev_sample.to(dtype)
        log_prob = gaussian_log_prob(prev_sample, mean, std, self.reduction)
        return StepOutput(prev_sample=prev_sample.to(x_t.dtype), log_prob=log_prob, mean=mean, std=std, x0_pred=x0,
                          eps_pred=eps)

    def apply_score_guidance(self, model_output, x_t, t, grad) -> torch.Tensor:
        """The velocity whose implied score is the model's score plus ``grad`` (see :func:`score_guided_output`);
        raises at σ = 1, where it is undefined."""
        if model_output.shape != x_t.shape:
            raise ValueError(f"shapes differ: model output {tuple(model_output.shape)}, x_t {tuple(x_t.shape)}")
        sigma = self.schedule.sigma(torch.as_tensor(t, device=x_t.device))
        s = _per_sample(sigma, model_output.to(torch.promote_types(model_output.dtype, torch.float32)))
        return score_guided_output(model_output, grad, "flow", sigma=s)


def is_flow_matching(scheduler_or_config) -> bool:
    """Whether a diffusers scheduler (or its config) is a flow-matching one (``FlowMatchEulerDiscreteScheduler``).

    The class is read from the object or from the config's ``_class_name``; a config without one counts as flow
    matching when it has a ``shift`` and no betas.  Other ``FlowMatch*`` schedulers are refused."""
    if isinstance(scheduler_or_config, FlowMatchSchedule):
        return True
    if isinstance(scheduler_or_config, NoiseSchedule):
        return False
    config = dict(getattr(scheduler_or_config, "config", scheduler_or_config))
    cls = type(scheduler_or_config).__name__ if hasattr(scheduler_or_config, "config") else config.get("_class_name")
    if cls is not None and cls.startswith("FlowMatch") and cls != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(f"scheduler {cls} is not supported; FlowMatchEulerDiscreteScheduler's sigmas are")
    return cls == "FlowMatchEulerDiscreteScheduler" or (
        cls in (None, "dict", "FrozenDict") and "shift" in config and "beta_schedule" not in config)


def make_step(scheduler_or_config, eta_or_noise_level: float = 1.0, reduction: str = "sum"):
    """The stochastic step for a diffusers scheduler (or its config): ``DDIMStep(eta)`` for DDPM/DDIM-style
    (VP) schedulers, ``FlowMatchSDEStep(noise_level)`` for ``FlowMatchEulerDiscreteScheduler``
    (:func:`is_flow_matching`; a trainer passes its config's ``eta`` or ``sde_noise_level`` accordingly).

    A ready :class:`FlowMatchSchedule` / :class:`NoiseSchedule` is taken as it is: that is how a task whose sigmas
    depend on more than the scheduler config (FLUX's resolution-dependent mu) hands the trainer its schedule."""
    if isinstance(scheduler_or_config, FlowMatchSchedule):
        return FlowMatchSDEStep(scheduler_or_config, noise_level=eta_or_noise_level, reduction=reduction)
    if isinstance(scheduler_or_config, NoiseSchedule):
        return DDIMStep(scheduler_or_config, eta=eta_or_noise_level, reduction=reduction)
    config = dict(getattr(scheduler_or_config, "config", scheduler_or_config))
    if is_flow_matching(scheduler_or_config):
        return FlowMatchSDEStep(FlowMatchSchedule.from_scheduler(config), noise_level=eta_or_noise_level,
                                reduction=reduction)
    return DDIMStep(NoiseSchedule.from_scheduler(config), eta=eta_or_noise_level, reduction=reduction)


def step_for_run(scheduler, config):
    """A run's stochastic step (:func:`make_step`): the config's ``sde_noise_level`` for a flow-matching scheduler,
    its ``eta`` for a DDPM/DDIM-style one, and its ``log_prob_reduction``."""
    noise = config.sde_noise_level if is_flow_matching(scheduler) else config.eta
    return make_step(scheduler, noise, config.log_prob_reduction)
