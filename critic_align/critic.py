"""The latent critic: a timestep-conditioned value head on a diffusion backbone's noisy-latent features.

V(x_t, t, c) ∈ R^K (one value per reward).  The backbone (initialised from the pretrained diffusion
model) reads the noisy latent; the head is

    tokens (B, N, C) --LayerNorm--> AdaLN: h = LN(tokens)·(1 + scale(e_t)) + shift(e_t)
                     --attention pooling: K learned queries attend over h--> (B, K, C)
                     --per-reward MLP--> (B, K)

where e_t is the backbone's own timestep embedding, so the head knows the noise level (the core
seed's "simple conditioning").  The AdaLN projection starts at zero (identity modulation).

Critic backbone modes (``mode``):
  "lora"   a separate LoRA adapter ("critic") on the policy's frozen base: cheap in memory (default);
  "full"   a full, trainable copy of the base backbone;
  "shared" the policy's own trunk: one forward gives both the model output and the features, and
           the value loss also trains the policy's LoRA (the critic's features move with the policy).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .backbones.base import BackboneAdapter, Features
from .backbones.lora import LoraAdapters

CRITIC_MODES = ("lora", "full", "shared")


class ValueHead(nn.Module):
    def __init__(self, feature_dim: int, temb_dim: int, num_rewards: int = 1, hidden_dim: int = 256,
                 num_heads: int = 4):
        super().__init__()
        if feature_dim % num_heads:
            raise ValueError(f"feature_dim {feature_dim} must be divisible by num_heads {num_heads}")
        if num_rewards < 1:
            raise ValueError(f"num_rewards must be >= 1, got {num_rewards}")
        self.num_rewards = num_rewards
        self.norm = nn.LayerNorm(feature_dim, elementwise_affine=False)
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(temb_dim, 2 * feature_dim))
        nn.init.zeros_(self.adaln[1].weight)
        nn.init.zeros_(self.adaln[1].bias)
        self.queries = nn.Parameter(torch.randn(num_rewards, feature_dim) * feature_dim**-0.5)
        self.attn = nn.MultiheadAttention(feature_dim, num_heads, batch_first=True)
        # value = out_mean + out_scale · head(x): the heads learn a standardised target.  Set once from the
        # first rewards seen (``set_output_scale``) so targets of any scale start well-conditioned.
        self.register_buffer("out_mean", torch.zeros(num_rewards))
        self.register_buffer("out_scale", torch.ones(num_rewards))
        self.heads = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, hidden_dim), nn.SiLU(),
                          nn.Linear(hidden_dim, 1))
            for _ in range(num_rewards)
        )

    def forward(self, features: Features) -> torch.Tensor:
        tokens, temb = features.tokens, features.temb
        dtype = self.queries.dtype
        tokens, temb = tokens.to(dtype), temb.to(dtype)
        scale, shift = self.adaln(temb).unsqueeze(1).chunk(2, dim=-1)
        h = self.norm(tokens) * (1 + scale) + shift
        q = self.queries.unsqueeze(0).expand(h.shape[0], -1, -1)
        pooled, _ = self.attn(q, h, h, need_weights=False)  # (B, K, C)
        pooled = pooled + q  # residual on the query keeps a path that ignores bad attention early on
        raw = torch.cat([head(pooled[:, k]) for k, head in enumerate(self.heads)], dim=-1)  # (B, K)
        return self.out_mean + self.out_scale * raw

    @torch.no_grad()
    def set_output_scale(self, rewards: torch.Tensor, min_scale: float = 1e-3) -> None:
        """Standardise each head's output with the mean/std of a (B, K) reward batch (NaNs ignored)."""
        for k in range(self.num_rewards):
            col = rewards[:, k].float()
            col = col[~torch.isnan(col)]
            if col.numel() >= 2:
                self.out_mean[k] = col.mean()
                self.out_scale[k] = col.std(unbiased=False).clamp(min=min_scale)


class Critic(nn.Module):
    """V(x_t, t, cond) -> (B, K).  Build it with :func:`build_critic`."""

    def __init__(self, head: ValueHead, mode: str, backbone: BackboneAdapter, adapters: LoraAdapters | None = None,
                 adapter_name: str = "critic", policy_adapter: str = "policy"):
        super().__init__()
        if mode not in CRITIC_MODES:
            raise ValueError(f"critic mode {mode!r}: use one of {CRITIC_MODES}")
        self.head = head
        self.mode = mode
        self.adapter_name = adapter_name
        self.policy_adapter = policy_adapter
        self.adapters = adapters
        if mode == "full":
            self.backbone = backbone  # registered: its parameters are the critic's own
        else:
            object.__setattr__(self, "_shared_backbone", backbone)  # not registered: it belongs to the policy

    @property
    def trunk(self) -> BackboneAdapter:
        return self.backbone if self.mode == "full" else self._shared_backbone

    def features(self, x_t, t, cond=None) -> Features:
        if self.mode == "full":
            return self.backbone.features(x_t, t, cond)
        name = self.adapter_name if self.mode == "lora" else self.policy_adapter
        with self.adapters.using(name):
            return self._shared_backbone.features(x_t, t, cond)

    def forward(self, x_t, t, cond=None) -> torch.Tensor:
        return self.head(self.features(x_t, t, cond))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the value loss should update (the head, plus the critic's own backbone weights)."""
        params = list(self.head.parameters())
        if self.mode == "full":
            params += [p for p in self.backbone.parameters() if p.requires_grad]
        elif self.mode == "lora":
            params += self.adapters.parameters(self.adapter_name)
        return params

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything that defines the critic beyond the shared frozen base (for checkpoints)."""
        out = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        if self.mode == "full":
            out.update({f"backbone.{k}": v for k, v in self.backbone.model.state_dict().items()})
        elif self.mode == "lora":
            out.update({f"lora.{k}": v for k, v in self.adapters.state_dict(self.adapter_name).items()})
        return {k: v.detach().contiguous() for k, v in out.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        head = {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}
        self.head.load_state_dict(head)
        if self.mode == "full":
            self.backbone.model.load_state_dict({k[9:]: v for k, v in tensors.items() if k.startswith("backbone.")})
        elif self.mode == "lora":
            self.adapters.load_state_dict(self.adapter_name, {k[5:]: v for k, v in tensors.items() if k.startswith("lora.")})


def build_critic(policy_backbone: BackboneAdapter, mode: str = "lora", num_rewards: int = 1,
                 adapters: LoraAdapters | None = None, lora_rank: int = 8, lora_alpha: float | None = None,
                 lora_target_modules=None, hidden_dim: int = 256, num_heads: int = 4) -> Critic:
    """Make a critic that starts from the pretrained backbone.

    mode="lora": adds a LoRA adapter "critic" to ``adapters`` (which wraps the policy's base model).
    mode="full": deep-copies the backbone; LoRA layers the policy model already carries are stripped from
    the copy (their base layers kept), so the critic starts from the pretrained base weights.
    mode="shared": reads the policy adapter's features.
    """
    if mode not in CRITIC_MODES:
        raise ValueError(f"critic mode {mode!r}: use one of {CRITIC_MODES}")
    head = ValueHead(policy_backbone.feature_dim, policy_backbone.temb_dim, num_rewards, hidden_dim, num_heads)
    head.to(next(policy_backbone.parameters()).device)
    if mode == "lora":
        if adapters is None:
            raise ValueError("critic mode 'lora' needs the LoraAdapters of the policy's base model")
        adapters.add("critic", rank=lora_rank, alpha=lora_alpha, target_modules=lora_target_modules)
        return Critic(head, mode, policy_backbone, adapters)
    if mode == "shared":
        if adapters is None:
            raise ValueError("critic mode 'shared' needs the policy's LoraAdapters")
        return Critic(head, mode, policy_backbone, adapters)
    backbone = copy.deepcopy(policy_backbone)
    if adapters is not None and adapters.names:
        # strip LoRA layers from the copy: the full critic is a plain trainable copy of the base
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in list(backbone.model.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, BaseTunerLayer):
                    setattr(module, child_name, child.get_base_layer())
    backbone.requires_grad_(True)
    return Critic(head, mode, backbone, adapters)
