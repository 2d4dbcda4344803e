"""Adapter for diffusers DiT-style transformers: ``DiTTransformer2DModel`` and ``SD3Transformer2DModel``.

What the adapter exposes (the :class:`BackboneAdapter` protocol)
-----------------------------------------------------------------
``predict(x_t, t, cond)``
    The model output at latents ``x_t`` (B, C, H, W) and timesteps ``t`` (scalar or (B,)).  For a
    DiT with learned variance (``out_channels == 2 * in_channels``, the original DiT-XL/2) only the first
    ``in_channels`` channels (the ε / v prediction) are returned, as diffusers' ``DiTPipeline`` does.
``features(x_t, t, cond)`` -> :class:`Features`
    tokens: (B, N, D) the hidden image tokens after the last transformer block, i.e. before the output
    norm / projection (N = (H / patch_size) · (W / patch_size), D = heads · head_dim).  The forward stops
    right after that block.
    temb:   (B, D) the model's *timestep* embedding (the ``timestep_embedder`` output, without the class
    label / pooled-text part), for the value head's AdaLN.

Timesteps are passed to the model unchanged: integers in [0, num_train_timesteps) for a DDPM-trained DiT,
``σ · num_train_timesteps`` (floats, what ``FlowMatchSchedule.timesteps`` returns and what diffusers'
SD3 pipeline passes) for a flow-matching model.

The ``cond`` contract
---------------------
* ``DiTTransformer2DModel`` (class-conditional): ``cond`` is a (B,) int64 tensor of class labels.
  The null class for classifier-free guidance is ``num_embeds_ada_norm`` (the extra row of the label
  table that diffusers adds when the class dropout is > 0).  diffusers' label embedding replaces labels
  with the null class *at random* while the module is in training mode, so the adapter refuses a model
  in training mode (call ``model.eval()``; LoRA training works in eval mode).
* ``SD3Transformer2DModel`` (text-conditional, MMDiT): ``cond`` is a :class:`critic_align.cond.TextCond`
  holding ``embeds`` (B, L, joint_attention_dim) — the concatenated CLIP + T5 token embeddings that
  ``StableDiffusion3Pipeline.encode_prompt`` returns, passed as ``encoder_hidden_states`` — and ``pooled``
  (B, pooled_projection_dim) — its pooled CLIP embeddings, passed as ``pooled_projections``.  An
  ``(embeds, pooled)`` tuple is accepted too and converted.  ``TextCond`` supports the batch operations the
  engine applies to conditioning (see ``critic_align/cond.py``), so rollouts, CFG and minibatching work
  unchanged.  For CFG the null conditioning is the encoding of the empty prompt with the *same* L.
"""

from __future__ import annotations

import torch
from torch import nn

from ..cond import TextCond
from .base import BackboneAdapter


def as_text_cond(cond) -> TextCond:
    """A :class:`TextCond` from a ``TextCond`` or an ``(embeds, pooled)`` tuple."""
    if isinstance(cond, TextCond):
        return cond
    if isinstance(cond, (tuple, list)) and len(cond) == 2:
        return TextCond(*cond)
    raise TypeError(
        "SD3Transformer2DModel needs cond = critic_align.cond.TextCond(embeds (B, L, D), pooled (B, P)) or an "
        f"(embeds, pooled) tuple, got {type(cond).__name__}"
    )


class DiTAdapter(BackboneAdapter):
    """Wraps a diffusers ``DiTTransformer2DModel`` or ``SD3Transformer2DModel`` (see the module doc)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        from diffusers import DiTTransformer2DModel, SD3Transformer2DModel

        if isinstance(model, SD3Transformer2DModel):
            self.kind = "sd3"
        elif isinstance(model, DiTTransformer2DModel):
            self.kind = "dit"
        else:
            raise TypeError(
                f"DiTAdapter wraps diffusers DiTTransformer2DModel or SD3Transformer2DModel, got {type(model).__name__}"
            )
        cfg = model.config
        self.in_channels = int(cfg.in_channels)
        out = int(getattr(model, "out_channels", cfg.out_channels or cfg.in_channels))
        if out not in (self.in_channels, 2 * self.in_channels):
            raise ValueError(f"out_channels={out} is neither in_channels={self.in_channels} nor twice it "
                             "(learned variance); the adapter cannot tell which channels are the prediction")
        self.learned_sigma = out == 2 * self.in_channels

    def _forward(self, x_t, t, cond):
        if self.kind == "sd3":
            c = as_text_cond(cond)
            out = self.model(hidden_states=x_t, encoder_hidden_states=c.embeds, pooled_projections=c.pooled,
                             timestep=t, return_dict=False)[0]
        else:
            if cond is None:
                raise ValueError("DiTTransformer2DModel is class-conditional: cond must be (B,) class labels")
            if self.model.training and self._label_dropout() > 0:
                raise RuntimeError(
                    "the DiT is in training mode, where diffusers replaces class labels with the null class at "
                    f"random (class dropout {self._label_dropout()}); call model.eval() before using the adapter"
                )
            out = self.model(x_t, timestep=t, class_labels=cond, return_dict=False)[0]
        if self.learned_sigma:
            out = out[:, : self.in_channels]
        return out

    def _label_dropout(self) -> float:
        emb = self.model.transformer_blocks[0].norm1.emb
        return float(getattr(getattr(emb, "class_embedder", None), "dropout_prob", 0.0))

    def feature_layers(self, which="mid") -> list[str]:
        n = len(self.model.transformer_blocks)
        if which == "mid":
            return [f"transformer_blocks.{n - 1}"]
        if which == "multi":  # three depths, e.g. blocks 7 / 15 / 23 of 24 (the core seed's DiT critic)
            return [f"transformer_blocks.{i}" for i in sorted({max(0, round(n * j / 3) - 1) for j in (1, 2, 3)})]
        return self._check_layers(which)

    def level_from_output(self, name: str, output) -> torch.Tensor:
        return self.tokens_from_output(output)

    def cond_module(self) -> nn.Module | None:
        if self.kind == "sd3":
            return self.model.time_text_embed.text_embedder  # the pooled-text projection
        return self.model.transformer_blocks[0].norm1.emb.class_embedder

    @property
    def cond_dim(self) -> int | None:
        return self.temb_dim

    def temb_module(self) -> nn.Module:
        if self.kind == "sd3":
            return self.model.time_text_embed.timestep_embedder
        # every DiT block embeds (t, label) itself; block 0's timestep embedder runs first
        return self.model.transformer_blocks[0].norm1.emb.timestep_embedder

    @staticmethod
    def tokens_from_output(output) -> torch.Tensor:
        # an SD3 joint block returns (encoder_hidden_states, hidden_states) — the last one (None, hidden)
        if isinstance(output, tuple):
            output = output[1]
        if output.ndim != 3:
            raise ValueError(f"expected (B, N, D) transformer tokens, got shape {tuple(output.shape)}")
        return output

    @property
    def feature_dim(self) -> int:
        return int(self.model.config.num_attention_heads * self.model.config.attention_head_dim)

    @property
    def temb_dim(self) -> int:
        return int(self.temb_module().linear_2.out_features)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype
