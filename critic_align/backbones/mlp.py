"""A small MLP denoiser for vector data (B, d), and its backbone adapter.

``ResidualMLP``: sinusoidal timestep features -> ``time_embedding`` (Linear-SiLU-Linear, hooked as the
temb) ; h_0 = SiLU(fc_in(x) + temb), h_{i} = SiLU(fc{i}(h_{i-1}) + h_{i-1}) ; output ``fc_out(h_L)``.
The hidden activations h_0..h_L are stacked into L+1 feature tokens (B, L+1, H) by the ``tokens``
identity module (hooked as the feature module).  ``fc_out`` starts at zero when ``zero_init`` is set.

``MLPDenoiser``: model output = ``base(x, t)`` (optional, e.g. the exact ε of a Gaussian mixture, no
parameters) + ``residual(x, t)``.  With a zero-initialised residual the starting policy *is* the base.
LoRA (peft) attaches to the residual's named Linear layers: ``MLP_LORA_TARGETS``.  Because ``fc_out``
is zero, LoRA's B = 0 starts at exactly the base model and at first only the ``fc_out`` LoRA gets a
gradient (its input, the frozen random hidden features, is non-zero); the hidden layers' LoRA follow
once fc_out's LoRA is non-zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import BackboneAdapter

MLP_LORA_TARGETS = ("fc_in", "fc1", "fc2", "fc3", "fc_out")


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


class TimeEmbedding(nn.Module):
    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear_2(nn.functional.silu(self.linear_1(sinusoidal_embedding(t, self.freq_dim))))


class ResidualMLP(nn.Module):
    def __init__(self, dim: int = 2, hidden: int = 64, num_layers: int = 2, freq_dim: int = 32,
                 zero_init: bool = True):
        super().__init__()
        if not 1 <= num_layers <= 3:
            raise ValueError(f"num_layers must be 1..3 (layers fc1..fc3), got {num_layers}")
        self.dim, self.hidden, self.num_layers = dim, hidden, num_layers
        self.time_embedding = TimeEmbedding(freq_dim, hidden)
        self.fc_in = nn.Linear(dim, hidden)
        for i in range(1, num_layers + 1):
            setattr(self, f"fc{i}", nn.Linear(hidden, hidden))
        self.fc_out = nn.Linear(hidden, dim)
        self.tokens = nn.Identity()
        if zero_init:
            nn.init.zeros_(self.fc_out.weight)
            nn.init.zeros_(self.fc_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_embedding(t)
        h = nn.functional.silu(self.fc_in(x) + temb)
        hs = [h]
        for i in range(1, self.num_layers + 1):
            h = nn.functional.silu(getattr(self, f"fc{i}")(h)) + h
            hs.append(h)
        self.tokens(torch.stack(hs, dim=1))  # (B, L+1, H): the hook point for the critic's tokens
        return self.fc_out(h)


class MLPDenoiser(nn.Module):
    """output = base(x, t) + residual(x, t); ``base`` is a parameter-free module or None."""

    def __init__(self, residual: ResidualMLP, base: nn.Module | None = None):
        super().__init__()
        self.residual = residual
        self.base = base

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.residual(x, t)
        if self.base is not None:
            out = out + self.base(x, t).to(out.dtype)
        return out


class MLPAdapter(BackboneAdapter):
    """Adapter for :class:`MLPDenoiser` (vector data, no conditioning: ``cond`` must be None)."""

    def __init__(self, model: MLPDenoiser):
        if not isinstance(model, MLPDenoiser):
            raise TypeError(f"MLPAdapter wraps an MLPDenoiser, got {type(model).__name__}")
        super().__init__(model)

    def _forward(self, x_t, t, cond):
        if cond is not None:
            raise ValueError("MLPAdapter's model is unconditional; the task's encode() must return None")
        return self.model(x_t, t)

    def feature_layers(self, which="mid") -> list[str]:
        # the hidden states h_0..h_L are already one token each: 'multi' and 'mid' read the same stack
        if which in ("mid", "multi"):
            return ["residual.tokens"]
        return self._check_layers(which)

    @property
    def cond_dim(self) -> int | None:
        return None

    def temb_module(self) -> nn.Module:
        return self.model.residual.time_embedding

    @property
    def feature_dim(self) -> int:
        return self.model.residual.hidden

    @property
    def temb_dim(self) -> int:
        return self.model.residual.hidden

    @property
    def dtype(self) -> torch.dtype:
        return self.model.residual.fc_in.weight.dtype
