"""Reward hacking on digits: a hackable reward alone vs jointly with digit_prob, same budget, several seeds.

    python benchmarks/reward_hacking.py --seeds 0 1 2

'single' trains on ``boldness`` (mean ink) alone (``train/configs/digits_hack_single.yaml``); 'joint' trains on
``boldness`` and ``digit_prob`` with two critic heads, GAE per head and ``normalize_then_sum``
(``train/configs/digits_hack_joint.yaml``).  Both use GAE, the same epochs, batch and value pretraining, so the
same number of reward queries.  Every run is evaluated, before and after, on the same fixed set (20 samples per
digit, fixed noise, the stochastic sampler as trained) with every reward: boldness, digit_prob (temperature 6)
and digit_correct.

Writes ``benchmarks/results/reward_hacking.json`` (final value of every reward per seed for single and joint,
the base model's values, per-epoch curves), ``reward_hacking.png`` (curves, mean ± std over seeds) and sample
grids ``reward_hacking/grid_{base,single,joint}_seed<S>.png`` for the first seed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from harness import evaluate, machine_info, per_prompt

ROOT = Path(__file__).resolve().parents[1]

from critic_align.api import build_trainer  # noqa: E402
from critic_align.train.registry import build_rewards, load_run_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = {"single": "digits_hack_single", "joint": "digits_hack_joint"}
EVAL_SPEC = [{"name": "boldness"}, {"name": "digit_prob", "temperature": 6.0}, {"name": "digit_correct"}]
CURVE_KEYS = ("boldness", "digit_prob", "digit_correct")


def evaluate_rewards(trainer, rewards, per_class: int = 20, seed: int = 999, use_policy: bool = True,
                     grid=None) -> dict:
    """Mean of every evaluation reward on a fixed set of prompts and noises; optionally save an 8-per-row grid."""
    prompts = per_prompt(trainer.task.prompts, per_class)
    ev = evaluate(trainer, prompts, [rewards], seed=seed, use_policy=use_policy)
    if grid is not None:
        from critic_align.viz import save_grid

        keep = torch.tensor([i for i in range(len(prompts)) if i % per_class < 8])
        save_grid(ev.samples[keep], grid, nrow=8, labels=list(trainer.task.prompts))
    return ev.means


def run_one(variant: str, seed: int, overrides: dict, workdir: Path, grids: Path | None) -> dict:
    over = dict(overrides)
    over.update(seed=seed, output_dir=str(workdir / f"{variant}_seed{seed}"), progress=False, grid_every=0,
                checkpoint_every=0, log_tensorboard=False)
    run = load_run_config(CONFIGS[variant], over)
    cfg = run["ppo"]
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    t0 = time.time()
    trainer = build_trainer(run)
    eval_rewards = build_rewards(EVAL_SPEC)
    base = evaluate_rewards(trainer, eval_rewards, use_policy=False,
                    grid=grids / f"grid_base_seed{seed}.png" if grids else None)
    pre_logs = trainer.pretrain_value()
    history = []
    for _ in range(cfg.num_epochs):
        res = trainer.train_epoch()
        trainer.log(res.metrics)
        history.append(res.metrics)
    final = evaluate_rewards(trainer, eval_rewards, grid=grids / f"grid_{variant}_seed{seed}.png" if grids else None)
    curve = [{"epoch": r["epoch"], "reward_queries": r["reward_queries"],
              **{k: r.get(f"reward/{k}/mean") for k in CURVE_KEYS},
              **{k: v for k, v in r.items() if k.startswith("value_ev/")}} for r in history]
    return {
        "variant": variant, "seed": seed, "trained_rewards": list(trainer.rewards.names),
        "weights": trainer.reward_weights.tolist(), "epochs": cfg.num_epochs, "reward_queries": trainer.reward_queries,
        "seconds": time.time() - t0, "base_eval": base, "final_eval": final, "curve": curve,
        "pretrain_value_ev": {k: v for k, v in pre_logs[-1].items() if k.startswith("pre_value_ev")} if pre_logs else {},
        "mean_epoch_seconds": float(np.mean([r["time_epoch_s"] for r in history])),
    }


def summarize(runs: list[dict]) -> dict:
    base = runs[0]["base_eval"]  # the base model and the evaluation set do not depend on the run
    out = {"base": base}
    for variant in CONFIGS:
        rs = [r for r in runs if r["variant"] == variant]
        if not rs:
            continue
        s = {"seeds": [r["seed"] for r in rs], "trained_rewards": rs[0]["trained_rewards"], "weights": rs[0]["weights"]}
        for key in CURVE_KEYS:
            vals = [r["final_eval"][key] for r in rs]
            s[f"final_{key}_per_seed"] = vals
            s[f"final_{key}_mean"] = float(np.mean(vals))
            s[f"final_{key}_std"] = float(np.std(vals))
        s["mean_epoch_seconds"] = float(np.mean([r["mean_epoch_seconds"] for r in rs]))
        s["reward_queries"] = rs[0]["reward_queries"]
        out[variant] = s
    if "joint" in out:
        out["joint_digit_correct_drop_points"] = 100 * (base["digit_correct"] - out["joint"]["final_digit_correct_mean"])
    if "single" in out:
        out["single_digit_correct_drop_points"] = 100 * (base["digit_correct"] - out["single"]["final_digit_correct_mean"])
    return out


def plot(runs: list[dict], base: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVE_KEYS), figsize=(4.2 * len(CURVE_KEYS), 3.5))
    for variant, color in zip(CONFIGS, ["C3", "C0"]):
        rs = [r for r in runs if r["variant"] == variant]
        if not rs:
            continue
        n = min(len(r["curve"]) for r in rs)
        xs = np.array([c["reward_queries"] for c in rs[0]["curve"][:n]])
        label = f"{variant}: {' + '.join(rs[0]['trained_rewards'])} ({len(rs)} seeds)"
        for ax, key in zip(axes, CURVE_KEYS):
            ys = np.array([[c[key] for c in r["curve"][:n]] for r in rs], dtype=float)
            ax.plot(xs, ys.mean(0), color=color, label=label)
            ax.fill_between(xs, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), color=color, alpha=0.2)
    for ax, key in zip(axes, CURVE_KEYS):
        ax.axhline(base[key], color="k", ls="--", lw=1, label="base model (eval set)")
        ax.set_xlabel("reward queries")
        ax.set_title(f"{key} (training batch)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="PPOConfig overrides applied to both configs (keep the budgets equal)")
    p.add_argument("--out", default=str(RESULTS / "reward_hacking"))
    args = p.parse_args(argv)
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grids_dir = out.parent / out.name
    workdir = RESULTS / "tmp" / "reward_hacking"
    runs = []
    from tqdm import tqdm

    jobs = [(s, v) for s in args.seeds for v in args.variants]  # interleaved: each seed runs both variants
    result = {}
    for seed, variant in tqdm(jobs, desc="reward hacking runs"):
        r = run_one(variant, seed, overrides, workdir, grids_dir if seed == args.seeds[0] else None)
        print(f"{variant} seed {seed}: final {r['final_eval']} base {r['base_eval']} ({r['seconds']:.0f} s)", flush=True)
        runs.append(r)
        result = {"overrides": overrides, "configs": {v: f"train/configs/{CONFIGS[v]}.yaml" for v in args.variants},
                  "eval_set": "20 samples per digit, noise seed 999, stochastic sampler (eta as trained)",
                  "summary": summarize(runs), "runs": runs, "machine": machine_info()}
        out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float))
    plot(runs, result["summary"]["base"], out.with_suffix(".png"))
    print(json.dumps(result["summary"], indent=2, default=float))
    return result


if __name__ == "__main__":
    main()
