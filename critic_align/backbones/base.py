"""The backbone-adapter protocol: one forward convention for every model family."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

FEATURE_CHOICES = ("mid", "multi")


@dataclass(frozen=True)
class Features:
    """What the value head reads from a backbone at a noisy latent.

    levels: one tensor per feature depth, shallowest first: (B, C_l, H_l, W_l) for convolutional maps (UNet
            blocks) or (B, N_l, C_l) for tokens (transformer blocks, the MLP's hidden states).  ``mid``
            features are one level (the deepest); ``multi`` several (see each adapter's ``feature_layers``).
    temb:   (B, D) the backbone's timestep embedding (for AdaLN modulation).
    cemb:   (B, D_c) the conditioning embedding (class label or pooled text), or None for an unconditional
            backbone; the value head adds its projection to the AdaLN input.
    """

    levels: tuple[torch.Tensor, ...]
    temb: torch.Tensor
    cemb: torch.Tensor | None = None

    @property
    def tokens(self) -> torch.Tensor:
        """(B, N, C) tokens of the deepest level (what the single-level ``mid`` head reads)."""
        return as_tokens(self.levels[-1])


def as_tokens(level: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C); (B, N, C) unchanged."""
    if level.ndim == 4:
        return level.flatten(2).transpose(1, 2)
    if level.ndim == 3:
        return level
    raise ValueError(f"cannot make tokens from a feature level of shape {tuple(level.shape)}")


class _StopForward(Exception):
    """Raised from a forward hook to skip the rest of a forward pass once the features are captured."""


class BackboneAdapter(nn.Module):
    """Base class: subclasses say which submodules' outputs are the feature levels, which is the timestep
    embedding and which (if any) the conditioning embedding.

    Features are captured with forward hooks, so the wrapped model's own ``forward`` runs unchanged
    (no forked model code).  ``features`` stops the forward right after the deepest feature module, so a
    critic costs only the encoder half of a UNet (``critic_align.critic.reached_modules`` finds which
    modules a critic's forward reaches, and the critic's LoRA goes only there).
    """

    stop_early = True
    """``features`` skips the rest of the forward (an exception out of the deepest feature module's hook).  False
    under FSDP: the exception would leave the enclosing sharded unit without its post-forward hook, so the critic's
    gradients there would never be reduced; the forward then runs to the end and its output is dropped."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    # -- subclasses implement these ----------------------------------------------------------------
    def _forward(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        raise NotImplementedError

    def feature_layers(self, which="mid") -> list[str]:
        """Dotted module names (in ``self.model``) whose outputs are the feature levels, shallowest first.

        ``which``: 'mid' (one level, the deepest the critic needs), 'multi' (several depths) or an explicit
        list of module names, checked here.
        """
        raise NotImplementedError

    def temb_module(self) -> nn.Module:
        raise NotImplementedError

    def cond_module(self) -> nn.Module | None:
        """The module whose output (B, D_c) is the conditioning embedding (None: see ``pooled_cond``)."""
        return None

    def pooled_cond(self, cond) -> torch.Tensor | None:
        """The conditioning embedding when no module outputs one (e.g. mean-pooled text tokens); None if none."""
        return None

    def level_from_output(self, name: str, output) -> torch.Tensor:
        """Turn feature module ``name``'s output into a level: (B, C, H, W) or (B, N, C)."""
        if isinstance(output, tuple):
            output = output[0]
        if output.ndim not in (3, 4):
            raise ValueError(f"cannot make a feature level from {name}'s output of shape {tuple(output.shape)}")
        return output

    # -- helpers for subclasses ----------------------------------------------------------------------
    def _check_layers(self, names) -> list[str]:
        if isinstance(names, str):
            if names not in FEATURE_CHOICES:
                raise ValueError(f"critic_features {names!r}: use 'mid', 'multi' or a list of module names")
            return self.feature_layers(names)
        names = list(names)
        bad = [n for n in names if not self._has_module(n)]
        if not names or bad:
            raise ValueError(
                f"critic_features names {bad or names} are not modules of {type(self.model).__name__}; "
                f"'multi' uses {self.feature_layers('multi')}"
            )
        return names

    def _has_module(self, name: str) -> bool:
        try:
            self.model.get_submodule(name)
        except AttributeError:
            return False
        return True

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

    def _run_with_hooks(self, x_t, t, cond, stop_early: bool, which):
        names = self._check_layers(which)
        captured: dict = {}
        levels: dict[str, torch.Tensor] = {}

        def grab(key):
            def hook(_m, _i, out):
                captured[key] = out
            return hook

        def grab_level(name):
            def hook(_m, _i, out):
                levels[name] = self.level_from_output(name, out)
                if stop_early and len(levels) == len(names):
                    raise _StopForward
            return hook

        handles = [self.temb_module().register_forward_hook(grab("temb"))]
        cmod = self.cond_module()
        if cmod is not None:
            handles.append(cmod.register_forward_hook(grab("cemb")))
        handles += [self.model.get_submodule(n).register_forward_hook(grab_level(n)) for n in dict.fromkeys(names)]
        out = None
        try:
            out = self._forward(x_t, self._timesteps(t, x_t), cond)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        b = x_t.shape[0]
        temb = captured["temb"]
        if temb.ndim == 1:
            temb = temb.unsqueeze(0).expand(b, -1)
        cemb = captured.get("cemb") if cmod is not None else self.pooled_cond(cond)
        if cemb is not None and cemb.ndim == 1:
            cemb = cemb.unsqueeze(0).expand(b, -1)
        return out, Features(levels=tuple(levels[n] for n in names), temb=temb, cemb=cemb)

    def features(self, x_t: torch.Tensor, t, cond=None, which="mid") -> Features:
        """Feature levels, timestep and conditioning embeddings at (x_t, t, cond); skips the rest of the network."""
        return self._run_with_hooks(x_t, t, cond, stop_early=self.stop_early, which=which)[1]

    def predict_and_features(self, x_t: torch.Tensor, t, cond=None, which="mid"):
        """One full forward returning (model_output, Features) — the shared-trunk critic's path."""
        return self._run_with_hooks(x_t, t, cond, stop_early=False, which=which)

    @property
    def feature_dim(self) -> int:
        """Channels of the 'mid' level."""
        raise NotImplementedError

    @property
    def temb_dim(self) -> int:
        raise NotImplementedError

    @property
    def cond_dim(self) -> int | None:
        """Width of the conditioning embedding (None: the backbone is unconditional)."""
        return None
