"""Measure a digits model's quality with the shipped classifier and write its model card.

    critic-align evaluate-digits [--model critic_align/assets/digits_unet] [--per-class 100] [--out DIR]

Samples ``per-class`` images of every digit with the deterministic sampler of the model's scheduler
(DDIM with eta = 0 for the UNet DDPM, the Euler ODE for the flow-matching DiT), without CFG, at 20 and at
50 steps; reports the classifier's accuracy per class; writes eval.json, a sample grid and MODEL_CARD.md
into ``--out`` (default ``runs/evaluate_digits/<model directory name>``: never into the package; to refresh a
shipped model's card, pass its directory as ``--out`` explicitly).  The model kind is read from the model
directory's config.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from critic_align.rollout import cfg_denoiser, sample
from critic_align.steps import FlowMatchSDEStep, make_step
from critic_align.tasks.digits import BASE_MODEL_DIR, NULL_CLASS, NUM_CLASSES, load_digit_classifier, load_digits_model

from .command import standalone


def evaluate(model_dir, per_class: int = 100, steps=(20, 50), guidance_scale: float = 1.0, eta: float = 0.0,
             seed: int = 0, batch: int = 500) -> dict:
    model, scheduler = load_digits_model(model_dir)
    clf = load_digit_classifier()
    step = make_step(scheduler, eta)
    schedule = step.schedule
    prefix = sampler_name(step)

    def den(x, t, c):
        return model(x, t, class_labels=c, return_dict=False)[0]

    den = cfg_denoiser(den, guidance_scale, lambda n: torch.full((n,), NULL_CLASS, dtype=torch.long))
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    results = {}
    for n_steps in steps:
        g = torch.Generator().manual_seed(seed)
        ts = schedule.timesteps(n_steps)
        t0 = time.time()
        imgs = []
        for i in range(0, len(labels), batch):
            lab = labels[i : i + batch]
            x_T = torch.randn((len(lab), 1, 16, 16), generator=g)
            imgs.append(sample(den, step, x_T, ts, lab, generator=g).clamp(-1, 1))
        imgs = torch.cat(imgs)
        with torch.no_grad():
            pred = clf(imgs).argmax(1)
        correct = (pred == labels).float()
        results[f"{prefix}{n_steps}"] = {
            "accuracy": correct.mean().item(),
            "per_class": {str(d): correct[labels == d].mean().item() for d in range(NUM_CLASSES)},
            "seconds": time.time() - t0,
        }
        results[f"_images_{prefix}{n_steps}"] = imgs
    return results


def sampler_name(step) -> str:
    """The key prefix of a sampler's results: 'ddim' (VP schedulers) or 'euler' (flow matching)."""
    return "euler" if isinstance(step, FlowMatchSDEStep) else "ddim"


SAMPLER_LABEL = {"ddim": "DDIM", "euler": "Euler"}


MODEL_CARD = """# digits_unet — the embedded base model of critic_align

A class-conditional DDPM (diffusers `UNet2DModel`, {params:,} parameters, 11 class embeddings: the
digits 0–9 and a null class for classifier-free guidance) on scikit-learn's 8×8 digits upsampled to
16×16 and scaled to [-1, 1]. Scheduler: `DDPMScheduler` config (1000 steps, cosine
`squaredcos_cap_v2` betas, ε-prediction, `timestep_spacing="trailing"`).

## How it was trained
`critic-align pretrain-digits` (= `python -m train.pretrain_digits`): {steps} steps, batch {batch_size},
AdamW lr {lr} with {warmup} warm-up steps and cosine decay, gradient clip 1.0, label dropout {cond_dropout}
(for CFG), EMA decay {ema_decay}, seed {seed}; {train_minutes:.1f} minutes on this machine's CPU.
Weights: `diffusion_pytorch_model.safetensors` (EMA weights); `training_log.json` has the loss curve.

## Measured quality
Accuracy of the shipped digit classifier (`critic_align/assets/digit_classifier`, held-out accuracy
{clf_acc:.1%}) on {per_class} samples per class, deterministic DDIM (eta = 0), **no CFG**, seed 0.
Reproduce with `python -m train.evaluate_digits --model <dir>` (writes `eval.json`).

| digit | {step_header} |
|---|{step_sep}|
{rows}
| **all** | {overall} |

Samples (DDIM 50 steps, one row per digit): `samples_ddim50.png`.

## Intended use
The default task of critic_align's tests, examples and benchmarks: post-training with rewards such as
the classifier's probability of the prompted digit. Not a model of handwriting in general.
"""


DIT_MODEL_CARD = """# digits_dit — the embedded flow-matching DiT of critic_align

A class-conditional rectified-flow transformer (diffusers `DiTTransformer2DModel`, {params:,} parameters:
patch size 2 on 16×16 images → 64 tokens of width 128, 3 adaLN-Zero blocks, 11 label embeddings: the
digits 0–9 and the null class 10 for classifier-free guidance) on scikit-learn's 8×8 digits upsampled to
16×16 and scaled to [-1, 1]. It predicts the velocity v = ε − x0 at x_σ = (1 − σ)·x0 + σ·ε, timestep
σ·1000. Scheduler: `FlowMatchEulerDiscreteScheduler` config (1000 train timesteps, shift 1).

## How it was trained
`critic-align pretrain-digits-dit` (= `python -m train.pretrain_digits_dit`): {steps} steps, batch
{batch_size}, σ ~ {t_sampling}, AdamW lr {lr} with {warmup} warm-up steps and cosine decay, gradient clip
1.0, label dropout {cond_dropout} (for CFG), EMA decay {ema_decay}, seed {seed}; {train_minutes:.1f} minutes
on this machine's CPU (2 cores, shared). Weights: `diffusion_pytorch_model.safetensors` (EMA weights);
`training_log.json` has the loss curve.

## Measured quality
Accuracy of the shipped digit classifier (`critic_align/assets/digit_classifier`, held-out accuracy
{clf_acc:.1%}) on {per_class} samples per class, deterministic Euler ODE sampler (noise level 0), **no CFG**,
seed 0. Reproduce with `python -m train.evaluate_digits --model <dir>` (writes `eval.json`).

| digit | {step_header} |
|---|{step_sep}|
{rows}
| **all** | {overall} |

Samples (Euler, 50 steps, one row per digit): `samples_euler50.png`.

## Intended use
The flow-matching twin of the default task (`critic-align train --config digits_dit`): post-training a
DiT with the SDE form of the rectified-flow sampler (Flow-GRPO) and rewards such as the classifier's
probability of the prompted digit. Not a model of handwriting in general.
"""


def write_model_card(model_dir, results: dict, per_class: int, out=None) -> Path:
    """MODEL_CARD.md of the model in ``model_dir`` (its training_log.json and weights), written into ``out``
    (default: ``model_dir``)."""
    model_dir = Path(model_dir)
    log = json.loads((model_dir / "training_log.json").read_text()) if (model_dir / "training_log.json").exists() \
        else {"args": {}, "train_time_s": float("nan")}
    args = log["args"]
    model, _ = load_digits_model(model_dir)
    is_dit = type(model).__name__ == "DiTTransformer2DModel"
    clf_metrics = json.loads((Path(load_digit_classifier.__globals__["CLASSIFIER_DIR"]) / "metrics.json").read_text())
    keys = [k for k in results if not k.startswith("_")]
    rows = "\n".join(
        f"| {d} | " + " | ".join(f"{results[k]['per_class'][str(d)]:.1%}" for k in keys) + " |"
        for d in range(NUM_CLASSES)
    )
    labels = {k: f"{SAMPLER_LABEL[k.rstrip('0123456789')]} {k.lstrip('abcdefghijklmnopqrstuvwxyz')} steps" for k in keys}
    extra = {"t_sampling": {"uniform": "U(0, 1)", "logit_normal": "logit-normal(0, 1)"}.get(args.get("t_sampling"), "?")} \
        if is_dit else {}
    text = (DIT_MODEL_CARD if is_dit else MODEL_CARD).format(
        params=sum(p.numel() for p in model.parameters()), **extra,
        steps=args.get("steps", "?"), batch_size=args.get("batch_size", "?"), lr=args.get("lr", "?"),
        warmup=args.get("warmup", "?"), cond_dropout=args.get("cond_dropout", "?"),
        ema_decay=args.get("ema_decay", "?"), seed=args.get("seed", "?"),
        train_minutes=log.get("train_time_s", float("nan")) / 60,
        clf_acc=clf_metrics["heldout_accuracy"], per_class=per_class,
        step_header=" | ".join(labels[k] for k in keys), step_sep="|".join("---" for _ in keys),
        rows=rows, overall=" | ".join(f"**{results[k]['accuracy']:.1%}**" for k in keys),
    )
    path = Path(out if out is not None else model_dir) / "MODEL_CARD.md"
    path.write_text(text)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(BASE_MODEL_DIR),
                   help="a digits model directory: UNet DDPM or flow-matching DiT (default: the shipped UNet)")
    p.add_argument("--per-class", type=int, default=100, help="samples per digit (default %(default)s)")
    p.add_argument("--steps", type=int, nargs="+", default=[20, 50], help="sampler steps to evaluate (default 20 50)")
    p.add_argument("--out", default=None, help="where eval.json, the grid and MODEL_CARD.md go "
                   "(default runs/evaluate_digits/<model directory name>)")
    p.add_argument("--no-card", action="store_true", help="only print/write eval.json")


def main(argv=None) -> dict:
    return standalone("critic-align evaluate-digits", __doc__, add_arguments, run, argv)


def run(args) -> dict:
    from critic_align.viz import save_grid

    res = evaluate(args.model, args.per_class, tuple(args.steps))
    model_dir = Path(args.model)
    out = Path(args.out) if args.out else Path("runs") / "evaluate_digits" / model_dir.resolve().name
    out.mkdir(parents=True, exist_ok=True)
    last = next(k for k in (f"_images_{name}{args.steps[-1]}" for name in SAMPLER_LABEL) if k in res)
    imgs = res[last].view(NUM_CLASSES, args.per_class, 1, 16, 16)[:, :10].reshape(-1, 1, 16, 16)
    save_grid(imgs, out / f"samples_{last[len('_images_'):]}.png", nrow=10, labels=list(range(10)))
    clean = {k: v for k, v in res.items() if not k.startswith("_")}
    (out / "eval.json").write_text(json.dumps({"per_class_samples": args.per_class, **clean}, indent=2))
    if not args.no_card:
        write_model_card(model_dir, res, args.per_class, out)
    print(json.dumps({k: v["accuracy"] for k, v in clean.items()}, indent=2))
    print(f"wrote {out}")
    return clean


if __name__ == "__main__":
    main()
