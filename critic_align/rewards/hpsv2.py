"""HPSv2.1 (Human Preference Score v2.1, Wu et al. 2023) as a native reward, without open_clip.

The HPSv2.1 checkpoint (``HPS_v2.1_compressed.pt``) is the state dict of an open_clip ``ViT-H-14`` CLIP model
fine-tuned on human preferences.  :func:`convert_open_clip_state_dict` renames its tensors into transformers'
``CLIPModel`` layout (splitting each attention's ``in_proj`` into q / k / v, transposing the two projections) and
:func:`clip_config_from_open_clip` reads the model's shape from the tensors (heads from ``head_width``, 64 in
open_clip's ViT-H-14, for both towers; GELU; LayerNorm eps 1e-5).  The checkpoint is read with
``torch.load(..., weights_only=True)`` (tensors only, never a full unpickle) or from a safetensors copy.

The score is HPSv2's own: the cosine of the L2-normalised image and text features (``image_features @
text_features.T``, its diagonal), about 0.2-0.35 for real images.  Preprocessing (resize 224 bicubic, centre crop,
OpenAI mean / std) and the tokenizer come from ``processor``, by default the LAION CLIP-ViT-H-14 repository whose
processor and tokenizer are open_clip's ViT-H-14 ones; the image preprocessing runs as torch ops, so the reward
can be differentiable (``differentiable=True``), as the other CLIP rewards (:mod:`critic_align.rewards.clip`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from critic_align.rewards.clip import CLIPImageTransform, _CLIPReward, processor_and_tokenizer

__all__ = ["HPSv2", "clip_config_from_open_clip", "convert_open_clip_state_dict", "load_open_clip_state_dict"]

_BLOCK = {  # open_clip resblock -> transformers encoder layer (besides in_proj, split below)
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
_TOP = {  # open_clip -> transformers, tensors renamed as they are
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight", "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
_IGNORED = ("attn_mask",)  # open_clip's causal-mask buffer (transformers builds its own)


def load_open_clip_state_dict(path) -> dict[str, torch.Tensor]:
    """An open_clip checkpoint's tensors: safetensors, or ``torch.load(weights_only=True)`` of a ``.pt`` (a bare state
    dict or ``{"state_dict": ...}`` as HPSv2's training saves it); a ``module.`` prefix (DDP) is dropped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"HPSv2 checkpoint {str(path)!r} does not exist; pass the path of HPS_v2.1_compressed.pt "
                                "(or a safetensors copy of it)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"could not read {str(path)!r} with torch.load(weights_only=True) ({type(exc).__name__}: "
                             f"{exc}); convert it to safetensors where it was made") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _layers(state, prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def clip_config_from_open_clip(state: dict[str, torch.Tensor], head_width: int = 64):
    """The ``CLIPConfig`` of an open_clip CLIP state dict (shapes from the tensors, ``width // head_width`` heads)."""
    from transformers import CLIPConfig

    required = ("token_embedding.weight", "positional_embedding", "text_projection", "visual.conv1.weight",
                "visual.positional_embedding", "visual.proj")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"not an open_clip CLIP state dict (missing {missing}); HPSv2 needs the ViT-H-14 checkpoint "
                         "HPS_v2.1_compressed.pt")
    vocab, text_width = state["token_embedding.weight"].shape
    patch_w = state["visual.conv1.weight"]
    vision_width, patch = patch_w.shape[0], patch_w.shape[-1]
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    for width in (text_width, vision_width):
        if width % head_width:
            raise ValueError(f"width {width} is not a multiple of head_width={head_width}")
    text = dict(vocab_size=int(vocab), hidden_size=int(text_width),
                intermediate_size=int(state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
                num_hidden_layers=_layers(state, "transformer.resblocks."), num_attention_heads=text_width // head_width,
                max_position_embeddings=int(state["positional_embedding"].shape[0]), hidden_act="gelu",
                layer_norm_eps=1e-5, projection_dim=int(state["text_projection"].shape[1]),
                bos_token_id=int(vocab) - 2, eos_token_id=int(vocab) - 1, pad_token_id=0)
    vision = dict(hidden_size=int(vision_width), image_size=int(grid * patch), patch_size=int(patch),
                  intermediate_size=int(state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
                  num_hidden_layers=_layers(state, "visual.transformer.resblocks."),
                  num_attention_heads=vision_width // head_width, hidden_act="gelu", layer_norm_eps=1e-5,
                  projection_dim=int(state["visual.proj"].shape[1]), num_channels=int(patch_w.shape[1]))
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=int(state["text_projection"].shape[1]))


def convert_open_clip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip CLIP tensors -> transformers ``CLIPModel`` tensors (see the module docstring); an unknown key is an
    error naming it (a checkpoint of another architecture, e.g. with layer scale or a custom text tower)."""
    out, unknown = {}, []
    towers = (("visual.transformer.resblocks.", "vision_model.encoder.layers."),
              ("transformer.resblocks.", "text_model.encoder.layers."))
    for k, v in state.items():
        if k in _TOP:
            out[_TOP[k]] = v
        elif k in _TRANSPOSED:
            out[_TRANSPOSED[k]] = v.t().contiguous()
        elif k.split(".")[-1] in _IGNORED:
            continue
        else:
            for src, dst in towers:
                if k.startswith(src):
                    i, rest = k[len(src):].split(".", 1)
                    layer = f"{dst}{i}."
                    if rest.startswith("attn.in_proj_"):
                        kind = rest.rsplit("_", 1)[-1]  # weight | bias
                        for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                            out[f"{layer}self_attn.{name}.{kind}"] = part.contiguous()
                    else:
                        sub, kind = rest.rsplit(".", 1)
                        if sub not in _BLOCK:
                            unknown.append(k)
                        else:
                            out[f"{layer}{_BLOCK[sub]}.{kind}"] = v
                    break
            else:
                unknown.append(k)
    if unknown:
        raise ValueError(f"open_clip keys with no CLIPModel counterpart: {unknown[:5]} ({len(unknown)} in all); "
                         "HPSv2 converts the plain ViT CLIP layout (open_clip ViT-H-14)")
    return out


class HPSv2(_CLIPReward):
    """HPSv2.1: the cosine of CLIP-H image and text features, with HPSv2.1's fine-tuned weights (module docstring).

    ``HPSv2(checkpoint, processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K", *, head_width=64, device=None,
    dtype="float32", batch_size=32, local_files_only=False, differentiable=False, name=None)``: ``checkpoint`` is
    the path of ``HPS_v2.1_compressed.pt`` (or a safetensors copy); ``processor`` a local directory or hub name
    with the image processor and tokenizer.
    """

    name = "hpsv2"
    default_model = ""
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def __init__(self, checkpoint, processor=None, *, head_width: int = 64, **kwargs):
        if not isinstance(checkpoint, (str, Path)) or not str(checkpoint):
            raise TypeError(f"HPSv2 needs checkpoint=<path to HPS_v2.1_compressed.pt>, got {checkpoint!r}")
        if isinstance(head_width, bool) or not isinstance(head_width, int) or head_width <= 0:
            raise ValueError(f"HPSv2 head_width must be a positive int, got {head_width!r}")
        super().__init__(str(checkpoint), processor or self.default_processor, **kwargs)
        self.head_width = head_width  # the checkpoint is read on the first call or load(), as the other CLIP rewards

    def load(self) -> None:
        if self._model is not None:
            return
        from transformers import CLIPModel

        owner = f"reward {self._display_name!r}"
        state = load_open_clip_state_dict(self.model_source)
        config = clip_config_from_open_clip(state, self.head_width)
        model = CLIPModel(config)
        converted = convert_open_clip_state_dict(state)
        missing, unexpected = model.load_state_dict(converted, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]  # buffers transformers makes itself
        if missing or unexpected:
            raise ValueError(f"{owner}: the converted checkpoint does not fit CLIPModel: missing {missing[:5]}, "
                             f"unexpected {list(unexpected)[:5]}")
        processor, tokenizer = processor_and_tokenizer(self.processor_source, owner, self.local_files_only)
        model = model.to(self.dtype).eval().requires_grad_(False)
        if self.device is not None:
            model.to(self.device)
        self._transform = CLIPImageTransform.from_processor(processor)
        self._tokenizer = tokenizer
        self._model = model
    # the score is the base class's: the cosine of the image and text embeddings (score_embeds)
