"""Steering any diffusers pipeline: SMC as a ``callback_on_step_end`` and value guidance as a scheduler wrapper.

Two hooks, no forked pipelines:

* :class:`SMCCallback` — pass it as ``callback_on_step_end``.  After every scheduler step but the last it
  evaluates the log-potential of the new latents (λ·V, or a soft value), twists the particles' weights, and when
  a group's ESS drops below κ·N it resamples the group: the latents, the prompt embeddings (if the pipeline
  hands them to the callback) and any per-sample history the scheduler keeps are re-indexed with the same
  ancestors.  :func:`steer_pipeline` then multiplies in exp(λ·r) of the decoded images and draws one image per
  prompt (or takes the best).  The weights, resampling and final choice are :mod:`steering.particles`' engine.
  Latents-only means no transition densities: guidance is not allowed together with SMC here (the proposal
  correction needs the step's mean) — use :func:`steering.samplers.smc` with an adapter for that.
* :class:`ScoreGuidedScheduler` — wraps ``pipe.scheduler``; its ``step`` shifts the (CFG-combined) model output
  so that its implied score is the model's score plus w·∇V before delegating to the real scheduler, with
  :func:`critic_align.steps.score_guided_output` (the one guidance formula): VP schedulers (DDPM, DDIM, ...),
  σ-parameterised Euler-family schedulers (VP-scaled model input, ε form) and flow matching (v form).

Value functions get :mod:`steering.values`'s convention in both hooks: the denoiser's input (Euler family:
latents/√(1+σ²), diffusers' ``scale_model_input``; others: the latents), the denoiser's timestep, and the
positive conditioning in the backbone adapter's format (SD1.5: the positive prompt embeddings; SD3: a
:class:`critic_align.cond.TextCond` of prompt embeddings + pooled projections; None without embeddings).
:func:`scheduler_noise_level` maps a scheduler timestep to ᾱ / σ.

Particles: ``num_images_per_prompt = N``; diffusers lays the batch out prompt-major, so groups are contiguous
(rows g·N … g·N+N−1 belong to prompt g), the layout :mod:`steering.resampling` expects.

Schedulers: SMC needs a stochastic sampler.  Accepted: DDPM, DDIM with eta > 0, Euler ancestral, LCM,
DPM-Solver++ (multistep) in an SDE variant (its ``model_outputs`` history is re-indexed), flow matching with
``stochastic_sampling=True``.  Deterministic ones (DDIM eta = 0, Euler, Heun, LMS, PNDM, UniPC, DEIS, plain
DPM-Solver) are refused with an error naming a stochastic alternative; schedulers with per-sample state we
cannot re-index (second-order ancestral KDPM2, DPM-Solver SDE's Brownian tree) are refused too.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from critic_align.steps import score_guided_output
from critic_align.x0_reward import refuse_in_callback

from .particles import ParticleSystem, check_log_potential, check_steering_numbers, choose
from .samplers import SteerCost, SteerResult
from .values import NoiseLevel, value_and_grad

STOCHASTIC_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler (eta > 0)", "EulerAncestralDiscreteScheduler", "LCMScheduler",
                         "DPMSolverMultistepScheduler (algorithm_type='sde-dpmsolver++' or 'sde-dpmsolver')",
                         "FlowMatchEulerDiscreteScheduler (stochastic_sampling=True)")
# per-sample history attributes that must follow the particles on resampling
_HISTORY = {"DPMSolverMultistepScheduler": ("model_outputs",)}
_UNINDEXABLE = {
    "KDPM2AncestralDiscreteScheduler": "it is second order and keeps per-sample state between its two sub-steps",
    "DPMSolverSDEScheduler": "its Brownian-tree noise sampler is tied to the batch it was created for",
}


def check_stochastic_scheduler(scheduler, eta: float | None = None) -> None:
    """Raise a clear error unless ``scheduler`` (with DDIM's ``eta``) samples stochastically and its per-sample
    state can follow resampled particles."""
    name = type(scheduler).__name__
    cfg = scheduler.config
    if name in _UNINDEXABLE:
        raise ValueError(f"{name} cannot be used for SMC: {_UNINDEXABLE[name]}; use one of {STOCHASTIC_SCHEDULERS}")
    ok = False
    if name in ("DDPMScheduler", "EulerAncestralDiscreteScheduler", "LCMScheduler"):
        ok = True
    elif name == "DDIMScheduler":
        if eta is None or eta <= 0:
            raise ValueError("DDIMScheduler with eta=0 is deterministic (an ODE sampler): SMC needs noise between "
                             "steps; pass eta > 0 (eta=1.0 is DDPM-like) or use DDPMScheduler / "
                             "EulerAncestralDiscreteScheduler")
        ok = True
    elif name == "DPMSolverMultistepScheduler":
        ok = str(cfg.get("algorithm_type", "")).startswith("sde-")
    elif name == "FlowMatchEulerDiscreteScheduler":
        ok = bool(cfg.get("stochastic_sampling", False))
    if not ok:
        raise ValueError(f"{name} (config {dict((k, cfg[k]) for k in ('algorithm_type', 'stochastic_sampling') if k in cfg)}"
                         f") is deterministic or unsupported for SMC: resampling identical-noise ODE particles only "
                         f"duplicates them. Use a stochastic scheduler: {STOCHASTIC_SCHEDULERS}, e.g. "
                         "pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)")


def _scheduler_kind(scheduler) -> str:
    """"vp" (alphas_cumprod, the model input is the latent), "sigma" (Euler family: VE latents, the model input
    is latents/√(1+σ²)) or "flow" (flow matching)."""
    name = type(scheduler).__name__
    if name.startswith("FlowMatch"):
        return "flow"
    if hasattr(scheduler, "sigmas") and name.startswith(("Euler", "Heun", "LMS", "KDPM2", "DPMSolverSDE")):
        return "sigma"
    if hasattr(scheduler, "alphas_cumprod"):
        return "vp"
    raise ValueError(f"{name}: no noise-level mapping for this scheduler (needs alphas_cumprod, sigmas, or flow "
                     "matching)")


def _sigma_at(scheduler, timestep, step_index: int | None = None) -> torch.Tensor:
    idx = step_index if step_index is not None else (
        scheduler.index_for_timestep(timestep) if scheduler.step_index is None else scheduler.step_index)
    return scheduler.sigmas[idx].to(torch.float64)


def scheduler_noise_level(scheduler, timestep, step_index: int | None = None, kind: str | None = None) -> NoiseLevel:
    """ᾱ / σ of the model input at a diffusers scheduler's ``timestep`` (scalars; see
    :class:`steering.values.NoiseLevel`).  σ-schedulers look σ up by ``step_index`` (default: the scheduler's
    current step index, else the timestep's index).  ``kind``: "vp" | "sigma" | "flow" (default: from the class)."""
    kind = kind or _scheduler_kind(scheduler)
    if kind == "vp":
        t = int(torch.as_tensor(timestep))
        a = scheduler.alphas_cumprod[t].to(torch.float64) if t >= 0 else scheduler.final_alpha_cumprod.to(torch.float64)
        return NoiseLevel(alpha_bar=a, sigma=((1 - a) / a).sqrt())
    s = _sigma_at(scheduler, timestep, step_index)
    if kind == "sigma":
        return NoiseLevel(alpha_bar=1 / (1 + s**2), sigma=s)
    return NoiseLevel(alpha_bar=(1 - s) ** 2 / ((1 - s) ** 2 + s**2), sigma=s)


def _model_input_scale(scheduler, timestep, step_index: int | None = None, kind: str | None = None) -> torch.Tensor:
    """c with model input = c·latents: 1/√(1+σ²) for Euler-family schedulers, 1 otherwise."""
    if (kind or _scheduler_kind(scheduler)) == "sigma":
        return 1 / (1 + _sigma_at(scheduler, timestep, step_index) ** 2).sqrt()
    return torch.ones((), dtype=torch.float64)


def positive_cond(embeds: torch.Tensor | None, pooled: torch.Tensor | None, m: int):
    """The value function's ``cond`` for m latents from a pipeline's prompt embeddings (and SD3's pooled
    projections): under CFG diffusers stacks [negative; positive] (2m rows), so the positive half is rows m…2m."""
    if embeds is None:
        return None
    embeds = embeds[m:] if embeds.shape[0] == 2 * m else embeds
    if embeds.shape[0] != m:
        raise ValueError(f"prompt embeddings have {embeds.shape[0]} rows for {m} latents")
    if pooled is None:
        return embeds
    from critic_align.cond import TextCond

    pooled = pooled[m:] if pooled.shape[0] == 2 * m else pooled
    return TextCond(embeds, pooled)


class SMCCallback:
    """Feynman–Kac SMC for ``pipe(..., callback_on_step_end=cb, callback_on_step_end_tensor_inputs=cb.tensor_inputs)``.

    value_fn(x, t, cond) -> (M,): a value in :mod:`steering.values`'s convention (the module doc): the model
        input at the next step's timestep ``t``, the positive conditioning.
    potential: "value" (log-potential λ·value_fn) or "soft_value" (value_fn is log E[exp(λ r) | x_t] itself,
        see :mod:`steering.potentials`).
    embed_keys: the callback tensors holding conditioning; re-indexed on resampling.  SD3 pipelines also hand
        "pooled_prompt_embeds" (default: both, where the pipeline offers them).
    """

    def __init__(self, value_fn, num_particles: int, lam: float = 1.0, ess_threshold: float = 0.5,
                 resample_every: int = 1, scheme: str = "systematic", generator: torch.Generator | None = None,
                 embed_keys: Sequence[str] | None = None, eta: float | None = None, potential: str = "value"):
        if potential not in ("value", "soft_value"):
            raise ValueError(f"SMCCallback potential must be 'value' or 'soft_value', got {potential!r} "
                             "(x0_reward needs the step's x0 prediction: use steering.smc_x0)")
        if potential == "soft_value" and getattr(value_fn, "lam", lam) != lam:
            raise ValueError(f"the soft value was built for λ={value_fn.lam}, but SMC runs with lam={lam}")
        refuse_in_callback(value_fn, "SMCCallback")
        if not isinstance(resample_every, int) or resample_every < 1:
            raise ValueError(f"resample_every must be a positive int, got {resample_every!r}")
        # validates num_particles, κ and the scheme now, not at the first step
        ParticleSystem(1, num_particles, ess_threshold, scheme)
        self.value_fn = value_fn
        self.n = num_particles
        self.lam = lam
        self.potential = potential
        self.ess_threshold = ess_threshold
        self.resample_every = resample_every
        self.scheme = scheme
        self.generator = generator
        self.embed_keys = None if embed_keys is None else tuple(embed_keys)
        self.eta = eta  # DDIM's eta as passed to the pipeline call (checked: SMC needs eta > 0)
        self.particles: ParticleSystem | None = None
        self.value_rows = 0
        self._capture: _ConditioningCapture | None = None

    def attach(self, pipe) -> "SMCCallback":
        """For pipelines whose callback does not offer the whole conditioning or image-shaped latents (FLUX: packed
        tokens, no pooled embeddings in the callback): capture them from the denoiser's calls.  ``close`` removes
        the hook.  A no-op for other pipelines."""
        if _packs_latents(pipe) and self._capture is None:
            self._capture = _ConditioningCapture(pipe.transformer)
        return self

    def close(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None

    def tensor_inputs_for(self, pipe) -> list[str]:
        """``callback_on_step_end_tensor_inputs`` for ``pipe``: the latents and the conditioning it offers."""
        keys = self.embed_keys if self.embed_keys is not None else ("prompt_embeds", "pooled_prompt_embeds")
        return ["latents", *[k for k in keys if k in getattr(pipe, "_callback_tensor_inputs", ())]]

    @property
    def tensor_inputs(self) -> list[str]:
        """For pipelines with prompt embeddings only (SD1.5-style); prefer :meth:`tensor_inputs_for`."""
        return ["latents", *(self.embed_keys or ("prompt_embeds",))]

    @property
    def log_w(self):
        return None if self.particles is None else self.particles.log_w

    @property
    def ess_history(self) -> list:
        return [] if self.particles is None else self.particles.ess_history

    @property
    def resampled_history(self) -> list:
        return [] if self.particles is None else self.particles.resampled_history

    def __call__(self, pipe, i: int, t, callback_kwargs: dict) -> dict:
        latents = callback_kwargs["latents"]
        m = latents.shape[0]
        if m % self.n:
            raise ValueError(f"the pipeline's batch of {m} latents is not a multiple of num_particles={self.n}; "
                             "call the pipeline with num_images_per_prompt=num_particles")
        if i == 0:
            check_stochastic_scheduler(pipe.scheduler, self.eta)
            self.particles = ParticleSystem(m // self.n, self.n, self.ess_threshold, self.scheme, self.generator,
                                            latents.device)
            self.value_rows = 0
        ts = pipe.scheduler.timesteps
        if i + 1 >= len(ts):
            return {}  # the last step: its potential would be replaced by λ·r at once (final_choice)
        embeds = {k: callback_kwargs[k] for k in callback_kwargs if k != "latents" and callback_kwargs[k] is not None}
        t_next = ts[i + 1]
        x = latents * _model_input_scale(pipe.scheduler, t_next, i + 1).to(latents.device, latents.dtype)
        if self._capture is not None:  # FLUX: the adapter's layout and the denoiser's full conditioning
            x = self._capture.unpack(pipe, x)
            cond = positive_cond(self._capture.embeds, self._capture.pooled, m)
        else:
            cond = positive_cond(embeds.get("prompt_embeds"), embeds.get("pooled_prompt_embeds"), m)
        with torch.no_grad():
            v = check_log_potential(self.value_fn(x, t_next.expand(m).to(latents.device), cond), m, "value_fn")
        self.value_rows += m
        self.particles.twist(v.double() if self.potential == "soft_value" else self.lam * v.double())
        idx = self.particles.maybe_resample(allowed=i % self.resample_every == 0)
        if idx is None:
            return {}
        out = {"latents": latents[idx]}
        for k, e in embeds.items():
            if e.shape[0] == 2 * m:  # CFG: [negative; positive], re-index both halves alike
                out[k] = torch.cat([e[:m][idx], e[m:][idx]])
            elif e.shape[0] == m:
                out[k] = e[idx]
            else:
                raise ValueError(f"cannot re-index {k} with {e.shape[0]} rows for {m} particles")
        for attr in _HISTORY.get(type(pipe.scheduler).__name__, ()):
            hist = getattr(pipe.scheduler, attr)
            setattr(pipe.scheduler, attr, [h[idx] if isinstance(h, torch.Tensor) and h.shape[0] == m else h
                                           for h in hist])
        return out

    def final_choice(self, rewards: torch.Tensor, output: str = "sample") -> torch.Tensor:
        """Twist by λ·r (replacing the last value potential) and pick one particle per group: (G,) flat rows
        ("sample": drawn ∝ the final weights, the tilted target; "argmax": the best reward)."""
        m = rewards.shape[0]
        if self.particles is None:  # a one-step pipeline: no callback step evaluated a potential
            self.particles = ParticleSystem(m // self.n, self.n, self.ess_threshold, self.scheme, self.generator)
        self.particles.finish(self.lam * rewards.double().to(self.particles.log_w.device))
        return self.particles.choose(rewards.to(self.particles.log_w.device), output).cpu()


class _ConditioningCapture:
    """A forward pre-hook on the pipeline's denoiser that keeps its latest text conditioning (the embeddings the
    scheduler wrapper cannot see), so value guidance gets the same ``cond`` as the denoiser."""

    def __init__(self, denoiser):
        self.embeds = self.pooled = self.img_ids = None
        self.handle = denoiser.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.embeds = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        self.pooled = kwargs.get("pooled_projections")
        self.img_ids = kwargs.get("img_ids")  # FLUX: the packed tokens' (0, row, col) positions

    def unpack(self, pipe, packed: torch.Tensor) -> torch.Tensor:
        """FLUX's packed latent tokens (M, N, 4C) -> the adapter's (M, C, H, W) layout, the grid read from the
        image ids of the denoiser's latest call (``FluxPipeline._unpack_latents``; differentiable)."""
        if self.img_ids is None:
            raise RuntimeError("no image ids captured yet: the denoiser has not run")
        rows, cols = int(self.img_ids[:, 1].max()) + 1, int(self.img_ids[:, 2].max()) + 1
        vsf = pipe.vae_scale_factor
        return pipe._unpack_latents(packed, 2 * rows * vsf, 2 * cols * vsf, vsf)


    def remove(self) -> None:
        self.handle.remove()


def _packs_latents(pipe) -> bool:
    """Pipelines whose latents are packed tokens (FLUX): value functions get them unpacked, as the adapter takes them."""
    return pipe is not None and hasattr(pipe, "_unpack_latents") and hasattr(pipe, "transformer")


class ScoreGuidedScheduler:
    """A wrapper around a diffusers scheduler whose ``step`` applies value guidance to the model output.

    ``pipe.scheduler = ScoreGuidedScheduler(pipe.scheduler, value_fn, scale, pipe=pipe)``; everything else is
    delegated.  value_fn follows :mod:`steering.values`'s convention: it gets the model input (Euler family:
    latents/√(1+σ²)), the timestep, and the positive conditioning of the denoiser's latest call (captured by a
    hook on ``pipe``'s UNet / transformer when ``pipe`` is given — call :meth:`close` to remove it; None without
    ``pipe``); it is evaluated on a detached input with gradients enabled.  ``rows`` counts critic rows (forward +
    backward each).
    """

    def __init__(self, scheduler, value_fn: Callable, scale: float, pipe=None):
        refuse_in_callback(value_fn, "ScoreGuidedScheduler")
        object.__setattr__(self, "_scheduler", scheduler)
        object.__setattr__(self, "value_fn", value_fn)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "rows", 0)
        object.__setattr__(self, "factors", [])  # per step call: 1.0 guided (uncapped), NaN not guided
        kind = _scheduler_kind(scheduler)
        if kind == "sigma" and scheduler.config.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"{type(scheduler).__name__}: value guidance for σ-parameterised schedulers supports "
                             f"prediction_type 'epsilon', got {scheduler.config.prediction_type!r}")
        object.__setattr__(self, "kind", kind)
        denoiser = None if pipe is None else getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        object.__setattr__(self, "_capture", None if denoiser is None else _ConditioningCapture(denoiser))
        object.__setattr__(self, "_pipe", pipe)

    def close(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            object.__setattr__(self, "_capture", None)

    def __getattr__(self, item):
        return getattr(self._scheduler, item)

    def __setattr__(self, key, value):
        setattr(self._scheduler, key, value)

    def step(self, model_output, timestep, sample, *args, **kwargs):
        if self.scale == 0:
            self.factors.append(float("nan"))
            return self._scheduler.step(model_output, timestep, sample, *args, **kwargs)
        b = sample.shape[0]
        level = scheduler_noise_level(self._scheduler, timestep, kind=self.kind)
        if self.kind == "flow" and float(level.sigma) >= 1.0:
            # σ = 1: pure noise carries no information about x0 (the velocity correction is infinite): no guidance
            self.factors.append(float("nan"))
            return self._scheduler.step(model_output, timestep, sample, *args, **kwargs)
        t = torch.as_tensor(timestep, device=sample.device).expand(b)
        c_in = _model_input_scale(self._scheduler, timestep, kind=self.kind).to(sample.device, torch.float32)
        cap = self._capture
        cond = None if cap is None else positive_cond(cap.embeds, cap.pooled, b)
        # ∇ with respect to the model input x_in = c·latents (the convention); the formula takes that gradient
        fn = self.value_fn
        if cap is not None and _packs_latents(self._pipe):  # FLUX: V reads the unpacked latents; ∇ flows back
            fn = lambda x, t_, c: self.value_fn(cap.unpack(self._pipe, x), t_, c)  # noqa: E731
        _, grad_in = value_and_grad(fn, sample.detach().float() * c_in, t, cond)
        object.__setattr__(self, "rows", self.rows + b)
        self.factors.append(1.0)
        dev = sample.device
        if self.kind == "flow":
            out = score_guided_output(model_output, self.scale * grad_in, "flow", sigma=level.sigma.to(dev))
        else:
            pt = "epsilon" if self.kind == "sigma" else self._scheduler.config.prediction_type
            out = score_guided_output(model_output, self.scale * grad_in, pt, alpha_bar=level.alpha_bar.to(dev))
        return self._scheduler.step(out, timestep, sample, *args, **kwargs)


def steer_pipeline(pipe, prompt: str | list[str], *, num_particles: int, reward_fn, value_fn=None, lam: float = 1.0,
                   potential: str = "value", ess_threshold: float = 0.5, resample_every: int = 1,
                   scheme: str = "systematic", output: str | None = None, guidance_value_fn=None,
                   guidance_scale_value: float = 0.0, generator: torch.Generator | None = None, eta: float | None = None,
                   reward_price: float = 1.0, **pipe_kwargs) -> SteerResult:
    """Best-of-N (``value_fn=None``) or SMC (``value_fn`` given, ``potential`` "value" or "soft_value") on any
    diffusers pipeline; value guidance through :class:`ScoreGuidedScheduler` when ``guidance_value_fn`` is given
    (best-of-N only: see the module doc).

    reward_fn(samples in [-1, 1] (M, C, H, W), prompts) -> (M,), the library's reward convention (any
    :class:`~critic_align.rewards.Reward` works; −inf marks a violated hard constraint).
    output: "sample" (SMC's default: one image per prompt drawn ∝ its final weight, a sample of p·exp(λ r)) or
        "argmax" (the best reward; best-of-N's only choice).
    reward_price: backbone-call price of one reward row in ``cost.equivalent_nfe`` (see :class:`SteerCost`).

    Returns a :class:`~steering.samplers.SteerResult` over the pipeline's T steps, G prompts and N particles:
    ``samples`` (G, C, H, W) the chosen images in [0, 1] (``output_type="pt"``), ``decoded`` the same in [-1, 1]
    (what ``reward_fn`` saw), ``particles`` (G·N, C, H, W) every image in [0, 1], ``rewards`` / ``particle_rewards``,
    ``chosen`` (G,) rows of ``particles``; ``log_weights`` (G, N) (zeros without SMC); ``ess`` (T + 1, G) with
    row i + 1 the ESS of the latents after step i (the callback sees no x_T: row 0 is NaN; the last row is the final
    ESS; all NaN without SMC) and ``resampled`` (T, G) likewise; ``guidance_factor`` (T,) 1 at the steps the
    scheduler wrapper guided (uncapped), NaN elsewhere.  ``cost``: backbone rows counted at the pipeline's UNet /
    transformer (a CFG batch counts both halves), critic rows (SMC potentials: forwards; guidance: a forward and a
    backward per row), one decode and one reward row per image.
    """
    t0 = time.perf_counter()
    check_steering_numbers(num_particles, guidance_scale_value, lam, where="steer_pipeline")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if guidance_value_fn is not None and value_fn is not None:
        raise ValueError("value guidance inside a pipeline cannot be combined with SMC weights (the callback sees "
                         "latents only, not the guided proposal's density); use steering.smc with an adapter")
    if output is None:
        output = "argmax" if value_fn is None else "sample"
    kwargs = dict(pipe_kwargs)
    if eta is not None:
        kwargs["eta"] = eta
    original = pipe.scheduler
    cb = guided = None
    counter = _RowCounter(_denoiser_of(pipe))
    try:
        if guidance_value_fn is not None and guidance_scale_value != 0:
            guided = ScoreGuidedScheduler(original, guidance_value_fn, guidance_scale_value, pipe=pipe)
            pipe.scheduler = guided
        if value_fn is not None:
            check_stochastic_scheduler(original, eta)
            cb = SMCCallback(value_fn, num_particles, lam, ess_threshold, resample_every, scheme, generator, eta=eta,
                             potential=potential).attach(pipe)
            kwargs.update(callback_on_step_end=cb, callback_on_step_end_tensor_inputs=cb.tensor_inputs_for(pipe))
        result = pipe(prompts, num_images_per_prompt=num_particles, generator=generator, output_type="pt", **kwargs)
    finally:
        pipe.scheduler = original
        counter.remove()
        if guided is not None:
            guided.close()
        if cb is not None:
            cb.close()
    images = result.images
    m, g = images.shape[0], len(prompts)
    flat_prompts = [p for p in prompts for _ in range(num_particles)]
    decoded = images * 2 - 1
    rewards = check_log_potential(reward_fn(decoded, flat_prompts), m, "reward_fn")
    if cb is not None:
        pick = cb.final_choice(rewards, output)
    else:
        pick = choose(rewards, num_particles, output).cpu()
    num_steps = len(original.timesteps)
    ess = torch.full((num_steps + 1, g), float("nan"))
    resampled = torch.zeros(num_steps, g, dtype=torch.bool)
    log_weights = torch.zeros(g, num_particles, dtype=torch.float64)
    if cb is not None:
        # the callback after step i weighs the latents step i + 1 starts from: SteerResult's row i + 1
        for i, (e, r) in enumerate(zip(cb.ess_history, cb.resampled_history)):
            ess[i + 1], resampled[i + 1] = e, r
        ess[num_steps] = cb.particles.final_ess.cpu()
        log_weights = cb.log_w
    factor = torch.full((num_steps,), float("nan"))
    if guided is not None:
        factor = torch.tensor(guided.factors, dtype=torch.float32)
    guide_rows = guided.rows if guided is not None else 0
    cost = SteerCost(backbone_rows=counter.rows, critic_forward_rows=(cb.value_rows if cb is not None else 0) + guide_rows,
                     critic_backward_rows=guide_rows, reward_rows=m, decode_rows=m, num_outputs=g,
                     reward_price=reward_price)
    cost.wall_time_s = time.perf_counter() - t0
    return SteerResult(samples=images[pick], decoded=decoded[pick], rewards=rewards[pick], particles=images,
                       particle_rewards=rewards, log_weights=log_weights, ess=ess, resampled=resampled,
                       guidance_factor=factor, chosen=pick, cost=cost)


def _denoiser_of(pipe):
    """The pipeline's UNet or transformer (None for a pipeline with neither)."""
    return getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)


class _RowCounter:
    """A forward pre-hook counting the rows of every batch the pipeline's denoiser runs (``backbone_rows``); it
    reads the sample (``sample`` / ``hidden_states``, or the first positional argument) and changes nothing."""

    def __init__(self, denoiser):
        self.rows = 0
        self.handle = None if denoiser is None else denoiser.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        if isinstance(x, torch.Tensor):
            self.rows += x.shape[0]

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
