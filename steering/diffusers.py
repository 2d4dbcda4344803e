"""Steering any diffusers pipeline: SMC as a ``callback_on_step_end`` and value guidance as a scheduler wrapper.

Two hooks, no forked pipelines:

* :class:`SMCCallback` — pass it as ``callback_on_step_end`` (latents only).  After every scheduler step it
  evaluates the value of the new latents, updates the particles' log-weights by λ·(V_new − V_old), and when a
  group's ESS drops below κ·N it resamples the group: the latents, the prompt embeddings (if the pipeline
  hands them to the callback) and any per-sample history the scheduler keeps are re-indexed with the same
  ancestors.  :func:`steer_pipeline` then multiplies in the true reward of the decoded images and picks one
  image per prompt.  Latents-only means no transition densities: guidance is not allowed together with SMC
  here (the proposal correction needs the step's mean) — use :func:`steering.samplers.steer` with an
  adapter for that.
* :class:`ScoreGuidedScheduler` — wraps ``pipe.scheduler``; its ``step`` shifts the (CFG-combined) model output
  so that its implied score is the model's score plus w·∇V(x_t) before delegating to the real scheduler: VP
  schedulers (DDPM, DDIM, ...: ε / v / x0 forms via ᾱ_t), σ-parameterised Euler-family schedulers (ε form,
  latents x = x0 + σ·ε, V evaluated on the VP-scaled x/√(1+σ²)), and flow matching (v form).

Particles: ``num_images_per_prompt = N``; diffusers lays the batch out prompt-major, so groups are contiguous
(rows g·N … g·N+N−1 belong to prompt g), the layout :mod:`steering.resampling` expects.

Schedulers: SMC needs a stochastic sampler.  Accepted: DDPM, DDIM with eta > 0, Euler ancestral, LCM,
DPM-Solver++ (multistep) in an SDE variant (its ``model_outputs`` history is re-indexed), flow matching with
``stochastic_sampling=True``.  Deterministic ones (DDIM eta = 0, Euler, Heun, LMS, PNDM, UniPC, DEIS, plain
DPM-Solver) are refused with an error naming a stochastic alternative; schedulers with per-sample state we
cannot re-index (second-order ancestral KDPM2, DPM-Solver SDE's Brownian tree) are refused too.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .resampling import RESAMPLING_SCHEMES, effective_sample_size, flat_ancestors, resample

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


class SMCCallback:
    """Feynman–Kac SMC for ``pipe(..., callback_on_step_end=cb, callback_on_step_end_tensor_inputs=cb.tensor_inputs)``.

    value_fn(latents, t, cond) -> (M,): a value of the *pipeline's* latents at timestep ``t`` (the scheduler's
        timestep value the denoiser will see next); ``cond`` is the positive half of the prompt embeddings the
        pipeline hands to the callback (None if the pipeline has none).
    """

    def __init__(self, value_fn, num_particles: int, lam: float = 1.0, ess_threshold: float = 0.5,
                 resample_every: int = 1, scheme: str = "systematic", generator: torch.Generator | None = None,
                 embed_keys: Sequence[str] = ("prompt_embeds",), cfg_doubled_embeds: bool | None = None,
                 eta: float | None = None):
        if scheme not in RESAMPLING_SCHEMES:
            raise ValueError(f"unknown resampling scheme {scheme!r}; use one of {RESAMPLING_SCHEMES}")
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive int, got {num_particles!r}")
        if not 0 <= ess_threshold <= 1:
            raise ValueError(f"ess_threshold κ must be in [0, 1], got {ess_threshold}")
        self.value_fn = value_fn
        self.n = num_particles
        self.lam = lam
        self.ess_threshold = ess_threshold
        self.resample_every = resample_every
        self.scheme = scheme
        self.generator = generator
        self.embed_keys = tuple(embed_keys)
        self.cfg_doubled_embeds = cfg_doubled_embeds
        self.eta = eta  # DDIM's eta as passed to the pipeline call (checked: SMC needs eta > 0)
        self.tensor_inputs = ["latents", *self.embed_keys]
        self.reset()

    def reset(self) -> None:
        self.log_w: torch.Tensor | None = None
        self.last_potential: torch.Tensor | None = None
        self.ess_history: list[torch.Tensor] = []
        self.resampled_history: list[torch.Tensor] = []
        self.value_rows = 0

    def _next_timestep(self, pipe, i: int, latents):
        ts = pipe.scheduler.timesteps
        return ts[i + 1] if i + 1 < len(ts) else torch.zeros((), dtype=ts.dtype)

    def __call__(self, pipe, i: int, t, callback_kwargs: dict) -> dict:
        latents = callback_kwargs["latents"]
        m = latents.shape[0]
        if m % self.n:
            raise ValueError(f"the pipeline's batch of {m} latents is not a multiple of num_particles={self.n}; "
                             "call the pipeline with num_images_per_prompt=num_particles")
        if i == 0:
            check_stochastic_scheduler(pipe.scheduler, self.eta)
            self.reset()
        g = m // self.n
        embeds = {k: callback_kwargs[k] for k in self.embed_keys if callback_kwargs.get(k) is not None}
        cond = None
        if "prompt_embeds" in embeds:
            pe = embeds["prompt_embeds"]
            doubled = self.cfg_doubled_embeds if self.cfg_doubled_embeds is not None else pe.shape[0] == 2 * m
            cond = pe[m:] if doubled else pe  # diffusers: torch.cat([negative, positive]) under CFG
        t_next = self._next_timestep(pipe, i, latents)
        with torch.no_grad():
            v = self.value_fn(latents, t_next.expand(m).to(latents.device), cond)
        if not isinstance(v, torch.Tensor) or v.shape != (m,) or not torch.isfinite(v).all():
            raise ValueError(f"value_fn must return a finite (batch,) tensor, got "
                             f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
        self.value_rows += m
        pot = self.lam * v.double()
        if self.log_w is None:
            self.log_w = torch.zeros(g, self.n, dtype=torch.float64, device=latents.device)
            self.last_potential = torch.zeros(m, dtype=torch.float64, device=latents.device)
        self.log_w += (pot - self.last_potential).view(g, self.n)
        self.last_potential = pot
        ess = effective_sample_size(self.log_w)
        self.ess_history.append(ess.cpu())
        do = ess < self.ess_threshold * self.n
        if i % self.resample_every:
            do = torch.zeros_like(do)
        self.resampled_history.append(do.cpu())
        if not bool(do.any()):
            return {}
        anc = resample(self.log_w, self.scheme, self.generator)
        anc = torch.where(do.unsqueeze(1), anc, torch.arange(self.n, device=anc.device).expand(g, self.n))
        idx = flat_ancestors(anc).to(latents.device)
        self.log_w[do] = 0.0
        self.last_potential = self.last_potential[idx]
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

    def final_choice(self, rewards: torch.Tensor, output: str = "argmax", generator=None) -> torch.Tensor:
        """Multiply in exp(λ·r) (replacing the last value potential) and pick one particle per group: (G,) flat rows."""
        m = rewards.shape[0]
        g = m // self.n
        if self.log_w is None:
            self.log_w = torch.zeros(g, self.n, dtype=torch.float64)
            self.last_potential = torch.zeros(m, dtype=torch.float64)
        self.log_w += (self.lam * rewards.double().to(self.log_w.device) - self.last_potential).view(g, self.n)
        if output == "argmax":
            choice = rewards.view(g, self.n).argmax(-1).cpu()
        elif output == "sample":
            choice = torch.multinomial(torch.softmax(self.log_w, -1).cpu(), 1, generator=generator).squeeze(1)
        else:
            raise ValueError(f"output must be 'argmax' or 'sample', got {output!r}")
        return choice + self.n * torch.arange(g)


class ScoreGuidedScheduler:
    """A wrapper around a diffusers scheduler whose ``step`` applies value guidance to the model output.

    ``pipe.scheduler = ScoreGuidedScheduler(pipe.scheduler, value_fn, scale)``; everything else is delegated.
    value_fn(x_vp, t, None) -> (B,) is evaluated on VP-scaled latents (for Euler-family schedulers x/√(1+σ²)),
    on a detached input with gradients enabled.  ``rows`` counts critic rows (forward + backward each).
    """

    def __init__(self, scheduler, value_fn: Callable, scale: float):
        object.__setattr__(self, "_scheduler", scheduler)
        object.__setattr__(self, "value_fn", value_fn)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "rows", 0)
        kind = self._kind()
        object.__setattr__(self, "kind", kind)

    def _kind(self) -> str:
        s = self._scheduler
        name = type(s).__name__
        if name.startswith("FlowMatch"):
            return "flow"
        if hasattr(s, "sigmas") and name.startswith(("Euler", "Heun", "LMS", "KDPM2", "DPMSolverSDE")):
            if s.config.get("prediction_type", "epsilon") != "epsilon":
                raise ValueError(f"{name}: value guidance for σ-parameterised schedulers supports prediction_type "
                                 f"'epsilon', got {s.config.prediction_type!r}")
            return "sigma"
        if hasattr(s, "alphas_cumprod"):
            return "vp"
        raise ValueError(f"{name}: no value-guidance formula for this scheduler (needs alphas_cumprod, sigmas, or "
                         "flow matching)")

    def __getattr__(self, item):
        return getattr(self._scheduler, item)

    def __setattr__(self, key, value):
        setattr(self._scheduler, key, value)

    def _sigma(self, timestep) -> torch.Tensor:
        s = self._scheduler
        idx = s.index_for_timestep(timestep) if s.step_index is None else s.step_index
        return s.sigmas[idx]

    def step(self, model_output, timestep, sample, *args, **kwargs):
        if self.scale == 0:
            return self._scheduler.step(model_output, timestep, sample, *args, **kwargs)
        b = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).expand(b)
        if self.kind == "sigma":
            sigma = self._sigma(timestep).to(sample.device, torch.float32)
            scale_in = 1.0 / (sigma**2 + 1).sqrt()
        else:
            scale_in = torch.ones((), device=sample.device)
        x = (sample.detach().float() * scale_in).requires_grad_(True)
        with torch.enable_grad():
            v = self.value_fn(x, t, None)
            if not isinstance(v, torch.Tensor) or v.shape != (b,):
                raise ValueError(f"value_fn must return a (batch,) tensor, got {getattr(v, 'shape', type(v))}")
            (grad_vp,) = torch.autograd.grad(v.sum(), x)
        object.__setattr__(self, "rows", self.rows + b)
        g = self.scale * grad_vp
        out = model_output.float()
        if self.kind == "vp":
            a = self._scheduler.alphas_cumprod.to(sample.device)[torch.as_tensor(timestep).long()].float()
            pt = self._scheduler.config.prediction_type
            if pt == "epsilon":
                out = out - (1 - a).sqrt() * g
            elif pt == "v_prediction":
                out = out - ((1 - a) / a).sqrt() * g
            else:
                out = out + (1 - a) / a.sqrt() * g
        elif self.kind == "sigma":
            # latents x = x0 + σ·ε: score_x = −ε/σ and ∇_x V(x/√(1+σ²)) = ∇V/√(1+σ²), so ε' = ε − σ·∇_x V
            out = out - sigma * scale_in * g
        else:  # flow matching, x = (1−σ)·x0 + σ·ε: v' = v − σ/(1−σ)·∇V (undefined at σ = 1: no guidance there)
            sigma = self._sigma(timestep).to(sample.device, torch.float32)
            if float(sigma) < 1.0:
                out = out - sigma / (1 - sigma) * g
        return self._scheduler.step(out.to(model_output.dtype), timestep, sample, *args, **kwargs)


def steer_pipeline(pipe, prompt: str | list[str], *, num_particles: int, reward_fn, value_fn=None, lam: float = 1.0,
                   ess_threshold: float = 0.5, resample_every: int = 1, scheme: str = "systematic",
                   output: str = "argmax", guidance_value_fn=None, guidance_scale_value: float = 0.0,
                   generator: torch.Generator | None = None, eta: float | None = None, **pipe_kwargs):
    """Best-of-N (``value_fn=None``) or SMC (``value_fn`` given) on any diffusers pipeline; value guidance through
    :class:`ScoreGuidedScheduler` when ``guidance_value_fn`` is given (best-of-N only: see the module doc).

    reward_fn(samples in [-1, 1] (M, C, H, W), prompts) -> (M,), the library's reward convention (any
    :class:`~critic_align.rewards.Reward` works).  Returns (images in [0, 1] (G, C, H, W), info dict).
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if guidance_value_fn is not None and value_fn is not None:
        raise ValueError("value guidance inside a pipeline cannot be combined with SMC weights (the callback sees "
                         "latents only, not the guided proposal's density); use steering.steer with an adapter")
    kwargs = dict(pipe_kwargs)
    if eta is not None:
        kwargs["eta"] = eta
    original = pipe.scheduler
    cb = None
    try:
        if guidance_value_fn is not None and guidance_scale_value != 0:
            pipe.scheduler = ScoreGuidedScheduler(original, guidance_value_fn, guidance_scale_value)
        if value_fn is not None:
            check_stochastic_scheduler(original, eta)
            cb = SMCCallback(value_fn, num_particles, lam, ess_threshold, resample_every, scheme, generator, eta=eta)
            kwargs.update(callback_on_step_end=cb, callback_on_step_end_tensor_inputs=cb.tensor_inputs)
        result = pipe(prompts, num_images_per_prompt=num_particles, generator=generator, output_type="pt", **kwargs)
    finally:
        pipe.scheduler = original
    images = result.images
    flat_prompts = [p for p in prompts for _ in range(num_particles)]
    rewards = reward_fn(images * 2 - 1, flat_prompts)
    if not isinstance(rewards, torch.Tensor) or rewards.shape != (images.shape[0],) or not torch.isfinite(rewards).all():
        raise ValueError("reward_fn must return a finite (batch,) tensor")
    if cb is not None:
        pick = cb.final_choice(rewards, output, generator)
    else:
        if output != "argmax":
            raise ValueError("output='sample' needs SMC weights: pass value_fn")
        g = len(prompts)
        pick = rewards.view(g, num_particles).argmax(-1).cpu() + num_particles * torch.arange(g)
    info = {"rewards": rewards[pick], "particle_rewards": rewards, "pick": pick,
            "log_weights": cb.log_w if cb is not None else None,
            "resampled": torch.stack(cb.resampled_history) if cb is not None and cb.resampled_history else None,
            "value_rows": cb.value_rows if cb is not None else 0}
    return images[pick], info
