"""The latent critic: a timestep-conditioned value head on a diffusion backbone's noisy-latent features.

V(x_t, t, c) ∈ R^K (one value per reward).  The backbone (initialised from the pretrained diffusion
model) reads the noisy latent; the head is

    levels (one or several depths) --patchify + project to width C, + level embedding--> tokens (B, N, C)
           --LayerNorm--> AdaLN: h = LN(tokens)·(1 + scale(e)) + shift(e),  e = e_t + W_c·e_c
           --attention pooling: K learned queries attend over h--> (B, K, C)
           --per-reward MLP--> (B, K)

where e_t is the backbone's own timestep embedding, so the head knows the noise level (the core
seed's "simple conditioning"), and e_c its conditioning embedding (class label or pooled text; optional).
The AdaLN projection starts at zero (identity modulation).  ``critic_features: multi`` reads a UNet's down
blocks and mid block (a DiT's hidden states at three depths): the mid block of a small UNet is a 4x4 map,
too coarse to tell how clearly a nearly finished sample shows its digit.

With ``reads_x0_reward`` (:mod:`critic_align.x0_reward`) the head also reads r̂_0 = r(decode(x̂0(x_t))), the trained
rewards of the policy's one-step prediction at the state (FK steering's potential), through a gate a(e) per reward
computed from the same modulation embedding and starting at zero:

    V = m + s·(MLP(pooled) + a(e)·(r̂_0 − m)/s)

so the head learns how far to trust the prediction at each noise level (little at the noisiest steps, where x̂0 is
a blur; nearly fully at the last, where it is the sample) and the MLP the rest.  Measured reason: on the tiny
text-to-image task a head on the latent features alone fits its training prompts and explains none of the return's
variance on new ones, while r̂_0 calibrated per step explains half (``benchmarks/results/t2i_critic_offline.json``).

Critic backbone modes (``mode``):
  "lora"   a separate LoRA adapter ("critic") on the policy's frozen base: cheap in memory (default);
  "full"   a full, trainable copy of the base backbone;
  "shared" the policy's own trunk: one forward gives both the model output and the features, and
           the value loss also trains the policy's LoRA (the critic's features move with the policy).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from .backbones.base import BackboneAdapter, Features
from .backbones.lora import LoraAdapters
from .x0_reward import X0Readout, check_head_input

CRITIC_MODES = ("lora", "full", "shared")


@dataclass(frozen=True)
class LevelSpec:
    """One feature level the head reads: ``channels`` C_l, and the patch size p_l that turns a (B, C, H, W) map
    into (H/p)·(W/p) tokens of C·p² values (the core seed's patchified features); p = 1 for token levels."""

    channels: int
    patch: int = 1


class ValueHead(nn.Module):
    """Feature levels -> one value per reward (see the module doc).

    feature_dim: the head's token width D.  ``levels`` (default: one level of D channels, read as is) are each
    patchified and projected to D (an identity when a level already has D channels and patch 1), tagged with a
    learned level embedding when there are several, and concatenated into one token sequence.  ``cond_dim``:
    width of the backbone's conditioning embedding (class label / pooled text); its projection is added to the
    timestep embedding that drives the AdaLN, so the head knows the prompt as well as the noise level.
    """

    def __init__(self, feature_dim: int, temb_dim: int, num_rewards: int = 1, hidden_dim: int = 256,
                 num_heads: int = 4, levels: list[LevelSpec] | None = None, cond_dim: int | None = None,
                 reads_x0_reward: bool = False):
        super().__init__()
        if feature_dim % num_heads:
            raise ValueError(f"feature_dim {feature_dim} must be divisible by num_heads {num_heads}")
        if num_rewards < 1:
            raise ValueError(f"num_rewards must be >= 1, got {num_rewards}")
        self.num_rewards = num_rewards
        self.levels = list(levels) if levels is not None else [LevelSpec(feature_dim, 1)]
        self.proj = nn.ModuleList(
            nn.Identity() if (lv.channels, lv.patch) == (feature_dim, 1) else nn.Linear(lv.channels * lv.patch**2, feature_dim)
            for lv in self.levels
        )
        if len(self.levels) > 1:
            self.level_emb = nn.Parameter(torch.randn(len(self.levels), feature_dim) * 0.02)
        self.cond_proj = nn.Linear(cond_dim, temb_dim) if cond_dim else None
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
        # a(e): the weight of the standardised r̂_0 per reward, zero at the start; made last, so the other
        # parameters draw the same initial values as a head without it
        self.reads_x0_reward = reads_x0_reward
        if reads_x0_reward:
            self.x0_gate = nn.Sequential(nn.SiLU(), nn.Linear(temb_dim, num_rewards))
            nn.init.zeros_(self.x0_gate[1].weight)
            nn.init.zeros_(self.x0_gate[1].bias)

    def tokens(self, features: Features) -> torch.Tensor:
        """(B, N, D): every level patchified, projected to D and tagged with its level embedding, concatenated."""
        if len(features.levels) != len(self.levels):
            raise ValueError(f"the head reads {len(self.levels)} feature levels, got {len(features.levels)}")
        dtype = self.queries.dtype
        out = []
        for i, (lv, proj, x) in enumerate(zip(self.levels, self.proj, features.levels)):
            x = x.to(dtype)
            if x.ndim == 4:
                if x.shape[-1] % lv.patch or x.shape[-2] % lv.patch:
                    raise ValueError(f"feature level {i} of spatial size {tuple(x.shape[-2:])} does not split into "
                                     f"{lv.patch}x{lv.patch} patches: build the critic for this latent size")
                x = rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=lv.patch, q=lv.patch)
            elif lv.patch != 1:
                raise ValueError(f"feature level {i} is a token sequence; it cannot be patchified (patch {lv.patch})")
            x = proj(x)
            if len(self.levels) > 1:
                x = x + self.level_emb[i]
            out.append(x)
        return torch.cat(out, dim=1)

    def modulation(self, features: Features) -> torch.Tensor:
        """(B, temb_dim): what drives the AdaLN — the timestep embedding plus the projected conditioning."""
        temb = features.temb.to(self.queries.dtype)
        if self.cond_proj is not None:
            if features.cemb is None:
                raise ValueError("this value head reads the conditioning embedding, but the features carry none")
            temb = temb + self.cond_proj(features.cemb.to(temb.dtype))
        return temb

    def forward(self, features: Features, x0_reward: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K) values; ``x0_reward`` (B, K): r(decode(x̂0(x_t))), required exactly when the head reads it."""
        check_head_input(self.reads_x0_reward, x0_reward)
        tokens = self.tokens(features)
        mod = self.modulation(features)
        scale, shift = self.adaln(mod).unsqueeze(1).chunk(2, dim=-1)
        h = self.norm(tokens) * (1 + scale) + shift
        q = self.queries.unsqueeze(0).expand(h.shape[0], -1, -1)
        pooled, _ = self.attn(q, h, h, need_weights=False)  # (B, K, C)
        pooled = pooled + q  # residual on the query keeps a path that ignores bad attention early on
        raw = torch.cat([head(pooled[:, k]) for k, head in enumerate(self.heads)], dim=-1)  # (B, K)
        if x0_reward is not None:
            check_head_input(True, x0_reward, raw.shape)
            # a reward that does not apply (NaN) contributes nothing; its head's loss is masked anyway
            r0 = torch.nan_to_num(self.standardize(x0_reward.to(raw.dtype)))
            raw = raw + self.x0_gate(mod) * r0
        return self.out_mean + self.out_scale * raw

    def standardize(self, values: torch.Tensor) -> torch.Tensor:
        """(V − m) / s per head: values in the head's own standardised units (what its MLP outputs)."""
        return (values - self.out_mean) / self.out_scale

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
                 adapter_name: str = "critic", policy_adapter: str = "policy", features="mid"):
        super().__init__()
        self.feature_layers = backbone.feature_layers(features) if isinstance(features, str) else list(features)
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
            return self.backbone.features(x_t, t, cond, which=self.feature_layers)
        name = self.adapter_name if self.mode == "lora" else self.policy_adapter
        with self.adapters.using(name):
            return self._shared_backbone.features(x_t, t, cond, which=self.feature_layers)

    def forward(self, x_t, t, cond=None, x0_reward=None) -> torch.Tensor:
        return self.head(self.features(x_t, t, cond), x0_reward)

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


def level_specs(features: Features, grid: int = 8) -> list[LevelSpec]:
    """Patch sizes that bring every convolutional level down to at most ``grid`` x ``grid`` tokens."""
    specs = []
    for x in features.levels:
        if x.ndim == 4:
            h, w = x.shape[-2:]
            p = max(1, min(h, w) // grid)
            while h % p or w % p:
                p -= 1
            specs.append(LevelSpec(int(x.shape[1]), p))
        else:
            specs.append(LevelSpec(int(x.shape[-1]), 1))
    return specs


@torch.no_grad()
def reached_modules(backbone: BackboneAdapter, example, which) -> tuple[set[str], Features]:
    """Names of the modules of ``backbone.model`` that a feature forward on ``example`` = (x_t, t, cond) calls,
    and the features it returned."""
    called: set[str] = set()
    handles = [m.register_forward_hook(lambda _m, _i, _o, n=n: called.add(n))
               for n, m in backbone.model.named_modules() if n]
    try:
        feats = backbone.features(*example, which=which)
    finally:
        for h in handles:
            h.remove()
    return called, feats


def critic_lora_targets(reached: set[str], target_modules) -> list[str]:
    """The full names of the reached modules whose name ends with one of ``target_modules`` (peft's matching),
    so the critic's LoRA goes only where its forward runs (e.g. not on a UNet's decoder)."""
    out = []
    for n in sorted(reached):
        parts = n.split(".")
        if "lora_A" in parts or "lora_B" in parts or "base_layer" in parts:
            continue
        if any(n == t or n.endswith("." + t) for t in target_modules):
            out.append(n)
    return out


def build_critic(policy_backbone: BackboneAdapter, mode: str = "lora", num_rewards: int = 1,
                 adapters: LoraAdapters | None = None, lora_rank: int = 8, lora_alpha: float | None = None,
                 lora_target_modules=None, hidden_dim: int = 256, num_heads: int = 4, features="mid",
                 use_cond: bool = False, width: int | None = None, example=None, grid: int = 8,
                 x0_reward: bool = False) -> Critic:
    """Make a critic that starts from the pretrained backbone.

    features: 'mid' (the deepest level only), 'multi' (several depths, see the adapter's ``feature_layers``)
    or a list of module names.  use_cond: feed the backbone's conditioning embedding to the AdaLN.
    width: the head's token width (default: the 'mid' level's channels).  x0_reward: the head also reads
    r(decode(x̂0(x_t))) (see the module doc; the caller supplies it with every call).  example: one (x_t, t, cond) input of
    the task's shape; with it the levels' patch sizes are measured and the critic's LoRA is put only on the
    modules a feature forward reaches (without it: 'mid' features only, LoRA on every matching module).

    mode="lora": adds a LoRA adapter "critic" to ``adapters`` (which wraps the policy's base model).
    mode="full": deep-copies the backbone; LoRA layers the policy model already carries are stripped from
    the copy (their base layers kept), so the critic starts from the pretrained base weights.
    mode="shared": reads the policy adapter's features.
    """
    if mode not in CRITIC_MODES:
        raise ValueError(f"critic mode {mode!r}: use one of {CRITIC_MODES}")
    which = policy_backbone._check_layers(features)
    width = width or policy_backbone.feature_dim
    cond_dim = policy_backbone.cond_dim if use_cond else None
    if example is None:
        if which != policy_backbone.feature_layers("mid"):
            raise ValueError("build_critic needs example=(x_t, t, cond) for features other than 'mid' "
                             "(the levels' shapes are measured on it)")
        reached, levels = None, None
    else:
        reached, feats = reached_modules(policy_backbone, example, which)
        levels = level_specs(feats, grid)
        if use_cond and feats.cemb is None:
            raise ValueError(f"use_cond: {type(policy_backbone.model).__name__} gave no conditioning embedding for "
                             "this input (an unconditional model or cond=None): set critic_cond: false")
    head = ValueHead(width, policy_backbone.temb_dim, num_rewards, hidden_dim, num_heads, levels=levels,
                     cond_dim=cond_dim, reads_x0_reward=x0_reward)
    head.to(next(policy_backbone.parameters()).device)
    if mode == "lora":
        if adapters is None:
            raise ValueError("critic mode 'lora' needs the LoraAdapters of the policy's base model")
        targets = lora_target_modules
        if reached is not None and targets:
            targets = critic_lora_targets(reached, lora_target_modules)
            if not targets:
                raise ValueError(f"none of lora_target_modules={list(lora_target_modules)} is reached by the critic's "
                                 f"feature forward (features {which}): name modules of the encoder")
        adapters.add("critic", rank=lora_rank, alpha=lora_alpha, target_modules=targets)
        return Critic(head, mode, policy_backbone, adapters, features=which)
    if mode == "shared":
        if adapters is None:
            raise ValueError("critic mode 'shared' needs the policy's LoraAdapters")
        return Critic(head, mode, policy_backbone, adapters, features=which)
    backbone = copy.deepcopy(policy_backbone)
    if adapters is not None and adapters.names:
        # strip LoRA layers from the copy: the full critic is a plain trainable copy of the base
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in list(backbone.model.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, BaseTunerLayer):
                    setattr(module, child_name, child.get_base_layer())
    backbone.requires_grad_(True)
    return Critic(head, mode, backbone, adapters, features=which)


def build_run_critic(config, task, models, schedule, rewards, t: torch.Tensor) -> nn.Module:
    """The critic a run's config asks for (``critic_body``, ``critic_mode``, ``critic_features``, ...) on the policy's
    backbone: ``models`` (:class:`~critic_align.models.Models`, no critic yet) with its LoRA adapters, one head per
    trained reward (``rewards``); ``schedule`` and the task's decoder for a grafted body.  One input of the task's
    shape at timestep ``t`` (1,) is probed: the critic measures its feature levels on it and puts its LoRA only on the
    modules its feature forward reaches."""
    cfg, device = config, models.device
    cond0 = task.encode(list(task.prompts[:1]))
    example = (torch.zeros((1, *task.latent_shape), device=device), t.to(device),
               None if cond0 is None else cond0.to(device))
    features = cfg.critic_features if isinstance(cfg.critic_features, str) else list(cfg.critic_features)
    with models.autocast():  # the probe forward runs as every later forward does (a bf16 base needs autocast)
        if cfg.critic_body == "grafted":  # the reward network's later layers as the critic (critic_align/grafted.py)
            from .grafted import build_grafted_critic

            decode = getattr(task, "decode_differentiable", task.decode)  # a Task protocol object may lack it
            return build_grafted_critic(models.adapter, models.adapters, schedule, decode, rewards, example,
                                        "critic", cfg.critic_lora_rank, None, cfg.lora_target_modules, features,
                                        task=task)
        return build_critic(
            models.adapter, mode=cfg.critic_mode, num_rewards=len(rewards.names), adapters=models.adapters,
            lora_rank=cfg.critic_lora_rank, lora_target_modules=cfg.lora_target_modules,
            hidden_dim=cfg.value_head_hidden, num_heads=cfg.value_head_heads, features=features,
            use_cond=cfg.critic_cond and cond0 is not None, width=cfg.critic_width, example=example,
            x0_reward=X0Readout.from_config(cfg).reads,
        ).to(device)
