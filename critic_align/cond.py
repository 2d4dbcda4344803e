"""Typed conditioning that is more than one tensor (SD3: token embeddings + pooled projections).

The trainer and :class:`~critic_align.rollout.Rollout` treat a task's conditioning as a batch: they
index it (``cond[i:j]``, ``cond[index_tensor]``), repeat it per step (``cond.repeat_interleave(T, dim=0)``),
move it (``cond.to(device)``), count it (``len(cond)``) and concatenate batches (:func:`cat_cond`, e.g.
rollout chunks or the conditional + unconditional halves of classifier-free guidance).  A plain tensor
does all of that already; :class:`TextCond` does exactly the same for a pair of tensors that share
the batch dimension, so no string-keyed dicts travel through the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TextCond:
    """Text conditioning of a transformer that also takes a pooled vector (e.g. ``SD3Transformer2DModel``).

    embeds: (B, L, D) token embeddings (``encoder_hidden_states``).
    pooled: (B, P) pooled text projections (``pooled_projections``).
    """

    embeds: torch.Tensor
    pooled: torch.Tensor

    def __post_init__(self):
        if not isinstance(self.embeds, torch.Tensor) or not isinstance(self.pooled, torch.Tensor):
            raise TypeError("TextCond holds two tensors: embeds (B, L, D) and pooled (B, P)")
        if self.embeds.ndim != 3:
            raise ValueError(f"TextCond.embeds must be (B, L, D), got shape {tuple(self.embeds.shape)}")
        if self.pooled.ndim != 2:
            raise ValueError(f"TextCond.pooled must be (B, P), got shape {tuple(self.pooled.shape)}")
        if self.embeds.shape[0] != self.pooled.shape[0]:
            raise ValueError(f"TextCond: embeds has batch {self.embeds.shape[0]} but pooled has batch "
                             f"{self.pooled.shape[0]}")

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @property
    def device(self) -> torch.device:
        return self.embeds.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embeds.dtype

    def __getitem__(self, index) -> "TextCond":
        """Batch indexing (a slice, list or 1-D index tensor), like ``tensor[index]`` on dim 0; keeps the batch dim."""
        if isinstance(index, (tuple, int)) or (isinstance(index, torch.Tensor) and index.ndim != 1):
            raise TypeError("TextCond supports batch indexing that keeps the batch dimension (cond[a:b], "
                            f"cond[[i, j]], cond[index_tensor]), got {index!r}; use cond[i:i + 1] for one row")
        if isinstance(index, torch.Tensor):
            index = index.to(self.embeds.device)
        return TextCond(self.embeds[index], self.pooled[index])

    def repeat_interleave(self, repeats, dim: int = 0) -> "TextCond":
        if dim != 0:
            raise ValueError(f"TextCond repeats along the batch (dim=0) only, got dim={dim}")
        return TextCond(self.embeds.repeat_interleave(repeats, dim=0), self.pooled.repeat_interleave(repeats, dim=0))

    def to(self, *args, **kwargs) -> "TextCond":
        return TextCond(self.embeds.to(*args, **kwargs), self.pooled.to(*args, **kwargs))

    @staticmethod
    def cat(conds: list["TextCond"]) -> "TextCond":
        return TextCond(torch.cat([c.embeds for c in conds]), torch.cat([c.pooled for c in conds]))


def cat_cond(conds: list):
    """Concatenate conditioning batches along dim 0: tensors with ``torch.cat``, :class:`TextCond` with
    :meth:`TextCond.cat`.  Mixing kinds is an error."""
    if not conds:
        raise ValueError("cat_cond needs at least one conditioning batch")
    if all(isinstance(c, torch.Tensor) for c in conds):
        return torch.cat(conds)
    if all(isinstance(c, TextCond) for c in conds):
        return TextCond.cat(conds)
    raise TypeError(f"cannot concatenate conditioning of kinds {sorted({type(c).__name__ for c in conds})}; "
                    "a task's encode() and null_cond() must return the same kind")
