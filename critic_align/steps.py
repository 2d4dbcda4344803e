"""Stateless stochastic denoising steps that both sample and score a transition.

The denoising MDP: state s_t = (x_t, t, c), action a_t = x_{t-1} ~ p_θ(x_{t-1} | x_t, c), a Gaussian
N(μ_θ(x_t, t), σ_t² I).  One function call either *samples* x_{t-1} (``prev_sample=None``) or *scores*
a stored one, and always returns the Gaussian's mean, std, the x0 prediction and the log-probability.

Everything is built from a diffusers scheduler's *config* (``alphas_cumprod`` from the betas,
``prediction_type``, clipping, timestep spacing) and never touches the scheduler's hidden step counter,
so a step can be evaluated for any batch of (x_t, t, t_prev) triples in any order — e.g. a PPO
minibatch that mixes timesteps.

Log-probabilities
-----------------
``log_prob`` is the exact log-density of the diagonal Gaussian, **summed** over all non-batch
dimensions by default (``reduction="sum"``): this is what importance weights (SMC), KL terms and
density ratios need.  ``reduction="mean"`` divides by the number of dimensions, as ddpo-pytorch and
Flow-GRPO do for the PPO ratio: the ratio then is the geometric mean of per-dimension ratios, so the
clip range does not depend on the image size.  The trainer's ``log_prob_reduction`` picks one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


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
        """(T,) descending int64 timesteps, spaced as diffusers' DDIM scheduler would."""
        n, t_max = int(num_inference_steps), self.num_train_timesteps
        if not 1 <= n <= t_max:
            raise ValueError(f"num_inference_steps must be in [1, {t_max}], got {num_inference_steps}")
        # numpy float64, exactly as diffusers' DDIMScheduler.set_timesteps (rounding ties included)
        if self.timestep_spacing == "leading":
            ratio = t_max // n
            ts = (np.arange(0, n) * ratio).round()[::-1].astype(np.int64) + self.steps_offset
        elif self.timestep_spacing == "trailing":
            ts = np.round(np.arange(t_max, 0, -t_max / n)).astype(np.int64) - 1
        else:
            ts = np.linspace(0, t_max - 1, n).round()[::-1].astype(np.int64)
        ts = torch.from_numpy(ts.copy())
        if ts.max() >= t_max:
            raise ValueError(f"timesteps reach {int(ts.max())} >= num_train_timesteps={t_max} "
                             f"(steps_offset={self.steps_offset} with {n} steps); use fewer steps or trailing spacing")
        return ts.to(torch.long)

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
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=dtype) if generator is not None \
                else torch.randn_like(x)
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
        """The model output whose implied score is the model's score plus ``grad`` (= ∇_x log of a potential).

        With x_t = √ᾱ·x0 + √(1−ᾱ)·ε the score is −ε̂/√(1−ᾱ), so adding g to it gives, per parameterisation,
            ε:  ε' = ε̂ − √(1−ᾱ)·g
            v:  v' = v − √(1−ᾱ)/√ᾱ · g          (v = √ᾱ·ε − √(1−ᾱ)·x0)
            x0: x0' = x0 + (1−ᾱ)/√ᾱ · g        (Tweedie: x̂0 = (x_t + (1−ᾱ)·score)/√ᾱ)
        Guidance by a value V with scale w is ``grad = w·∇V(x_t)`` (classifier guidance, Dhariwal & Nichol).
        """
        t = torch.as_tensor(t, device=x_t.device)
        a = _per_sample(self.schedule.alpha_bar(t), x_t)
        grad = grad.to(model_output.dtype)
        if self.schedule.prediction_type == "epsilon":
            return model_output - (1 - a).sqrt() * grad
        if self.schedule.prediction_type == "v_prediction":
            return model_output - ((1 - a) / a).sqrt() * grad
        return model_output + (1 - a) / a.sqrt() * grad


def gaussian_kl(mean_p, mean_q, std, reduction: str = "sum") -> torch.Tensor:
    """KL(N(mean_p, σ²) || N(mean_q, σ²)) per sample for equal isotropic stds: ||μ_p − μ_q||² / (2σ²)."""
    kl = ((mean_p - mean_q) ** 2 / (2 * std**2)).flatten(1)
    return kl.sum(1) if reduction == "sum" else kl.mean(1)
