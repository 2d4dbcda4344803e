"""Train the tiny text-to-image model (`critic-align pretrain-t2i`): a diffusers ``StableDiffusionPipeline``
on compositions of scikit-learn's digits (``critic_align/tasks/composition.py``), shipped in
``critic_align/assets/tiny_t2i``; with ``--kind sd3`` its flow-matching twin, a ``StableDiffusion3Pipeline``
shipped in ``critic_align/assets/tiny_t2i_sd3`` (see "SD3" below).

Three stages, all on the composition data (32x32 RGB canvases, 2x2 grid of 16x16 cells):

1. ``AutoencoderKL`` 32x32x3 -> 4x8x8 latents (factor 4): L1 + MSE reconstruction and a small KL term;
   its ``scaling_factor`` is then set to 1 / std of the latents of a data batch (as SD's 0.18215 was).
2. A ``CLIPTokenizer`` whose vocabulary and merges are written here from the grammar's words (byte-level
   characters stay in the vocabulary, so any text tokenizes), and a small ``CLIPTextModel`` trained
   jointly with
3. a ``UNet2DConditionModel`` with cross-attention at 8x8 and 4x4 latents (ε-prediction, DDPM loss on the
   VAE latents of freshly rendered compositions, 10 % empty prompts so that CFG works too), EMA weights.

Held-out prompts (``critic_align.tasks.composition.is_held_out``) are never rendered for training; both
prompt lists are written next to the model (``train_prompts.txt``, ``heldout_prompts.txt``).  The scheduler
is DDIM (cosine betas, SD1.5's leading spacing; see ``scheduler_config``).  No safety checker.
The model card is written by ``train.evaluate_t2i``.

SD3 (``--kind sd3``), the same data and tokenizer (written as ``tokenizer/`` and ``tokenizer_2/``):

- the VAE is the shipped tiny_t2i one by default (``--vae-from``), with ``shift_factor`` 0.0 set in its config
  (the SD3 pipeline decodes ``z / scaling_factor + shift_factor``);
- two ``CLIPTextModelWithProjection`` (``text_encoder``, ``text_encoder_2``); no T5 (``text_encoder_3`` and
  ``tokenizer_3`` are None, the pipeline then appends ``max_sequence_length`` zero tokens, so the pipeline must
  be called with the ``--max-sequence-length`` it was trained with, ``pipe(..., max_sequence_length=8)``);
- an ``SD3Transformer2DModel`` (MMDiT, adaLN-Zero initialisation) predicting the rectified-flow velocity
  v = ε − z0 at z_σ = (1 − σ)·z0 + σ·ε, timestep σ·1000, with σ drawn as diffusers' SD3 DreamBooth script
  draws it (``compute_density_for_timestep_sampling``: uniform by default, ``--weighting-scheme``);
- the conditioning is ``StableDiffusion3Pipeline.encode_prompt``'s own (called on the training modules, with
  gradients into both text encoders): the CLIP encoders' penultimate hidden states side by side, then the zero
  T5 tokens; their pooled projections side by side;
- ``FlowMatchEulerDiscreteScheduler`` with shift 1 (the digits DiT's; 8x8 latents need no resolution shift).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from critic_align.tasks.composition import (
    CANVAS,
    Renderer,
    all_compositions,
    is_held_out,
    prompt_split,
    vocabulary_words,
)
from critic_align.tokenizer import clip_byte_alphabet

from .command import standalone
from .pretrain_digits import _options
from .pretrain_digits_dit import rectified_flow_pair

MAX_TOKENS = 16  # a relation prompt is 8 words + start + end
KINDS = ("sd15", "sd3")


# ------------------------------------------------------------------------------------------------------
# configs
def vae_config() -> dict:
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), latent_channels=4,
                layers_per_block=1, norm_num_groups=8, sample_size=CANVAS)


def unet_config(cross_dim: int = 64) -> dict:
    return dict(sample_size=CANVAS // 4, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_dim,
                attention_head_dim=16, norm_num_groups=16)


def text_config(tokenizer, hidden: int = 64) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def scheduler_config() -> dict:
    """DDIM with cosine betas and SD1.5's spacing ('leading', steps_offset 1: 20 steps start at t = 951).

    Why not 'trailing' (start at t = 999, pure noise): the cosine schedule's last ᾱ is 2.4e-9, so DDIM's
    x0 = (x_t - sqrt(1 - ᾱ) ε̂) / sqrt(ᾱ) multiplies ε̂'s error by 20 000 at t = 999 and the samples explode;
    the digits model clips x0 to [-1, 1] for this, but StableDiffusionPipeline switches clip_sample off.  At
    t = 951, ᾱ = 0.006 (the signal is 8 % of the noise): sampling starts from pure noise as SD1.5 does."""
    return dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


def sd3_text_config(tokenizer, hidden: int = 64) -> dict:
    """One of the SD3 twin's two CLIP text encoders (``CLIPTextModelWithProjection``; projection = width)."""
    return text_config(tokenizer, hidden) | dict(projection_dim=hidden)


def transformer_config(text_hidden: int = 64, width: int = 96, layers: int = 4, patch_size: int = 1) -> dict:
    """The SD3 twin's ``SD3Transformer2DModel`` on 8x8x4 latents.  ``joint_attention_dim`` is what
    ``encode_prompt`` gives: both encoders' hidden states side by side (2 * text_hidden; no zero padding), and
    ``pooled_projection_dim`` both pooled projections side by side.  Heads of 32 channels."""
    if width % 32:
        raise ValueError(f"transformer width {width} must be a multiple of the head size 32")
    if (CANVAS // 4) % patch_size:
        raise ValueError(f"patch size {patch_size} must divide the latent side {CANVAS // 4}")
    return dict(sample_size=CANVAS // 4, patch_size=patch_size, in_channels=4, out_channels=4, num_layers=layers,
                attention_head_dim=32, num_attention_heads=width // 32, joint_attention_dim=2 * text_hidden,
                caption_projection_dim=width, pooled_projection_dim=2 * text_hidden,
                pos_embed_max_size=CANVAS // 4 // patch_size, qk_norm="rms_norm")


def flow_scheduler_config() -> dict:
    """FlowMatchEulerDiscreteScheduler, 1000 train timesteps, shift 1 (the digits DiT's sampler)."""
    from critic_align.tasks.digits import flow_scheduler_config as digits_flow

    return digits_flow()


# ------------------------------------------------------------------------------------------------------
# tokenizer
def write_tokenizer(directory: Path, words=None):
    """Write a CLIPTokenizer (vocab.json, merges.txt, its config) whose vocabulary has every byte character
    (alone and word-final) and every word of ``words`` (default: the grammar's) as one token, built by
    left-to-right merges.  Checks that each word becomes exactly one token."""
    from transformers import CLIPTokenizer

    words = list(words or vocabulary_words())
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = clip_byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges: list[str] = []

    def join(pieces):  # left-to-right merges that turn ``pieces`` into one token
        left = pieces[0]
        for right in pieces[1:]:
            merges.append(f"{left} {right}")
            left = left + right
            vocab.setdefault(left, len(vocab))  # the merges' intermediate results are tokens too

    for w in words:
        if len(w) > 1:
            join(list(w[:-1]) + [w[-1] + "</w>"])
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)

    def build():
        (directory / "vocab.json").write_text(json.dumps(vocab))
        (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
        return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=MAX_TOKENS)

    # an earlier word's merge can fire inside a later word ('r e' of 'red' inside 'three'): join the pieces
    # such a word ends up in with merges of lower priority, and check again
    for _ in range(10):
        tok = build()
        split = {w: tok.convert_ids_to_tokens(tok(w, add_special_tokens=False).input_ids) for w in words}
        bad = {w: pieces for w, pieces in split.items() if len(pieces) != 1}
        if not bad:
            break
        for pieces in bad.values():
            join(pieces)
    else:
        raise RuntimeError(f"tokenizer: words that do not become one token: {bad}")
    tok.save_pretrained(directory)
    return tok


# ------------------------------------------------------------------------------------------------------
# data
class CompositionSampler:
    """Draws (image, prompt) pairs from the training compositions: half count prompts (one, two, three digits
    equally often), half relation prompts; held-out compositions never appear."""

    def __init__(self, seed: int, renderer: Renderer | None = None):
        self.rng = np.random.default_rng(seed)
        self.renderer = renderer or Renderer()
        comps = [c for c in all_compositions() if not is_held_out(c)]
        self.count_comps = [c for c in comps if c.relation is None]
        self.relation_comps = [c for c in comps if c.relation is not None]

    def batch(self, n: int) -> tuple[torch.Tensor, list[str]]:
        images, prompts = [], []
        for _ in range(n):
            pool = self.count_comps if self.rng.random() < 0.5 else self.relation_comps
            comp = pool[int(self.rng.integers(len(pool)))]
            images.append(self.renderer.render(comp, self.rng))
            prompts.append(comp.prompt())
        return torch.stack(images), prompts


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) * 0.95 + 0.05


# ------------------------------------------------------------------------------------------------------
# stages
def train_vae(args, sampler: CompositionSampler, log: list) -> "object":
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.vae_steps, 50))
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for step in range(args.vae_steps):
        x, _ = sampler.batch(args.vae_batch)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        kl = post.kl().mean() / z[0].numel()
        loss = rec_loss + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.vae_steps - 1:
            row = {"stage": "vae", "step": step, "rec": rec_loss.item(), "kl": kl.item(), "time_s": time.time() - t0}
            log.append(row)
            print(json.dumps(row), flush=True)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x, _ = sampler.batch(256)
        z = vae.encode(x).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return vae


@torch.no_grad()
def encode_latents(vae, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Scaled VAE latents of images ``x`` (B, 3, 32, 32) -> (B, 4, 8, 8), a posterior draw:
    (z - shift_factor) * scaling_factor, the inverse of what both pipelines decode (no shift: SD1.5's None)."""
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
    shift = vae.config.shift_factor
    return (z - shift if shift is not None else z) * vae.config.scaling_factor


class EMA:
    def __init__(self, params, decay: float):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def step(self) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


def denoiser_step(loss, params, opt, sched, ema, step: int, total: int, t0: float, log: list) -> None:
    """One optimiser step of a denoiser stage (gradient clipped to norm 1, the LR schedule, the EMA), logged every
    50 steps and at the last."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    ema.step()
    if step % 50 == 0 or step == total - 1:
        row = {"stage": "denoiser", "step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0],
               "time_s": time.time() - t0}
        log.append(row)
        print(json.dumps(row), flush=True)


def train_denoiser(args, vae, tokenizer, sampler: CompositionSampler, log: list):
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(args.seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(tokenizer, args.text_hidden)))
    unet = UNet2DConditionModel(**unet_config(args.text_hidden))
    scheduler = DDIMScheduler(**scheduler_config())
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.steps, 100))
    ema = EMA(params, args.ema_decay)
    acp = scheduler.alphas_cumprod
    gen = torch.Generator().manual_seed(args.seed + 2)
    t0 = time.time()
    for step in range(args.steps):
        x, prompts = sampler.batch(args.batch_size)
        drop = torch.rand(len(prompts), generator=gen) < args.cond_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        ids = tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                        return_tensors="pt").input_ids
        z0 = encode_latents(vae, x, gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(prompts),), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        cond = text_encoder(ids)[0]  # last_hidden_state, what StableDiffusionPipeline.encode_prompt gives
        loss = F.mse_loss(unet(zt, t, encoder_hidden_states=cond).sample, noise)
        denoiser_step(loss, params, opt, sched, ema, step, args.steps, t0, log)
    ema.copy_to()
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return unet, text_encoder, scheduler


def adaln_zero_init(transformer) -> None:
    """DiT's initialisation: every adaLN modulation and the output projection start at zero, so each block
    starts as the identity and the first prediction is 0 (as the digits DiT)."""
    for block in transformer.transformer_blocks:
        for norm in (block.norm1, block.norm1_context):
            torch.nn.init.zeros_(norm.linear.weight)
            torch.nn.init.zeros_(norm.linear.bias)
    for layer in (transformer.norm_out.linear, transformer.proj_out):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)


def build_sd3_pipeline(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, transformer, scheduler):
    """The twin as a ``StableDiffusion3Pipeline`` without T5."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                    tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                                    text_encoder_3=None, tokenizer_3=None)


def sd3_conditioning(pipe, prompts: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (B, MAX_TOKENS + max_sequence_length, 2 * text width), pooled (B, 2 * text width)):
    ``pipe.encode_prompt`` itself, CFG-free; differentiable in the text encoders (encode_prompt has no no_grad)."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=torch.device("cpu"),
                                              num_images_per_prompt=1, do_classifier_free_guidance=False,
                                              max_sequence_length=max_sequence_length)
    return embeds, pooled


def train_denoiser_sd3(args, vae, tokenizer, tokenizer_2, sampler: CompositionSampler, log: list):
    """The SD3 twin's two text encoders and transformer, trained jointly with the rectified-flow loss
    (diffusers' train_dreambooth_lora_sd3.py: σ from compute_density_for_timestep_sampling, mapped to the
    scheduler's training timesteps/sigmas, target ε − z0, weights compute_loss_weighting_for_sd3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(args.seed + 1)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**sd3_text_config(tokenizer, args.text_hidden)))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**sd3_text_config(tokenizer, args.text_hidden)))
    transformer = SD3Transformer2DModel(**transformer_config(args.text_hidden, args.width, args.layers,
                                                             args.patch_size))
    adaln_zero_init(transformer)
    scheduler = FlowMatchEulerDiscreteScheduler(**flow_scheduler_config())
    pipe = build_sd3_pipeline(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, transformer, scheduler)
    modules = (transformer, text_encoder, text_encoder_2)
    for m in modules:
        m.train()
    params = [q for m in modules for q in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.steps, 100))
    ema = EMA(params, args.ema_decay)
    train_timesteps, train_sigmas = scheduler.timesteps.clone(), scheduler.sigmas.clone()  # before any set_timesteps
    n_train = scheduler.config.num_train_timesteps
    gen = torch.Generator().manual_seed(args.seed + 2)
    t0 = time.time()
    for step in range(args.steps):
        x, prompts = sampler.batch(args.batch_size)
        drop = torch.rand(len(prompts), generator=gen) < args.cond_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        z0 = encode_latents(vae, x, gen)
        u = compute_density_for_timestep_sampling(args.weighting_scheme, len(prompts), logit_mean=0.0, logit_std=1.0,
                                                  mode_scale=1.29, generator=gen)
        idx = (u * n_train).long().clamp(max=n_train - 1)
        t, sigma = train_timesteps[idx], train_sigmas[idx]
        noise = torch.randn(z0.shape, generator=gen)
        zt, target = rectified_flow_pair(z0, noise, sigma)
        embeds, pooled = sd3_conditioning(pipe, prompts, args.max_sequence_length)
        pred = transformer(hidden_states=zt, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled,
                           return_dict=False)[0]
        weight = compute_loss_weighting_for_sd3(args.weighting_scheme, sigma).view(-1, 1, 1, 1)
        loss = (weight * (pred - target) ** 2).mean()
        denoiser_step(loss, params, opt, sched, ema, step, args.steps, t0, log)
    ema.copy_to()
    for m in modules:
        m.eval().requires_grad_(False)
    return pipe


def load_vae(vae_from) -> "object":
    """The VAE of the pipeline directory ``vae_from`` (its vae/), with ``shift_factor`` 0.0 where it has none
    (SD3's pipeline adds it when decoding; SD1.5's ignores it)."""
    from diffusers import AutoencoderKL

    path = Path(vae_from) / "vae"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"--vae-from {vae_from}: no vae/config.json there; pass a pipeline directory such "
                                "as critic_align/assets/tiny_t2i, or --vae-from train")
    vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
    if vae.config.shift_factor is None:
        vae.register_to_config(shift_factor=0.0)
    return vae.eval().requires_grad_(False)


def build_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=KINDS, default="sd15",
                   help="sd15: StableDiffusionPipeline (UNet, DDIM; the shipped tiny_t2i); sd3: its flow-matching "
                        "twin, StableDiffusion3Pipeline without T5 (the shipped tiny_t2i_sd3) (default %(default)s)")
    p.add_argument("--out", default=None,
                   help="output directory, must not hold a pipeline (default runs/tiny_t2i, runs/tiny_t2i_sd3 with "
                        "--kind sd3; the shipped models are critic_align/assets/tiny_t2i and tiny_t2i_sd3)")
    p.add_argument("--vae-from", default=None,
                   help="'train' (train a VAE) or a pipeline directory whose vae/ is reused (default: train for "
                        "sd15, the shipped critic_align/assets/tiny_t2i for sd3)")
    p.add_argument("--vae-steps", type=int, default=1500, help="VAE optimiser steps (default %(default)s)")
    p.add_argument("--vae-batch", type=int, default=32, help="images per VAE step (default %(default)s)")
    p.add_argument("--vae-lr", type=float, default=1e-3, help="peak AdamW learning rate of the VAE (default %(default)s)")
    p.add_argument("--vae-kl", type=float, default=1e-4, help="weight of the per-dimension KL term (default %(default)s)")
    p.add_argument("--steps", type=int, default=3000, help="UNet + text encoder steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="images per UNet step (default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default %(default)s)")
    p.add_argument("--ema-decay", type=float, default=0.995, help="EMA decay of the saved weights (default %(default)s)")
    p.add_argument("--cond-dropout", type=float, default=0.1, help="fraction of empty prompts, for CFG (default %(default)s)")
    p.add_argument("--text-hidden", type=int, default=64,
                   help="text encoder width = UNet cross-attention dim (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data (default %(default)s)")
    sd3 = p.add_argument_group("--kind sd3 only")
    sd3.add_argument("--width", type=int, default=96, help="transformer width, heads of 32 (default %(default)s)")
    sd3.add_argument("--layers", type=int, default=4, help="transformer blocks (default %(default)s)")
    sd3.add_argument("--patch-size", type=int, default=1, help="latent pixels per token side (default %(default)s)")
    sd3.add_argument("--max-sequence-length", type=int, default=8,
                     help="zero T5 tokens encode_prompt appends without T5; the pipeline must be called with the same "
                          "max_sequence_length (default %(default)s)")
    sd3.add_argument("--weighting-scheme", choices=("none", "logit_normal", "mode"), default="none",
                     help="diffusers' SD3 σ density (none = uniform σ, unweighted loss) (default %(default)s)")


def main(argv=None) -> Path:
    return standalone("critic-align pretrain-t2i", __doc__, add_arguments, run, argv)


def default_vae_from(kind: str) -> str:
    from critic_align.tasks.digits import ASSETS

    return "train" if kind == "sd15" else str(ASSETS / "tiny_t2i")


def run(args) -> Path:
    if args.out is None:
        args.out = "runs/tiny_t2i" if args.kind == "sd15" else "runs/tiny_t2i_sd3"
    if args.vae_from is None:
        args.vae_from = default_vae_from(args.kind)
    if args.kind == "sd3" and not 1 <= args.max_sequence_length <= 512:
        raise SystemExit(f"--max-sequence-length {args.max_sequence_length}: must be in [1, 512] (the SD3 pipeline's "
                         "limit)")
    out = Path(args.out)
    if (out / "model_index.json").exists():
        raise SystemExit(f"{out} already holds a pipeline; pass another --out (nothing saved is overwritten)")
    t_start = time.time()
    log: list = []
    sampler = CompositionSampler(args.seed)
    tok_dir = out / "tokenizer"
    tokenizer = write_tokenizer(tok_dir)
    vae = train_vae(args, sampler, log) if args.vae_from == "train" else load_vae(args.vae_from)
    if args.kind == "sd15":
        unet, text_encoder, scheduler = train_denoiser(args, vae, tokenizer, sampler, log)
        pipe = build_pipeline(vae, text_encoder, tokenizer, unet, scheduler)
        modules = (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))
    else:  # the same tokenizer for both CLIP encoders, written twice as the pipeline's format has it
        pipe = train_denoiser_sd3(args, vae, tokenizer, write_tokenizer(out / "tokenizer_2"), sampler, log)
        modules = tuple((n, getattr(pipe, n)) for n in ("transformer", "vae", "text_encoder", "text_encoder_2"))
    pipe.save_pretrained(out, safe_serialization=True)
    train, held = prompt_split()
    (out / "train_prompts.txt").write_text("\n".join(train) + "\n")
    (out / "heldout_prompts.txt").write_text("\n".join(held) + "\n")
    n_params = {name: sum(q.numel() for q in m.parameters()) for name, m in modules}
    (out / "training_log.json").write_text(json.dumps(
        {"args": _options(args), "params": n_params, "log": log, "train_time_s": time.time() - t_start}, indent=1))
    print(f"pretrain-t2i --kind {args.kind}: {time.time() - t_start:.0f} s, saved the pipeline to {out}")
    return out


if __name__ == "__main__":
    main()
