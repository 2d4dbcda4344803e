"""The SDE window (Flow-GRPO-Fast / MixGRPO): which denoising steps of a training rollout are stochastic and trained.

Everything about the window lives here and reaches the rest through one record, :class:`Window`: the epoch draws one
from the config and the run's generator (:func:`draw_window`, the only reader of ``sde_window_size`` /
``sde_window_range``), the collect stage samples through it (:meth:`Window.sample`: the window's steps stochastic and
recorded, the ODE before and after it), and the epoch's metrics row reports it (:meth:`Window.metrics`).
:data:`EVERY_STEP` is the run without a window: every step stochastic and trained, the full MDP.

Downstream of the rollout nothing needs the window: a window's :class:`~critic_align.rollout.Rollout` *is* the
window's W transitions (latents[:, 0] the ODE state at its start, ``x0`` the ODE's continuation of its last state), so
the estimators, the critic and the algorithms see a shorter episode and nothing else.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch

from .rollout import Denoiser, Rollout, sample, sample_trajectories
from .steps import DDIMStep


class Window(NamedTuple):
    """Steps [start, stop) (Python slice bounds into the sampler's timesteps) stochastic and recorded, the rest the
    step's ODE; start = stop = None (:data:`EVERY_STEP`): no window, every step stochastic.  A tuple, so it indexes
    and unpacks as the (start, stop) it names."""

    start: int | None = None
    stop: int | None = None

    @classmethod
    def of(cls, window: Window | tuple[int, int] | None) -> Window:
        """The window a caller names: a :class:`Window`, (start, stop), or None (every step stochastic)."""
        if window is None:
            return EVERY_STEP
        start, stop = window
        if (start is None) != (stop is None) or not (start is None or 0 <= start < stop):
            raise ValueError(f"an SDE window is (start, stop) with 0 <= start < stop, or None for every step; got "
                             f"{tuple(window)}")
        return cls(start, stop)

    @property
    def every_step(self) -> bool:
        """No window: every step is stochastic, recorded and trained."""
        return self.start is None

    def sample(self, denoiser: Denoiser, step: DDIMStep, x_T: torch.Tensor, timesteps: torch.Tensor, cond=None,
               prompts=None, generator: torch.Generator | None = None, record_x0: bool = False) -> Rollout:
        """A recorded rollout from x_T: every step's (:func:`~critic_align.rollout.sample_trajectories`) or the
        window's (:func:`sample_window`)."""
        if self.every_step:
            return sample_trajectories(denoiser, step, x_T, timesteps, cond, prompts, generator=generator,
                                       record_x0=record_x0)
        return sample_window(denoiser, step, x_T, timesteps, self, cond, prompts, generator=generator,
                             record_x0=record_x0)

    def metrics(self) -> dict:
        """What an epoch's metrics row says of its window: its first step (nothing without one)."""
        return {} if self.every_step else {"sde_window_start": self.start}


EVERY_STEP = Window()


def draw_window(config, generator: torch.Generator) -> Window:
    """An epoch's SDE window over the denoising steps (``sde_window_size`` / ``sde_window_range``), or
    :data:`EVERY_STEP` without one: the start is uniform on [lo, hi], from ``generator`` (the run's), which is not
    touched without a window."""
    if not config.sde_window_size:
        return EVERY_STEP
    lo, hi = config.sde_window_range or (0, config.num_inference_steps - config.sde_window_size)
    start = int(torch.randint(lo, hi + 1, (1,), generator=generator))
    return Window(start, start + config.sde_window_size)


def sample_window(denoiser: Denoiser, step: DDIMStep, x_T: torch.Tensor, timesteps: torch.Tensor,
                  window: tuple[int, int], cond=None, prompts=None, generator: torch.Generator | None = None,
                  record_x0: bool = False) -> Rollout:
    """A trajectory whose steps ``window = (start, stop)`` (Python slice bounds into ``timesteps``) are the stochastic
    ``step`` and the rest its deterministic ODE form (``step.ode()``): Flow-GRPO-Fast's / MixGRPO's SDE window.

    Returns the window's :class:`Rollout` (T = stop − start transitions with their log-probs; latents[:, 0] is the
    ODE state at the window's start) with ``x0`` = the ODE's continuation of its last state to the final sample.
    The whole trajectory costs the same backbone calls as :func:`sample_trajectories`; the noise is drawn only inside
    the window.  (0, len(timesteps)) is exactly :func:`sample_trajectories`'s rollout with ``x0`` set."""
    start, stop = window
    n = len(timesteps)
    if start is None or stop is None or not 0 <= start < stop <= n:
        raise ValueError(f"window {tuple(window)} must satisfy 0 <= start < stop <= {n} (the number of timesteps)")
    prev = step.schedule.prev_timesteps(timesteps)
    ode = step.ode()
    x_s = sample(denoiser, ode, x_T, timesteps[:start], cond, prev_timesteps=prev[:start]) if start else x_T
    ro = sample_trajectories(denoiser, step, x_s, timesteps[start:stop], cond, prompts, generator=generator,
                             prev_timesteps=prev[start:stop], record_x0=record_x0)
    x0 = sample(denoiser, ode, ro.latents[:, -1], timesteps[stop:], cond, prev_timesteps=prev[stop:]) \
        if stop < n else ro.latents[:, -1]
    return replace(ro, x0=x0).validate()
