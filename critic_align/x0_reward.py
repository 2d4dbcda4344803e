"""The x0-reward read-out: a value head that also reads r̂_0 = r(decode(x̂0(x_t))), the trained rewards of the policy's
one-step prediction at the state (config ``critic_x0_reward``; the head's gate is in :mod:`critic_align.critic`).

Everything about it lives here and reaches the rest through one record, :class:`X0Readout`, built once from the config
(:meth:`X0Readout.from_config`, the only reader of ``critic_x0_reward``) or read off a trained critic
(:meth:`X0Readout.of_critic`):

* training: the sampler records the x0 prediction at every recorded state when the read-out asks for it
  (:attr:`X0Readout.reads`), the scorer turns those into ``Rollout.x0_rewards`` (:meth:`X0Readout.score`), the
  trainer counts the decode + reward rows apart from the reward queries (:meth:`X0Readout.rows`,
  :meth:`X0Readout.metrics`), and the value computations hand the head its extra input
  (:func:`head_input_rows`, :func:`head_input_at`, checked by :func:`check_head_input`);
* steering (:mod:`critic_align.steering`): only SMC with ``potential="value"`` can supply r̂_0 (from the step's own x0
  prediction); guidance has no gradient through it and a diffusers callback has no x0 prediction, so those refuse such
  a critic (:func:`refuse_unless_smc_value`, :func:`refuse_in_callback`, :func:`refuse_guidance`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class X0Readout:
    """Whether the value head reads r̂_0 next to the latent (``reads``): :data:`LATENT_ONLY` or
    :data:`WITH_X0_REWARD`."""

    reads: bool

    @staticmethod
    def from_config(config) -> X0Readout:
        """The read-out a run's config asks for (``critic_x0_reward``)."""
        return WITH_X0_REWARD if config.critic_x0_reward else LATENT_ONLY

    @staticmethod
    def of_critic(critic) -> X0Readout:
        """The read-out a built critic (or None) was made with: its value head's ``reads_x0_reward``."""
        return WITH_X0_REWARD if getattr(getattr(critic, "head", None), "reads_x0_reward", False) else LATENT_ONLY

    def score(self, task, rewards, x0_preds: torch.Tensor | None, prompts: list, device) -> torch.Tensor | None:
        """(B, T, K) r(decode(x̂0)) of a chunk's recorded x0 predictions (B, T, *S), or None when the head reads
        none (nothing was recorded)."""
        if not self.reads:
            return None
        if x0_preds is None:
            raise ValueError("the value head reads r(decode(x0_pred)) (critic_x0_reward), but the chunk recorded no "
                             "x0 predictions: sample it with record_x0=True")
        return x0_prediction_rewards(task, rewards, x0_preds, prompts, device)

    def rows(self, trajectories: int, steps: int) -> int:
        """The decode + reward rows scoring the x0 predictions of ``trajectories`` x ``steps`` recorded states costs
        (not reward queries: they are counted apart)."""
        return trajectories * steps if self.reads else 0

    def metrics(self, rows: int) -> dict:
        """What an epoch's metrics row says of the read-out: the run's x0 reward rows so far (nothing without it)."""
        return {"x0_reward_rows": rows} if self.reads else {}


LATENT_ONLY = X0Readout(False)
WITH_X0_REWARD = X0Readout(True)


def x0_prediction_rewards(task, rewards, x0_preds: torch.Tensor, prompts: list, device, chunk: int = 256) -> torch.Tensor:
    """(B, T, K) the rewards of decode(x̂0) for x0_preds (B, T, *S), each trajectory's prompt repeated over its steps,
    in chunks of ``chunk`` rows."""
    b, t = x0_preds.shape[:2]
    flat = x0_preds.reshape(b * t, *x0_preds.shape[2:])
    rows = [p for p in prompts for _ in range(t)]
    out = [rewards(task.decode(flat[i:i + chunk]), rows[i:i + chunk]).to(device).float()
           for i in range(0, b * t, chunk)]
    return torch.cat(out).view(b, t, -1)


# ------------------------------------------------------------------------------------ the value head's extra input
def head_input_rows(x0_rewards: torch.Tensor | None, device) -> torch.Tensor | None:
    """(B·T, K) a rollout's (B, T, K) ``x0_rewards`` in (trajectory, step) order, the order the states are flattened
    in for batched values, on ``device``; None for a rollout without them (a head that reads the latent only)."""
    return None if x0_rewards is None else x0_rewards.reshape(-1, x0_rewards.shape[-1]).to(device)


def head_input_at(x0_rewards: torch.Tensor | None, traj: torch.Tensor, step: torch.Tensor, device) -> torch.Tensor | None:
    """(N, K) the x0 rewards of the states (``traj``, ``step``) of a rollout's (B, T, K) ``x0_rewards``, on
    ``device``; None for a rollout without them."""
    return None if x0_rewards is None else x0_rewards[traj, step].to(device)


def check_head_input(reads: bool, x0_reward: torch.Tensor | None, shape: tuple | None = None) -> None:
    """A value head that reads r̂_0 gets it with every call and one that does not never does; ``shape``: the (B, K)
    it must have."""
    if reads != (x0_reward is not None):
        raise ValueError("this value head reads r(decode(x0_pred)) (critic_x0_reward): pass x0_reward" if reads else
                         "x0_reward given to a value head built without critic_x0_reward")
    if x0_reward is not None and shape is not None and tuple(x0_reward.shape) != tuple(shape):
        raise ValueError(f"x0_reward must be (B, K) = {tuple(shape)}, got {tuple(x0_reward.shape)}")


# ------------------------------------------------------------------------------------ steering with such a critic
def reads_x0_reward(critic) -> bool:
    """Whether ``critic`` (or None) reads r(decode(x0_pred)) next to the latent (``critic_x0_reward``)."""
    return X0Readout.of_critic(critic).reads


def needs_x0_reward(value_fn) -> bool:
    """Whether a steering value function must be called with r̂_0 (it wraps a critic that reads it:
    :class:`critic_align.steering.values.X0CriticValueFn` says so with ``needs_x0_reward = True``)."""
    return bool(getattr(value_fn, "needs_x0_reward", False))


def refuse_unless_smc_value(value_fns, where: str, guided: bool, potential: str | None) -> None:
    """Steering can supply r̂_0 only as SMC's ``potential="value"`` without guidance: refuse a value function that
    needs it anywhere else (``value_fns``: those the run calls; ``guided``: a guidance term is applied)."""
    if any(needs_x0_reward(fn) for fn in value_fns) and (guided or potential != "value"):
        raise ValueError(f"{where}: this value_fn's critic reads r(decode(x0_pred)) (critic_x0_reward): steering can "
                         "use it only as an SMC potential (smc with potential='value', guidance_scale=0); for "
                         "guidance use a critic trained with critic_x0_reward: false")


def refuse_in_callback(value_fn, where: str) -> None:
    """A diffusers callback sees a state, not the denoiser's output at it, so it has no x0 prediction to score."""
    if needs_x0_reward(value_fn):
        raise ValueError(f"{where}: this critic reads r(decode(x0_pred)) (critic_x0_reward), which a diffusers "
                         "callback cannot supply; use steering.smc (potential='value'), steering.smc_x0, or a critic "
                         "trained with critic_x0_reward: false")


def refuse_guidance(critic, method: str, unguided: str) -> None:
    """A guided steering ``method`` differentiates the value in x_t, which r̂_0 has no gradient for here
    (``unguided``: the methods to offer instead)."""
    if reads_x0_reward(critic):
        raise ValueError(f"--method {method}: this run's critic reads r(decode(x0_pred)) (critic_x0_reward), which "
                         f"has no gradient in x_t here; steer it with one of {unguided}, or pretrain a fresh critic "
                         "(--config, critic_x0_reward false by default)")
