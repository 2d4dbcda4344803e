"""The SDE window at equal wall-clock (issue 18): reward reached vs training time, window vs full trajectories.

    python benchmarks/sde_window.py                                  # digits, 3 seeds, full / W=4 / W=2
    python benchmarks/sde_window.py --config t2i --windows 0 4 --seconds 300   # the tiny text-to-image task
    python benchmarks/sde_window.py --windows 0 4 --seconds 60 --seeds 0 --out /tmp/w.json   # a quick look

Every run trains the main job's configuration (``train/configs/digits.yaml``: value pretraining + PPO/GAE on
digit_prob) for the same budget of *training* wall-clock seconds (value pretraining included; the evaluations are
not counted), differing only in ``sde_window_size`` (0 = every step stochastic and trained, the full MDP; W = one
window of W steps per epoch, placed uniformly at random, the rest the deterministic DDIM ODE).  Every
``--eval-every-s`` seconds of training the policy is evaluated on fixed noises with the full stochastic sampler at
eta = 1 for every run, so the numbers compare.  digits: 200 samples, 20 per digit: digit_prob, digit_correct and
within-prompt diversity.  t2i (``--config t2i``, whose config places the window in the first steps: a window run keeps
that ``sde_window_range``, the full run drops it): the held-out prompts of ``t2i_advantages.py`` (``--eval-prompts``,
one sample each): composition (dense, trained) and composition_correct (all clauses, GenEval's metric); no diversity.
The configurations of one seed run back to back, so a slow or busy machine affects them alike.

Reported per window size: the eval reward at the end of the budget (mean ± std over seeds), the curve (mean over
seeds at each eval time), epochs and reward queries done within the budget.  Writes ``--out`` (default
benchmarks/results/sde_window.json) and a plot next to it after every run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from digits_advantages import evaluate_policy as evaluate_digits  # noqa: E402
from harness import machine_info  # noqa: E402
from report_training import METRICS, _describe  # noqa: E402

from critic_align.api import build_trainer  # noqa: E402
from critic_align.train.registry import load_run_config  # noqa: E402

# per config: the trained reward's key (the metric compared), its 0/1 companion, and whether diversity is measured


def evaluator(config: str, eval_prompts: int):
    """A function trainer -> {metric: value} on fixed noises and prompts (the full stochastic sampler)."""
    if config != "t2i":
        return evaluate_digits
    from t2i_advantages import eval_prompts as t2i_prompts
    from t2i_advantages import evaluate_policy as evaluate_t2i

    prompts = {"heldout": t2i_prompts(eval_prompts)["heldout"]}
    return lambda trainer: evaluate_t2i(trainer, prompts)["heldout"]


def run_one(window: int, seed: int, seconds: float, eval_every_s: float, config: str, workdir: Path,
            overrides: dict, evaluate_policy=evaluate_digits) -> dict:
    metric, correct, _ = METRICS.get(config, METRICS["digits"])
    over = {**overrides, "sde_window_size": window, "seed": seed, "num_epochs": 10_000,
            "output_dir": str(workdir / f"w{window}_seed{seed}"), "progress": False, "grid_every": 0,
            "checkpoint_every": 0, "log_tensorboard": False, "eval_every": 0}
    if window == 0:
        over["sde_window_range"] = None  # a config's window placement does not apply to full trajectories
    run = load_run_config(config, over)
    shutil.rmtree(run["ppo"].output_dir, ignore_errors=True)
    trainer = build_trainer(run)
    curve = []

    def evaluate(train_s):
        ev = evaluate_policy(trainer)
        curve.append({"train_seconds": train_s, "epoch": trainer.epoch, "reward_queries": trainer.reward_queries,
                      **ev})

    evaluate(0.0)
    train_s, next_eval = 0.0, eval_every_s
    t0 = time.time()
    if trainer.critic is not None:
        trainer.pretrain_value()
    train_s += time.time() - t0
    pretrain_s = train_s
    rewards, epoch_s = [], []
    while train_s < seconds:
        t0 = time.time()
        res = trainer.train_epoch()
        epoch_s.append(time.time() - t0)
        train_s += epoch_s[-1]
        rewards.append(res.metrics[f"reward/{metric}/mean"])
        if train_s >= next_eval or train_s >= seconds:
            evaluate(train_s)
            next_eval += eval_every_s
    final = curve[-1]
    return {"window": window, "seed": seed, "epochs": trainer.epoch, "reward_queries": trainer.reward_queries,
            "train_seconds": train_s, "value_pretrain_seconds": pretrain_s,
            "seconds_per_epoch": float(np.mean(epoch_s)) if epoch_s else None, f"final_{metric}": final[metric],
            f"final_{correct}": final.get(correct),
            "final_diversity_pairwise_l2": final.get("diversity_pairwise_l2"),
            f"base_{metric}": curve[0][metric], "base_diversity_pairwise_l2": curve[0].get("diversity_pairwise_l2"),
            "curve": curve, "train_reward_per_epoch": rewards}


def summarize(runs: list[dict], seconds: float, eval_every_s: float, config: str = "digits") -> dict:
    metric, correct, diversity = METRICS.get(config, METRICS["digits"])
    out = {}
    grid = np.arange(0.0, seconds + 1e-9, eval_every_s)
    for w in sorted({r["window"] for r in runs}):
        mine = [r for r in runs if r["window"] == w]
        fin = np.array([r[f"final_{metric}"] for r in mine])
        # each run's eval reward on a common time grid (the last eval at or before each grid time)
        curves = []
        for r in mine:
            ts = np.array([c["train_seconds"] for c in r["curve"]])
            ys = np.array([c[metric] for c in r["curve"]])
            curves.append([ys[ts <= g + 1e-9][-1] for g in grid])
        out[str(w)] = {
            "label": "full trajectories" if w == 0 else f"window of {w} steps",
            "seeds": len(mine),
            f"base_{metric}_mean": float(np.mean([r[f"base_{metric}"] for r in mine])),
            f"final_{metric}_mean": float(fin.mean()),
            f"final_{metric}_std": float(fin.std(ddof=1)) if len(fin) > 1 else None,
            f"final_{correct}_mean": float(np.mean([r[f"final_{correct}"] for r in mine])),
            "final_diversity_kept_mean": float(np.mean([r["final_diversity_pairwise_l2"] / r["base_diversity_pairwise_l2"]
                                                        for r in mine])) if diversity else None,
            "epochs_mean": float(np.mean([r["epochs"] for r in mine])),
            "reward_queries_mean": float(np.mean([r["reward_queries"] for r in mine])),
            "seconds_per_epoch_mean": (float(np.mean([r["seconds_per_epoch"] for r in mine]))
                                       if all(r["seconds_per_epoch"] is not None for r in mine) else None),
            "value_pretrain_seconds_mean": float(np.mean([r["value_pretrain_seconds"] for r in mine])),
            "curve_seconds": grid.tolist(), f"curve_{metric}_mean": np.mean(curves, axis=0).tolist(),
        }
    if "0" in out:
        for s in out.values():
            s["final_minus_full"] = s[f"final_{metric}_mean"] - out["0"][f"final_{metric}_mean"]
    return out






def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = result["args"]["config"]
    metric = METRICS.get(config, METRICS["digits"])[0]
    fig, ax = plt.subplots(figsize=(6, 4))
    for _w, s in result["summary"].items():
        ax.plot(s["curve_seconds"], s[f"curve_{metric}_mean"], marker="o", label=f"{s['label']} ({s['seeds']} seeds)")
    ax.set_xlabel("training wall-clock seconds (value pretraining included)")
    ax.set_ylabel(f"held-out {metric} (full stochastic sampler)")
    ax.set_title(f"SDE window vs full trajectories at equal wall-clock ({_describe(config)[0]})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="digits", choices=sorted(METRICS))
    p.add_argument("--windows", nargs="+", type=int, default=[0, 4, 2], help="sde_window_size values (0 = full)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--seconds", type=float, default=240.0, help="training wall-clock budget per run")
    p.add_argument("--eval-every-s", type=float, default=40.0)
    p.add_argument("--eval-prompts", type=int, default=128, help="t2i: held-out prompts evaluated (one sample each)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="PPOConfig overrides for every run")
    p.add_argument("--out", help="default benchmarks/results/sde_window.json (digits), sde_window_<config>.json otherwise")
    args = p.parse_args(argv)
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    name = "sde_window.json" if args.config == "digits" else f"sde_window_{args.config}.json"
    out = Path(args.out or ROOT / "benchmarks" / "results" / name)
    args.out = str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = ROOT / "benchmarks" / "results" / "tmp" / f"sde_window_{args.config}"
    evaluate = evaluator(args.config, args.eval_prompts)
    metric = METRICS[args.config][0]
    runs, t0 = [], time.time()
    result: dict = {}
    for seed in args.seeds:
        for w in args.windows:
            r = run_one(w, seed, args.seconds, args.eval_every_s, args.config, workdir, overrides, evaluate)
            runs.append(r)
            print(f"window {w} seed {seed}: {metric} {r[f'base_{metric}']:.4f} -> {r[f'final_{metric}']:.4f} "
                  f"in {r['epochs']} epochs ({r['train_seconds']:.0f} s)", flush=True)
            result = {"benchmark": "sde_window", "args": vars(args), "overrides": overrides,
                      "summary": summarize(runs, args.seconds, args.eval_every_s, args.config), "runs": runs,
                      "machine": machine_info(), "time_s": time.time() - t0}
            out.write_text(json.dumps(result, indent=1, default=float))
            plot(result, out.with_suffix(".png"))
    print(json.dumps(result["summary"], indent=1, default=float))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
