"""Adapter for diffusers UNets: ``UNet2DModel`` (class labels) and ``UNet2DConditionModel`` (SD1.5 class)."""

from __future__ import annotations

import torch
from torch import nn

from .base import BackboneAdapter


class UNetAdapter(BackboneAdapter):
    """Wraps a diffusers UNet.  Tokens: the mid-block output (B, H*W, C); temb: ``time_embedding``'s output.

    ``cond`` is the conditioning tensor: class labels (B,) for ``UNet2DModel`` (or None for an
    unconditional one), text encoder hidden states (B, L, D) for ``UNet2DConditionModel``.
    """

    def __init__(self, model: nn.Module):
        super().__init__(model)
        from diffusers import UNet2DConditionModel, UNet2DModel

        if isinstance(model, UNet2DConditionModel):
            self.kind = "condition"
        elif isinstance(model, UNet2DModel):
            self.kind = "class"
        else:
            raise TypeError(
                f"UNetAdapter wraps diffusers UNet2DModel or UNet2DConditionModel, got {type(model).__name__}"
            )
        if getattr(model, "mid_block", None) is None:
            raise ValueError("UNetAdapter needs a UNet with a mid block (its output feeds the value head)")

    def _forward(self, x_t, t, cond):
        if self.kind == "condition":
            if cond is None:
                raise ValueError("UNet2DConditionModel needs cond = encoder hidden states (B, L, D)")
            return self.model(x_t, t, encoder_hidden_states=cond, return_dict=False)[0]
        return self.model(x_t, t, class_labels=cond, return_dict=False)[0]

    def feature_module(self) -> nn.Module:
        return self.model.mid_block

    def temb_module(self) -> nn.Module:
        return self.model.time_embedding

    @property
    def feature_dim(self) -> int:
        return int(self.model.config.block_out_channels[-1])

    @property
    def temb_dim(self) -> int:
        return int(self.model.time_embedding.linear_2.out_features)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype
