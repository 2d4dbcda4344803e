"""Reward interface, output validation and reward combination.

Conventions shared by every reward in :mod:`critic_align.rewards`:

* **samples** are a batch of images, a float tensor of shape ``(B, C, H, W)`` with values in
  ``[-1, 1]`` (the range the diffusion models produce);
* **prompts** are a sequence of ``B`` strings, one per sample (rewards that do not look at the
  prompt ignore them, but the length is still checked);
* a reward returns a ``(B,)`` **float32** tensor, one value per sample, *higher is better*.
  Values must be finite.  A reward whose class sets ``allows_nan = True`` may return NaN for a
  sample to mean "not applicable to this sample"; :class:`MultiReward` treats such entries as
  missing.

A reward is *differentiable* when the returned tensor carries a gradient with respect to the
samples (e.g. a classifier probability); non-differentiable rewards (JPEG size, argmax accuracy,
external scorers) are evaluated under :func:`torch.no_grad` and return detached tensors.

Every failure of a reward call -- an exception inside :meth:`Reward.compute` or an invalid output
-- surfaces as a :class:`RewardError` whose message names the reward.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = ["FunctionReward", "MultiReward", "Reward", "RewardError", "check_reward_output"]

_MAX_LISTED = 10


class RewardError(RuntimeError):
    """A reward failed: its ``compute`` raised, or it returned an invalid value.

    The message always names the reward; when ``compute`` raised, the original exception is
    chained as ``__cause__``.
    """


def _format_indices(mask: torch.Tensor) -> str:
    idx = torch.nonzero(mask.reshape(-1)).reshape(-1).tolist()
    if len(idx) <= _MAX_LISTED:
        return str(idx)
    return str(idx[:_MAX_LISTED])[:-1] + f", ...] ({len(idx)} in total)"


def check_reward_output(name: str, value, batch_size: int, allows_nan: bool = False) -> torch.Tensor:
    """Validate the output of reward ``name`` for a batch of ``batch_size`` samples.

    Accepts a tensor, a numpy array or a list/tuple of numbers of shape ``(batch_size,)``.
    Integer and boolean values (e.g. 0/1 correctness) are fine and are converted; the result is
    always a float32 tensor (on the input tensor's device; autograd history is kept).

    Raises :class:`RewardError` (naming the reward) when the value is a scalar, a string or
    otherwise not array-like; when its shape is not exactly ``(batch_size,)`` (a ``(B, 1)``
    column is *not* squeezed silently); when its dtype is complex or not numeric; when any entry
    is +-inf; and when any entry is NaN unless ``allows_nan`` is true.
    """
    if isinstance(value, torch.Tensor):
        tensor = value
    elif isinstance(value, (str, bytes)):
        raise RewardError(
            f"reward {name!r} returned a {type(value).__name__} ({value!r:.50}); "
            f"rewards must return a (B,) tensor of numbers"
        )
    elif isinstance(value, (np.ndarray, list, tuple)):
        try:
            tensor = torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise RewardError(
                f"reward {name!r} returned a {type(value).__name__} that cannot be converted to a "
                f"tensor ({exc}); rewards must return a (B,) tensor of numbers"
            ) from exc
    elif isinstance(value, (int, float, bool, np.number, np.bool_)):
        raise RewardError(
            f"reward {name!r} returned a scalar ({type(value).__name__} {value!r}); rewards must return "
            f"one value per sample, a (B,) tensor with B = {batch_size}"
        )
    else:
        raise RewardError(
            f"reward {name!r} returned a {type(value).__name__}; rewards must return a (B,) tensor "
            f"(a numpy array or a list of numbers is also accepted)"
        )

    if tuple(tensor.shape) != (batch_size,):
        raise RewardError(
            f"reward {name!r} returned shape {tuple(tensor.shape)}, expected (B,) = ({batch_size},): "
            f"one value per sample"
        )
    if not (tensor.is_floating_point() or tensor.dtype == torch.bool or _is_integer(tensor)):
        raise RewardError(f"reward {name!r} returned dtype {tensor.dtype}; expected real numbers")
    tensor = tensor.to(torch.float32)

    inf = torch.isinf(tensor)
    if bool(inf.any()):
        raise RewardError(
            f"reward {name!r} returned inf for samples {_format_indices(inf)}; rewards must be finite "
            f"(use NaN with allows_nan=True to mean 'not applicable')"
        )
    if not allows_nan:
        nan = torch.isnan(tensor)
        if bool(nan.any()):
            raise RewardError(
                f"reward {name!r} returned NaN for samples {_format_indices(nan)}; "
                f"if NaN means 'not applicable', set allows_nan=True"
            )
    return tensor


def _is_integer(tensor: torch.Tensor) -> bool:
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        return False
    try:
        torch.iinfo(tensor.dtype)
    except TypeError:
        return False
    return True


def _batch_size(name: str, samples) -> int:
    if isinstance(samples, torch.Tensor):
        if samples.ndim == 0:
            raise RewardError(f"reward {name!r} got a 0-d tensor as samples; expected a batch (B, C, H, W)")
        return int(samples.shape[0])
    try:
        return len(samples)
    except TypeError:
        raise RewardError(
            f"reward {name!r} got samples of type {type(samples).__name__}; expected a (B, C, H, W) tensor"
        ) from None


def _check_prompts(name: str, prompts, batch_size: int) -> None:
    if prompts is None:
        return
    if isinstance(prompts, (str, bytes)):
        raise RewardError(
            f"reward {name!r} got a single {type(prompts).__name__} as prompts; "
            f"pass a sequence of {batch_size} strings, one per sample"
        )
    if hasattr(prompts, "__len__") and len(prompts) != batch_size:
        raise RewardError(
            f"reward {name!r} got {len(prompts)} prompts for {batch_size} samples; expected one prompt per sample"
        )


class Reward(abc.ABC):
    """Base class of rewards: ``reward(samples, prompts) -> (B,) float32 tensor``.

    Subclasses set the class (or instance) attributes

    * ``name`` -- a short identifier used in logs and error messages (defaults to the class name);
    * ``differentiable`` -- whether the output carries gradients w.r.t. ``samples`` (default
      ``False``: :meth:`__call__` then runs :meth:`compute` under :func:`torch.no_grad` and
      returns a detached tensor);
    * ``allows_nan`` -- whether NaN may be returned to mean "not applicable to this sample"
      (default ``False``: NaN is an error);

    and implement :meth:`compute`.  Call the reward, not ``compute``: :meth:`__call__` checks the
    batch, wraps any exception in a :class:`RewardError` naming the reward, and validates the
    output with :func:`check_reward_output`.
    """

    name: str = ""
    differentiable: bool = False
    allows_nan: bool = False
    prompt_metadata: dict | None = None
    """prompt -> metadata of the run's JSONL prompt file (:meth:`set_prompt_metadata`), or None."""

    @property
    def _display_name(self) -> str:
        return self.name or type(self).__name__

    def set_prompt_metadata(self, table: dict | None) -> None:
        """Give the reward the metadata of the run's prompts (prompt -> dict; None: the prompts have none)."""
        self.prompt_metadata = dict(table) if table else None

    def metadata(self, prompts: Sequence[str]) -> list[dict | None] | None:
        """Each prompt's metadata (None for a prompt without any), or None when the run's prompts have none."""
        if not self.prompt_metadata:
            return None
        return [self.prompt_metadata.get(p) for p in prompts]

    @abc.abstractmethod
    def compute(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Return one reward per sample (shape ``(B,)``; any real dtype, converted to float32)."""

    def __call__(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        name = self._display_name
        batch_size = _batch_size(name, samples)
        _check_prompts(name, prompts, batch_size)
        if self.differentiable:
            return self._compute_checked(name, samples, prompts, batch_size)
        with torch.no_grad():
            return self._compute_checked(name, samples, prompts, batch_size).detach()

    def _compute_checked(self, name, samples, prompts, batch_size) -> torch.Tensor:
        try:
            value = self.compute(samples, prompts)
        except Exception as exc:
            raise RewardError(f"reward {name!r} failed: {type(exc).__name__}: {exc}") from exc
        return check_reward_output(name, value, batch_size, allows_nan=self.allows_nan)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self._display_name!r}, differentiable={self.differentiable})"


class FunctionReward(Reward):
    """A reward from a plain function ``fn(samples, prompts) -> (B,)`` values.

    ``name`` defaults to ``fn.__name__``.  Example::

        brightness = FunctionReward(lambda x, p: x.mean(dim=(1, 2, 3)), name="brightness",
                                    differentiable=True)
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor, Sequence[str]], torch.Tensor],
        name: str | None = None,
        differentiable: bool = False,
        allows_nan: bool = False,
    ):
        if not callable(fn):
            raise TypeError(f"FunctionReward needs a callable fn(samples, prompts), got {type(fn).__name__}")
        name = name if name is not None else getattr(fn, "__name__", None)
        if not isinstance(name, str) or not name:
            raise ValueError("FunctionReward needs a non-empty name (fn has no usable __name__)")
        self.fn = fn
        self.name = name
        self.differentiable = bool(differentiable)
        self.allows_nan = bool(allows_nan)

    def compute(self, samples, prompts):
        return self.fn(samples, prompts)


class MultiReward:
    """Several rewards evaluated together, with weights for a scalar combination.

    ``MultiReward(rewards, weights=None)``: ``rewards`` a non-empty list of :class:`Reward` with
    distinct names; ``weights`` one finite number per reward (default all 1.0, not all zero;
    negative weights are allowed, e.g. to penalise a reward).

    Calling it returns a ``(B, K)`` float32 matrix whose column ``k`` is ``rewards[k](samples,
    prompts)``; each column is validated by its own reward, so NaN appears only in columns whose
    reward has ``allows_nan``.  Attributes: ``rewards`` and ``names`` (tuples, in column order),
    ``weights`` (1-D float32 tensor) and ``differentiable`` (true when all rewards are).
    """

    def __init__(self, rewards: Sequence[Reward], weights: Sequence[float] | torch.Tensor | None = None):
        rewards = tuple(rewards)
        if not rewards:
            raise ValueError("MultiReward needs at least one reward")
        for r in rewards:
            if not isinstance(r, Reward):
                raise TypeError(
                    f"MultiReward takes Reward instances, got {type(r).__name__}; wrap plain functions "
                    f"in FunctionReward(fn, name=...)"
                )
        names = tuple(r._display_name for r in rewards)
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"MultiReward reward names must be distinct, duplicated: {dupes}")
        if weights is None:
            w = torch.ones(len(rewards), dtype=torch.float32)
        else:
            w = torch.as_tensor(
                weights.detach().cpu() if isinstance(weights, torch.Tensor) else list(weights),
                dtype=torch.float32,
            ).reshape(-1)
            if w.numel() != len(rewards):
                raise ValueError(f"MultiReward got {w.numel()} weights for {len(rewards)} rewards {list(names)}")
            if not bool(torch.isfinite(w).all()):
                raise ValueError(f"MultiReward weights must be finite, got {w.tolist()}")
            if not bool((w != 0).any()):
                raise ValueError("MultiReward weights are all zero")
        self.rewards = rewards
        self.names = names
        self.weights = w
        self.differentiable = all(r.differentiable for r in rewards)

    def set_prompt_metadata(self, table: dict | None) -> None:
        for r in self.rewards:
            r.set_prompt_metadata(table)

    def __len__(self) -> int:
        return len(self.rewards)

    def __repr__(self) -> str:
        pairs = ", ".join(f"{n}: {w:g}" for n, w in zip(self.names, self.weights.tolist()))
        return f"MultiReward({{{pairs}}})"

    def __call__(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Return the ``(B, K)`` float32 matrix of rewards (column ``k`` = ``rewards[k]``)."""
        columns = [r(samples, prompts) for r in self.rewards]
        device = samples.device if isinstance(samples, torch.Tensor) else columns[0].device
        return torch.stack([c.to(device) for c in columns], dim=1)

    def weighted_sum(self, matrix: torch.Tensor) -> torch.Tensor:
        """Combine a ``(B, K)`` reward matrix into ``(B,)``: ``sum_k w_k r_k`` over available rewards.

        NaN entries mean "reward not applicable to this sample" and are treated as missing: for
        each sample the weighted sum runs over the available rewards only and is rescaled by
        ``W / W_avail``, where ``W = sum_k |w_k|`` is the total weight and ``W_avail`` the total
        weight of the available rewards.  So a sample with every reward present gets exactly
        ``sum_k w_k r_k``, and a sample missing some rewards gets the weighted mean of the others
        put on the same scale.  Rewards with weight 0 count as missing; a sample with no
        available reward gets NaN.  (With non-negative weights ``|w_k| = w_k``; absolute values
        keep the rescaling well-defined for negative weights.)  Differentiable in ``matrix``.
        """
        if not isinstance(matrix, torch.Tensor):
            raise TypeError(f"weighted_sum expects a (B, K) tensor, got {type(matrix).__name__}")
        k = len(self.rewards)
        if matrix.ndim != 2 or matrix.shape[1] != k:
            raise ValueError(
                f"weighted_sum expects a (B, {k}) matrix (one column per reward {list(self.names)}), "
                f"got shape {tuple(matrix.shape)}"
            )
        matrix = matrix.float()
        w = self.weights.to(matrix.device)
        avail = ~torch.isnan(matrix) & (w != 0)
        filled = torch.where(avail, matrix, torch.zeros_like(matrix))
        total = (filled * w).sum(dim=1)
        w_abs = w.abs()
        w_avail = (avail.float() * w_abs).sum(dim=1)
        scale = w_abs.sum() / w_avail.clamp_min(torch.finfo(torch.float32).tiny)
        return torch.where(w_avail > 0, total * scale, torch.full_like(total, math.nan))
