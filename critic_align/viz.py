"""Image grids and plots (PIL + matplotlib; no torchvision)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def make_grid(images: torch.Tensor, nrow: int, padding: int = 1, scale: int = 1) -> np.ndarray:
    """(N, C, H, W) images in [-1, 1] -> (H', W', C) uint8 grid with ``nrow`` images per row."""
    images = images.detach().float().cpu().clamp(-1, 1)
    n, c, h, w = images.shape
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
        h, w = h * scale, w * scale
    ncol = nrow
    nrows = (n + ncol - 1) // ncol
    grid = torch.full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), 0.5)
    for i in range(n):
        r, q = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, y : y + h, x : x + w] = (images[i] + 1) / 2
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return arr


def save_grid(images: torch.Tensor, path, nrow: int, scale: int = 4, labels=None) -> Path:
    """Save a PNG grid; ``labels`` (one per row) are drawn on the left when given."""
    from PIL import Image, ImageDraw

    arr = make_grid(images, nrow=nrow, scale=scale)
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if labels is not None:
        h = images.shape[-2] * scale + 1
        width = 24  # room for the longest label (prompts), at least a digit's
        probe = ImageDraw.Draw(img)
        width = max(width, 8 + max((int(probe.textlength(str(lab))) for lab in labels), default=0))
        canvas = Image.new(img.mode, (img.width + width, img.height), color=255 if img.mode == "L" else (255,) * 3)
        canvas.paste(img, (width, 0))
        draw = ImageDraw.Draw(canvas)
        for i, lab in enumerate(labels):
            draw.text((4, 1 + i * h + h // 2 - 6), str(lab), fill=0 if img.mode == "L" else (0, 0, 0))
        img = canvas
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def plot_metrics(jsonl_path, out_path, keys, x_key: str = "reward_queries", title: str = "") -> Path:
    """Plot metric curves from a JSONL log, one subplot per key (keys absent from the log are skipped).

    A ``.../mean`` key whose ``.../std`` twin is logged gets a ±std band (e.g. ``reward/<name>/mean``); a key
    whose ``pre_<key>`` twin is logged (value-pretraining rows, e.g. ``value_ev/<name>``) gets that curve too.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(jsonl_path).read_text().splitlines() if line.strip()]
    keys = [k for k in keys if any(k in r or f"pre_{k}" in r for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4 * max(1, len(keys)), 3.2), squeeze=False)

    def series(key):
        pts = [(r[x_key], r[key]) for r in rows if key in r and x_key in r and r[key] is not None]
        return tuple(np.array(v, dtype=float) for v in zip(*pts)) if pts else (None, None)

    for ax, key in zip(axes[0], keys):
        xp, yp = series(f"pre_{key}")
        if xp is not None:
            ax.plot(xp, yp, marker=".", color="C1", label="value pretraining")
        xs, ys = series(key)
        if xs is not None:
            ax.plot(xs, ys, marker=".", color="C0", label="training" if xp is not None else None)
            if key.endswith("/mean"):
                xd, sd = series(key[: -len("/mean")] + "/std")
                if xd is not None and len(xd) == len(xs):
                    ax.fill_between(xs, ys - sd, ys + sd, color="C0", alpha=0.2, label="± std over the batch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.set_xlabel(x_key)
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
