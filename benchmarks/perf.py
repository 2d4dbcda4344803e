"""Where an epoch's time goes and what the speed-ups buy: before/after epoch times, LoRA layer costs.

    python benchmarks/perf.py                  # ≈ 4 min on 2 CPU cores

1. One LoRA layer (rank 8 on a 3×3 conv of 32 / 64 channels, and on a 64-wide linear; batch 64): peft's
   forward ``base(x) + s·B(A(x))`` vs the fused forward (one op with ``W + s·B·A``,
   ``critic_align/backbones/lora.py``), without gradients and forward + backward.
2. Digits (``train/configs/digits.yaml``: 64 trajectories × 20 steps, LoRA on attention and ResNet convs)
   epochs in ``gae`` and ``grpo`` mode with ``fused_lora`` off ("before") and on ("after"), alternating,
   one warm-up epoch then ``--epochs`` timed per configuration and round; value pretraining skipped.
3. The same on the tiny SD1.5 pipeline of ``trl_ddpo_compare.py`` (8 samples × 8 steps, CFG-free).
4. Rollouts under ``torch.no_grad`` (what the trainer uses: its tensors feed autograd later) vs
   ``torch.inference_mode``, digits policy, 64 trajectories × 20 steps.

Writes ``benchmarks/results/perf.json`` (re-rendered into benchmarks/results/perf.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import machine_info, write_result
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1000


def layer_costs(reps: int = 10) -> list[dict]:
    from critic_align.backbones import LoraAdapters

    rows = []
    for kind, shape in (("conv3x3", (32, 16)), ("conv3x3", (64, 8)), ("linear", (64, 256))):
        res = {}
        for fused in (False, True):
            torch.manual_seed(0)
            c = shape[0]
            if kind == "conv3x3":
                model = nn.Sequential()
                model.add_module("conv1", nn.Conv2d(c, c, 3, padding=1))
                x0 = torch.randn(64, c, shape[1], shape[1])
            else:
                model = nn.Sequential()
                model.add_module("to_q", nn.Linear(c, c))
                x0 = torch.randn(64, shape[1], c)
            model.requires_grad_(False)
            adapters = LoraAdapters(model, fused=fused)
            adapters.add("policy", rank=8, target_modules=["conv1", "to_q"])
            with torch.no_grad():
                for _n, p in adapters.named_parameters("policy"):
                    p.normal_(0, 0.1)

            def fwd(model=model, x0=x0):
                with torch.no_grad():
                    model(x0)

            def fwd_bwd(model=model, x0=x0):
                x = x0.clone().requires_grad_(True)
                model(x).square().mean().backward()

            res["fused" if fused else "peft"] = {"no_grad_ms": _time(fwd, reps), "fwd_bwd_ms": _time(fwd_bwd, reps)}
        rows.append({"layer": kind, "channels": shape[0], "spatial_or_tokens": shape[1], "batch": 64, "rank": 8, **res,
                     "speedup_no_grad": res["peft"]["no_grad_ms"] / res["fused"]["no_grad_ms"],
                     "speedup_fwd_bwd": res["peft"]["fwd_bwd_ms"] / res["fused"]["fwd_bwd_ms"]})
    return rows


def _digits_trainer(mode: str, fused: bool, tmp: str):
    from critic_align.api import build_trainer
    from critic_align.train.registry import load_run_config

    run = load_run_config("digits", dict(advantage=mode, fused_lora=fused, value_pretrain_epochs=0, progress=False,
                                         log_tensorboard=False, grid_every=0, checkpoint_every=0,
                                         output_dir=str(Path(tmp) / f"d_{mode}_{fused}")))
    return build_trainer(run)


def _sd_trainer(mode: str, fused: bool, tmp: str, model_dir: Path):
    from critic_align.config import PPOConfig
    from critic_align.rewards import FunctionReward, MultiReward
    from critic_align.tasks.sd import StableDiffusionTask, load_pipeline
    from critic_align.trainer import Trainer

    pipe = load_pipeline(model_dir, kind="sd15")
    task = StableDiffusionTask(pipe, ("a cat", "a dog", "red fox", "an owl"))
    cfg = PPOConfig(advantage=mode, fused_lora=fused, batch_size=8, group_size=4, num_inference_steps=8,
                    value_pretrain_epochs=0, progress=False, log_tensorboard=False, grid_every=0, checkpoint_every=0,
                    output_dir=str(Path(tmp) / f"sd_{mode}_{fused}"))
    rw = MultiReward([FunctionReward(lambda s, p: ((s + 1) / 2).mean(dim=(1, 2, 3)), name="brightness")])
    return Trainer(cfg, task, task.backbone(), task.scheduler, rw)


def epoch_times(make, modes, rounds: int, epochs: int) -> dict:
    times = {m: {"before": [], "after": []} for m in modes}
    for r in range(rounds):
        for mode in modes:
            for fused in ((False, True) if r % 2 == 0 else (True, False)):
                trainer = make(mode, fused)
                trainer.train_epoch()  # warm-up
                for _ in range(epochs):
                    m = trainer.train_epoch().metrics
                    times[mode]["after" if fused else "before"].append(
                        {k: m[f"time_{k}_s"] for k in ("rollout", "update", "epoch")})
                del trainer
    out = {}
    for mode, d in times.items():
        out[mode] = {}
        for tag, rows in d.items():
            out[mode][tag] = {k: statistics.median(r[k] for r in rows) for k in ("rollout", "update", "epoch")}
        out[mode]["speedup_epoch"] = out[mode]["before"]["epoch"] / out[mode]["after"]["epoch"]
    if "gae" in out and "grpo" in out:
        for tag in ("before", "after"):
            out[f"gae_vs_grpo_{tag}"] = out["gae"][tag]["epoch"] / out["grpo"][tag]["epoch"]
    return out


def rollout_grad_modes(tmp: str, reps: int = 3) -> dict:
    trainer = _digits_trainer("grpo", True, tmp)
    prompts = trainer.prompt_iter.batch(trainer.config.prompts_per_epoch, trainer.config.group_size)
    res = {"no_grad": [], "inference_mode": []}
    trainer.rollout(prompts)  # warm-up
    for _ in range(reps):
        for name, ctx in (("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode)):
            with ctx():
                t0 = time.perf_counter()
                trainer.rollout(prompts)
                res[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in res.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "perf.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t_start = time.time()
    from trl_ddpo_compare import build_pipeline

    with tempfile.TemporaryDirectory(prefix="perf_") as tmp:
        layers = layer_costs()
        print("layers", json.dumps(layers, indent=1))
        digits = epoch_times(lambda m, f: _digits_trainer(m, f, tmp), ("gae", "grpo"), a.rounds, a.epochs)
        print("digits", json.dumps(digits, indent=1))
        model_dir = Path(tmp) / "pipe"
        info = build_pipeline(model_dir)
        sd = epoch_times(lambda m, f: _sd_trainer(m, f, tmp, model_dir), ("gae", "grpo"), a.rounds, a.epochs)
        print("sd", json.dumps(sd, indent=1))
        grad_modes = rollout_grad_modes(tmp)
    data = {
        "command": "python benchmarks/perf.py" + "".join(f" {x}" for x in (argv if argv is not None else sys.argv[1:])),
        "machine": machine_info(torch_threads=a.threads),
        "rounds": a.rounds, "epochs": a.epochs,
        "lora_layer": layers, "digits_epoch": digits, "sd_epoch": sd, "sd_unet_params": info["unet_params"],
        "rollout_no_grad_vs_inference_mode_s": grad_modes,
        "time_s": time.time() - t_start,
    }
    out = Path(a.out)
    write_result(out, data, topic="perf")
    return data


if __name__ == "__main__":
    main()
