"""The ``Rollout``: one typed record flowing from sampling to rewards to advantages to the update.

Shapes (B = trajectories, T = denoising steps, S = latent shape, K = rewards):
    latents         (B, T+1, *S)  latents[:, 0] = x_T (noise) ... latents[:, T] = x_0 (final sample)
    timesteps       (T,)          t_k of the transition latents[:, k] -> latents[:, k+1]
    prev_timesteps  (T,)          t_{k+1}; -1 for the final transition
    log_probs       (B, T)        log p_old(latents[:, k+1] | latents[:, k]) recorded while sampling
    cond            (B, ...)      the conditioning given to the denoiser: a tensor, a
                                  :class:`~critic_align.cond.TextCond` (SD3: embeds + pooled), or None
    prompts         list of B     the prompts (group ids for GRPO/DDPO come from them)
    samples         (B, ...)      decoded outputs given to the rewards (images in [-1, 1])
    rewards         (B, K)        reward matrix (NaN = "not applicable" where a reward allows it)
    values          (B, T, K)     critic values V(latents[:, k], t_k), when a critic is used
    advantages      (B, T)        combined advantage per (trajectory, step)
    returns         (B, T, K)     value targets per reward head
    x0              (B, *S)       the final sample x_0 when the recorded trajectory is an SDE window that the ODE
                                  continued past latents[:, -1]; None = latents[:, -1] is x_0 (``final`` reads it)
    x0_preds        (B, T, *S)    the policy's one-step prediction x̂0(latents[:, k]) made while sampling (only when
                                  asked for: ``record_x0``); the scorer turns them into ``x0_rewards`` and drops them
    x0_rewards      (B, T, K)     r(decode(x̂0(latents[:, k]))): the trained rewards of those predictions, the value
                                  head's extra input under ``critic_x0_reward`` (NaN where a reward does not apply)

With an SDE window (:mod:`critic_align.sde_window`) T is the window's W steps: latents[:, 0] is the deterministic state at
the window's start, timesteps are the window's, and the sample is ``final`` (= x0).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Callable

import torch

from .cond import TextCond, cat_cond
from .steps import DDIMStep

Denoiser = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


@dataclass(frozen=True)
class Rollout:
    """Immutable: each stage returns a new record (``dataclasses.replace``)."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    prev_timesteps: torch.Tensor
    log_probs: torch.Tensor
    cond: torch.Tensor | TextCond | None
    prompts: list = field(default_factory=list)
    samples: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    x0: torch.Tensor | None = None
    x0_preds: torch.Tensor | None = None
    x0_rewards: torch.Tensor | None = None

    _PER_SAMPLE = ("latents", "log_probs", "cond", "samples", "rewards", "values", "advantages", "returns", "x0",
                   "x0_preds", "x0_rewards")

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    @property
    def final(self) -> torch.Tensor:
        """(B, *S) the final samples x_0."""
        return self.latents[:, -1] if self.x0 is None else self.x0

    def validate(self) -> "Rollout":
        b, t = self.batch_size, self.num_steps
        if self.latents.shape[1] != t + 1:
            raise ValueError(f"latents has {self.latents.shape[1]} states for {t} steps; expected T+1 = {t + 1}")
        if self.prev_timesteps.shape != self.timesteps.shape:
            raise ValueError("prev_timesteps must have the same shape (T,) as timesteps")
        if self.log_probs.shape != (b, t):
            raise ValueError(f"log_probs must be (B, T) = {(b, t)}, got {tuple(self.log_probs.shape)}")
        if len(self.prompts) != b:
            raise ValueError(f"{len(self.prompts)} prompts for {b} trajectories")
        if self.cond is not None and len(self.cond) != b:
            raise ValueError(f"cond has batch {len(self.cond)}, expected {b}")
        if self.rewards is not None and (self.rewards.ndim != 2 or self.rewards.shape[0] != b):
            raise ValueError(f"rewards must be (B, K) with B = {b}, got {tuple(self.rewards.shape)}")
        if self.x0 is not None and self.x0.shape != self.latents[:, -1].shape:
            raise ValueError(f"x0 must be (B, *S) = {tuple(self.latents[:, -1].shape)}, got {tuple(self.x0.shape)}")
        if self.values is not None and self.values.shape[:2] != (b, t):
            raise ValueError(f"values must be (B, T, K) with (B, T) = {(b, t)}, got {tuple(self.values.shape)}")
        if self.x0_preds is not None and self.x0_preds.shape != self.latents[:, 1:].shape:
            raise ValueError(f"x0_preds must be (B, T, *S) = {tuple(self.latents[:, 1:].shape)}, "
                             f"got {tuple(self.x0_preds.shape)}")
        if self.x0_rewards is not None and (self.x0_rewards.ndim != 3 or self.x0_rewards.shape[:2] != (b, t)):
            raise ValueError(f"x0_rewards must be (B, T, K) with (B, T) = {(b, t)}, got {tuple(self.x0_rewards.shape)}")
        return self

    def select(self, index) -> "Rollout":
        """The trajectories at ``index`` (a (n,) long tensor, list or slice), every per-sample field re-indexed."""
        if isinstance(index, slice):
            index = torch.arange(self.batch_size)[index]
        index = torch.as_tensor(index, dtype=torch.long)
        updates = {}
        for name in self._PER_SAMPLE:
            value = getattr(self, name)
            if value is not None:
                updates[name] = value[index.to(value.device)]
        updates["prompts"] = [self.prompts[i] for i in index.tolist()]
        return replace(self, **updates)

    def to(self, device) -> "Rollout":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), (torch.Tensor, TextCond))})

    @staticmethod
    def cat(rollouts: list["Rollout"]) -> "Rollout":
        """Concatenate rollouts with identical timesteps along the batch."""
        first = rollouts[0]
        for r in rollouts[1:]:
            if not torch.equal(r.timesteps, first.timesteps):
                raise ValueError("cannot concatenate rollouts with different timesteps")
        out = {}
        for name in Rollout._PER_SAMPLE:
            vals = [getattr(r, name) for r in rollouts]
            if all(v is None for v in vals):
                out[name] = None
            elif any(v is None for v in vals):
                raise ValueError(f"some rollouts have {name} and some do not")
            else:
                out[name] = cat_cond(vals) if name == "cond" else torch.cat(vals)
        out["prompts"] = [p for r in rollouts for p in r.prompts]
        return replace(first, **out)


def check_stochastic_timesteps(timesteps: torch.Tensor) -> None:
    """A stochastic rollout cannot end with a step from t = 0: ᾱ_0 is already the final noise level, so
    that transition has zero variance and no log-probability."""
    if int(timesteps[-1]) == 0:
        raise ValueError(
            "the last timestep is 0, so the final transition has no noise and no log-probability; use "
            "timestep_spacing='trailing' or steps_offset=1 in the scheduler config (SD1.5's config has "
            "steps_offset=1), or drop the last step"
        )


def cfg_denoiser(denoiser: Denoiser, guidance_scale: float, null_cond) -> Denoiser:
    """Classifier-free guidance as a denoiser wrapper: out = u + s·(c − u), one batched forward.

    ``null_cond(batch_size)`` returns the unconditional conditioning.  scale 1.0 returns ``denoiser``.
    """
    if guidance_scale == 1.0:
        return denoiser

    def guided(x, t, cond):
        b = x.shape[0]
        both = denoiser(torch.cat([x, x]), torch.cat([t, t]), cat_cond([cond, null_cond(b)]))
        c, u = both.chunk(2)
        return u + guidance_scale * (c - u)

    return guided


def sample_trajectories(denoiser: Denoiser, step: DDIMStep, x_T: torch.Tensor, timesteps: torch.Tensor,
                        cond=None, prompts=None, generator: torch.Generator | None = None,
                        prev_timesteps: torch.Tensor | None = None, progress: bool = False,
                        record_x0: bool = False) -> Rollout:
    """Run the stochastic sampler from x_T and record every state and transition log-prob (``record_x0``: and the
    step's x0 prediction at every state, as ``x0_preds``).

    A plain function of a denoiser callable ``denoiser(x_t, t (B,), cond) -> model output``: no scheduler
    state.  Runs without gradients; the returned tensors are ordinary (not inference-mode) tensors, so
    the update can differentiate through fresh forwards on them.
    """
    step.require_stochastic("recording a rollout's log-probabilities")
    if prev_timesteps is None:
        prev_timesteps = step.schedule.prev_timesteps(timesteps)
    check_stochastic_timesteps(timesteps)
    b = x_T.shape[0]
    x = x_T
    states, log_probs, x0_preds = [x_T], [], []
    iterator = range(len(timesteps))
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="sampling", leave=False)
    with torch.no_grad():
        for k in iterator:
            t = timesteps[k].expand(b).to(x.device)
            out = step(denoiser(x, t, cond), x, t, prev_timesteps[k].to(x.device), generator=generator)
            x = out.prev_sample
            states.append(x)
            log_probs.append(out.log_prob)
            if record_x0:
                x0_preds.append(out.x0_pred.to(x.dtype))
    return Rollout(
        latents=torch.stack(states, dim=1),
        timesteps=timesteps.clone(),
        prev_timesteps=prev_timesteps.clone(),
        log_probs=torch.stack(log_probs, dim=1),
        cond=cond,
        prompts=list(prompts) if prompts is not None else [""] * b,
        x0_preds=torch.stack(x0_preds, dim=1) if record_x0 else None,
    ).validate()


def sample(denoiser: Denoiser, step: DDIMStep, x_T: torch.Tensor, timesteps: torch.Tensor, cond=None,
           generator: torch.Generator | None = None, prev_timesteps: torch.Tensor | None = None,
           progress: bool = False) -> torch.Tensor:
    """Plain sampling (no log-probs recorded): returns x_0.  Works with eta = 0 (deterministic DDIM)."""
    if prev_timesteps is None:
        prev_timesteps = step.schedule.prev_timesteps(timesteps)
    x = x_T
    iterator = range(len(timesteps))
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="sampling", leave=False)
    with torch.no_grad():
        for k in iterator:
            t = timesteps[k].expand(x.shape[0]).to(x.device)
            x = step(denoiser(x, t, cond), x, t, prev_timesteps[k].to(x.device), generator=generator).prev_sample
    return x

