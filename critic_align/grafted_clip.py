"""The CLIP-family rewards grafted for the reward-grafted critic (:mod:`critic_align.grafted`).

:func:`clip_graft` splits the image tower of a CLIP-based reward (:class:`~critic_align.rewards.CLIPScore`,
:class:`~critic_align.rewards.PickScore`, :class:`~critic_align.rewards.LaionAesthetic`,
:class:`~critic_align.rewards.HPSv2`) after encoder layer ``split``:

    early(image)  = layers[:split](pre_layrnorm(embeddings(transform(unit_rgb(image)))))   tokens -> map
    late(map)     = l2_normalized(visual_projection(post_layernorm(layers[split:](tokens)[:, 0])))
    readout(e, c) = reward.score_embeds(e, text embeddings of prompts(c))

``transform`` is the reward's own torch preprocessing (:class:`~critic_align.rewards.clip.CLIPImageTransform`), the
late part is ``get_image_features``' path from the same layer on, and the read-out is the reward's own score from the
image and text embeddings (:meth:`~critic_align.rewards.clip._CLIPReward.score_embeds`, which the reward's
``compute`` calls too): the cosine (times the reward's scale for CLIP score, times ``exp(logit_scale)`` for PickScore)
or the aesthetic MLP on the image embedding.  Unstitched, ``readout(late(early(x)))`` is the reward of ``x``.

Token layout.  The stitch adds a 1x1 convolution of the backbone's feature map, resampled to the graft's (H, W), into
a (B, C, H, W) map; the tower's tokens are one CLS token and h·w patch tokens of width D.  The map is
(B, 2D, h, w): channels [0, D) hold the patch tokens on their own grid (row-major, as the patch embedding flattens
its convolution), so each position's stitch is the backbone's features over the same image region; channels [D, 2D)
hold the CLS token copied to every position, and ``late`` reads the CLS token back as their spatial mean.  The CLS
token describes the whole image, and so receives the mean of the stitch over all positions (a global pooling of the
backbone's features through the same 1x1 convolution), not the features of one arbitrary place (as an extra row of
the grid would give it, which would also misalign the patch rows with the resampled features by a row).  Unstitched,
the mean of the copies is the CLS token itself (up to float rounding of the mean).

Prompts.  The critic is called with conditioning rows, not prompts: ``prompts`` (a :class:`~critic_align.grafted.
PromptTable`) maps them back; each prompt's text embedding (the reward's ``text_embeds``, constant: the text tower
is frozen and not grafted) is computed once and cached.  The aesthetic predictor reads no prompt and needs no table.

The grafted critic's per-noise-level logit scale multiplies the "logits" ``late`` returns, here the normalised image
embedding: it scales the cosine (CLIP score, PickScore, HPSv2) or the aesthetic MLP's linear part.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from .reward_graft import RewardGraft
from .rewards.clip import _CLIPReward, l2_normalized, unit_rgb

__all__ = ["clip_graft"]


@functools.cache
def _takes_causal_mask(layer_type: type) -> bool:
    return "causal_attention_mask" in inspect.signature(layer_type.forward).parameters


def _run_layers(layers, h: torch.Tensor) -> torch.Tensor:
    """CLIP encoder layers, no attention mask (the image tower has none).  transformers 4's layer takes a causal mask
    too and returns a tuple; 5's returns the tensor."""
    for layer in layers:
        out = layer(h, None, None) if _takes_causal_mask(type(layer)) else layer(h, None)
        h = out[0] if isinstance(out, tuple) else out
    return h


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class _CLIPEarly(nn.Module):
    """image in [-1, 1] -> the tower's tokens after ``split`` layers, as the (B, 2D, h, w) map (module docstring)."""

    def __init__(self, reward: _CLIPReward, split: int):
        super().__init__()
        vision = reward.model.vision_model
        object.__setattr__(self, "transform", reward._transform)  # not a module: plain tensors and settings
        self.embeddings, self.pre_layrnorm = vision.embeddings, vision.pre_layrnorm
        self.layers = nn.ModuleList(vision.encoder.layers[:split])

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        dtype = _dtype(self.embeddings)
        x = unit_rgb(image, torch.promote_types(image.dtype, torch.float32))
        pixels = self.transform(x).to(dtype)
        h = _run_layers(self.layers, self.pre_layrnorm(self.embeddings(pixels)))
        b, n, d = h.shape
        side = int(round((n - 1) ** 0.5))
        patches = h[:, 1:].transpose(1, 2).reshape(b, d, side, side)
        cls = h[:, 0, :, None, None].expand(b, d, side, side)
        return torch.cat([patches, cls], dim=1)


class _CLIPLate(nn.Module):
    """the (B, 2D, h, w) map -> the remaining layers, post-layernorm, visual projection -> L2-normalised image
    embeddings (B, P) in float32 (float64 for a float64 tower), as the reward's ``image_embeds``."""

    def __init__(self, reward: _CLIPReward, split: int):
        super().__init__()
        model = reward.model
        vision = model.vision_model
        self.layers = nn.ModuleList(vision.encoder.layers[split:])
        self.post_layernorm, self.visual_projection = vision.post_layernorm, model.visual_projection
        self.score_modules = nn.ModuleList(reward.score_modules())  # held for device / dtype moves

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[1] // 2
        patches = x[:, :d].flatten(2).transpose(1, 2)
        cls = x[:, d:].mean(dim=(2, 3))  # in the stitched map's dtype, before a cast to a half-precision tower's
        tokens = torch.cat([cls[:, None], patches], dim=1).to(_dtype(self.post_layernorm))
        h = _run_layers(self.layers, tokens)
        emb = self.visual_projection(self.post_layernorm(h[:, 0]))
        return l2_normalized(emb.to(torch.promote_types(emb.dtype, torch.float32)))


class _TextEmbeds:
    """The reward's L2-normalised text embedding of each prompt, computed once per prompt (the text tower is frozen)."""

    def __init__(self, reward: _CLIPReward):
        self.reward = reward
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: list[str], like: torch.Tensor) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            for p, e in zip(missing, self.reward.text_embeds(missing)):
                self.cache[p] = e
        return torch.stack([self.cache[p] for p in prompts]).to(like.device, like.dtype)


def clip_graft(reward: _CLIPReward, prompts=None, split: int | None = None):
    """A CLIP-family reward's graft (module docstring): its image tower split after encoder layer ``split`` (default:
    half of the layers, rounded down); ``prompts``: the :class:`~critic_align.grafted.PromptTable` from conditioning
    rows to prompts, needed when the reward reads prompts (all but the aesthetic predictor)."""
    if not isinstance(reward, _CLIPReward):
        raise TypeError(f"clip_graft grafts the CLIP-family rewards (CLIPScore, PickScore, LaionAesthetic, HPSv2), got "
                        f"{type(reward).__name__}")
    reward.load()
    config = reward.model.config.vision_config
    n_layers = int(config.num_hidden_layers)
    split = n_layers // 2 if split is None else split
    if isinstance(split, bool) or not isinstance(split, int) or not 0 <= split <= n_layers:
        raise ValueError(f"clip_graft split={split!r}: the encoder layer after which to graft, an int in "
                         f"[0, {n_layers}] (the image tower of reward {reward._display_name!r} has {n_layers})")
    if reward.reads_prompts and prompts is None:
        raise ValueError(f"the grafted critic of reward {reward._display_name!r} reads each prompt's text embedding: "
                         "build_grafted_critic needs the task (task=...) to map conditioning rows back to its prompts")
    side = int(config.image_size) // int(config.patch_size)
    texts = _TextEmbeds(reward) if reward.reads_prompts else None

    def readout(logits, cond, image=None):
        txt = texts(prompts(cond), logits) if texts is not None else None
        return reward.score_embeds(logits, txt)

    return RewardGraft(_CLIPEarly(reward, split), _CLIPLate(reward, split), readout, 2 * int(config.hidden_size),
                       (side, side))
