"""Train the embedded class-conditional digits DiT with flow matching (`critic-align pretrain-digits-dit`).

Reproduces ``critic_align/assets/digits_dit``: a diffusers ``DiTTransformer2DModel`` (patch 2 on the
16x16 digits, ~1 M parameters, class labels 0-9 plus the null class 10 for classifier-free guidance)
trained as a rectified flow: x_σ = (1 − σ)·x0 + σ·ε with σ ~ U(0, 1) (or logit-normal), the model
predicts the velocity v = ε − x0 at timestep σ·1000, mean-squared error.  The sampler is diffusers'
``FlowMatchEulerDiscreteScheduler`` (shift 1), whose config is saved next to the weights.

Label dropout for CFG is done here, once per sample (the label becomes the null class), and the model is
run in eval mode: diffusers' DiT drops labels independently *in every block* in training mode, which
would show a block the null class while its neighbours see the digit.  The adaLN-Zero modulations and
the output head start at zero (DiT's initialisation).  EMA weights are saved.  The model card is written
by ``train.evaluate_digits`` (per-class accuracy of Euler-ODE samples judged by the shipped classifier).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from critic_align.tasks.digits import dit_config, flow_scheduler_config, load_digits_dataset

from .command import standalone
from .pretrain_digits import add_fit_arguments, fit_digits_model


def build_dit(seed: int = 0):
    """A fresh digits DiT with DiT's adaLN-Zero initialisation (modulations and output head at zero)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**dit_config())
    for block in model.transformer_blocks:
        torch.nn.init.zeros_(block.norm1.linear.weight)
        torch.nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    return model


class EMA:
    """Exponential moving average of parameters with diffusers EMAModel's default warm-up,
    decay_k = min(decay, (1 + k) / (10 + k)) at update k = 0, 1, ... (no diffusers.training_utils import:
    it costs seconds)."""

    def __init__(self, params, decay: float):
        self.shadow = [p.detach().clone() for p in params]
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def step(self, params) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow, params):
            s.lerp_(p.detach(), 1 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, params) -> None:
        for s, p in zip(self.shadow, params):
            p.copy_(s)


def sample_sigmas(n: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "uniform":
        return torch.rand(n, generator=gen)
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=gen))
    raise ValueError(f"t sampling {kind!r}: use 'uniform' or 'logit_normal'")


def rectified_flow_pair(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_σ, v): the rectified-flow point x_σ = (1 − σ) x0 + σ ε and its velocity target v = ε − x0, for x0 and
    ε (B, ...) and σ (B,); also the tiny SD3 twin's (train.train_t2i)."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise, noise - x0


def flow_matching_loss(model, x0, y, sigma, noise, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Rectified-flow loss ||v_θ(x_σ, σ·N, y) − (ε − x0)||² at x_σ = (1 − σ) x0 + σ ε."""
    x_t, target = rectified_flow_pair(x0, noise, sigma)
    pred = model(x_t, timestep=sigma * num_train_timesteps, class_labels=y).sample
    return F.mse_loss(pred, target)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_fit_arguments(p, "digits_dit", steps=1500, batch_size=64)
    p.add_argument("--t-sampling", default="uniform", choices=["uniform", "logit_normal"],
                   help="distribution of the training σ (default %(default)s)")


def main(argv=None) -> Path:
    return standalone("critic-align pretrain-digits-dit", __doc__, add_arguments, run, argv)


def run(args) -> Path:
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import FlowMatchEulerDiscreteScheduler

    gen = torch.Generator().manual_seed(args.seed)
    images, labels = load_digits_dataset()
    model = build_dit(args.seed)
    model.eval()  # no dropout layers; keeps diffusers' per-block label dropout off (see the module doc)
    scheduler = FlowMatchEulerDiscreteScheduler(**flow_scheduler_config())
    n_train = int(scheduler.config.num_train_timesteps)
    ema = EMA(model.parameters(), decay=args.ema_decay)

    def loss_fn(model, x0, y, gen):
        sigma = sample_sigmas(x0.shape[0], args.t_sampling, gen)
        noise = torch.randn(x0.shape, generator=gen)
        return flow_matching_loss(model, x0, y, sigma, noise, n_train)

    out = fit_digits_model(model, scheduler, ema, loss_fn, images, labels, gen, args, "pretrain-digits-dit")
    print(f"saved the digits DiT to {out}")
    return out

if __name__ == "__main__":
    main()
