"""Prompt-independent image rewards: JPEG (in)compressibility as in DDPO, and boldness.

Samples are ``(B, C, H, W)`` float images in ``[-1, 1]``; prompts are ignored (their number is
still checked against ``B`` by :class:`~critic_align.rewards.base.Reward`).
"""

from __future__ import annotations

import io

import torch
from PIL import Image

from critic_align.rewards.base import Reward

__all__ = ["Boldness", "JpegCompressibility", "JpegIncompressibility", "jpeg_size_kb"]


def _check_images(samples, what: str) -> None:
    if not isinstance(samples, torch.Tensor):
        raise TypeError(f"{what} expects a (B, C, H, W) tensor, got {type(samples).__name__}")
    if samples.ndim != 4:
        raise ValueError(f"{what} expects samples of shape (B, C, H, W), got {tuple(samples.shape)}")
    if not samples.is_floating_point():
        raise TypeError(f"{what} expects float samples in [-1, 1], got dtype {samples.dtype}")


def jpeg_size_kb(samples: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """JPEG file size of each image in kB (bytes / 1000), as a ``(B,)`` float32 tensor on the samples' device.

    Images are mapped from ``[-1, 1]`` to uint8 as ``round(clamp((x + 1) / 2, 0, 1) * 255)`` and
    encoded with PIL at the given quality: grayscale (mode ``L``) when ``C == 1``, RGB when
    ``C == 3``; other channel counts are an error, and so are NaN/inf pixels.
    """
    _check_images(samples, "jpeg_size_kb")
    channels = samples.shape[1]
    if channels not in (1, 3):
        raise ValueError(f"JPEG rewards need 1 (grayscale) or 3 (RGB) channels, got C = {channels}")
    x = samples.detach()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("JPEG rewards got non-finite (NaN/inf) pixel values")
    pixels = ((x.float() + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
    sizes = []
    for img in pixels:
        arr = img[0] if channels == 1 else img.transpose(1, 2, 0)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=samples.device)


class JpegCompressibility(Reward):
    """Minus the JPEG size in kB at ``quality`` (default 95): smaller files score higher (DDPO).

    Not differentiable.  ``JpegCompressibility(quality=95)``.
    """

    name = "jpeg_compressibility"
    differentiable = False
    _sign = -1.0

    def __init__(self, quality: int = 95):
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
        self.quality = int(quality)

    def compute(self, samples, prompts):
        return self._sign * jpeg_size_kb(samples, self.quality)


class JpegIncompressibility(JpegCompressibility):
    """The JPEG size in kB at ``quality`` (default 95): larger, more detailed files score higher (DDPO).

    Not differentiable.  ``JpegIncompressibility(quality=95)``.
    """

    name = "jpeg_incompressibility"
    _sign = 1.0


class Boldness(Reward):
    """Mean ink, ``mean((x + 1) / 2)`` over channels and pixels: 0 for an all ``-1`` image, 1 for all ``+1``.

    Differentiable and trivially hackable (brighten everything), which makes it a handy reward for
    checking reward-hacking behaviour and gradient plumbing.
    """

    name = "boldness"
    differentiable = True

    def compute(self, samples, prompts):
        _check_images(samples, "boldness")
        return ((samples + 1) / 2).mean(dim=(1, 2, 3))
