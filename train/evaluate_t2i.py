"""Measure the tiny text-to-image pipeline with the composition judge and write its model card.

    python -m train.evaluate_t2i --model critic_align/assets/tiny_t2i --per-split 400
    python -m train.evaluate_t2i --model critic_align/assets/tiny_t2i_sd3 --per-split 400

The pipeline class is read from the model's ``model_index.json`` (``StableDiffusionPipeline``, or
``StableDiffusion3Pipeline`` loaded without T5 and called with the ``max_sequence_length`` it was trained with).
Samples ``per-split`` prompts (a fixed random subset) of the training and of the held-out prompt lists
(``train_prompts.txt`` / ``heldout_prompts.txt`` next to the model), one image each, with the pipeline's own
``__call__`` (DDIM with eta 0, or SD3's Euler flow sampler; 20 steps) CFG-free (guidance 1, how the RL configs
sample) and with guidance 3;
judges every clause with :func:`critic_align.rewards.composition.judge_compositions`; writes ``eval.json``,
``samples.png`` and ``MODEL_CARD.md`` into ``--out`` (the shipped ones: ``--out critic_align/assets/tiny_t2i``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from critic_align.rewards.composition import ATTRIBUTES, judge_compositions
from critic_align.tasks.digits import load_digit_classifier
from critic_align.tasks.sd import load_pipeline, read_prompts

from .command import standalone

SHOWCASE = ("a red 3", "two blue 7s", "three green 0s", "a yellow 5", "a red 3 left of a blue 7",
            "a yellow 5 above a green 2", "a blue 1 below a red 8", "a green 9 right of a yellow 4")


PIPELINE_KINDS = {"StableDiffusionPipeline": "sd15", "StableDiffusion3Pipeline": "sd3"}


def saved_kind(model_dir) -> str:
    """'sd15' or 'sd3': the pipeline class in ``model_dir/model_index.json``."""
    index = Path(model_dir) / "model_index.json"
    if not index.exists():
        raise FileNotFoundError(f"{model_dir} is not a pipeline directory (no model_index.json)")
    name = json.loads(index.read_text()).get("_class_name")
    if name not in PIPELINE_KINDS:
        raise ValueError(f"{index}: pipeline class {name!r}; evaluate-t2i evaluates {sorted(PIPELINE_KINDS)}")
    return PIPELINE_KINDS[name]


def open_pipeline(model_dir):
    """(pipe, the keyword arguments every ``pipe(...)`` call needs): SD1.5 DDIM with eta 0; SD3 without T5, with the
    ``max_sequence_length`` of its training log (the number of zero T5 tokens it was trained on)."""
    kind = saved_kind(model_dir)
    if kind == "sd15":
        pipe, call = load_pipeline(model_dir, kind="sd15"), {"eta": 0.0}
    else:
        log = json.loads((Path(model_dir) / "training_log.json").read_text())
        pipe, call = load_pipeline(model_dir, kind="sd3", drop_t5=True), {
            "max_sequence_length": log["args"]["max_sequence_length"]}
    pipe.set_progress_bar_config(disable=True)
    return pipe, call


def generate(pipe, prompts, steps: int, guidance_scale: float, seed: int, batch: int = 100, **call) -> torch.Tensor:
    """Images (N, 3, 32, 32) in [-1, 1] from the pipeline's own sampling loop (``call``: see open_pipeline)."""
    out = []
    g = torch.Generator().manual_seed(seed)
    for i in range(0, len(prompts), batch):
        imgs = pipe(list(prompts[i:i + batch]), num_inference_steps=steps, guidance_scale=guidance_scale,
                    generator=g, output_type="pt", **call).images
        out.append(imgs * 2 - 1)
    return torch.cat(out).clamp(-1, 1)


def summarize(judgement) -> dict:
    """Per-attribute accuracy (over prompts that have the clause), all-clauses accuracy and the mean dense score."""
    res = {}
    for a in ATTRIBUTES:
        c = judgement.correct[a]
        c = c[~torch.isnan(c)]
        res[a] = c.mean().item() if len(c) else None
    res["all_clauses"] = judgement.all_correct.mean().item()
    res["score"] = judgement.score.mean().item()
    return res


def evaluate(model_dir, per_split: int = 400, steps: int = 20, guidances=(1.0, 3.0), seed: int = 0) -> dict:
    model_dir = Path(model_dir)
    pipe, call = open_pipeline(model_dir)
    clf = load_digit_classifier()
    rng = np.random.default_rng(seed)
    results = {"steps": steps, "per_split": per_split, "seed": seed}
    for split, fname in (("train", "train_prompts.txt"), ("heldout", "heldout_prompts.txt")):
        prompts = read_prompts(model_dir / fname)
        chosen = [prompts[i] for i in rng.choice(len(prompts), size=min(per_split, len(prompts)), replace=False)]
        for gs in guidances:
            t0 = time.time()
            images = generate(pipe, chosen, steps, gs, seed, **call)
            with torch.no_grad():
                j = judge_compositions(images, chosen, clf)
            results[f"{split}_cfg{gs:g}"] = summarize(j) | {"seconds": time.time() - t0, "n": len(chosen)}
    return results


MODEL_CARD = """# tiny_t2i — a tiny text-to-image model of critic_align (a GenEval analogue on a CPU)

A diffusers `StableDiffusionPipeline` (no safety checker) trained from scratch on compositions of
scikit-learn's digits: 32×32 RGB canvases, a 2×2 grid of 16×16 cells, prompts such as `a red 3`,
`two blue 7s`, `a red 3 left of a blue 7` (grammar: `critic_align/tasks/composition.py`; 4 colours,
counts 1–3, positions left of / right of / above / below).

| component | class | parameters |
|---|---|---|
| VAE | `AutoencoderKL`, 32×32×3 → 4×8×8 latents (scaling factor {scaling:.3f}) | {vae:,} |
| text encoder | `CLIPTextModel`, width {text_width}, 2 layers, {max_tokens} tokens; `CLIPTokenizer` \
whose vocabulary the training script writes from the grammar's words | {text:,} |
| denoiser | `UNet2DConditionModel`, cross-attention at 8×8 and 4×4, ε-prediction | {unet:,} |
| scheduler | `DDIMScheduler`, cosine (`squaredcos_cap_v2`) betas, SD1.5's leading spacing (20 steps: t = 951 … 1) | |

Load it offline: `StableDiffusionPipeline.from_pretrained("critic_align/assets/tiny_t2i")`, then
`pipe("a red 3 left of a blue 7", num_inference_steps=20, guidance_scale=1.0)`.

## How it was trained
`critic-align pretrain-t2i` (= `python -m train.train_t2i`): the VAE for {vae_steps} steps (batch {vae_batch}),
then the text encoder and UNet jointly for {steps} steps (batch {batch_size}, AdamW lr {lr}, cosine decay, EMA
{ema_decay}, {cond_dropout:.0%} empty prompts for classifier-free guidance), on freshly rendered training
compositions; {train_minutes:.1f} minutes in total on one CPU core of this machine (shared with other jobs).
`training_log.json` has the loss curves.

"""

CARD_TAIL = """## Held-out prompts
`heldout_prompts.txt` ({n_held} prompts) are never rendered for training: the prompts whose primary triple
(first colour, first digit, arrangement ∈ two / three / left of / right of / above / below) is in a fixed
1-in-8 subset. Every word and every colour–digit pair still occurs in training (`train_prompts.txt`,
{n_train} prompts), in other combinations; the converse phrasing of a held-out relation can occur in training.

## How often its samples are right
`critic-align evaluate-t2i --out critic_align/assets/{asset}` ({per_split} prompts drawn from each list, one
image each, the pipeline's own {sampler} and {eval_steps} steps), judged by the `composition`
reward's clause checks (`critic_align/rewards/composition.py`: shipped digit classifier per cell, ink colour, occupied cells,
centroids). Accuracy per attribute over the prompts that have it; *all clauses* is GenEval's metric.

{table}

`samples.png`: rows = {showcase}, 8 seeds each, CFG-free.
"""


MODEL_CARD_SD3 = """# tiny_t2i_sd3 — the flow-matching twin of tiny_t2i (a `StableDiffusion3Pipeline` on a CPU)

A diffusers `StableDiffusion3Pipeline` without T5, trained from scratch on the same compositions of
scikit-learn's digits as `tiny_t2i`: 32×32 RGB canvases, a 2×2 grid of 16×16 cells, prompts such as `a red 3`,
`two blue 7s`, `a red 3 left of a blue 7` (grammar: `critic_align/tasks/composition.py`; 4 colours,
counts 1–3, positions left of / right of / above / below).

| component | class | parameters |
|---|---|---|
| VAE | `AutoencoderKL`, 32×32×3 → 4×8×8 latents (scaling factor {scaling:.3f}, shift factor {shift:g}); \
{vae_source} | {vae:,} |
| text encoders | two `CLIPTextModelWithProjection` (`text_encoder`, `text_encoder_2`), width {text_width}, {text_layers} \
layers, {max_tokens} tokens, each with tiny_t2i's grammar-written `CLIPTokenizer` (`tokenizer/`, `tokenizer_2/`) | \
{text:,} + {text_2:,} |
| T5 | none (`text_encoder_3`, `tokenizer_3` null): the pipeline appends `max_sequence_length` zero tokens | |
| denoiser | `SD3Transformer2DModel` (MMDiT, RMS q/k norm), width {width}, {layers} blocks, patch {patch} \
({tokens} latent tokens + {max_tokens} CLIP + {msl} zero T5 tokens), rectified-flow velocity ε − z0 | {transformer:,} |
| scheduler | `FlowMatchEulerDiscreteScheduler`, shift {shift_sched:g} (20 steps: σ = 1 … 0.001) | |

Load it offline: `StableDiffusion3Pipeline.from_pretrained("critic_align/assets/tiny_t2i_sd3", text_encoder_3=None,
tokenizer_3=None)` (diffusers' way of loading SD3 without T5; or `critic_align.tasks.sd.load_pipeline(path,
kind="sd3", drop_t5=True)`), then
`pipe("a red 3 left of a blue 7", num_inference_steps=20, guidance_scale=1.0, max_sequence_length={msl})`.
**`max_sequence_length={msl}` is required**: it was trained with {msl} zero T5 tokens, the pipeline's default
(256) gives it others. The RL config `train/configs/t2i_sd3.yaml` sets `sd: max_sequence_length: {msl}`.

## How it was trained
`critic-align pretrain-t2i --kind sd3` (= `python -m train.train_t2i --kind sd3`): the two text encoders and the
transformer jointly for {steps} steps (batch {batch_size}, AdamW lr {lr}, cosine decay, EMA {ema_decay},
{cond_dropout:.0%} empty prompts for classifier-free guidance, adaLN-Zero initialisation) with the rectified-flow
loss on z_σ = (1 − σ)·z0 + σ·ε, σ drawn by diffusers' `compute_density_for_timestep_sampling` ({weighting}), on the
conditioning `StableDiffusion3Pipeline.encode_prompt` itself gives (gradients into both text encoders), on freshly
rendered training compositions; {train_minutes:.1f} minutes in total on one CPU core of this machine.
`training_log.json` has the loss curve.

"""

WEIGHTINGS = {"none": "uniform σ, unweighted loss", "logit_normal": "logit-normal σ (mean 0, std 1)",
              "mode": "mode sampling (scale 1.29)"}


def _rows(results: dict) -> list[str]:
    rows = ["| prompts | guidance | count | digit | colour | position | all clauses | dense score |",
            "|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        if not isinstance(r, dict):
            continue
        split, gs = key.split("_cfg")
        cells = [f"{r[x]:.3f}" if r[x] is not None else "–" for x in (*ATTRIBUTES, "all_clauses", "score")]
        rows.append(f"| {split} ({r['n']}) | {gs} | " + " | ".join(cells) + " |")
    return rows


def _vae_source(vae_from: str, a: dict) -> str:
    from critic_align.tasks.digits import ASSETS

    if vae_from == "train":
        return f"trained here for {a['vae_steps']} steps (batch {a['vae_batch']})"
    if Path(vae_from).resolve() == (ASSETS / "tiny_t2i").resolve():
        return "tiny_t2i's VAE, reused as it is (shift factor added to its config)"
    return f"the VAE of `{vae_from}`, reused"


def write_card(model_dir, results: dict, out_dir) -> Path:
    """MODEL_CARD.md of the pipeline in ``model_dir`` (its configs and training log) with ``results``, in ``out_dir``."""
    model_dir = Path(model_dir)
    log = json.loads((model_dir / "training_log.json").read_text())
    a = log["args"]
    kind = saved_kind(model_dir)
    tail = CARD_TAIL.format(
        n_held=len(read_prompts(model_dir / "heldout_prompts.txt")),
        n_train=len(read_prompts(model_dir / "train_prompts.txt")), per_split=results["per_split"],
        eval_steps=results["steps"], table="\n".join(_rows(results)), showcase=", ".join(f"`{p}`" for p in SHOWCASE),
        asset="tiny_t2i" if kind == "sd15" else "tiny_t2i_sd3",
        sampler="DDIM sampler with eta 0" if kind == "sd15" else
        f"Euler flow sampler (`max_sequence_length={a.get('max_sequence_length')}`)")
    vae_cfg = json.loads((model_dir / "vae" / "config.json").read_text())
    text_cfg = json.loads((model_dir / "text_encoder" / "config.json").read_text())
    if kind == "sd3":
        tcfg = json.loads((model_dir / "transformer" / "config.json").read_text())
        sched = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
        p = log["params"]
        head = MODEL_CARD_SD3.format(
            scaling=vae_cfg["scaling_factor"], shift=vae_cfg["shift_factor"], vae_source=_vae_source(a["vae_from"], a),
            vae=p["vae"], text_width=text_cfg["hidden_size"], text_layers=text_cfg["num_hidden_layers"],
            max_tokens=text_cfg["max_position_embeddings"], text=p["text_encoder"], text_2=p["text_encoder_2"],
            width=tcfg["num_attention_heads"] * tcfg["attention_head_dim"], layers=tcfg["num_layers"],
            patch=tcfg["patch_size"], tokens=(tcfg["sample_size"] // tcfg["patch_size"]) ** 2,
            msl=a["max_sequence_length"], transformer=p["transformer"], shift_sched=sched["shift"],
            steps=a["steps"], batch_size=a["batch_size"], lr=a["lr"], ema_decay=a["ema_decay"],
            cond_dropout=a["cond_dropout"], weighting=WEIGHTINGS[a["weighting_scheme"]],
            train_minutes=log["train_time_s"] / 60)
        path = Path(out_dir) / "MODEL_CARD.md"
        path.write_text(head + tail)
        return path
    card = MODEL_CARD.format(
        scaling=vae_cfg["scaling_factor"], vae=log["params"]["vae"], text=log["params"]["text_encoder"],
        unet=log["params"]["unet"], text_width=text_cfg["hidden_size"],
        max_tokens=text_cfg["max_position_embeddings"], vae_steps=a["vae_steps"], vae_batch=a["vae_batch"],
        steps=a["steps"], batch_size=a["batch_size"], lr=a["lr"], ema_decay=a["ema_decay"],
        cond_dropout=a["cond_dropout"], train_minutes=log["train_time_s"] / 60) + tail
    path = Path(out_dir) / "MODEL_CARD.md"
    path.write_text(card)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="critic_align/assets/tiny_t2i", help="pipeline directory (default %(default)s)")
    p.add_argument("--per-split", type=int, default=400, help="prompts drawn from each list (default %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt draw and the noise (default %(default)s)")
    p.add_argument("--out", default=None, help="where eval.json, samples.png and MODEL_CARD.md go (default "
                   "runs/evaluate_t2i/<model directory name>; the shipped card: --out critic_align/assets/tiny_t2i)")


def main(argv=None) -> dict:
    return standalone("critic-align evaluate-t2i", __doc__, add_arguments, run, argv)


def run(args) -> dict:
    out = Path(args.out) if args.out else Path("runs/evaluate_t2i") / Path(args.model).resolve().name
    out.mkdir(parents=True, exist_ok=True)
    results = evaluate(args.model, args.per_split, args.steps, seed=args.seed)
    (out / "eval.json").write_text(json.dumps(results, indent=2))
    from critic_align.viz import save_grid

    pipe, call = open_pipeline(args.model)
    images = generate(pipe, [p for p in SHOWCASE for _ in range(8)], args.steps, 1.0, args.seed, **call)
    save_grid(images, out / "samples.png", nrow=8)
    print(f"wrote {write_card(args.model, results, out)}")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
