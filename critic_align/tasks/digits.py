"""The embedded digits task: scikit-learn's 8x8 digits, upsampled to 16x16 in [-1, 1].

Everything here runs offline: the data ship with scikit-learn, and the base model and classifier
ship with this package (``critic_align/assets``).  ``load_base_model`` / ``load_digit_classifier``
load them from safetensors + JSON only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .base import BaseTask

IMAGE_SIZE = 16
NUM_CLASSES = 10
NULL_CLASS = 10  # extra class embedding used for the unconditional branch (CFG dropout)
DIGIT_PROMPTS = tuple(str(d) for d in range(NUM_CLASSES))

ASSETS = Path(str(resources.files("critic_align") / "assets"))
BASE_MODEL_DIR = ASSETS / "digits_unet"
DIT_MODEL_DIR = ASSETS / "digits_dit"
CLASSIFIER_DIR = ASSETS / "digit_classifier"


def load_digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images, labels): images (N, 1, 16, 16) float32 in [-1, 1], labels (N,) int64."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N,1,8,8) in [0,1]
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = images.clamp(0, 1) * 2 - 1
    labels = torch.from_numpy(data.target.astype(np.int64))
    return images, labels


def train_val_split(n: int, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split of ``range(n)`` into (train, held-out) index arrays."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def prompts_to_labels(prompts) -> torch.Tensor:
    """Map digit prompts ("0".."9", or ints) to class labels, with a clear error otherwise."""
    if isinstance(prompts, torch.Tensor):
        labels = prompts.long()
    else:
        if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
            raise TypeError(
                f"prompts must be a sequence of digit strings like ['3', '7'], got {type(prompts).__name__}"
            )
        out = []
        for p in prompts:
            try:
                out.append(int(p))
            except (TypeError, ValueError):
                raise ValueError(
                    f"digits prompt {p!r} is not a digit: use the strings '0'..'9' (or ints 0..9)"
                ) from None
        labels = torch.tensor(out, dtype=torch.long)
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"digit prompts must be in 0..9, got {labels.tolist()}")
    return labels


def unet_config() -> dict:
    """The base model's UNet2DModel config (1.1 M parameters, class-conditional, attention at 8x8)."""
    return dict(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=NUM_CLASSES + 1,
        attention_head_dim=32,
    )


def scheduler_config() -> dict:
    # "trailing" spacing starts sampling at t = 999 (pure noise), which matters at 20 steps
    return dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                clip_sample=True, timestep_spacing="trailing")


def dit_config() -> dict:
    """The digits DiT's DiTTransformer2DModel config (patch 2 -> 64 tokens of width 128, 3 blocks, ~1.1 M
    parameters; ``num_embeds_ada_norm=10`` gives 11 label embeddings: the digits and the null class 10)."""
    return dict(sample_size=IMAGE_SIZE, patch_size=2, in_channels=1, out_channels=1, num_layers=3,
                num_attention_heads=4, attention_head_dim=32, num_embeds_ada_norm=NUM_CLASSES)


def flow_scheduler_config() -> dict:
    """The digits DiT's sampler: diffusers' FlowMatchEulerDiscreteScheduler, timesteps σ·1000, no shift."""
    return dict(num_train_timesteps=1000, shift=1.0)


def load_dit_model(path: str | Path | None = None, device="cpu"):
    """Load the shipped digits DiT (or one saved by ``critic-align pretrain-digits-dit``) and its scheduler.

    Returns ``(dit, scheduler)``: a ``DiTTransformer2DModel`` in eval mode (see ``backbones/dit.py`` for
    why) and a ``FlowMatchEulerDiscreteScheduler``.  Weights are read with safetensors only.
    """
    from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler

    path = Path(path) if path is not None else DIT_MODEL_DIR
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no digits DiT at {path} (config.json missing); run `critic-align pretrain-digits-dit --out {path}`"
        )
    dit = DiTTransformer2DModel.from_pretrained(path, use_safetensors=True).to(device)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path)
    dit.eval().requires_grad_(False)
    return dit, scheduler


def load_digits_model(path: str | Path, device="cpu"):
    """Load a digits model directory of either kind (UNet DDPM or flow-matching DiT) by its config's class."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"no digits model at {path} (config.json missing)")
    cls = json.loads(cfg_file.read_text()).get("_class_name")
    if cls == "DiTTransformer2DModel":
        return load_dit_model(path, device)
    if cls == "UNet2DModel":
        return load_base_model(path, device)
    raise ValueError(f"{cfg_file}: model class {cls!r} is not a digits model (UNet2DModel or DiTTransformer2DModel)")


def load_base_model(path: str | Path | None = None, device="cpu"):
    """Load the shipped digits UNet (or one saved by ``critic-align pretrain-digits``) and its scheduler.

    Returns ``(unet, scheduler)``.  Weights are read with safetensors only.
    """
    from diffusers import DDPMScheduler, UNet2DModel

    path = Path(path) if path is not None else BASE_MODEL_DIR
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no digits base model at {path} (config.json missing); run `critic-align pretrain-digits --out {path}`"
        )
    unet = UNet2DModel.from_pretrained(path, use_safetensors=True).to(device)
    scheduler = DDPMScheduler.from_pretrained(path)
    unet.eval().requires_grad_(False)
    return unet, scheduler


@dataclass
class ClassifierConfig:
    channels: tuple[int, int] = (32, 64)
    hidden: int = 128
    dropout: float = 0.3


class DigitClassifier(torch.nn.Module):
    """Small CNN on 16x16 images in [-1, 1] -> 10 logits."""

    def __init__(self, channels=(32, 64), hidden: int = 128, dropout: float = 0.3):
        super().__init__()
        c1, c2 = channels
        self.config = {"channels": list(channels), "hidden": hidden, "dropout": dropout}
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, c1, 3, padding=1), torch.nn.GroupNorm(8, c1), torch.nn.SiLU(),
            torch.nn.Conv2d(c1, c1, 3, padding=1), torch.nn.GroupNorm(8, c1), torch.nn.SiLU(),
            torch.nn.AvgPool2d(2),  # 8x8
            torch.nn.Conv2d(c1, c2, 3, padding=1), torch.nn.GroupNorm(8, c2), torch.nn.SiLU(),
            torch.nn.AvgPool2d(2),  # 4x4
            torch.nn.Flatten(),
            torch.nn.Dropout(dropout),
            torch.nn.Linear(c2 * 16, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1:] != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"DigitClassifier expects (B, 1, 16, 16) images in [-1, 1], got {tuple(x.shape)}")
        return self.net(x)


def load_digit_classifier(path: str | Path | None = None, device="cpu") -> DigitClassifier:
    """Load the shipped digit classifier (safetensors + JSON, never pickle)."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else CLASSIFIER_DIR
    cfg_file, w_file = path / "config.json", path / "model.safetensors"
    if not cfg_file.exists() or not w_file.exists():
        raise FileNotFoundError(
            f"no digit classifier at {path}; run `python -m train.train_classifier --out {path}`"
        )
    cfg = json.loads(cfg_file.read_text())
    # the random init is overwritten below: do not consume the caller's RNG (a reward loads this lazily, on its
    # first call, so drawing from the global RNG here would shift it after a resume)
    with torch.random.fork_rng(devices=[]):
        model = DigitClassifier(channels=tuple(cfg["channels"]), hidden=cfg["hidden"], dropout=cfg["dropout"])
    model.load_state_dict(load_file(str(w_file)))
    return model.to(device).eval().requires_grad_(False)


class DigitsTask(BaseTask):
    """The digits task's prompt source, conditioning and decoding (pixel space: decode is identity).

    Prompts are the strings "0".."9"; the conditioning is the class label; the null conditioning
    (for classifier-free guidance) is the extra class ``NULL_CLASS``.
    """

    name = "digits"
    prompts = DIGIT_PROMPTS
    latent_shape = (1, IMAGE_SIZE, IMAGE_SIZE)

    def encode(self, prompts) -> torch.Tensor:
        return prompts_to_labels(prompts)

    def null_cond(self, n: int) -> torch.Tensor:
        return torch.full((n,), NULL_CLASS, dtype=torch.long)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)
