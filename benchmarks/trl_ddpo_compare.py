"""Side by side: TRL 0.23.1's DDPOTrainer vs this library (ddpo / grpo / gae) on one tiny SD1.5 pipeline.

    python benchmarks/trl_ddpo_compare.py                 # ≈ 10 min on 2 CPU cores
    python benchmarks/trl_ddpo_compare.py --alternations 1 --epochs 1   # a quick look

What it does:

1. Builds a small ``StableDiffusionPipeline`` from configs, offline (UNet2DConditionModel with 32×32
   latents, 1.7 M parameters, cross-attention at 16×16 and 8×8, a VAE with factor 2 → 64×64 images, a one-layer CLIP
   text encoder, SD1.5's DDIM schedule) and saves it once with ``save_pretrained``: both sides load the
   identical weights from that directory.
2. Makes ``benchmarks/.venv-trl`` if it is missing (TRL removed DDPO in 0.24, and its dependencies are
   not ours): ``pip install torch==<ours>`` first (the local CPU wheel), then ``trl==0.23.1`` with the
   same diffusers / transformers / peft / accelerate versions as this environment.  A failed install
   is recorded in the JSON with pip's output, and the script stops.
3. Runs every side in its own subprocess (so its peak RSS is its own), alternating the order over
   ``--alternations`` rounds: TRL ``DDPOTrainer`` (CPU, ``mixed_precision="no"``, ``PartialState()``
   first, LoRA rank 4 on to_q/k/v/out — TRL's fixed choice) and this library's ``Trainer`` in
   ``ddpo``, ``grpo`` and ``gae`` mode with the same LoRA, samples per epoch, denoising steps, eta,
   classifier-free guidance (DDPO's default 5.0, in the rollouts and in the update: TRL's
   ``train_cfg=True``), inner epochs and optimiser steps per epoch.  The reward is the mean brightness
   of the [0, 1] image, the same function on both sides.

   Why CFG 5 and not this library's CFG-free default: TRL 0.23.1's ``pipeline_step`` calls diffusers'
   deprecated ``_encode_prompt``, which (diffusers 0.42) always concatenates the negative and the
   positive prompt embeddings, so ``sample_guidance_scale=1.0`` crashes with a batch mismatch in the
   UNet's attention (2B text embeddings for B latents).  With guidance both sides run two UNet rows
   per sample in every forward.
   Both sides run their defaults otherwise: this library's micro-batches are its ``micro_batch_size: auto``
   (sized from a memory budget), ``channels_last`` and the rest of its defaults; ``--ours-grad-accum`` exists
   for experiments and is 1 (not set) in the recorded runs.
4. Per side and round: one warm-up epoch, then ``--epochs`` timed epochs.  ``rollout`` = sampling + VAE
   decode + reward + advantages (GAE: the critic's values too); ``update`` = the PPO update (GAE: policy
   + value loss); ``epoch`` = both.  Samples/s = samples per epoch / seconds.  Ratios (ours / TRL) are
   taken within each round, then the median over rounds is reported (with min and max).

Equivalences: TRL trains one timestep at a time on ``train_batch_size`` trajectories and steps the
optimiser every ``train_gradient_accumulation_steps`` such batches; this library trains on shuffled
(trajectory, step) pairs, ``minibatch_size`` pairs per optimiser step.  ``minibatch_size =
train_batch_size × grad_accum × T`` gives both the same pairs per optimiser step and the same optimiser
steps per epoch.  GAE mode skips value pretraining here (it is a one-off cost, not per epoch).

Writes ``benchmarks/results/trl_compare.json`` (top-level ``overall_vs_trl`` and ``rss_vs_trl``: median ratios
ours / TRL by mode; ``gae_vs_grpo_epoch``: the median GAE / GRPO epoch time; ``machine.cpu_affinity``: the cores
it ran on) and ``.png``, then re-renders benchmarks/results/perf.md.  On a shared machine, pin it:
``taskset -c 1 python benchmarks/trl_ddpo_compare.py --threads 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import machine_info, write_result

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TRL_VENV = ROOT / "benchmarks" / ".venv-trl"
TRL_VERSION = "0.23.1"
SIDES = ("trl", "ddpo", "grpo", "gae")
PROMPTS = ("a cat", "a dog", "red fox", "an owl", "a horse", "a fish", "a bird", "a frog")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


# ------------------------------------------------------------------------------------------------------
# the pipeline (built in this library's environment, loaded from disk by both sides)
def build_pipeline(out_dir: Path, latent_size: int = 32, seed: int = 0) -> dict:
    """Build the benchmark's StableDiffusionPipeline from configs and ``save_pretrained`` it to ``out_dir``."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from critic_align.tokenizer import byte_clip_tokenizer

    tok = byte_clip_tokenizer(out_dir.parent / "tokenizer_src", 16)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
                        norm_num_groups=8, layers_per_block=1, sample_size=2 * latent_size)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              timestep_spacing="leading")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"unet_params": count(unet), "vae_params": count(vae), "text_encoder_params": count(text_encoder),
            "latent_shape": [4, latent_size, latent_size], "image_size": 2 * latent_size}


# ------------------------------------------------------------------------------------------------------
# the TRL environment
def _versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "diffusers", "transformers", "peft", "accelerate")}


def ensure_trl_venv(log_path: Path) -> dict:
    """Create benchmarks/.venv-trl with trl==0.23.1 beside this environment's versions (once)."""
    py = TRL_VENV / "bin" / "python"
    probe = [str(py), "-c", "import trl, diffusers, transformers, peft, accelerate, torch; "
             "print(trl.__version__, torch.__version__)"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return {"created": False}
    ours = _versions()
    torch_spec = "torch==" + ours["torch"].split("+")[0]
    cmds = [
        [sys.executable, "-m", "venv", str(TRL_VENV)],
        [str(py), "-m", "pip", "install", "-q", torch_spec],
        [str(py), "-m", "pip", "install", "-q", f"trl=={TRL_VERSION}", "psutil", "pillow"]
        + [f"{k}=={v}" for k, v in ours.items() if k != "torch"],
    ]
    t0 = time.time()
    with open(log_path, "w") as log:
        for cmd in cmds:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
            if r.returncode != 0:
                raise RuntimeError(f"creating {TRL_VENV} failed at `{' '.join(cmd)}` (exit {r.returncode}); "
                                   f"pip's output is in {log_path}")
    return {"created": True, "install_s": time.time() - t0, "commands": [" ".join(c) for c in cmds]}


# ------------------------------------------------------------------------------------------------------
# the workers (each runs in its own process)
def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _worker_trl(a) -> dict:
    import accelerate

    accelerate.PartialState()  # before the pipeline: the CPU path needs the state to exist (see shared notes)
    import torch

    torch.set_num_threads(a.threads)
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    counter = {"i": 0}

    def prompt_fn():  # group_size consecutive samples share a prompt, as this library's PromptIterator does
        i = counter["i"]
        counter["i"] += 1
        return PROMPTS[(i // a.group_size) % len(PROMPTS)], {}

    def reward_fn(images, prompts, metadata):  # images in [0, 1]
        return images.float().mean(dim=(1, 2, 3)), {}

    tmp = Path(a.tmp)
    cfg = DDPOConfig(
        num_epochs=a.warmup + a.epochs, seed=a.seed, mixed_precision="no", log_with=None, save_freq=10**9,
        sample_num_steps=a.steps, sample_eta=1.0, sample_guidance_scale=a.guidance, sample_batch_size=a.batch,
        sample_num_batches_per_epoch=1, train_batch_size=a.train_batch, train_gradient_accumulation_steps=a.grad_accum,
        train_num_inner_epochs=a.inner_epochs, train_cfg=a.guidance != 1.0, train_learning_rate=a.lr, train_clip_range=a.clip,
        train_adv_clip_max=5.0, train_max_grad_norm=1.0, train_timestep_fraction=1.0, per_prompt_stat_tracking=True,
        per_prompt_stat_tracking_buffer_size=a.stat_buffer, per_prompt_stat_tracking_min_count=a.stat_min,
        async_reward_computation=False, project_kwargs={"project_dir": str(tmp / "trl_run"),
                                                         "logging_dir": str(tmp / "trl_run" / "logs")})
    pipe = DefaultDDPOStableDiffusionPipeline(a.model_dir, use_lora=True)
    pipe.set_progress_bar_config(disable=True)
    trainer = DDPOTrainer(cfg, reward_fn, prompt_fn, pipe)
    trainer.sd_pipeline.set_progress_bar_config(disable=True)
    rss_loaded = _rss_mb()
    timer = {"update": 0.0}
    inner = trainer._train_batched_samples

    def timed_train(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            timer["update"] += time.perf_counter() - t

    trainer._train_batched_samples = timed_train
    lora = [p for p in trainer.sd_pipeline.unet.parameters() if p.requires_grad]
    epochs, global_step = [], 0
    for epoch in range(a.warmup + a.epochs):
        timer["update"] = 0.0
        t0 = time.perf_counter()
        global_step = trainer.step(epoch, global_step)
        dt = time.perf_counter() - t0
        epochs.append({"epoch_s": dt, "update_s": timer["update"], "rollout_s": dt - timer["update"]})
    return {"epochs": epochs[a.warmup:], "rss_loaded_mb": rss_loaded, "peak_rss_mb": _rss_mb(),
            "trainable_params": sum(p.numel() for p in lora), "optimizer_steps": global_step,
            "versions": {**_versions(), "trl": __import__("trl").__version__}}


def _worker_ours(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from critic_align.config import PPOConfig
    from critic_align.rewards import FunctionReward, MultiReward
    from critic_align.tasks.sd import StableDiffusionTask, load_pipeline
    from critic_align.trainer import Trainer

    def brightness(samples, prompts):  # samples in [-1, 1] -> the same [0, 1] image mean as TRL's side
        return ((samples.float() + 1) / 2).mean(dim=(1, 2, 3))

    pipe = load_pipeline(a.model_dir, kind="sd15")
    task = StableDiffusionTask(pipe, PROMPTS)
    cfg = PPOConfig(
        advantage=a.worker, seed=a.seed, num_epochs=a.warmup + a.epochs, output_dir=str(Path(a.tmp) / f"run_{a.worker}"),
        num_inference_steps=a.steps, eta=1.0, guidance_scale=a.guidance, batch_size=a.batch, group_size=a.group_size,
        sample_chunk_size=a.batch, ppo_epochs=a.inner_epochs, minibatch_size=a.train_batch * a.grad_accum * a.steps,
        gradient_accumulation_steps=a.ours_grad_accum, learning_rate=a.lr, clip_range=a.clip, adv_clip_max=5.0,
        max_grad_norm=1.0, lora_rank=4, lora_alpha=4, lora_target_modules=LORA_TARGETS, critic_lora_rank=4,
        **({"stat_buffer_size": a.stat_buffer, "stat_min_count": a.stat_min} if a.worker == "ddpo" else {}),
        value_pretrain_epochs=0, progress=False,
        log_tensorboard=False, grid_every=0, checkpoint_every=0)
    trainer = Trainer(cfg, task, task.backbone(), task.scheduler, MultiReward([FunctionReward(brightness, name="brightness")]))
    rss_loaded = _rss_mb()
    epochs = []
    for _ in range(a.warmup + a.epochs):
        m = trainer.train_epoch().metrics
        epochs.append({"epoch_s": m["time_epoch_s"], "update_s": m["time_update_s"],
                       "rollout_s": m["time_epoch_s"] - m["time_update_s"]})
    n_opt = trainer.optimizer.state[trainer.policy_params[0]]["step"]
    return {"epochs": epochs[a.warmup:], "rss_loaded_mb": rss_loaded, "peak_rss_mb": _rss_mb(),
            "trainable_params": sum(p.numel() for p in trainer.policy_params + trainer.critic_params),
            "optimizer_steps": int(n_opt), "versions": _versions()}


# ------------------------------------------------------------------------------------------------------
# the driver
def _summarise(rounds: list[dict], batch: int) -> dict:
    def per_round(side, key):
        return [statistics.median(e[key] for e in r[side]["epochs"]) for r in rounds]

    out = {"sides": {}, "ratios_vs_trl": {}, "gae_vs_grpo_epoch_time": None}
    for side in SIDES:
        sps = {k: [batch / s for s in per_round(side, f"{k}_s")] for k in ("rollout", "update", "epoch")}
        out["sides"][side] = {
            "samples_per_s": {k: statistics.median(v) for k, v in sps.items()},
            "seconds_per_epoch": {k: statistics.median(per_round(side, f"{k}_s")) for k in ("rollout", "update", "epoch")},
            "peak_rss_mb": statistics.median(r[side]["peak_rss_mb"] for r in rounds),
            "rss_after_load_mb": statistics.median(r[side]["rss_loaded_mb"] for r in rounds),
            "trainable_params": rounds[0][side]["trainable_params"],
            "optimizer_steps": rounds[0][side]["optimizer_steps"],
        }
    for side in SIDES[1:]:
        ratios = {}
        for k in ("rollout", "update", "epoch"):
            rs = [t / o for t, o in zip(per_round("trl", f"{k}_s"), per_round(side, f"{k}_s"))]  # ours / TRL samples/s
            ratios[k] = {"median": statistics.median(rs), "min": min(rs), "max": max(rs), "per_round": rs}
        rss = [r[side]["peak_rss_mb"] / r["trl"]["peak_rss_mb"] for r in rounds]
        ratios["peak_rss"] = {"median": statistics.median(rss), "min": min(rss), "max": max(rss), "per_round": rss}
        out["ratios_vs_trl"][side] = ratios
    g = [a / b for a, b in zip(per_round("gae", "epoch_s"), per_round("grpo", "epoch_s"))]
    out["gae_vs_grpo_epoch_time"] = {"median": statistics.median(g), "min": min(g), "max": max(g), "per_round": g}
    return out


GOALS = {"overall_vs_trl": {"ddpo": 1.5, "gae": 1.2}, "rss_vs_trl": {"ddpo": 1.0, "gae": 1.1},
         "gae_vs_grpo_epoch": 1.15}


def headline(summary: dict) -> dict:
    """The top-level figures: median over rounds of ours / TRL overall samples/s and peak RSS per mode, and of the
    GAE epoch time / the GRPO epoch time; with the issue's goals (overall >=, RSS and GAE/GRPO <=)."""
    r = summary["ratios_vs_trl"]
    return {"overall_vs_trl": {m: r[m]["epoch"]["median"] for m in SIDES[1:]},
            "rss_vs_trl": {m: r[m]["peak_rss"]["median"] for m in SIDES[1:]},
            "gae_vs_grpo_epoch": summary["gae_vs_grpo_epoch_time"]["median"],
            "goals": GOALS}


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    kinds = ("rollout", "update", "epoch")
    x = np.arange(len(kinds))
    w = 0.2
    for i, side in enumerate(SIDES):
        vals = [summary["sides"][side]["samples_per_s"][k] for k in kinds]
        label = "TRL DDPOTrainer" if side == "trl" else f"critic_align {side}"
        axes[0].bar(x + (i - 1.5) * w, vals, w, label=label)
    axes[0].set_xticks(x, ["rollout", "update", "overall"])
    axes[0].set_ylabel("samples / s (higher is better)")
    axes[0].legend(fontsize=8)
    axes[0].set_title("throughput, median over rounds")
    rss = [summary["sides"][s]["peak_rss_mb"] for s in SIDES]
    axes[1].bar(range(len(SIDES)), rss, color=[f"C{i}" for i in range(len(SIDES))])
    axes[1].set_xticks(range(len(SIDES)), ["TRL", "ddpo", "grpo", "gae"])
    axes[1].set_ylabel("peak RSS (MB)")
    axes[1].set_title("peak resident memory per process")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--alternations", type=int, default=3, help="rounds of (TRL, ddpo, grpo, gae), order rotated")
    p.add_argument("--epochs", type=int, default=1, help="timed epochs per run (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=8, help="samples (trajectories) per epoch")
    p.add_argument("--group-size", type=int, default=4, help="samples per prompt")
    p.add_argument("--steps", type=int, default=8, help="denoising steps")
    p.add_argument("--train-batch", type=int, default=4, help="TRL's train_batch_size")
    p.add_argument("--grad-accum", type=int, default=1, help="TRL's train_gradient_accumulation_steps")
    p.add_argument("--ours-grad-accum", type=int, default=1,
                   help="this library's gradient_accumulation_steps (1 = its default: micro-batches chosen by "
                        "micro_batch_size 'auto')")
    p.add_argument("--inner-epochs", type=int, default=1)
    p.add_argument("--guidance", type=float, default=5.0,
                   help="CFG scale in rollouts and the update on both sides (DDPO's default 5.0; see the docstring for 1.0)")
    p.add_argument("--latent-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--clip", type=float, default=1e-4)
    p.add_argument("--stat-buffer", type=int, default=16)
    p.add_argument("--stat-min", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "trl_compare.json"))
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:  # inside a subprocess
        res = _worker_trl(a) if a.worker == "trl" else _worker_ours(a)
        Path(a.result).write_text(json.dumps(res))
        return res

    t_start = time.time()
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="trl_compare_"))
    try:
        venv_info = ensure_trl_venv(RESULTS / "trl_compare_venv.log")
        model_dir = tmp / "pipeline"
        model_info = build_pipeline(model_dir, a.latent_size, a.seed)
        passthrough = []
        for name in ("epochs", "warmup", "batch", "group_size", "steps", "train_batch", "grad_accum", "ours_grad_accum",
                     "inner_epochs", "guidance", "lr", "clip", "stat_buffer", "stat_min", "threads", "seed"):
            passthrough += [f"--{name.replace('_', '-')}", str(getattr(a, name))]
        rounds = []
        from tqdm import tqdm

        bar = tqdm(total=a.alternations * len(SIDES), desc="runs")
        for r in range(a.alternations):
            order = list(SIDES[r % len(SIDES):] + SIDES[:r % len(SIDES)])  # rotate who goes first
            if r % 2:
                order.reverse()
            row = {"order": order}
            for side in order:
                py = TRL_VENV / "bin" / "python" if side == "trl" else Path(sys.executable)
                result = tmp / f"{side}_{r}.json"
                cmd = [str(py), str(Path(__file__).resolve()), "--worker", side, "--model-dir", str(model_dir),
                       "--tmp", str(tmp), "--result", str(result), *passthrough]
                env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp))
                if proc.returncode != 0:
                    raise RuntimeError(f"the {side} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
                row[side] = json.loads(result.read_text())
                bar.update(1)
            rounds.append(row)
        bar.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


    summary = _summarise(rounds, a.batch)
    data = {
        "command": "python benchmarks/trl_ddpo_compare.py" + "".join(
            f" {x}" for x in (argv if argv is not None else sys.argv[1:])),
        **headline(summary),
        # every side runs with the same affinity: ratios are taken within a round, so they stay fair
        "machine": machine_info(torch_threads=a.threads, cpu_affinity=sorted(os.sched_getaffinity(0))),
        "versions": {"ours": rounds[0]["ddpo"]["versions"], "trl_env": rounds[0]["trl"]["versions"]},
        "trl_venv": venv_info,
        "model": model_info,
        "settings": {k: getattr(a, k) for k in ("batch", "group_size", "steps", "train_batch", "grad_accum",
                                                "ours_grad_accum", "inner_epochs", "guidance", "latent_size", "lr", "clip",
                                                "epochs", "warmup", "alternations", "threads")}
        | {"lora_rank": 4, "lora_targets": list(LORA_TARGETS), "eta": 1.0,
           "ours_minibatch_pairs": a.train_batch * a.grad_accum * a.steps,
           "reward": "mean brightness of the [0, 1] image"},
        "summary": summary,
        "rounds": rounds,
        "time_s": time.time() - t_start,
    }
    out = Path(a.out)
    write_result(out, data, topic="perf")
    plot(summary, out.with_suffix(".png"))
    print(json.dumps(headline(summary), indent=1))
    return data


if __name__ == "__main__":
    main()
