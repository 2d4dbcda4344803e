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


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(prog="critic-align pretrain-digits", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="critic_align/assets/digits_unet", help="output directory")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--cond-dropout", type=float, default=0.1, help="label dropout for CFG")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args(argv)
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
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)

    def lr_lambda(step):
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) * 0.95 + 0.05

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    acp = scheduler.alphas_cumprod
    log = []
    t0 = time.time()
    bar = tqdm(range(args.steps), desc="pretrain-digits")
    for step in bar:
        idx = torch.randint(0, len(images), (args.batch_size,), generator=gen)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(args.batch_size, generator=gen) < args.cond_dropout] = NULL_CLASS
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(xt, t, class_labels=y).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(unet.parameters())
        if step % 50 == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log.append({"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0], "time_s": time.time() - t0})

    ema.copy_to(unet.parameters())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out, safe_serialization=True)
    scheduler.save_pretrained(out)
    (out / "training_log.json").write_text(json.dumps({"args": vars(args), "log": log,
                                                        "train_time_s": time.time() - t0}, indent=1))
    print(f"saved base model to {out} ({time.time() - t0:.0f} s)")
    return out


if __name__ == "__main__":
    main()
