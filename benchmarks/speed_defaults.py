"""What the speed and memory defaults buy: micro-batches from a memory budget, channels-last weights, bf16,
background rewards and torch.compile, measured on this CPU.

    python benchmarks/speed_defaults.py            # ≈ 15 min on one core
    taskset -c 1 python benchmarks/speed_defaults.py --threads 1   # pinned, on a shared machine

1. The TRL comparison's tiny SD1.5 pipeline (``trl_ddpo_compare.py``'s settings: 8 samples × 8 steps, CFG 5 in
   rollouts and update, ddpo advantages, 32 pairs per optimiser step), one process per configuration (its peak RSS
   is its own): the old defaults (the whole minibatch in one forward, contiguous weights), ``micro_batch_size:
   auto`` alone, the new defaults (auto + ``channels_last``), and the new defaults with ``mixed_precision: bf16``.
2. Digits (``train/configs/digits.yaml`` as it stands, with its SDE window; value pretraining skipped) in grpo and
   gae mode: the new defaults, the
   same with the whole 160-pair minibatch in one forward (``micro_batch_size: 160``), and grpo without
   channels-last; the GAE / GRPO epoch-time ratio at the defaults.
3. Background rewards: a digits rollout in 4 chunks with a slow reward (a 0.25 s sleep per call, standing in for a
   remote or large reward model), ``overlap_rewards`` off vs on; the rewards must be identical.
4. ``torch.compile`` of the tiny SD1.5 UNet (LoRA on the attention projections, fused): compile time and the
   forward+backward of 16 rows, against eager and eager with channels-last (``--no-compile`` skips it).

Per configuration and round: one warm-up epoch, then ``--epochs`` timed; ``--rounds`` passes over all
configurations in alternating order (other work on the machine hits every configuration alike); medians.  Writes
``benchmarks/results/speed_defaults.json`` (re-rendered into benchmarks/results/perf.md).
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

SD_CONFIGS = {
    "old defaults (one forward per minibatch)": {"micro_batch_size": 10**6, "channels_last": False},
    "micro_batch_size auto": {"channels_last": False},
    "new defaults (auto + channels_last)": {},
    "new defaults + bf16": {"mixed_precision": "bf16"},
}
DIGITS_CONFIGS = [
    ("grpo", "defaults", {}),
    ("grpo", "micro_batch_size 160", {"micro_batch_size": 160}),
    ("grpo", "channels_last off", {"channels_last": False}),
    ("gae", "defaults", {}),
    ("gae", "micro_batch_size 160", {"micro_batch_size": 160}),
]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _epochs(trainer, n: int) -> dict:
    rows = [trainer.train_epoch().metrics for _ in range(n + 1)][1:]
    out = {k: statistics.median(r[f"time_{k}_s"] for r in rows) for k in ("rollout", "update", "epoch")}
    out["bytes_per_pair"] = trainer.opt.batcher.bytes_per_row.get("ppo")
    return out


def worker_sd(a, overrides: dict) -> dict:
    from trl_ddpo_compare import LORA_TARGETS, PROMPTS

    from critic_align.config import PPOConfig, not_applicable
    from critic_align.rewards import FunctionReward, MultiReward
    from critic_align.tasks.sd import StableDiffusionTask, load_pipeline
    from critic_align.trainer import Trainer

    task = StableDiffusionTask(load_pipeline(a.model_dir, kind="sd15"), PROMPTS)
    fields = {**dict(
        advantage="ddpo", num_epochs=10, output_dir=str(Path(a.tmp) / "sd"), num_inference_steps=8, eta=1.0,
        guidance_scale=5.0, batch_size=8, group_size=4, sample_chunk_size=8, minibatch_size=32, learning_rate=3e-4,
        clip_range=1e-4, lora_rank=4, lora_alpha=4, lora_target_modules=LORA_TARGETS, stat_buffer_size=16,
        stat_min_count=16, value_pretrain_epochs=0, progress=False, log_tensorboard=False, grid_every=0,
        checkpoint_every=0), **overrides}
    cfg = PPOConfig(**{k: v for k, v in fields.items() if k not in not_applicable(fields)})  # ddpo's stats: ddpo only
    rw = MultiReward([FunctionReward(lambda s, p: ((s.float() + 1) / 2).mean(dim=(1, 2, 3)), name="brightness")])
    trainer = Trainer(cfg, task, task.backbone(), task.scheduler, rw)
    return {**_epochs(trainer, a.epochs), "peak_rss_mb": _rss_mb()}


def _digits(mode: str, tmp: str, **overrides):
    from critic_align.api import build_trainer
    from critic_align.train.registry import load_run_config

    run = load_run_config("digits", dict(advantage=mode, value_pretrain_epochs=0, progress=False, log_tensorboard=False,
                                         grid_every=0, checkpoint_every=0, output_dir=str(Path(tmp) / "digits"),
                                         **overrides))
    return build_trainer(run)


def worker_digits(a, mode: str, overrides: dict) -> dict:
    return {**_epochs(_digits(mode, a.tmp, **overrides), a.epochs), "peak_rss_mb": _rss_mb()}


def worker_overlap(a) -> dict:
    import torch

    from critic_align.rewards import FunctionReward, MultiReward

    def slow(samples, prompts):  # a remote / large reward model: the wait is not compute
        time.sleep(0.25)
        return samples.float().mean(dim=(1, 2, 3))

    out, rewards = {}, {}
    for overlap in (False, True, False, True):
        tr = _digits("grpo", a.tmp, sample_chunk_size=16, overlap_rewards=overlap, seed=0)
        tr.rewards = MultiReward([FunctionReward(slow, name="slow")])
        prompts = tr.prompt_iter.batch(tr.config.prompts_per_epoch, tr.config.group_size)
        t0 = time.perf_counter()
        ro = tr.rollout(prompts)
        out.setdefault("overlap" if overlap else "sequential", []).append(time.perf_counter() - t0)
        rewards[overlap] = ro.rewards
    return {"rollout_s": {k: statistics.median(v) for k, v in out.items()}, "chunks": 4, "reward_sleep_s": 0.25,
            "rewards_identical": bool(torch.equal(rewards[False], rewards[True]))}


def worker_compile(a) -> dict:
    os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"  # the first call's time is the real compile time
    import torch
    from diffusers import UNet2DConditionModel

    from critic_align.backbones import LoraAdapters

    unet = UNet2DConditionModel.from_pretrained(Path(a.model_dir) / "unet").requires_grad_(False)
    adapters = LoraAdapters(unet, fused=True)
    adapters.add("policy", rank=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    adapters.activate("policy")
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(16, 4, 32, 32, generator=g), torch.full((16,), 500), torch.randn(16, 16, 32, generator=g)

    def fwd_bwd(m):
        m(x, t, c).sample.square().mean().backward()

    def timed(m, reps=5):
        fwd_bwd(m)
        t0 = time.perf_counter()
        for _ in range(reps):
            fwd_bwd(m)
        return (time.perf_counter() - t0) / reps

    eager, cl = [], []
    for _ in range(3):  # alternating, so other work on the machine hits both alike
        eager.append(timed(unet))
        unet.to(memory_format=torch.channels_last)
        cl.append(timed(unet))
        unet.to(memory_format=torch.contiguous_format)
    compiled = torch.compile(unet)
    t0 = time.perf_counter()
    fwd_bwd(compiled)
    first = time.perf_counter() - t0
    eager2, comp = [], []
    for _ in range(3):
        eager2.append(timed(unet))
        comp.append(timed(compiled))
    med = statistics.median
    return {"rows": 16, "what": "forward + backward of the tiny SD1.5 UNet (LoRA on attention)",
            "eager_s": med(eager), "eager_channels_last_s": med(cl), "compile_first_call_s": first,
            "eager_beside_compiled_s": med(eager2), "compiled_s": med(comp), "inductor_caches": "disabled"}


def _run(a, kind: str, payload) -> dict:
    result = Path(a.tmp) / f"r_{time.time_ns()}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--payload", json.dumps(payload),
           "--model-dir", str(a.model_dir), "--tmp", str(a.tmp), "--result", str(result),
           "--epochs", str(a.epochs), "--threads", str(a.threads)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} {payload} failed:\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def _median_runs(rows: list[dict]) -> dict:
    """Medians over rounds (``per_round`` keeps each round's figures)."""
    out = {k: statistics.median(r[k] for r in rows) for k in ("rollout", "update", "epoch", "peak_rss_mb")}
    return {**out, "bytes_per_pair": rows[0]["bytes_per_pair"], "per_round": rows}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="passes over every configuration, order alternating")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "speed_defaults.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--payload", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    if a.worker:
        payload = json.loads(a.payload)
        res = {"sd": lambda: worker_sd(a, payload), "digits": lambda: worker_digits(a, *payload),
               "overlap": lambda: worker_overlap(a), "compile": lambda: worker_compile(a)}[a.worker]()
        Path(a.result).write_text(json.dumps(res))
        return res

    from trl_ddpo_compare import build_pipeline

    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="speed_defaults_") as tmp:
        a.tmp, a.model_dir = tmp, Path(tmp) / "pipe"
        model = build_pipeline(a.model_dir)
        jobs = [("sd", name, ov) for name, ov in SD_CONFIGS.items()] + \
               [("digits", f"{m}/{name}", [m, ov]) for m, name, ov in DIGITS_CONFIGS]
        runs: dict[str, list] = {}
        for r in range(a.rounds):  # every configuration once per round, the order reversed every other round
            for kind, key, payload in (jobs if r % 2 == 0 else jobs[::-1]):
                runs.setdefault(key, []).append(_run(a, kind, payload))
                print(key, runs[key][-1], flush=True)
        sd = {name: _median_runs(runs[name]) for name in SD_CONFIGS}
        digits = [{"mode": m, "config": name, **_median_runs(runs[f"{m}/{name}"])} for m, name, _ in DIGITS_CONFIGS]
        overlap = _run(a, "overlap", None)
        compiled = None if a.no_compile else _run(a, "compile", None)
    dflt = {r["mode"]: r for r in digits if r["config"] == "defaults"}
    data = {
        "command": "python benchmarks/speed_defaults.py" + "".join(
            f" {x}" for x in (argv if argv is not None else sys.argv[1:])),
        "machine": machine_info(torch_threads=a.threads, cpu_affinity=sorted(os.sched_getaffinity(0))),
        "epochs": a.epochs, "rounds": a.rounds, "sd_model": model,
        "sd": sd, "digits": digits,
        "digits_gae_vs_grpo_epoch": dflt["gae"]["epoch"] / dflt["grpo"]["epoch"],
        "overlap_rewards": overlap, "compile": compiled,
        "time_s": time.time() - t_start,
    }
    out = Path(a.out)
    write_result(out, data, topic="perf")
    return data


if __name__ == "__main__":
    main()
