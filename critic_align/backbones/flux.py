"""Adapter for diffusers' ``FluxTransformer2DModel`` (FLUX.1-dev / -schnell and models of that class).

What the adapter exposes (the :class:`BackboneAdapter` protocol)
-----------------------------------------------------------------
``predict(x_t, t, cond)``
    The velocity at *unpacked* latents ``x_t`` (B, C, H, W) (C = 16 for FLUX.1, H and W even) and timesteps
    ``t`` (scalar or (B,)) in the flow-matching convention of the rest of the package: ``σ · 1000`` (what
    ``FlowMatchSchedule.timesteps`` returns).  The adapter does what ``FluxPipeline.__call__`` does around the
    transformer: packs the latents into (B, H/2 · W/2, 4C) tokens (``FluxPipeline._pack_latents``), builds the
    image position ids (``FluxPipeline._prepare_latent_image_ids``) and zero text ids (what ``encode_prompt``
    returns), passes ``timestep = t / 1000`` (the transformer multiplies by 1000 itself) and, for a
    guidance-distilled model (``config.guidance_embeds``, FLUX.1-dev), the embedded guidance value; the output is
    unpacked back to (B, C, H, W).  Working on unpacked latents keeps FLUX's latents the same kind of tensor as
    every other backbone's, so rollouts, the SDE step, rewards' decoding and the critic need nothing FLUX-specific.
``features(x_t, t, cond)`` -> :class:`Features`
    levels: (B, H/2 · W/2, D) image tokens (D = heads · head_dim) after the chosen blocks; both block kinds return
    ``(text tokens, image tokens)`` and the image half is the level.  ``'mid'`` is the last single-stream block
    (the deepest hidden state, before the output norm); ``'multi'`` three depths of the whole stack (double-stream
    blocks first, then single-stream blocks), e.g. double block 19 and single blocks 19 and 38 of FLUX.1's 19 + 38.
    temb: (B, D) the *timestep* embedding (``time_text_embed.timestep_embedder``; the guidance embedding, a constant
    of the run, is left out); cemb: (B, D) the pooled-text projection (``time_text_embed.text_embedder``).

The ``cond`` contract
---------------------
``cond`` is a :class:`critic_align.cond.TextCond`: ``embeds`` (B, L, joint_attention_dim) are the T5 token
embeddings ``FluxPipeline.encode_prompt`` returns (``prompt_embeds``) and ``pooled`` (B, pooled_projection_dim)
its pooled CLIP embedding (``pooled_prompt_embeds``).  An ``(embeds, pooled)`` tuple is accepted too.

``guidance``: FLUX.1-dev is guidance-distilled: the transformer takes the guidance scale as an input (the
pipeline's ``guidance_scale``, 3.5 by default) instead of running classifier-free guidance.  It is a constant of
the adapter (give it for a model with ``guidance_embeds``, and only then); true CFG with a negative prompt is the
trainer's ``guidance_scale`` as for every other backbone (FluxPipeline's ``true_cfg_scale``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import BackboneAdapter
from .dit import DiTAdapter, as_text_cond


class FluxAdapter(BackboneAdapter):
    """Wraps a diffusers ``FluxTransformer2DModel`` (see the module doc)."""

    def __init__(self, model: nn.Module, guidance: float | None = None):
        super().__init__(model)
        from diffusers import FluxTransformer2DModel

        if not isinstance(model, FluxTransformer2DModel):
            raise TypeError(f"FluxAdapter wraps a diffusers FluxTransformer2DModel, got {type(model).__name__}")
        cfg = model.config
        if int(cfg.patch_size) != 1 or int(cfg.in_channels) % 4:
            raise ValueError(f"FluxAdapter packs 2x2 latent patches itself (as FluxPipeline does): it needs "
                             f"patch_size=1 and in_channels divisible by 4, got patch_size={cfg.patch_size}, "
                             f"in_channels={cfg.in_channels}")
        if int(model.out_channels) != int(cfg.in_channels):
            raise ValueError(f"out_channels={model.out_channels} != in_channels={cfg.in_channels}: the output "
                             "cannot be unpacked into latents of the input's shape")
        self.latent_channels = int(cfg.in_channels) // 4
        if cfg.guidance_embeds:
            if guidance is None or not (isinstance(guidance, (int, float)) and math.isfinite(guidance)):
                raise ValueError("this FluxTransformer2DModel is guidance-distilled (guidance_embeds=True, FLUX.1-dev): "
                                 "pass guidance=<the embedded guidance scale> (FluxPipeline's guidance_scale, "
                                 f"3.5 by default), got {guidance!r}")
            guidance = float(guidance)
        elif guidance is not None:
            raise ValueError(f"guidance={guidance!r} given, but the model has no guidance embedding "
                             "(guidance_embeds=False, e.g. FLUX.1-schnell); pass guidance=None")
        self.guidance = guidance

    # -- packing, exactly as FluxPipeline -------------------------------------------------------------
    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) latents -> (B, H/2 · W/2, 4C) tokens (``FluxPipeline._pack_latents``)."""
        from diffusers import FluxPipeline

        b, c, h, w = self._check_latents(x)
        return FluxPipeline._pack_latents(x, b, c, h, w)

    def unpack(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, H/2 · W/2, 4C) tokens -> (B, C, H, W) latents (``FluxPipeline._unpack_latents``; it takes pixel sizes
        and a VAE factor, so latent sizes go in with factor 1)."""
        from diffusers import FluxPipeline

        return FluxPipeline._unpack_latents(tokens, height, width, 1)

    def _check_latents(self, x: torch.Tensor):
        if x.ndim != 4 or x.shape[1] != self.latent_channels or x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"FluxAdapter takes unpacked latents (B, {self.latent_channels}, H, W) with even H and W, "
                             f"got shape {tuple(x.shape)}")
        return x.shape

    def _forward(self, x_t, t, cond):
        from diffusers import FluxPipeline

        c = as_text_cond(cond)
        b, _, h, w = self._check_latents(x_t)
        if len(c) != b:
            raise ValueError(f"cond has batch {len(c)} but the latents have batch {b}")
        dtype = x_t.dtype
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, dtype)
        txt_ids = torch.zeros(c.embeds.shape[1], 3, device=x_t.device, dtype=dtype)  # what encode_prompt returns
        guidance = None
        if self.guidance is not None:  # FluxPipeline: torch.full([1], guidance_scale, dtype=float32).expand(B)
            guidance = torch.full((b,), self.guidance, device=x_t.device, dtype=torch.float32)
        out = self.model(hidden_states=self.pack(x_t), timestep=t.to(dtype) / 1000, guidance=guidance,
                         pooled_projections=c.pooled, encoder_hidden_states=c.embeds, txt_ids=txt_ids,
                         img_ids=img_ids, return_dict=False)[0]
        return self.unpack(out, h, w)

    # -- features --------------------------------------------------------------------------------------
    def block_names(self) -> list[str]:
        """Every transformer block in forward order: the double-stream blocks, then the single-stream ones."""
        return ([f"transformer_blocks.{i}" for i in range(len(self.model.transformer_blocks))]
                + [f"single_transformer_blocks.{i}" for i in range(len(self.model.single_transformer_blocks))])

    def feature_layers(self, which="mid") -> list[str]:
        names = self.block_names()
        if which == "mid":
            return [names[-1]]
        if which == "multi":  # three depths of the whole stack, as DiTAdapter's 'multi'
            n = len(names)
            return [names[i] for i in sorted({max(0, round(n * j / 3) - 1) for j in (1, 2, 3)})]
        return self._check_layers(which)

    def level_from_output(self, name: str, output) -> torch.Tensor:
        # both block kinds return (encoder_hidden_states, hidden_states): the image tokens are the second
        return DiTAdapter.tokens_from_output(output)

    def temb_module(self) -> nn.Module:
        return self.model.time_text_embed.timestep_embedder

    def cond_module(self) -> nn.Module:
        return self.model.time_text_embed.text_embedder  # the pooled-text projection

    @property
    def feature_dim(self) -> int:
        return int(self.model.inner_dim)

    @property
    def temb_dim(self) -> int:
        return int(self.temb_module().linear_2.out_features)

    @property
    def cond_dim(self) -> int:
        return int(self.cond_module().linear_2.out_features)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype
