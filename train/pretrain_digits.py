"""Train the embedded class-conditional digits DDPM (`critic-align pretrain-digits`).

Reproduces the shipped base model in ``critic_align/assets/digits_unet``: a diffusers UNet2DModel
(1.1 M parameters, 11 class embeddings: the digits plus a null class for classifier-free guidance)
trained with the ε-prediction DDPM loss on scikit-learn's digits upsampled to 16x16, with an EMA of
the weights.  ~2000 steps x batch 128 take ~15 minutes on 2 CPU cores.  The model card is written by
``train.evaluate_digits`` (per-class accuracy of samples judged by the shipped classifier).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from critic_align.tasks.digits import NULL_CLASS, load_digits_dataset, scheduler_config, unet_config

from .command import standalone


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_fit_arguments(p, "digits_unet", steps=2000, batch_size=128)


def add_fit_arguments(p: argparse.ArgumentParser, model: str, steps: int, batch_size: int) -> None:
    """The options of :func:`fit_digits_model`, shared by both digits models (``model``: the asset's name)."""
    p.add_argument("--out", default=f"runs/{model}",
                   help=f"output directory (default %(default)s; the shipped model is critic_align/assets/{model})")
    p.add_argument("--steps", type=int, default=steps, help="optimiser steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=batch_size, help="images per step (default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default %(default)s)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default %(default)s)")
    p.add_argument("--ema-decay", type=float, default=0.995, help="EMA decay of the saved weights (default %(default)s)")
    p.add_argument("--cond-dropout", type=float, default=0.1, help="label dropout for CFG (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and batches (default %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")


def main(argv=None) -> Path:
    return standalone("critic-align pretrain-digits", __doc__, add_arguments, run, argv)


def run(args) -> Path:
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images, labels = load_digits_dataset()
    unet = UNet2DModel(**unet_config())
    scheduler = DDPMScheduler(**scheduler_config())
    ema = EMAModel(unet.parameters(), decay=args.ema_decay)
    acp = scheduler.alphas_cumprod

    def ddpm_loss(model, x0, y, gen):
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        return F.mse_loss(model(xt, t, class_labels=y).sample, noise)

    out = fit_digits_model(unet, scheduler, ema, ddpm_loss, images, labels, gen, args, "pretrain-digits")
    print(f"saved base model to {out}")
    return out


def fit_digits_model(model, scheduler, ema, loss_fn, images, labels, gen, args, desc: str) -> Path:
    """The training loop both digits models share: label dropout for CFG (the null class), AdamW with linear
    warm-up then cosine decay to 5 %, gradient clipping at 1, an EMA of the weights (saved), a JSON log.

    ``loss_fn(model, x0, y, gen)`` draws the noise level and the noise and returns the loss.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)

    def lr_lambda(step):
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) * 0.95 + 0.05

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    log = []
    t0 = time.time()
    bar = tqdm(range(args.steps), desc=desc)
    for step in bar:
        idx = torch.randint(0, len(images), (args.batch_size,), generator=gen)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(args.batch_size, generator=gen) < args.cond_dropout] = NULL_CLASS
        loss = loss_fn(model, x0, y, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(model.parameters())
        if step % 50 == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log.append({"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0], "time_s": time.time() - t0})

    ema.copy_to(model.parameters())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    scheduler.save_pretrained(out)
    (out / "training_log.json").write_text(json.dumps({"args": _options(args), "log": log,
                                                        "train_time_s": time.time() - t0}, indent=1))
    print(f"{desc}: {time.time() - t0:.0f} s")
    return out

def _options(args) -> dict:
    """The command's options (without what the ``critic-align`` parser adds: the subcommand and its function)."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "fn")}


if __name__ == "__main__":
    main()
