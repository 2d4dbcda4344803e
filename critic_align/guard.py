"""The finiteness guard: a diverging run stops with an error instead of checkpointing non-finite weights.

The trainer calls :func:`check_update` after clipping and before every optimiser step (losses and gradient
norms), :func:`check_weights` after the step and before every checkpoint write (every trainable tensor), and
:func:`check_reward_magnitude` on each batch of trained rewards.  A non-finite value raises
:class:`DivergenceError` naming what diverged (which loss, whose gradient, which weights), the epoch (or the
value-pretraining phase) and the newest checkpoint on disk, which is the last good one: a checkpoint is only
written after :func:`check_weights` passed, so no checkpoint with non-finite weights exists and ``keep_last``
rotation only ever drops good checkpoints for newer good ones.

Checking before the step keeps the in-memory weights finite too (a NaN gradient never reaches them).  The
checks read values the trainer computes anyway (loss floats, clip_grad_norm_'s total norm) plus one
``isfinite`` pass over the trainable tensors per optimiser step (LoRA + critic: small next to a backward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import DivergenceError, latest_checkpoint, nonfinite_weights  # noqa: F401 (re-exported)

# Rewards above this magnitude are refused.  The value loss squares (value - return) in float32 and sums the
# squares over a minibatch; returns are up to |r| and a critic fitting them outputs values of the same scale,
# so one square is up to (2·|r|)².  At |r| = 1e15 that is 4e30, leaving float32's maximum (3.4e38) a factor of
# 8.5e7 for the sum over pairs; at |r| ≈ 1.8e19 a single square overflows (a 1e20 reward made the value loss
# inf and the critic silently stopped learning).  GRPO/DDPO's whitening squares (r - mean) the same way.
# No meaningful reward is this large; rescale such a reward (a weight does not help: each head sees its raw
# reward).
MAX_ABS_REWARD = 1e15


@dataclass(frozen=True)
class RunPlace:
    """Where a run stands, for a divergence message: ``phase`` (:func:`phase`), the run directory (its newest
    checkpoint is the last good one) and the config (its learning rates are named)."""

    phase: str
    run_dir: Path
    config: object


def phase(has_critic: bool, pretrained_value: bool, epoch: int) -> str:
    """The phase a divergence message names: value pretraining (a critic not fitted yet) or the epoch in training."""
    if has_critic and not pretrained_value:
        return "during value pretraining (before epoch 1)"
    return f"in epoch {epoch + 1}"


def _last_good(run_dir: Path) -> str:
    ckpt = latest_checkpoint(Path(run_dir) / "checkpoints")
    if ckpt is None:
        return "no checkpoint was written before it (nothing saved was lost); start again once the cause is fixed"
    return (f"the last good checkpoint is {ckpt} (every checkpoint on disk passed this check: nothing non-finite "
            f"was saved); it loads with critic-align train --resume-from {ckpt} once the cause is fixed (a smaller "
            "learning rate is another config: start a new run with it)")


def _raise(place: RunPlace, what: str) -> None:
    cfg, good = place.config, _last_good(place.run_dir)
    raise DivergenceError(
        f"training diverged {place.phase}: {what}. {good[0].upper()}{good[1:]}. "
        f"Likely causes: a learning rate too large (learning_rate={cfg.learning_rate:g}, critic_learning_rate="
        f"{cfg.critic_learning_rate:g}; try 10x smaller) or rewards of a huge scale"
    )


def check_update(losses: list[dict], grad_norms: dict, num_processes: int, place: RunPlace) -> None:
    """Before an optimiser step: every loss of the minibatch's parts and the clipped groups' gradient norms.

    losses: the stats dicts of the minibatch's micro-batches (keys ending in ``loss`` are checked);
    grad_norms: ``{"grad_norm_policy": float, "grad_norm_critic": float}`` (clip_grad_norm_'s total norm,
    non-finite iff a gradient entry is).  Losses are checked with one process only: with several, each
    process's losses are its own, and a non-finite loss shows up in the summed gradients on every process
    anyway, so every process raises together instead of one waiting for the others forever.
    place: where the run stands, for the message.
    """
    bad_norms = {k: v for k, v in grad_norms.items() if not math.isfinite(v)}
    bad_losses = {}
    for st in losses:
        for k, v in st.items():
            if "loss" in k and isinstance(v, float) and not math.isfinite(v):
                bad_losses.setdefault(k, v)
    if bad_norms or (bad_losses and num_processes == 1):
        parts = [f"the {k} is {v}" for k, v in bad_losses.items()]
        parts += [f"the gradient norm of the {k.removeprefix('grad_norm_')} is {v}" for k, v in bad_norms.items()]
        _raise(place, ", ".join(parts) + " (the step was not taken)")


def check_weights(models, params, place: RunPlace, when: str = "after the optimiser step") -> None:
    """Every trainable tensor (``params``: the policy LoRA and the critic of ``models``) is finite; otherwise
    :class:`DivergenceError` (:func:`~critic_align.checkpoint.nonfinite_weights` names them)."""
    bad = nonfinite_weights(models, params)
    if bad:
        what = "; ".join(f"{len(names)} {part} tensors hold NaN/inf (e.g. {names[:3]})" for part, names in bad.items())
        _raise(place, f"{what} {when}")


def check_reward_magnitude(rewards: torch.Tensor, names) -> None:
    """Refuse a (B, K) reward matrix with an entry above :data:`MAX_ABS_REWARD` in magnitude, naming the reward,
    or one with no reward at all (:func:`check_rewards_present`)."""
    from .rewards.base import RewardError

    check_rewards_present(rewards, names)
    mags = torch.nan_to_num(rewards.detach().float(), nan=0.0).abs()
    if mags.numel() == 0 or float(mags.max()) <= MAX_ABS_REWARD:
        return
    k = int(mags.max(0).values.argmax())
    idx = torch.nonzero(mags[:, k] > MAX_ABS_REWARD).reshape(-1).tolist()
    raise RewardError(
        f"reward {list(names)[k]!r} returned {float(rewards[idx[0], k]):g} for samples {idx[:10]}: magnitudes above "
        f"{MAX_ABS_REWARD:g} overflow the value loss (float32 squares of returns), so the critic would stop "
        "learning; rescale the reward (e.g. divide it by a constant or take its log)"
    )


def check_rewards_present(rewards: torch.Tensor, names) -> None:
    """Refuse a (B, K) reward matrix that is NaN everywhere: with ``allows_nan=True`` NaN means "not applicable",
    and a batch where no reward applies to any sample trains nothing (every advantage is 0, every gradient 0), so
    the run would go on without learning.  One reward NaN for the whole batch next to another that scored it is
    fine (that head's value loss skips it)."""
    from .rewards.base import RewardError

    if rewards.numel() == 0 or not bool(torch.isnan(rewards.detach().float()).all()):
        return
    names = list(names)
    which = f"reward {names[0]!r}" if len(names) == 1 else f"every reward ({', '.join(map(repr, names))})"
    raise RewardError(
        f"{which} returned NaN for all {rewards.shape[0]} samples of the batch: NaN means 'not applicable' "
        "(allows_nan=True), and a batch where nothing is scored trains nothing (zero advantages and gradients); "
        "check that the reward applies to these prompts and samples (e.g. call it on a few samples by hand)"
    )
