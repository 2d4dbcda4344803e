"""Critic backbone modes on digits: a LoRA adapter on the shared frozen base vs a full trainable copy vs the
policy's own trunk (``PPOConfig.critic_mode``): cost and learning efficiency.

    python benchmarks/critic_modes.py                      # ≈ 10 min on 2 CPU cores
    python benchmarks/critic_modes.py --epochs 5 --modes lora full   # a quick look

Each mode runs ``train/configs/digits.yaml`` (GAE) with the same seed and budget in its own subprocess (so
peak RSS is its own): value pretraining, then ``--epochs`` PPO epochs.  A GRPO run with the same settings
(no critic) is the reference for the critic's overhead.  Reported per mode: seconds per epoch (median),
value-pretraining seconds, peak RSS, parameters trained (policy LoRA, critic), the critic's explained
variance after pretraining (first epoch) and at the end (mean of the last 5 epochs), the training reward
of the last 3 epochs, and the policy's reward on a fixed evaluation set (20 samples per digit, fixed noise)
before and after.  Writes ``benchmarks/results/critic_modes.json`` and ``.png``, then re-renders benchmarks/results/perf.md.
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
MODES = ("lora", "full", "shared")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(mode: str, a) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    from digits_advantages import evaluate_policy

    from critic_align.api import build_trainer
    from critic_align.train.registry import load_run_config

    over = dict(seed=a.seed, num_epochs=a.epochs, output_dir=str(Path(a.tmp) / f"run_{mode}"), progress=False,
                grid_every=0, checkpoint_every=0, log_tensorboard=False)
    if mode == "grpo":
        over["advantage"] = "grpo"
    else:
        over.update(advantage="gae", critic_mode=mode)
    run = load_run_config("digits", over)
    trainer = build_trainer(run)
    rss_built = _rss_mb()
    base_eval = evaluate_policy(trainer)
    t0 = time.perf_counter()
    pre = trainer.pretrain_value() if trainer.critic is not None else []
    pretrain_s = time.perf_counter() - t0
    hist = [trainer.train_epoch().metrics for _ in range(a.epochs)]
    final_eval = evaluate_policy(trainer)
    key = f"reward/{trainer.rewards.names[0]}/mean"
    critic_params = sum(p.numel() for p in trainer.critic_params)
    head_params = sum(p.numel() for p in trainer.critic.head.parameters()) if trainer.critic is not None else 0
    return {
        "mode": mode,
        "seconds_per_epoch": statistics.median(h["time_epoch_s"] for h in hist),
        "rollout_s_per_epoch": statistics.median(h["time_rollout_s"] for h in hist),
        "update_s_per_epoch": statistics.median(h["time_update_s"] for h in hist),
        "pretrain_s": pretrain_s,
        "rss_after_build_mb": rss_built,
        "peak_rss_mb": _rss_mb(),
        "policy_params_trained": sum(p.numel() for p in trainer.policy_params),
        "critic_params_trained": critic_params,
        "critic_head_params": head_params,
        "critic_backbone_params_trained": critic_params - head_params,
        "value_ev_after_pretraining": hist[0].get("value_ev"),
        "value_ev_final": float(np.mean([h["value_ev"] for h in hist[-5:]])) if "value_ev" in hist[0] else None,
        "train_reward_last3": float(np.mean([h[key] for h in hist[-3:]])),
        "base_eval": base_eval,
        "final_eval": final_eval,
        "curve": [{"epoch": h["epoch"], "reward": h[key], "value_ev": h.get("value_ev"),
                   "time_epoch_s": h["time_epoch_s"]} for h in hist],
        "pretrain_ev": [r.get("pre_value_ev") for r in pre],
        "reward_queries": trainer.reward_queries,
    }


def recommend(runs: list[dict], ev_tol: float = 0.05, reward_tol: float = 0.01) -> str | None:
    """The rule behind the recommended default: among the modes whose final critic EV is within ``ev_tol`` of
    the best and whose evaluation reward is within ``reward_tol`` of the best, the one with the lowest epoch
    time (ties: lower peak memory)."""
    if len(runs) < 2:
        return None
    best_ev = max(r["value_ev_final"] for r in runs)
    best_rw = max(r["final_eval"]["digit_prob"] for r in runs)
    ok = [r for r in runs if r["value_ev_final"] >= best_ev - ev_tol and r["final_eval"]["digit_prob"] >= best_rw - reward_tol]
    why = f"final EV within {ev_tol} of the best ({best_ev:.3f}) and eval digit_prob within {reward_tol} of the best " \
          f"({best_rw:.3f})"
    if not ok:
        pick = max(runs, key=lambda r: r["value_ev_final"])
        return f"'{pick['mode']}' (no mode met both tolerances — {why}; highest final EV)"
    pick = min(ok, key=lambda r: (r["seconds_per_epoch"], r["peak_rss_mb"]))
    return (f"'{pick['mode']}' — the fastest of the modes with {why}: "
            + ", ".join(f"{r['mode']}" for r in ok) + ". One seed and a short budget: a hint, not a verdict.")


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for i, r in enumerate(runs):
        ep = [c["epoch"] for c in r["curve"]]
        label = r["mode"] if r["mode"] == "grpo" else f"gae, critic {r['mode']}"
        axes[0].plot(ep, [c["reward"] for c in r["curve"]], label=label, color=f"C{i}")
        if r["mode"] != "grpo":
            axes[1].plot(ep, [c["value_ev"] for c in r["curve"]], label=label, color=f"C{i}")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("training reward (digit_prob)")
    axes[0].legend(fontsize=8)
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("critic explained variance")
    axes[1].set_ylim(-1, 1)
    names = [r["mode"] for r in runs]
    axes[2].bar(names, [r["seconds_per_epoch"] for r in runs], color=[f"C{i}" for i in range(len(runs))])
    axes[2].set_ylabel("seconds / epoch")
    ax2 = axes[2].twinx()
    ax2.plot(names, [r["peak_rss_mb"] for r in runs], "ko-")
    ax2.set_ylabel("peak RSS (MB, dots)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--no-baseline", action="store_true", help="skip the GRPO (no critic) reference run")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "critic_modes.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        res = worker(a.worker, a)
        Path(a.result).write_text(json.dumps(res))
        return res

    t_start = time.time()
    runs = []
    names = list(a.modes) + ([] if a.no_baseline else ["grpo"])
    from tqdm import tqdm

    with tempfile.TemporaryDirectory(prefix="critic_modes_") as tmp:
        for name in tqdm(names, desc="runs"):
            result = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--tmp", tmp, "--result", str(result),
                   "--epochs", str(a.epochs), "--seed", str(a.seed), "--threads", str(a.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if proc.returncode != 0:
                raise RuntimeError(f"the {name} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            runs.append(json.loads(result.read_text()))

    base = next((r for r in runs if r["mode"] == "grpo"), None)
    for r in runs:
        r["epoch_time_vs_grpo"] = r["seconds_per_epoch"] / base["seconds_per_epoch"] if base else None
    data_rec = recommend([r for r in runs if r["mode"] != "grpo"])
    data = {
        "recommendation": data_rec,
        "command": "python benchmarks/critic_modes.py" + "".join(f" {x}" for x in (argv if argv is not None else sys.argv[1:])),
        "machine": machine_info(torch_threads=a.threads),
        "epochs": a.epochs, "seed": a.seed, "config": "train/configs/digits.yaml",
        "runs": runs, "time_s": time.time() - t_start,
    }
    out = Path(a.out)
    write_result(out, data, topic="perf")
    plot(runs, out.with_suffix(".png"))
    for r in runs:
        print(r["mode"], f"{r['seconds_per_epoch']:.2f} s/epoch", f"{r['peak_rss_mb']:.0f} MB",
              f"EV {r['value_ev_final']}", f"reward {r['train_reward_last3']:.3f}")
    return data


if __name__ == "__main__":
    main()
