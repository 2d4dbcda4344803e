"""Thin adapters that give every model family the same calling convention.

An adapter exposes ``predict(x_t, t, cond)`` (the raw model output: ε, v or x0) and
``features(x_t, t, cond)`` (feature tokens + the timestep embedding, for the value head).
``UNetAdapter``: diffusers UNets; ``DiTAdapter``: DiT / SD3 transformers (its ``cond`` contract — class
labels, or a ``critic_align.cond.TextCond`` for SD3 — is in ``backbones/dit.py``); ``FluxAdapter``: FLUX's
``FluxTransformer2DModel`` on unpacked latents (``backbones/flux.py``); ``MLPAdapter``: vector data.
"""

from .base import BackboneAdapter, Features
from .dit import DiTAdapter
from .flux import FluxAdapter
from .lora import LoraAdapters
from .mlp import MLP_LORA_TARGETS, MLPAdapter, MLPDenoiser, ResidualMLP
from .unet import UNetAdapter

__all__ = ["BackboneAdapter", "DiTAdapter", "Features", "FluxAdapter", "LoraAdapters", "MLP_LORA_TARGETS", "MLPAdapter",
           "MLPDenoiser", "ResidualMLP", "UNetAdapter"]
