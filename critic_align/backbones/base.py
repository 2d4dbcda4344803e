"""The backbone-adapter protocol: one forward convention for every model family."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Features:
    """What the value head reads from a backbone at a noisy latent.

    tokens: (B, N, C) feature tokens (e.g. the UNet mid-block's H*W positions, a DiT's hidden tokens).
    temb:   (B, D) the backbone's timestep embedding (for AdaLN modulation).
    """

    tokens: torch.Tensor
    temb: torch.Tensor


class _StopForward(Exception):
    """Raised from a forward hook to skip the rest of a forward pass once the features are captured."""


class BackboneAdapter(nn.Module):
    """Base class: subclasses say which submodule's output are the tokens and which is the time embedding.

    Features are captured with forward hooks, so the wrapped model's own ``forward`` runs unchanged
    (no forked model code).  ``features`` stops the forward right after the feature module, so a
    critic costs only the encoder half of a UNet.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    # -- subclasses implement these three ---------------------------------------------------------
    def _forward(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        raise NotImplementedError

    def feature_module(self) -> nn.Module:
        raise NotImplementedError

    def temb_module(self) -> nn.Module:
        raise NotImplementedError

    @staticmethod
    def tokens_from_output(output) -> torch.Tensor:
        """Turn the feature module's output into (B, N, C) tokens."""
        if isinstance(output, tuple):
            output = output[0]
        if output.ndim == 4:  # (B, C, H, W) -> (B, H*W, C)
            return output.flatten(2).transpose(1, 2)
        if output.ndim == 3:
            return output
        raise ValueError(f"cannot make tokens from a feature output of shape {tuple(output.shape)}")

    # -- public API --------------------------------------------------------------------------------
    @staticmethod
    def _timesteps(t, x_t) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if t.shape[0] != x_t.shape[0]:
            raise ValueError(f"got {t.shape[0]} timesteps for a batch of {x_t.shape[0]} samples")
        return t

    def predict(self, x_t: torch.Tensor, t, cond=None) -> torch.Tensor:
        """The model output (ε, v or x0 per the scheduler's prediction_type) at (x_t, t, cond)."""
        return self._forward(x_t, self._timesteps(t, x_t), cond)

    def forward(self, x_t, t, cond=None):
        return self.predict(x_t, t, cond)

    def _run_with_hooks(self, x_t, t, cond, stop_early: bool):
        captured = {}

        def grab_temb(_m, _i, out):
            captured["temb"] = out

        def grab_tokens(_m, _i, out):
            captured["tokens"] = self.tokens_from_output(out)
            if stop_early:
                raise _StopForward

        h1 = self.temb_module().register_forward_hook(grab_temb)
        h2 = self.feature_module().register_forward_hook(grab_tokens)
        out = None
        try:
            out = self._forward(x_t, self._timesteps(t, x_t), cond)
        except _StopForward:
            pass
        finally:
            h1.remove()
            h2.remove()
        temb = captured["temb"]
        if temb.ndim == 1:
            temb = temb.unsqueeze(0).expand(x_t.shape[0], -1)
        return out, Features(tokens=captured["tokens"], temb=temb)

    def features(self, x_t: torch.Tensor, t, cond=None) -> Features:
        """Feature tokens and timestep embedding at (x_t, t, cond); skips the rest of the network."""
        return self._run_with_hooks(x_t, t, cond, stop_early=True)[1]

    def predict_and_features(self, x_t: torch.Tensor, t, cond=None):
        """One full forward returning (model_output, Features) — the shared-trunk critic's path."""
        return self._run_with_hooks(x_t, t, cond, stop_early=False)

    @property
    def feature_dim(self) -> int:
        raise NotImplementedError

    @property
    def temb_dim(self) -> int:
        raise NotImplementedError
