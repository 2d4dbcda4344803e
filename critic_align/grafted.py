"""A reward-grafted critic (``critic_body: grafted``): the reward network's own later layers read the backbone.

StitchVM (arXiv 2605.19804) grafts a truncated reward model onto a diffusion backbone so that the reward model's
judgement scores noisy latents.  Here, for a reward network split at an intermediate layer into ``early`` and
``late`` (:class:`RewardGraft`):

    out, F = trunk(x_t, t, c)                        one forward through the critic's own LoRA on the shared base:
                                                     the model output and the feature level(s) F
    x̂0    = predict_x0(out, x_t, t)                 the trunk's one-step prediction (the sampler's formula)
    h      = early(decode(x̂0)) + stitch(F)          the stitching layer: upsample + 1x1 conv into the graft layer's
                                                     channels, zero at the start
    logits = late(h) · exp(a(e_t))                  the reward network's own later layers (frozen), then a learned
                                                     per-noise-level logit scale (a = 0 at the start)
    r̂      = readout(logits, c, decode(x̂0))         the reward's own read-out (e.g. softmax(logits / T)[label])
    V      = r̂ + α(e_t)·(μ(e_t) − r̂)               a learned per-noise-level shrinkage towards a mean μ (α = 0 at the
                                                     start): a softmax read-out cannot express "uncertain, on average
                                                     0.7" by its logits alone (E[softmax] ≠ softmax of any logits)

At the start (critic LoRA = 0, stitch = 0, a = 0) V(x_t, t) = r(decode(x̂0_base(x_t))): near t = 0, where x̂0 ≈ x_t,
it reads r(x0) of a clean sample.  Value pretraining and the PPO value loss train the critic's LoRA, the stitch and
the scale; the reward network stays frozen.  The whole path is differentiable in x_t (gradient guidance can use it).

Reward networks: :func:`digit_graft` splits the shipped digit classifier (``digit_prob``); :func:`composition_graft`
grafts the tiny text-to-image tasks' dense ``composition`` reward through the same digit classifier, applied to each of
the canvas's 4 cells (its read-out is the reward's own clause read-out,
:func:`critic_align.rewards.composition.judge_cells`).  The CLIP-family rewards (CLIP score, PickScore, the LAION
aesthetic predictor, HPSv2) split their image tower (:func:`critic_align.grafted_clip.clip_graft`: early = the reward's
preprocessing, the patch embedding and the first half of the encoder layers on the decoded image; late = the
remaining layers and the projection; read-out = the reward's own score from the image and text embeddings).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .reward_graft import RewardGraft  # its own module: grafted_clip builds one and graft_for dispatches to it
from .steps import predict_x0

__all__ = ["RewardGraft", "digit_graft", "composition_graft", "PromptTable", "GraftedCritic", "build_grafted_critic",
           "graft_for"]


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

    def readout(logits, cond, image=None):
        labels = torch.as_tensor(cond, device=logits.device).long()
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return (logits / temperature).softmax(-1).gather(1, labels[:, None]).squeeze(1)

    return RewardGraft(early, late, readout, int(probe.shape[1]), tuple(probe.shape[-2:]))


class PromptTable:
    """The prompts behind rows of a task's conditioning: the critic is called with (x_t, t, cond), and the trainer's
    value rows carry the conditioning, not the prompt strings, while the composition read-out needs each prompt's
    clauses.  Each known prompt's conditioning (``encode``, the task's) is kept as a fixed random projection of the
    flattened row (a fingerprint, float64); a row is resolved to the prompt with the nearest fingerprint, and refused
    when that one is not within ``tol`` (relative) of it, i.e. the row is none of the known prompts' conditioning.
    ``add(prompts)`` makes more prompts known (e.g. held-out ones before steering on them)."""

    def __init__(self, encode, prompts, dim: int = 32, tol: float = 1e-3, chunk: int = 512):
        self.encode, self.dim, self.tol, self.chunk = encode, int(dim), float(tol), int(chunk)
        self.prompts: list[str] = []
        self._index: dict[str, int] = {}
        self._keys = torch.zeros(0, self.dim, dtype=torch.float64)
        self._proj: torch.Tensor | None = None
        self.add(prompts)

    @staticmethod
    def _flat(cond) -> torch.Tensor:
        if isinstance(cond, torch.Tensor):
            return cond.flatten(1)
        if hasattr(cond, "embeds") and hasattr(cond, "pooled"):  # a TextCond
            return torch.cat([cond.embeds.flatten(1), cond.pooled.flatten(1)], dim=1)
        raise TypeError(f"PromptTable reads tensor or TextCond conditioning, got {type(cond).__name__}")

    def _key(self, cond) -> torch.Tensor:
        flat = self._flat(cond).detach().to("cpu", torch.float64)
        if self._proj is None:
            g = torch.Generator().manual_seed(0)
            self._proj = torch.randn(flat.shape[1], self.dim, generator=g, dtype=torch.float64) / flat.shape[1] ** 0.5
        if flat.shape[1] != self._proj.shape[0]:
            raise ValueError(f"conditioning rows have {flat.shape[1]} values, the table's {self._proj.shape[0]}")
        return flat @ self._proj

    def add(self, prompts) -> None:
        new = [p for p in dict.fromkeys(prompts) if p not in self._index]
        for s in range(0, len(new), self.chunk):
            part = new[s:s + self.chunk]
            self._keys = torch.cat([self._keys, self._key(self.encode(part))])
            for p in part:
                self._index[p] = len(self.prompts)
                self.prompts.append(p)

    def __call__(self, cond) -> list[str]:
        key = self._key(cond)
        dist = torch.cdist(key, self._keys)
        best, idx = dist.min(dim=1)
        bad = (best > self.tol * key.norm(dim=1).clamp_min(1e-12)).nonzero().flatten()
        if len(bad):
            raise ValueError(f"conditioning row {int(bad[0])} is none of the {len(self.prompts)} prompts the grafted "
                             "critic knows (its composition read-out needs each prompt's clauses): add them with "
                             "critic.prompt_table.add(prompts)")
        return [self.prompts[i] for i in idx.tolist()]


class _Cells(nn.Module):
    """The 4 cells' activations (B·4, C, h, w) tiled back into the canvas's 2x2 grid (B, C, 2h, 2w) (``inverse``:
    untiled), in ``CELLS`` order (row-major, as :func:`~critic_align.tasks.composition.cell_views`)."""

    def __init__(self, inner: nn.Module, inverse: bool = False):
        super().__init__()
        self.inner, self.inverse = inner, inverse

    def forward(self, x):
        if self.inverse:  # (B, C, 2h, 2w) -> (B·4, C, h, w) -> the classifier's later layers -> (B, 4, 10)
            b, c, hh, ww = x.shape
            cells = x.reshape(b, c, 2, hh // 2, 2, ww // 2).permute(0, 2, 4, 1, 3, 5).reshape(b * 4, c, hh // 2, ww // 2)
            return self.inner(cells).reshape(b, 4, -1)
        b = x.shape[0]  # x: (B, 4, 1, 16, 16), the classifier's input per cell
        h = self.inner(x.reshape(b * 4, *x.shape[2:]))
        c, hh, ww = h.shape[1:]
        return h.reshape(b, 2, 2, c, hh, ww).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 2 * hh, 2 * ww)


def composition_graft(reward, prompts: PromptTable, split: int = 7) -> RewardGraft:
    """The ``composition`` reward's digit clause grafted through its digit classifier, split as :func:`digit_graft`.

    early: the classifier's first layers on each cell's ink (the reward's own classifier input, from
    :func:`~critic_align.rewards.composition.pixel_features`), the 4 cells' 8x8 maps tiled back into the canvas's 2x2
    grid: a (B, 32, 16, 16) map in which every position lies over the canvas region it describes, so the stitch (a 1x1
    conv of the backbone's feature map resampled to 16x16) adds, at each canvas position, into the cell there, with one
    set of weights for every cell, as the classifier's own.  late: untiled, the classifier's later layers -> (B, 4, 10)
    digit logits.  Read-out: the reward's clause read-out (:func:`~critic_align.rewards.composition.judge_cells`, the
    mean clause probability) on those logits with the non-neural clauses (occupancy and count, colour, centroid and
    position) measured from the pixels of decode(x̂0) itself: the x0-reward read-out for them (they have no layer to
    stitch into; they are differentiable in the pixels almost everywhere).  The prompts' clauses: ``prompts`` maps
    the conditioning rows back to prompts, whose clauses the reward reads (``reward.compositions``)."""
    from .rewards.composition import judge_cells, pixel_features, with_digit_logits

    clf = reward.classifier
    early, late = _Cells(clf.net[:split]), _Cells(clf.net[split:], inverse=True)
    opts = reward.opts
    with torch.no_grad():
        probe = early(torch.zeros(1, 4, 1, 16, 16, dtype=next(clf.parameters()).dtype))
    pixel_opts = {k: opts[k] for k in ("ink_threshold", "ink_scale", "colour_scale")}

    def cell_input(image):
        return pixel_features(image, **pixel_opts)[1]

    def readout(logits, cond, image):
        dtype = torch.promote_types(image.dtype, torch.float32)
        f, _ = pixel_features(image.to(dtype), **pixel_opts)
        f = with_digit_logits(f, logits, opts["temperature"])
        comps = reward.compositions(prompts(cond))
        return judge_cells(f, comps, opts["ink_threshold"], opts["position_scale"]).score

    return RewardGraft(_ImageTo(cell_input, early), late, readout, int(probe.shape[1]), tuple(probe.shape[-2:]))


class _ImageTo(nn.Module):
    """early(image) = net(prepare(image)): the reward's own input preparation (not a module) before its layers."""

    def __init__(self, prepare: Callable[[torch.Tensor], torch.Tensor], net: nn.Module):
        super().__init__()
        self.prepare, self.net = prepare, net

    def forward(self, image):
        return self.net(self.prepare(image))


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

    @staticmethod
    def _as_map(level: torch.Tensor) -> torch.Tensor:
        """A feature level as a (B, C, h, w) map: a convolutional map as it is; transformer tokens (B, N, C) of a
        square patch grid (N = h·w, row-major, as the DiT patchifies) laid back onto it."""
        if level.ndim == 4:
            return level
        b, n, c = level.shape
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f"the grafted critic lays transformer tokens back onto a square patch grid; got {n} tokens")
        return level.transpose(1, 2).reshape(b, c, side, side)

    def _stitched(self, feats, graft: RewardGraft, conv: nn.Conv2d) -> torch.Tensor:
        maps = [nn.functional.interpolate(self._as_map(f).to(conv.weight.dtype), size=graft.size, mode="bilinear",
                                          align_corners=False) for f in feats.levels]
        return conv(torch.cat(maps, dim=1))

    def forward(self, x_t, t, cond=None, x0_reward=None) -> torch.Tensor:
        if x0_reward is not None:
            raise ValueError("the grafted critic reads the reward network itself: critic_x0_reward does not apply")
        t = self._trunk._timesteps(t, x_t)
        with self.adapters.using(self.adapter_name):
            out, feats = self._trunk.predict_and_features(x_t, t, cond, which=self.feature_layers)
        x0_hat = predict_x0(self.schedule, out, x_t, t)  # float32, or float64 for a float64 input
        image = self.decode(x0_hat)
        temb = feats.temb.to(self.stitch[0].weight.dtype)
        values = []
        for k, (graft, nets, conv, scale, shrink) in enumerate(zip(self.grafts, self.reward_nets, self.stitch,
                                                                     self.logit_scale, self.shrink)):
            early, late = nets
            h = early(image.to(conv.weight.dtype)) + self._stitched(feats, graft, conv)
            logits = late(h)
            logits = logits * scale(temb).exp().view(-1, *[1] * (logits.ndim - 1))
            r_hat = graft.readout(logits, cond, image)
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


def graft_for(reward, prompts: PromptTable | None = None) -> RewardGraft:
    """The graft of one trained reward: ``digit_prob`` (:func:`digit_graft`), ``composition``
    (:func:`composition_graft`, which needs the task's ``prompts`` table) or a CLIP-family reward
    (:func:`critic_align.grafted_clip.clip_graft`; the table for those that read prompts)."""
    from .rewards.clip import _CLIPReward

    if isinstance(reward, _CLIPReward):
        from .grafted_clip import clip_graft

        return clip_graft(reward, prompts)
    name = getattr(reward, "name", None)
    if name == "digit_prob":
        return digit_graft(reward)
    if name == "composition":
        if prompts is None:
            raise ValueError("the composition graft reads each prompt's clauses: build_grafted_critic needs the task "
                             "(task=...) to map conditioning rows back to its prompts")
        return composition_graft(reward, prompts)
    raise ValueError(f"no grafted critic for reward {name or reward!r}: digit_prob, composition and the CLIP-family "
                     "rewards (CLIPScore, PickScore, LaionAesthetic, HPSv2) are built")


def build_grafted_critic(adapter, adapters, schedule, decode, rewards, example, adapter_name: str = "critic",
                         lora_rank: int = 8, lora_alpha: float | None = None, lora_target_modules=None,
                         features="mid", task=None) -> GraftedCritic:
    """A grafted critic on the policy's backbone ``adapter`` (its LoraAdapters ``adapters`` get the critic's LoRA on
    every target module: the critic runs the whole trunk).  rewards: a MultiReward (one graft per reward);
    example: one (x_t, t, cond) input of the task's shape (the feature levels' channels are measured on it);
    decode: the task's latents -> reward input, differentiable (``task.decode_differentiable``); task: needed by a
    prompt-conditioned read-out (``composition``): its ``encode`` and ``prompts`` make the :class:`PromptTable`."""
    which = adapter._check_layers(features)
    with torch.no_grad():
        feats = adapter.features(*example, which=which)
    adapters.add(adapter_name, rank=lora_rank, alpha=lora_alpha, target_modules=lora_target_modules)
    needs_prompts = any(getattr(r, "name", None) == "composition" or getattr(r, "reads_prompts", False)
                        for r in rewards.rewards)
    table = PromptTable(task.encode, task.prompts) if needs_prompts and task is not None else None
    grafts = [graft_for(r, table) for r in rewards.rewards]
    device = example[0].device
    for g in grafts:
        g.early.to(device)
        g.late.to(device)
    critic = GraftedCritic(adapter, adapters, adapter_name, schedule, decode, grafts, which,
                           [int(GraftedCritic._as_map(f).shape[1]) for f in feats.levels], int(feats.temb.shape[-1])).to(device)
    critic.prompt_table = table
    return critic
