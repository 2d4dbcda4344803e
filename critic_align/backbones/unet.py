"""Adapter for diffusers UNets: ``UNet2DModel`` (class labels) and ``UNet2DConditionModel`` (SD1.5 class)."""

from __future__ import annotations

import torch
from torch import nn

from .base import BackboneAdapter


class UNetAdapter(BackboneAdapter):
    """Wraps a diffusers UNet.

    Feature levels: 'mid' = the mid-block output (B, C, h, w); 'multi' = every down block's full-resolution
    output (its last resnet's, before the downsampler: (B, C_i, H / 2^i, W / 2^i)) and the mid block's, so the
    head sees fine detail as well as the bottleneck.  temb: ``time_embedding``'s output.  Conditioning
    embedding: ``class_embedding``'s output for a class-conditional ``UNet2DModel``; the mean over tokens of
    the text encoder states for ``UNet2DConditionModel`` (SD1.5 has no pooled projection in its UNet).

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

    def feature_layers(self, which="mid") -> list[str]:
        if which == "mid":
            return ["mid_block"]
        if which == "multi":
            return [f"down_blocks.{i}" for i in range(len(self.model.down_blocks))] + ["mid_block"]
        return self._check_layers(which)

    def level_from_output(self, name: str, output) -> torch.Tensor:
        if name.startswith("down_blocks.") and name.count(".") == 1:
            # a down block returns (hidden_states, res_samples): res_samples[n_resnets - 1] is its last
            # resnet's (or attention's) output at the block's input resolution, before any downsampler
            block = self.model.get_submodule(name)
            return output[1][len(block.resnets) - 1]
        return super().level_from_output(name, output)

    def cond_module(self) -> nn.Module | None:
        return self.model.class_embedding if self.kind == "class" else None

    def pooled_cond(self, cond):
        if self.kind == "condition" and cond is not None:
            return cond.mean(dim=1)
        return None

    @property
    def cond_dim(self) -> int | None:
        if self.kind == "condition":
            return int(self.model.config.cross_attention_dim)
        return self.temb_dim if self.model.class_embedding is not None else None

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
