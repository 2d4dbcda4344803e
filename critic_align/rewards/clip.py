"""Rewards from CLIP models (transformers): CLIP score, PickScore and the LAION aesthetic predictor.

All three share one loader and one image pipeline:

* **Lazy loading.**  Constructing a reward loads nothing; the CLIP model, its image processor
  settings and its tokenizer are loaded on the first call (or by :meth:`load`), from a local
  directory (what ``save_pretrained`` writes) or a Hugging Face hub name.  A path that looks like a
  path but does not exist is an error straight away; a hub name that cannot be fetched (no network)
  is an error that says to pass a local path.  ``local_files_only=True`` never touches the network
  (a hub name is then looked up in the local cache only), which makes offline failures immediate.
* **Preprocessing as torch ops on the batch** (:class:`CLIPImageTransform`), not a PIL round trip per
  image: samples in ``[-1, 1]`` are mapped to ``[0, 1]`` as ``clamp((x + 1) / 2, 0, 1)`` (the
  ``uint8 / 255`` scale an image file would have), grayscale is repeated to RGB, then the processor's
  own settings are applied: resize (shortest edge or fixed size, with its bicubic/bilinear filter,
  antialiased like PIL), centre crop, rescale and normalise with its mean/std.  It matches the
  processor's output on the same image as a PIL input to within the uint8 rounding PIL does after its
  resize (see ``tests/test_real_rewards.py``).  Because it is torch, the rewards can be
  differentiable (``differentiable=True``: gradients reach the samples; the CLIP weights are frozen).
* ``device`` (default: the samples' device, which is the trainer's; ``cuda`` means this rank's GPU,
  ``cuda:{LOCAL_RANK}``, resolved at construction so a lazy load in the reward thread lands there),
  ``dtype`` (``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``; the model's weights and
  inputs; embeddings are compared in float32) and
  ``batch_size`` (images per forward; larger batches are chunked).  The result is a ``(B,)`` float32
  tensor on the samples' device.
* ``processor``: where the image processor and tokenizer live when they are not next to the model
  (PickScore's model repository uses the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
* ``name``: the reward's name in logs and in a :class:`~critic_align.rewards.MultiReward` (two CLIP
  scores with different models need different names).

Prompts are tokenised with padding and truncation to the text model's maximum length (77 for the
released CLIP models); the embeddings of repeated prompts in a batch are computed once.

Each reward is ``score_embeds(image_embeds(x), text_embeds(prompts))``: the score from the L2-normalised
embeddings is one method per reward, which the reward-grafted critic calls too
(:mod:`critic_align.grafted_clip`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from critic_align.launch import rank_device
from critic_align.rewards.base import Reward

__all__ = [
    "AESTHETIC_HEAD_KEYS",
    "AestheticHead",
    "CLIPImageTransform",
    "CLIPScore",
    "LaionAesthetic",
    "PickScore",
    "convert_aesthetic_head",
    "l2_normalized",
    "unit_rgb",
]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

# PIL resampling codes used in processor configs -> torch interpolation modes.
_RESAMPLE = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))} or a torch.dtype")


def _looks_like_path(source: str) -> bool:
    """Whether ``source`` can only be a filesystem path (hub names are ``name`` or ``owner/name``)."""
    return (
        source.startswith(("/", ".", "~"))
        or "\\" in source
        or source.count("/") > 1
        or source.endswith("/")
    )


def _from_pretrained(cls, source, what: str, owner: str, local_files_only: bool, **kwargs):
    """``cls.from_pretrained(source)`` with errors that say what failed and what to do offline."""
    if isinstance(source, Path):
        source = str(source)
    if not isinstance(source, str) or not source:
        raise TypeError(f"{owner}: the {what} must be a local directory or a hub name, got {source!r}")
    local = Path(source).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ValueError(
                f"{owner}: {what} path {str(local)!r} is a file; pass the directory written by save_pretrained"
            )
        try:
            return cls.from_pretrained(str(local), local_files_only=True, **kwargs)
        except Exception as exc:
            raise ValueError(
                f"{owner}: could not load the {what} from the local directory {str(local)!r} "
                f"({type(exc).__name__}: {exc})"
            ) from exc
    if _looks_like_path(source):
        raise FileNotFoundError(
            f"{owner}: {what} path {source!r} does not exist; pass an existing local directory "
            f"(what save_pretrained writes) or a Hugging Face hub name"
        )
    try:
        return cls.from_pretrained(source, local_files_only=local_files_only, **kwargs)
    except Exception as exc:
        where = "in the local Hugging Face cache (local_files_only=True)" if local_files_only else (
            "on the Hugging Face hub (unreachable, or no such repository)"
        )
        raise OSError(
            f"{owner}: could not load the {what} {source!r}: it is not a local directory and it was not "
            f"found {where} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            f"Offline, pass a local path: a directory with the model's files, e.g. made elsewhere with "
            f"`huggingface-cli download {source} --local-dir DIR` or save_pretrained"
        ) from exc



def processor_and_tokenizer(source, owner: str, local_files_only: bool):
    """The CLIP image processor and tokenizer of ``source`` (transformers' "requires torchvision, falling back to PIL"
    notice silenced: the rewards preprocess in torch ops and use only the processor's sizes and statistics)."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        processor = _from_pretrained(AutoImageProcessor, source, "image processor", owner, local_files_only)
    finally:
        hf_logging.set_verbosity(verbosity)
    return processor, _from_pretrained(AutoTokenizer, source, "tokenizer", owner, local_files_only)

def _dtype_kwarg() -> str:
    """``from_pretrained``'s dtype argument: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _get(obj, key):
    """Read ``key`` from a processor size entry (a dict, or transformers 5's ``SizeDict``)."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


class CLIPImageTransform:
    """A CLIP image processor's preprocessing as batched torch ops.

    ``CLIPImageTransform(size, crop_size, mean, std, resample="bicubic", scale=1.0)`` maps
    ``(B, 3, H, W)`` images in ``[0, 1]`` to the model's ``pixel_values``:

    1. resize: ``size`` an int resizes the shortest edge to ``size`` and the other to
       ``int(size * long / short)`` (the processors' rule); a ``(height, width)`` pair resizes to it;
       ``None`` skips.  ``resample`` is ``"bicubic"``, ``"bilinear"`` or ``"nearest-exact"``;
       bicubic/bilinear are antialiased (as PIL does when downsampling) and clamped to ``[0, 1]``
       (as PIL's uint8 output is);
    2. centre crop to ``crop_size = (height, width)`` (top/left offsets ``(in - out) // 2``), or
       ``None`` to skip; a crop larger than the resized image is an error (the processors would pad);
    3. ``(x * scale - mean) / std`` per channel; ``scale`` is ``255 * rescale_factor`` of the processor
       (1 for the usual ``1/255``), since ``[0, 1]`` here corresponds to ``uint8 / 255``.

    :meth:`from_processor` reads these from a transformers image processor.
    """

    def __init__(self, size, crop_size, mean, std, resample: str = "bicubic", scale: float = 1.0):
        if size is not None:
            if isinstance(size, int):
                if size <= 0:
                    raise ValueError(f"resize size must be positive, got {size}")
            elif not (len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
                raise ValueError(f"resize size must be an int (shortest edge) or (height, width), got {size!r}")
        if crop_size is not None and not (len(crop_size) == 2 and all(isinstance(s, int) and s > 0 for s in crop_size)):
            raise ValueError(f"crop_size must be (height, width) of positive ints, got {crop_size!r}")
        if resample not in _RESAMPLE.values():
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE.values())}, got {resample!r}")
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean.numel() not in (1, 3) or std.numel() not in (1, 3):
            raise ValueError(f"mean/std need 1 or 3 values, got {mean.tolist()} / {std.tolist()}")
        if not bool((std > 0).all()):
            raise ValueError(f"std must be positive, got {std.tolist()}")
        self.size = size if isinstance(size, int) or size is None else (int(size[0]), int(size[1]))
        self.crop_size = None if crop_size is None else (int(crop_size[0]), int(crop_size[1]))
        self.mean = mean.expand(3).clone()
        self.std = std.expand(3).clone()
        self.resample = resample
        self.scale = float(scale)

    @classmethod
    def from_processor(cls, processor) -> CLIPImageTransform:
        """Read resize/crop/rescale/normalise settings from a (CLIP) image processor."""
        size = None
        if getattr(processor, "do_resize", True):
            s = processor.size
            if _get(s, "shortest_edge") and not _get(s, "longest_edge"):
                size = int(_get(s, "shortest_edge"))
            elif _get(s, "height") and _get(s, "width"):
                size = (int(_get(s, "height")), int(_get(s, "width")))
            elif isinstance(s, int):
                size = s
            else:
                raise ValueError(f"unsupported image processor size {s!r}: expected shortest_edge or height/width")
        crop = None
        if getattr(processor, "do_center_crop", False):
            c = processor.crop_size
            crop = (int(_get(c, "height")), int(_get(c, "width"))) if not isinstance(c, int) else (c, c)
        resample = int(getattr(processor, "resample", 3))
        if resample not in _RESAMPLE:
            raise ValueError(
                f"image processor resample={resample} is not supported; supported PIL codes: "
                f"{ {k: v for k, v in _RESAMPLE.items()} }"
            )
        scale = 255.0 * float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else 255.0
        if getattr(processor, "do_normalize", True):
            mean, std = processor.image_mean, processor.image_std
        else:
            mean, std = [0.0], [1.0]
        return cls(size, crop, mean, std, resample=_RESAMPLE[resample], scale=scale)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) of ``pixel_values`` for an input of ``height × width``."""
        h, w = self._resized(height, width)
        return self.crop_size if self.crop_size is not None else (h, w)

    def _resized(self, height: int, width: int) -> tuple[int, int]:
        if self.size is None:
            return height, width
        if isinstance(self.size, tuple):
            return self.size
        if width <= height:
            return int(self.size * height / width), self.size
        return self.size, int(self.size * width / height)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"CLIPImageTransform expects (B, 3, H, W) images in [0, 1], got {tuple(images.shape)}")
        x = images
        h, w = self._resized(x.shape[2], x.shape[3])
        if (h, w) != tuple(x.shape[2:]):
            if self.resample == "nearest-exact":
                x = F.interpolate(x, size=(h, w), mode="nearest-exact")
            else:
                x = F.interpolate(x, size=(h, w), mode=self.resample, align_corners=False, antialias=True).clamp(0, 1)
        if self.crop_size is not None:
            ch, cw = self.crop_size
            if ch > h or cw > w:
                raise ValueError(f"centre crop {self.crop_size} is larger than the resized image {(h, w)}")
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[:, :, top : top + ch, left : left + cw]
        mean = self.mean.to(x.device, x.dtype).view(1, 3, 1, 1)
        std = self.std.to(x.device, x.dtype).view(1, 3, 1, 1)
        return (x * self.scale - mean) / std

    def __repr__(self) -> str:
        return (
            f"CLIPImageTransform(size={self.size}, crop_size={self.crop_size}, resample={self.resample!r}, "
            f"scale={self.scale:g}, mean={self.mean.tolist()}, std={self.std.tolist()})"
        )


def _features(output) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output whose pooler_output it is (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def unit_rgb(samples: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Samples in ``[-1, 1]`` as RGB in ``[0, 1]`` (``clamp((x + 1) / 2, 0, 1)``, grayscale repeated), in ``dtype``
    (the rewards: float32; the grafted critic keeps float64 inputs float64)."""
    x = ((samples.to(dtype) + 1) / 2).clamp(0, 1)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def l2_normalized(embeds: torch.Tensor) -> torch.Tensor:
    """Embeddings divided by their L2 norm (CLIP's image and text embeddings before the cosine)."""
    return embeds / embeds.norm(dim=-1, keepdim=True)


class _CLIPReward(Reward):
    """Shared loading, preprocessing and embedding of the CLIP-based rewards (see the module docstring)."""

    name = "clip"
    default_model: str = ""
    default_processor: str | None = None
    reads_prompts = True  # whether score_embeds reads the prompts' text embeddings (the aesthetic predictor does not)

    def __init__(
        self,
        model: str | Path | None = None,
        processor: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "float32",
        batch_size: int = 32,
        local_files_only: bool = False,
        differentiable: bool = False,
        name: str | None = None,
    ):
        model = self.default_model if model is None else model
        if processor is None:
            processor = self.default_processor if model == self.default_model and self.default_processor else model
        for what, value in (("model", model), ("processor", processor)):
            if not isinstance(value, (str, Path)) or not str(value):
                raise TypeError(f"{type(self).__name__}: {what} must be a local directory or a hub name, got {value!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"{type(self).__name__}: batch_size must be a positive int, got {batch_size!r}")
        if name is not None:
            if not isinstance(name, str) or not name:
                raise ValueError(f"{type(self).__name__}: name must be a non-empty string, got {name!r}")
            self.name = name
        self.model_source = str(model)
        self.processor_source = str(processor)
        # resolved now, on the constructing thread: 'cuda' -> this rank's GPU (cuda:LOCAL_RANK), so a model loaded
        # lazily in the background reward thread (whose current CUDA device is cuda:0) lands on the rank's own GPU
        self.device = None if device is None else rank_device(device)
        self.dtype = _resolve_dtype(dtype)
        self.batch_size = batch_size
        self.local_files_only = bool(local_files_only)
        self.differentiable = bool(differentiable)
        self._model = None
        self._transform: CLIPImageTransform | None = None
        self._tokenizer = None

    # ------------------------------------------------------------------ loading

    @property
    def is_loaded(self) -> bool:
        """Whether the CLIP model has been loaded (it is on the first call or :meth:`load`)."""
        return self._model is not None

    def load(self) -> None:
        """Load the CLIP model, image processor settings and tokenizer now (otherwise done on first call)."""
        if self._model is not None:
            return
        from transformers import CLIPModel

        owner = f"reward {self._display_name!r}"
        model = _from_pretrained(CLIPModel, self.model_source, "CLIP model", owner, self.local_files_only,
                                 **{_dtype_kwarg(): self.dtype})
        processor, tokenizer = processor_and_tokenizer(self.processor_source, owner, self.local_files_only)
        model.eval().requires_grad_(False)
        if self.device is not None:
            model.to(self.device)
        self._transform = CLIPImageTransform.from_processor(processor)
        self._tokenizer = tokenizer
        self._after_load(model)
        self._model = model

    def _after_load(self, model) -> None:
        """Hook for subclasses that load more (the aesthetic head)."""

    @property
    def model(self):
        """The CLIP model (loaded on first access)."""
        self.load()
        return self._model

    def _model_on(self, samples: torch.Tensor):
        model = self.model
        target = self.device if self.device is not None else samples.device
        p = next(model.parameters())
        if p.device != target:
            model.to(target)
            self._on_move(target)
        return model, target

    def _on_move(self, device) -> None:
        """Hook for subclasses holding more modules."""

    # ------------------------------------------------------------------ embeddings

    def _images01(self, samples) -> torch.Tensor:
        if not isinstance(samples, torch.Tensor):
            raise TypeError(f"expects a (B, C, H, W) tensor, got {type(samples).__name__}")
        if samples.ndim != 4 or samples.shape[1] not in (1, 3):
            raise ValueError(
                f"expects samples of shape (B, C, H, W) with C = 1 (grayscale) or 3 (RGB) in [-1, 1], "
                f"got {tuple(samples.shape)}"
            )
        if not samples.is_floating_point():
            raise TypeError(f"expects float samples in [-1, 1], got dtype {samples.dtype}")
        if not bool(torch.isfinite(samples.detach()).all()):
            raise ValueError("got non-finite (NaN/inf) pixel values")
        return unit_rgb(samples)

    def image_embeds(self, samples: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLIP image embeddings ``(B, D)`` (float32) of samples in ``[-1, 1]``."""
        model, device = self._model_on(samples)
        x = self._images01(samples)
        out = []
        for i in range(0, x.shape[0], self.batch_size):
            pixels = self._transform(x[i : i + self.batch_size].to(device))
            emb = _features(model.get_image_features(pixel_values=pixels.to(self.dtype))).float()
            out.append(l2_normalized(emb))
        return torch.cat(out)

    def text_embeds(self, prompts: Sequence[str], device=None) -> torch.Tensor:
        """L2-normalised CLIP text embeddings ``(B, D)`` (float32); repeated prompts are embedded once."""
        if prompts is None or isinstance(prompts, (str, bytes)):
            raise TypeError(f"needs one prompt string per sample, got {type(prompts).__name__}")
        prompts = list(prompts)
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must be strings, got {type(bad[0]).__name__} {bad[0]!r}")
        model = self.model
        device = device if device is not None else next(model.parameters()).device
        unique = list(dict.fromkeys(prompts))
        max_len = min(int(self._tokenizer.model_max_length), int(model.config.text_config.max_position_embeddings))
        out = []
        with torch.no_grad():
            for i in range(0, len(unique), self.batch_size):
                tok = self._tokenizer(unique[i : i + self.batch_size], padding=True, truncation=True,
                                      max_length=max_len, return_tensors="pt")
                emb = _features(model.get_text_features(input_ids=tok["input_ids"].to(device),
                                                        attention_mask=tok["attention_mask"].to(device))).float()
                out.append(l2_normalized(emb))
        table = torch.cat(out)
        position = {p: i for i, p in enumerate(unique)}
        index = torch.tensor([position[p] for p in prompts], device=table.device)
        return table[index]

    def score_embeds(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor | None) -> torch.Tensor:
        """The reward from the L2-normalised image embeddings ``(B, D)`` and the prompts' L2-normalised text embeddings
        ``(B, D)`` (``None`` when the reward reads no prompt, ``reads_prompts = False``): here their cosine.  The
        reward (:meth:`compute`) and its grafted critic (:func:`critic_align.grafted_clip.clip_graft`) both score
        through this one function."""
        return (image_embeds * text_embeds).sum(dim=-1)

    def score_modules(self) -> list[torch.nn.Module]:
        """The modules :meth:`score_embeds` runs besides the CLIP model (the aesthetic head), for the grafted critic
        to hold (device and dtype moves)."""
        return []

    def compute(self, samples, prompts):
        img = self.image_embeds(samples)
        txt = self.text_embeds(prompts, device=img.device) if self.reads_prompts else None
        return self.score_embeds(img, txt).to(samples.device)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self._display_name!r}, model={self.model_source!r}, "
            f"loaded={self.is_loaded}, differentiable={self.differentiable})"
        )


class CLIPScore(_CLIPReward):
    """CLIP score: ``scale · cos(E_image(x), E_text(prompt))`` per sample.

    ``scale`` defaults to 1 (the raw cosine, in ``[-1, 1]``).  The published definitions clamp at 0
    and rescale: Hessel et al. (2021) CLIP-S ``= 2.5 · max(cos, 0)``, torchmetrics' ``CLIPScore`` ``=
    100 · max(cos, 0)`` (with ``openai/clip-vit-large-patch14``, the default model here); pass
    ``scale=100, clip_at_zero=True`` to reproduce the latter.  (The clamp removes the reward's signal
    below 0, so it is off by default for training.)

    ``CLIPScore(model="openai/clip-vit-large-patch14", processor=None, *, scale=1.0,
    clip_at_zero=False, device=None, dtype="float32", batch_size=32, local_files_only=False,
    differentiable=False, name=None)``; the other arguments are described in the module docstring.
    """

    name = "clip_score"
    default_model = "openai/clip-vit-large-patch14"

    def __init__(self, model=None, processor=None, *, scale: float = 1.0, clip_at_zero: bool = False, **kwargs):
        super().__init__(model, processor, **kwargs)
        scale = float(scale)
        if not (scale > 0 and scale < float("inf")):
            raise ValueError(f"CLIPScore scale must be a positive finite number, got {scale}")
        self.scale = scale
        self.clip_at_zero = bool(clip_at_zero)

    def score_embeds(self, image_embeds, text_embeds):
        cos = super().score_embeds(image_embeds, text_embeds)
        if self.clip_at_zero:
            cos = cos.clamp_min(0)
        return self.scale * cos


class PickScore(_CLIPReward):
    """PickScore (Kirstain et al., 2023): ``exp(logit_scale) · cos(E_image(x), E_text(prompt))``.

    As in the reference code: the CLIP-H model ``yuvalkirstain/PickScore_v1`` with the processor
    (and tokenizer) of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` -- the defaults when ``model`` is not
    given; with another ``model`` the processor defaults to the model's own directory.  Scores of
    good matches are around 20-23 (``exp(logit_scale) = 100``); some papers report them divided by
    100 or 26.

    ``PickScore(model=None, processor=None, *, device=None, dtype="float32", batch_size=32,
    local_files_only=False, differentiable=False, name=None)``.
    """

    name = "pickscore"
    default_model = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def score_embeds(self, image_embeds, text_embeds):
        cos = super().score_embeds(image_embeds, text_embeds)
        return self.model.logit_scale.detach().float().exp().to(cos.device) * cos


# ------------------------------------------------------------------------------------------ aesthetic

AESTHETIC_HIDDEN = (1024, 128, 64, 16)
"""Widths of the LAION aesthetic predictor v2's MLP after the input (its ``layers.0/2/4/6/7`` Linear layers)."""

AESTHETIC_HEAD_KEYS = (
    "layers.0.weight", "layers.0.bias",  # Linear(D, 1024)     (D = 768 for CLIP ViT-L/14)
    "layers.2.weight", "layers.2.bias",  # Linear(1024, 128)
    "layers.4.weight", "layers.4.bias",  # Linear(128, 64)
    "layers.6.weight", "layers.6.bias",  # Linear(64, 16)
    "layers.7.weight", "layers.7.bias",  # Linear(16, 1)
)
"""The tensors of the aesthetic head's safetensors file, named as in the original state dict."""


class AestheticHead(torch.nn.Module):
    """The MLP of the LAION aesthetic predictor v2 (``improved-aesthetic-predictor``'s ``MLP``).

    Same layer layout as the original, so its state dict (e.g. ``sac+logos+ava1-l14-linearMSE.pth``,
    converted to safetensors by :func:`convert_aesthetic_head`) loads with the original key names
    :data:`AESTHETIC_HEAD_KEYS`::

        layers = Sequential(Linear(D, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2),
                            Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1))

    There are no activations (the original's ReLUs are commented out), so in eval mode the head is an
    affine map of the embedding.  ``input_size`` is the CLIP projection dimension (768 for ViT-L/14).
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0:
            raise ValueError(f"AestheticHead input_size must be a positive int, got {input_size!r}")
        h1, h2, h3, h4 = AESTHETIC_HIDDEN
        self.input_size = input_size
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, h1),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(h1, h2),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(h2, h3),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(h3, h4),
            torch.nn.Linear(h4, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` L2-normalised CLIP image embeddings -> ``(B, 1)`` aesthetic scores."""
        return self.layers(embeds)

    @classmethod
    def from_safetensors(cls, path: str | Path) -> AestheticHead:
        """Load a head from a safetensors file with exactly the keys :data:`AESTHETIC_HEAD_KEYS`."""
        from safetensors.torch import load_file

        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"aesthetic head file {str(path)!r} does not exist; pass the safetensors file of the LAION "
                f"aesthetic predictor's MLP (convert the original .pth with convert_aesthetic_head)"
            )
        try:
            state = load_file(str(path))
        except Exception as exc:
            raise ValueError(f"could not read the aesthetic head {str(path)!r} as safetensors ({exc})") from exc
        missing = [k for k in AESTHETIC_HEAD_KEYS if k not in state]
        unexpected = sorted(set(state) - set(AESTHETIC_HEAD_KEYS))
        if missing or unexpected:
            raise ValueError(
                f"aesthetic head {str(path)!r} has the wrong keys: missing {missing}, unexpected {unexpected}; "
                f"expected {list(AESTHETIC_HEAD_KEYS)} (the original MLP's state dict)"
            )
        w0 = state["layers.0.weight"]
        if w0.ndim != 2:
            raise ValueError(f"aesthetic head {str(path)!r}: layers.0.weight must be 2-D, got {tuple(w0.shape)}")
        head = cls(int(w0.shape[1]))
        try:
            head.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"aesthetic head {str(path)!r} does not fit the original layout: {exc}") from exc
        return head.eval().requires_grad_(False)


def convert_aesthetic_head(pth_path: str | Path, out_path: str | Path) -> Path:
    """Convert the original aesthetic predictor state dict (``.pth``) to a safetensors file.

    The ``.pth`` is read with ``torch.load(..., weights_only=True)`` (tensors only, nothing is
    unpickled beyond that); its keys must be :data:`AESTHETIC_HEAD_KEYS`.  Returns ``out_path``.
    """
    from safetensors.torch import save_file

    pth_path, out_path = Path(pth_path).expanduser(), Path(out_path).expanduser()
    state = torch.load(str(pth_path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or sorted(state) != sorted(AESTHETIC_HEAD_KEYS):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{str(pth_path)!r} is not the aesthetic MLP's state dict: keys {keys}, "
                         f"expected {list(AESTHETIC_HEAD_KEYS)}")
    save_file({k: v.detach().float().contiguous() for k, v in state.items()}, str(out_path))
    return out_path


class LaionAesthetic(_CLIPReward):
    """LAION aesthetic predictor v2: ``head(E_image(x) / ||E_image(x)||)``, roughly a 1-10 rating.

    ``E_image`` is the CLIP image embedding (``get_image_features``; the original uses OpenAI's CLIP
    ViT-L/14, ``openai/clip-vit-large-patch14``, the default ``model``), L2-normalised, and ``head``
    an :class:`AestheticHead` loaded from the safetensors file ``head`` (required; keys
    :data:`AESTHETIC_HEAD_KEYS`, input width = the CLIP projection dimension).  The prompt is
    ignored.  DDPO and AlignProp train on this reward (AlignProp differentiably:
    ``differentiable=True``).

    ``LaionAesthetic(head, model=None, processor=None, *, device=None, dtype="float32",
    batch_size=32, local_files_only=False, differentiable=False, name=None)``.
    """

    name = "aesthetic"
    default_model = "openai/clip-vit-large-patch14"
    reads_prompts = False

    def __init__(self, head: str | Path, model=None, processor=None, **kwargs):
        if not isinstance(head, (str, Path)) or not str(head):
            raise TypeError(f"LaionAesthetic needs head=<path to the MLP's safetensors file>, got {head!r}")
        super().__init__(model, processor, **kwargs)
        self.head_path = Path(head).expanduser()
        self._head: AestheticHead | None = None

    def _after_load(self, model) -> None:
        head = AestheticHead.from_safetensors(self.head_path)
        dim = int(model.config.projection_dim)
        if head.input_size != dim:
            raise ValueError(
                f"reward {self._display_name!r}: the aesthetic head {str(self.head_path)!r} takes {head.input_size}-d "
                f"embeddings but the CLIP model {self.model_source!r} produces {dim}-d ones (the original head is for "
                f"CLIP ViT-L/14, 768-d)"
            )
        self._head = head.to(next(model.parameters()).device)

    def _on_move(self, device) -> None:
        self._head.to(device)

    def score_embeds(self, image_embeds, text_embeds=None):
        return self._head(image_embeds).squeeze(-1)

    def score_modules(self):
        self.load()
        return [self._head]
