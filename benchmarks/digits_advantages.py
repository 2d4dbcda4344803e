"""GAE (latent critic) vs GRPO vs DDPO advantages on the digits task, at an equal budget of reward queries.

    python benchmarks/digits_advantages.py --seeds 0 1 2 --budget 1920

Every mode uses the same trainer, model, LoRA, PPO settings and rollout batch; only the advantage
estimator differs.  GAE's value-pretraining rollouts count against its budget (they query the reward).
Writes ``benchmarks/results/digits_advantages.json`` and ``.png`` (reward vs reward queries, mean ± std
over seeds), plus the critic's explained variance per timestep bucket after pretraining.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from harness import evaluate, machine_info, per_prompt

ROOT = Path(__file__).resolve().parents[1]

from critic_align.api import build_trainer  # noqa: E402
from critic_align.diagnostics import within_prompt_diversity  # noqa: E402
from critic_align.train.registry import load_run_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def evaluate_policy(trainer, per_class: int = 20, seed: int = 999) -> dict:
    """Mean rewards (trained and evaluation-only) of the policy on a fixed set of noises and prompts (stochastic
    sampler, eta as trained), and the within-prompt diversity of those samples (``diversity_pairwise_l2``,
    ``diversity_pixel_std``)."""
    prompts = per_prompt(trainer.task.prompts, per_class)
    ev = evaluate(trainer, prompts, [trainer.rewards, trainer.eval_rewards], seed=seed)
    return {**{f"diversity_{k}": v for k, v in within_prompt_diversity(ev.samples, prompts).items()}, **ev.means}


def run_one(mode: str, seed: int, budget: int, overrides: dict, workdir: Path, config: str = "digits") -> dict:
    over = dict(overrides)
    over.update(advantage=mode, seed=seed, output_dir=str(workdir / f"{mode}_seed{seed}"), progress=False,
                grid_every=0, checkpoint_every=0, log_tensorboard=False, eval_every=0)
    run = load_run_config(config if mode == "gae" else "digits", over)
    cfg = run["ppo"]
    pre = cfg.value_pretrain_epochs * cfg.batch_size if mode == "gae" else 0
    cfg.num_epochs = max(1, (budget - pre) // cfg.batch_size)
    out_dir = Path(cfg.output_dir)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    t0 = time.time()
    trainer = build_trainer(run)
    base_eval = evaluate_policy(trainer)
    pre_logs = trainer.pretrain_value() if mode == "gae" else []
    history = []
    for _ in range(cfg.num_epochs):
        res = trainer.train_epoch()
        trainer.log(res.metrics)
        history.append(res.metrics)
    final_eval = evaluate_policy(trainer)
    key = f"reward/{trainer.rewards.names[0]}/mean"
    curve = [{"reward_queries": r["reward_queries"], "reward": r[key],
              "digit_correct": r.get("reward/digit_correct/mean")} for r in history]
    ev_after_pretrain = {k: v for k, v in history[0].items() if k.startswith("value_ev")} if mode == "gae" else {}
    return {
        "mode": mode, "seed": seed, "reward_queries": trainer.reward_queries, "epochs": cfg.num_epochs,
        "pretrain_queries": pre, "seconds": time.time() - t0, "base_eval": base_eval, "final_eval": final_eval,
        "curve": curve, "value_ev_after_pretraining": ev_after_pretrain,
        "pretrain_log": pre_logs,
        "mean_epoch_seconds": float(np.mean([r["time_epoch_s"] for r in history])),
    }


def queries_to_reach(curve: list[dict], target: float, smooth: int = 3, full_window: bool = False) -> float:
    """First reward-query count at which the moving average (``smooth`` epochs) reaches ``target``; with
    ``full_window`` only once ``smooth`` epochs exist (the first epochs' shorter averages are noisier)."""
    ys = np.array([c["reward"] for c in curve])
    xs = np.array([c["reward_queries"] for c in curve])
    for i in range(smooth - 1 if full_window else 0, len(ys)):
        lo = max(0, i - smooth + 1)
        if ys[lo : i + 1].mean() >= target:
            return float(xs[i])
    return math.inf


def summarize(runs: list[dict]) -> dict:
    modes = sorted({r["mode"] for r in runs})
    summary = {}
    for m in modes:
        rs = [r for r in runs if r["mode"] == m]
        fin = [r["final_eval"] for r in rs]
        summary[m] = {
            "seeds": [r["seed"] for r in rs],
            "final_digit_prob_mean": float(np.mean([f["digit_prob"] for f in fin])),
            "final_digit_prob_std": float(np.std([f["digit_prob"] for f in fin])),
            "final_digit_correct_mean": float(np.mean([f.get("digit_correct", float("nan")) for f in fin])),
            "base_diversity_pairwise_l2": float(np.mean([r["base_eval"]["diversity_pairwise_l2"] for r in rs])),
            "final_diversity_pairwise_l2": float(np.mean([f["diversity_pairwise_l2"] for f in fin])),
            "base_diversity_pixel_std": float(np.mean([r["base_eval"]["diversity_pixel_std"] for r in rs])),
            "final_diversity_pixel_std": float(np.mean([f["diversity_pixel_std"] for f in fin])),
            "base_digit_prob_mean": float(np.mean([r["base_eval"]["digit_prob"] for r in rs])),
            "last3_train_reward_mean": float(np.mean([np.mean([c["reward"] for c in r["curve"][-3:]]) for r in rs])),
            "mean_epoch_seconds": float(np.mean([r["mean_epoch_seconds"] for r in rs])),
        }
    if "gae" in summary and "grpo" in summary:
        target = summary["grpo"]["last3_train_reward_mean"]
        budget = max(r["reward_queries"] for r in runs)
        reach = [queries_to_reach(r["curve"], target) for r in runs if r["mode"] == "gae"]
        # GRPO spent its whole budget to reach its final reward; GAE's queries (value pretraining included) to reach
        # the same, over GRPO's: the goal is <= 0.5.  null when GAE's median seed never reaches it.
        grpo_queries = max(r["reward_queries"] for r in runs if r["mode"] == "grpo")
        ratio = float(np.median(reach)) / grpo_queries
        summary["gae_queries_to_reach_grpo_final"] = {
            "grpo_final_train_reward": target,
            "per_seed": reach,
            "median_fraction_of_budget": float(np.median(reach) / budget),
        }
        summary["queries_ratio_median"] = ratio if math.isfinite(ratio) else None
    return summary


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for m, color in zip(["gae", "grpo", "ddpo"], ["C0", "C1", "C2"]):
        rs = [r for r in runs if r["mode"] == m]
        if not rs:
            continue
        n = min(len(r["curve"]) for r in rs)
        xs = np.array([c["reward_queries"] for c in rs[0]["curve"][:n]])
        for ax, key in zip(axes, ["reward", "digit_correct"]):
            ys = np.array([[c[key] for c in r["curve"][:n]] for r in rs])
            ax.plot(xs, ys.mean(0), color=color, label=f"{m} ({len(rs)} seeds)")
            ax.fill_between(xs, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), color=color, alpha=0.2)
    for ax, title in zip(axes, ["digit_prob (trained reward)", "digit_correct (reported)"]):
        ax.set_xlabel("reward queries")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--modes", nargs="+", default=["gae", "grpo", "ddpo"])
    p.add_argument("--budget", type=int, default=1920, help="reward queries per run")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="PPOConfig overrides for every mode (critic fields only matter for gae)")
    p.add_argument("--gae-config", default="digits", help="the run config GAE starts from (e.g. digits_ecg)")
    p.add_argument("--out", default=str(RESULTS / "digits_advantages"))
    args = p.parse_args(argv)
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    workdir = RESULTS / "tmp" / "digits_advantages"
    runs = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for mode in args.modes:  # interleaved: every seed runs all modes back to back
            r = run_one(mode, seed, args.budget, overrides, workdir, args.gae_config)
            print(f"{mode} seed {seed}: final {r['final_eval']} base {r['base_eval']} ({r['seconds']:.0f} s)",
                  flush=True)
            runs.append(r)
            summary = summarize(runs)
            result = {"budget_reward_queries": args.budget, "overrides": overrides, "gae_config": args.gae_config,
                      "queries_ratio_median": summary.get("queries_ratio_median"), "summary": summary,
                      "runs": runs, "machine": machine_info()}
            out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float))
    plot(runs, out.with_suffix(".png"))
    print(json.dumps(result["summary"], indent=2, default=float))
    return result


if __name__ == "__main__":
    main()
