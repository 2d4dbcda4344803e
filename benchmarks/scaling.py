"""How an epoch's time and memory grow with batch size, denoising steps and image size (tiny SD1.5 pipeline).

    python benchmarks/scaling.py                    # ≈ 5 min on 2 CPU cores

The pipeline is ``trl_ddpo_compare.build_pipeline`` (UNet2DConditionModel, 1.7 M parameters, VAE factor 2)
at latent sizes 8, 16 and 32, trained by this library in GAE mode (the default LoRA policy and critic,
CFG-free, ``minibatch_size`` 160 pairs).  One axis varies at a time around batch 8, 8 steps, 16×16 latents.
Every point runs in its own process: one warm-up epoch, then ``--epochs`` timed; peak RSS is the process's.
Memory per sample is the least-squares slope of peak RSS against batch size.  Writes
``benchmarks/results/scaling.json`` and ``.png``, then re-renders benchmarks/results/perf.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import machine_info, write_result

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BASE = {"batch": 8, "steps": 8, "latent": 16}
AXES = {"batch": (4, 8, 16), "steps": (4, 8, 16), "latent": (8, 16, 32)}


def worker(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from critic_align.config import PPOConfig
    from critic_align.rewards import FunctionReward, MultiReward
    from critic_align.tasks.sd import StableDiffusionTask, load_pipeline
    from critic_align.trainer import Trainer

    def brightness(samples, prompts):
        return ((samples.float() + 1) / 2).mean(dim=(1, 2, 3))

    pipe = load_pipeline(a.model_dir, kind="sd15")
    task = StableDiffusionTask(pipe, ("a cat", "a dog", "red fox", "an owl"))
    cfg = PPOConfig(advantage="gae", batch_size=a.batch, group_size=4, num_inference_steps=a.steps,
                    sample_chunk_size=max(a.batch, 1), value_pretrain_epochs=0, progress=False, log_tensorboard=False,
                    grid_every=0, checkpoint_every=0, output_dir=str(Path(a.tmp) / "run"), seed=0)
    trainer = Trainer(cfg, task, task.backbone(), task.scheduler, MultiReward([FunctionReward(brightness, name="b")]))
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    hist = [trainer.train_epoch().metrics for _ in range(1 + a.epochs)][1:]
    return {"epoch_s": statistics.median(h["time_epoch_s"] for h in hist),
            "rollout_s": statistics.median(h["time_rollout_s"] for h in hist),
            "update_s": statistics.median(h["time_update_s"] for h in hist),
            "rss_after_build_mb": rss_built,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def _slope(xs, ys) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"batch": "samples per epoch", "steps": "denoising steps", "latent": "latent side (image = 2×)"}
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for ax, axis in zip(axes[:3], AXES):
        pts = data["axes"][axis]
        xs = [p[axis] for p in pts]
        for key, style in (("epoch_s", "o-"), ("rollout_s", "s--"), ("update_s", "^--")):
            ax.plot(xs, [p[key] for p in pts], style, label=key.replace("_s", ""))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel(labels[axis])
        ax.set_ylabel("seconds per epoch")
        ax.legend(fontsize=8)
    pts = data["axes"]["batch"]
    axes[3].plot([p["batch"] for p in pts], [p["peak_rss_mb"] for p in pts], "ko-")
    axes[3].set_xlabel("samples per epoch")
    axes[3].set_ylabel("peak RSS (MB)")
    axes[3].set_title(f"≈ {data['memory_per_sample_mb']:.1f} MB per sample", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=1, help="timed epochs per point (after one warm-up epoch)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "scaling.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        res = worker(a)
        Path(a.result).write_text(json.dumps(res))
        return res

    from trl_ddpo_compare import build_pipeline

    t_start = time.time()
    points = {}
    todo = []
    for axis, values in AXES.items():
        for v in values:
            key = (v if axis == "batch" else BASE["batch"], v if axis == "steps" else BASE["steps"],
                   v if axis == "latent" else BASE["latent"])
            if key not in todo:
                todo.append(key)
    from tqdm import tqdm

    with tempfile.TemporaryDirectory(prefix="scaling_") as tmp:
        models = {}
        for latent in AXES["latent"]:
            models[latent] = Path(tmp) / f"pipe_{latent}"
            info = build_pipeline(models[latent], latent_size=latent)
        for batch, steps, latent in tqdm(todo, desc="points"):
            result = Path(tmp) / "r.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--batch", str(batch), "--steps", str(steps),
                   "--model-dir", str(models[latent]), "--tmp", tmp, "--result", str(result), "--epochs", str(a.epochs),
                   "--threads", str(a.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if proc.returncode != 0:
                raise RuntimeError(f"point {(batch, steps, latent)} failed:\n{proc.stderr[-4000:]}")
            points[(batch, steps, latent)] = {"batch": batch, "steps": steps, "latent": latent,
                                              **json.loads(result.read_text())}

    axes = {}
    for axis, values in AXES.items():
        axes[axis] = [points[(v if axis == "batch" else BASE["batch"], v if axis == "steps" else BASE["steps"],
                              v if axis == "latent" else BASE["latent"])] for v in values]
    bs = axes["batch"]
    data = {
        "command": "python benchmarks/scaling.py" + "".join(f" {x}" for x in (argv if argv is not None else sys.argv[1:])),
        "machine": machine_info(torch_threads=a.threads),
        "base": BASE, "unet_params": info["unet_params"], "axes": axes,
        "memory_per_sample_mb": _slope([p["batch"] for p in bs], [p["peak_rss_mb"] for p in bs]),
        "seconds_per_sample": _slope([p["batch"] for p in bs], [p["epoch_s"] for p in bs]),
        "time_s": time.time() - t_start,
    }
    out = Path(a.out)
    write_result(out, data, topic="perf")
    plot(data, out.with_suffix(".png"))
    return data


if __name__ == "__main__":
    main()
