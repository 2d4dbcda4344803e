"""Thin adapters that give every model family the same calling convention.

An adapter exposes ``predict(x_t, t, cond)`` (the raw model output: ε, v or x0) and
``features(x_t, t, cond)`` (feature tokens + the timestep embedding, for the value head).
"""

from .base import BackboneAdapter, Features
from .lora import LoraAdapters
from .mlp import MLP_LORA_TARGETS, MLPAdapter, MLPDenoiser, ResidualMLP
from .unet import UNetAdapter

__all__ = ["BackboneAdapter", "Features", "LoraAdapters", "MLP_LORA_TARGETS", "MLPAdapter", "MLPDenoiser",
           "ResidualMLP", "UNetAdapter"]
