"""A reward-grafted critic (``critic_body: grafted``): the reward network's own later layers read the backbone.

StitchVM (arXiv 2605.19804) grafts a truncated reward model onto a diffusion backbone so that the reward model's
judgement scores noisy latents.  Here, for a reward network split at an intermediate layer into ``early`` and
``late`` (:class:`RewardGraft`):

    out, F = trunk(x_t, t, c)                        one forward through the critic's own LoRA on the shared base:
                                                     the model output and the feature level(s) F
    x̂0    = x0_from_output(out, x_t, t)             the trunk's one-step prediction (the sampler's formula)
    h      = early(decode(x̂0)) + stitch(F)          the stitching layer: upsample + 1x1 conv into the graft layer's
                                                     channels, zero at the start
    logits = late(h) · exp(a(e_t))                  the reward network's own later layers (frozen), then a learned
                                                     per-noise-level logit scale (a = 0 at the start)
    r̂      = readout(logits, c)                     the reward's own read-out (e.g. softmax(logits / T)[label])
    V      = r̂ + α(e_t)·(μ(e_t) − r̂)               a learned per-noise-level shrinkage towards a mean μ (α = 0 at the
                                                     start): a softmax read-out cannot express "uncertain, on average
                                                     0.7" by its logits alone (E[softmax] ≠ softmax of any logits)

At the start (critic LoRA = 0, stitch = 0, a = 0) V(x_t, t) = r(decode(x̂0_base(x_t))): near t = 0, where x̂0 ≈ x_t,
it reads r(x0) of a clean sample.  Value pretraining and the PPO value loss train the critic's LoRA, the stitch and
the scale; the reward network stays frozen.  The whole path is differentiable in x_t (gradient guidance can use it).

Reward networks: :func:`digit_graft` splits the shipped digit classifier (``digit_prob``).  The CLIP-family rewards
would split their image tower the same way (early = patch embedding + first blocks on the decoded image, late = the
remaining blocks, the projection and the cosine with the prompt's text embedding as read-out); not built here.
``composition``'s digit clause grafts through the digit classifier as ``digit_prob`` does; its non-neural clauses
(counts, positions, colours computed from thresholded pixels) have no intermediate layer to stitch into and no
gradient, so a grafted critic for them would keep those clauses as r(decode(x̂0)) (the x0-reward read-out) or learn
them in a separate head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .steps import predict_x0_eps

__all__ = ["RewardGraft", "digit_graft", "GraftedCritic", "build_grafted_critic", "graft_for"]


@dataclass
class RewardGraft:
    """A reward network split at its graft layer.  ``early``: image -> graft activations (B, C, H, W); ``late``:
    graft activations -> logits; ``readout(logits, cond) -> (B,)`` the reward's value from the logits and the task's
    conditioning; ``channels``, ``size``: the graft layer's C and (H, W)."""

    early: nn.Module
    late: nn.Module
    readout: Callable[[torch.Tensor, object], torch.Tensor]
    channels: int
    size: tuple[int, int]


def digit_graft(reward, split: int = 7) -> RewardGraft:
    """The digit classifier of a ``digit_prob`` reward split before layer ``split`` of its ``net`` (default 7: after
    the first pooling, the 8x8x32 map; the late part is conv, pool, MLP).  Read-out: softmax(logits / T)[label] with
    the reward's temperature; the conditioning is the class label (the digits task's ``encode``)."""
    clf = reward.classifier
    net = clf.net
    early, late = net[:split], net[split:]
    with torch.no_grad():
        probe = early(torch.zeros(1, 1, 16, 16, dtype=next(clf.parameters()).dtype))
    temperature = float(getattr(reward, "temperature", 1.0))

    def readout(logits, cond):
        labels = torch.as_tensor(cond, device=logits.device).long()
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return (logits / temperature).softmax(-1).gather(1, labels[:, None]).squeeze(1)

    return RewardGraft(early, late, readout, int(probe.shape[1]), tuple(probe.shape[-2:]))


class _OutputScale(nn.Module):
    """The value-head interface the trainer uses (``standardize``, ``set_output_scale``): the grafted critic's values
    are already in reward units; these buffers only standardise the value loss when ``value_loss_standardized``."""

    def __init__(self, num_rewards: int):
        super().__init__()
        self.register_buffer("out_mean", torch.zeros(num_rewards))
        self.register_buffer("out_scale", torch.ones(num_rewards))

    def standardize(self, values: torch.Tensor) -> torch.Tensor:
        return (values - self.out_mean) / self.out_scale

    @torch.no_grad()
    def set_output_scale(self, rewards: torch.Tensor, min_scale: float = 1e-3) -> None:
        for k in range(self.out_mean.numel()):
            col = rewards[:, k].float()
            col = col[~torch.isnan(col)]
            if col.numel() >= 2:
                self.out_mean[k] = col.mean()
                self.out_scale[k] = col.std(unbiased=False).clamp(min=min_scale)


class GraftedCritic(nn.Module):
    """V(x_t, t, cond) -> (B, K) through the grafted reward networks (one :class:`RewardGraft` per reward).

    trunk: the policy's :class:`~critic_align.backbones.base.BackboneAdapter`; adapters: its LoraAdapters, to which the
    critic's adapter ``adapter_name`` has been added; schedule: the sampler's noise schedule (x̂0 from the output);
    decode: the task's latents -> reward input (differentiable); features: the trunk's feature layers to stitch."""

    mode = "lora"

    def __init__(self, trunk, adapters, adapter_name: str, schedule, decode, grafts: list[RewardGraft],
                 feature_layers: list[str], feature_channels: list[int], temb_dim: int):
        super().__init__()
        object.__setattr__(self, "_trunk", trunk)  # the policy's: not registered here
        self.adapters, self.adapter_name = adapters, adapter_name
        self.schedule, self.decode = schedule, decode
        self.feature_layers = list(feature_layers)
        self.grafts = grafts
        self.reward_nets = nn.ModuleList(nn.ModuleList([g.early, g.late]) for g in grafts)
        self.reward_nets.requires_grad_(False)
        self.stitch = nn.ModuleList(nn.Conv2d(sum(feature_channels), g.channels, 1) for g in grafts)
        self.logit_scale = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(temb_dim, 1)) for _ in grafts)
        self.shrink = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(temb_dim, 2)) for _ in grafts)
        for m in list(self.stitch) + [s[1] for s in self.logit_scale] + [s[1] for s in self.shrink]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        self.head = _OutputScale(len(grafts))

    def train(self, mode: bool = True):
        super().train(mode)
        self.reward_nets.eval()  # frozen reward networks: no dropout, fixed norms
        return self

    @property
    def trunk(self):
        return self._trunk

    def _stitched(self, feats, graft: RewardGraft, conv: nn.Conv2d) -> torch.Tensor:
        maps = [nn.functional.interpolate(f.to(conv.weight.dtype), size=graft.size, mode="bilinear",
                                          align_corners=False) for f in feats.levels]
        return conv(torch.cat(maps, dim=1))

    def forward(self, x_t, t, cond=None, x0_reward=None) -> torch.Tensor:
        if x0_reward is not None:
            raise ValueError("the grafted critic reads the reward network itself: critic_x0_reward does not apply")
        t = self._trunk._timesteps(t, x_t)
        with self.adapters.using(self.adapter_name):
            out, feats = self._trunk.predict_and_features(x_t, t, cond, which=self.feature_layers)
        dtype = torch.promote_types(x_t.dtype, torch.float32)  # float32, or float64 for a float64 input
        abar = self.schedule.alpha_bar(t.cpu()).to(device=x_t.device, dtype=dtype).view(-1, *[1] * (x_t.ndim - 1))
        x0_hat, _ = predict_x0_eps(self.schedule, out.to(dtype), x_t.to(dtype), abar)
        image = self.decode(x0_hat)
        temb = feats.temb.to(self.stitch[0].weight.dtype)
        values = []
        for k, (graft, nets, conv, scale, shrink) in enumerate(zip(self.grafts, self.reward_nets, self.stitch,
                                                                     self.logit_scale, self.shrink)):
            early, late = nets
            h = early(image.to(conv.weight.dtype)) + self._stitched(feats, graft, conv)
            logits = late(h) * scale(temb).exp()
            r_hat = graft.readout(logits, cond)
            alpha, d_mu = shrink(temb).to(r_hat.dtype).unbind(-1)
            mu = self.head.out_mean[k].to(r_hat.dtype) + self.head.out_scale[k].to(r_hat.dtype) * d_mu
            values.append(r_hat + alpha * (mu - r_hat))
        return torch.stack(values, dim=-1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.stitch.parameters()) + list(self.logit_scale.parameters()) + list(self.shrink.parameters()) + \
            self.adapters.parameters(self.adapter_name)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"graft.{k}": v for k, v in self.state_dict().items() if not k.startswith("reward_nets.")}
        out.update({f"lora.{k}": v for k, v in self.adapters.state_dict(self.adapter_name).items()})
        return {k: v.detach().contiguous() for k, v in out.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("graft.")}, strict=False)
        self.adapters.load_state_dict(self.adapter_name, {k[5:]: v for k, v in tensors.items() if k.startswith("lora.")})


def graft_for(reward) -> RewardGraft:
    """The graft of one trained reward (only the digit classifier's ``digit_prob`` is built)."""
    if getattr(reward, "name", None) == "digit_prob":
        return digit_graft(reward)
    raise ValueError(f"no grafted critic for reward {getattr(reward, 'name', reward)!r}: only digit_prob is built "
                     "(see critic_align/grafted.py for what the CLIP rewards and composition need)")


def build_grafted_critic(adapter, adapters, schedule, decode, rewards, example, adapter_name: str = "critic",
                         lora_rank: int = 8, lora_alpha: float | None = None, lora_target_modules=None,
                         features="mid") -> GraftedCritic:
    """A grafted critic on the policy's backbone ``adapter`` (its LoraAdapters ``adapters`` get the critic's LoRA on
    every target module: the critic runs the whole trunk).  rewards: a MultiReward (one graft per reward);
    example: one (x_t, t, cond) input of the task's shape (the feature levels' channels are measured on it)."""
    which = adapter._check_layers(features)
    with torch.no_grad():
        feats = adapter.features(*example, which=which)
    adapters.add(adapter_name, rank=lora_rank, alpha=lora_alpha, target_modules=lora_target_modules)
    grafts = [graft_for(r) for r in rewards.rewards]
    device = example[0].device
    for g in grafts:
        g.early.to(device)
        g.late.to(device)
    return GraftedCritic(adapter, adapters, adapter_name, schedule, decode, grafts, which,
                         [int(f.shape[1]) for f in feats.levels], int(feats.temb.shape[-1])).to(device)
