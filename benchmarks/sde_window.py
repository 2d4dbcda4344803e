"""The SDE window at equal wall-clock (issue 18): reward reached vs training time, window vs full trajectories.

    python benchmarks/sde_window.py                                  # digits, 3 seeds, full / W=4 / W=2
    python benchmarks/sde_window.py --windows 0 4 --seconds 60 --seeds 0 --out /tmp/w.json   # a quick look

Every run trains the main job's configuration (``train/configs/digits.yaml``: value pretraining + PPO/GAE on
digit_prob) for the same budget of *training* wall-clock seconds (value pretraining included; the evaluations are
not counted), differing only in ``sde_window_size`` (0 = every step stochastic and trained, the full MDP; W = one
window of W steps per epoch, placed uniformly at random, the rest the deterministic DDIM ODE).  Every
``--eval-every-s`` seconds of training the policy is evaluated on fixed noises (200 samples, 20 per digit, the full
stochastic sampler at eta = 1 for every run, so the numbers compare): digit_prob, digit_correct and within-prompt
diversity.  The configurations of one seed run back to back, so a slow or busy machine affects them alike.

Reported per window size: the eval reward at the end of the budget (mean ± std over seeds), the curve (mean over
seeds at each eval time), epochs and reward queries done within the budget.  Writes ``--out`` (default
benchmarks/results/sde_window.json) and a plot next to it after every run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from digits_advantages import _machine, evaluate_policy  # noqa: E402

from train.registry import build_trainer, load_run_config  # noqa: E402


def run_one(window: int, seed: int, seconds: float, eval_every_s: float, config: str, workdir: Path,
            overrides: dict) -> dict:
    over = {**overrides, "sde_window_size": window, "seed": seed, "num_epochs": 10_000,
            "output_dir": str(workdir / f"w{window}_seed{seed}"), "progress": False, "grid_every": 0,
            "checkpoint_every": 0, "log_tensorboard": False, "eval_every": 0}
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
        rewards.append(res.metrics["reward/digit_prob/mean"])
        if train_s >= next_eval or train_s >= seconds:
            evaluate(train_s)
            next_eval += eval_every_s
    final = curve[-1]
    return {"window": window, "seed": seed, "epochs": trainer.epoch, "reward_queries": trainer.reward_queries,
            "train_seconds": train_s, "value_pretrain_seconds": pretrain_s,
            "seconds_per_epoch": float(np.mean(epoch_s)) if epoch_s else None, "final_digit_prob": final["digit_prob"],
            "final_digit_correct": final.get("digit_correct"),
            "final_diversity_pairwise_l2": final["diversity_pairwise_l2"],
            "base_digit_prob": curve[0]["digit_prob"], "base_diversity_pairwise_l2": curve[0]["diversity_pairwise_l2"],
            "curve": curve, "train_reward_per_epoch": rewards}


def summarize(runs: list[dict], seconds: float, eval_every_s: float) -> dict:
    out = {}
    grid = np.arange(0.0, seconds + 1e-9, eval_every_s)
    for w in sorted({r["window"] for r in runs}):
        mine = [r for r in runs if r["window"] == w]
        fin = np.array([r["final_digit_prob"] for r in mine])
        # each run's eval reward on a common time grid (the last eval at or before each grid time)
        curves = []
        for r in mine:
            ts = np.array([c["train_seconds"] for c in r["curve"]])
            ys = np.array([c["digit_prob"] for c in r["curve"]])
            curves.append([ys[ts <= g + 1e-9][-1] for g in grid])
        out[str(w)] = {
            "label": "full trajectories" if w == 0 else f"window of {w} steps",
            "seeds": len(mine),
            "final_digit_prob_mean": float(fin.mean()),
            "final_digit_prob_std": float(fin.std(ddof=1)) if len(fin) > 1 else None,
            "final_digit_correct_mean": float(np.mean([r["final_digit_correct"] for r in mine])),
            "final_diversity_kept_mean": float(np.mean([r["final_diversity_pairwise_l2"] / r["base_diversity_pairwise_l2"]
                                                        for r in mine])),
            "epochs_mean": float(np.mean([r["epochs"] for r in mine])),
            "reward_queries_mean": float(np.mean([r["reward_queries"] for r in mine])),
            "seconds_per_epoch_mean": float(np.mean([r["seconds_per_epoch"] for r in mine])),
            "value_pretrain_seconds_mean": float(np.mean([r["value_pretrain_seconds"] for r in mine])),
            "curve_seconds": grid.tolist(), "curve_digit_prob_mean": np.mean(curves, axis=0).tolist(),
        }
    if "0" in out:
        for s in out.values():
            s["final_minus_full"] = s["final_digit_prob_mean"] - out["0"]["final_digit_prob_mean"]
    return out


def section(path: Path) -> str:
    """The BENCHMARKS.md section (benchmarks/report.py) rendered from ``sde_window.json``."""
    d = json.loads(Path(path).read_text())
    a = d["args"]

    def fmt(x, digits=3):
        return "n/a" if x is None else f"{x:.{digits}f}"

    lines = ["## SDE window vs full trajectories at equal wall-clock (digits)", "",
             f"Command: `python benchmarks/sde_window.py` (writes `benchmarks/results/sde_window.json` and `.png`; "
             f"{d['time_s']:.0f} s in all on {d['machine'].get('cpu_count')} CPU cores). Config `{a['config']}` "
             f"(overrides {d['overrides'] or 'none'}), seeds {a['seeds']}, {a['seconds']:.0f} s of training per run "
             "(value pretraining included, evaluations not), the configurations of each seed back to back. The reward "
             "is the held-out digit_prob of 200 samples on fixed noises from the full stochastic sampler (eta = 1) for "
             "every run; diversity kept = final / base within-prompt pairwise L2.", "",
             "| trajectories | final digit_prob (mean ± std) | − full | digit_correct | diversity kept | epochs in "
             "the budget | s / epoch | value pretraining s |", "|---|---|---|---|---|---|---|---|"]
    for _w, r in d["summary"].items():
        lines.append(f"| {r['label']} | {fmt(r['final_digit_prob_mean'])} ± {fmt(r['final_digit_prob_std'])} | "
                     f"{fmt(r.get('final_minus_full'))} | {fmt(r['final_digit_correct_mean'])} | "
                     f"{fmt(r['final_diversity_kept_mean'], 2)} | {r['epochs_mean']:.0f} | "
                     f"{fmt(r['seconds_per_epoch_mean'], 2)} | {fmt(r['value_pretrain_seconds_mean'], 0)} |")
    lines += ["", "![reward vs wall-clock](benchmarks/results/sde_window.png)", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for _w, s in result["summary"].items():
        ax.plot(s["curve_seconds"], s["curve_digit_prob_mean"], marker="o", label=f"{s['label']} ({s['seeds']} seeds)")
    ax.set_xlabel("training wall-clock seconds (value pretraining included)")
    ax.set_ylabel("held-out digit_prob (full stochastic sampler)")
    ax.set_title("SDE window vs full trajectories at equal wall-clock (digits)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="digits")
    p.add_argument("--windows", nargs="+", type=int, default=[0, 4, 2], help="sde_window_size values (0 = full)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--seconds", type=float, default=240.0, help="training wall-clock budget per run")
    p.add_argument("--eval-every-s", type=float, default=40.0)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="PPOConfig overrides for every run")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sde_window.json"))
    args = p.parse_args(argv)
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = ROOT / "benchmarks" / "results" / "tmp" / "sde_window"
    runs, t0 = [], time.time()
    result: dict = {}
    for seed in args.seeds:
        for w in args.windows:
            r = run_one(w, seed, args.seconds, args.eval_every_s, args.config, workdir, overrides)
            runs.append(r)
            print(f"window {w} seed {seed}: digit_prob {r['base_digit_prob']:.4f} -> {r['final_digit_prob']:.4f} "
                  f"in {r['epochs']} epochs ({r['train_seconds']:.0f} s)", flush=True)
            result = {"benchmark": "sde_window", "args": vars(args), "overrides": overrides,
                      "summary": summarize(runs, args.seconds, args.eval_every_s), "runs": runs,
                      "machine": _machine(), "time_s": time.time() - t0}
            out.write_text(json.dumps(result, indent=1, default=float))
            plot(result, out.with_suffix(".png"))
    print(json.dumps(result["summary"], indent=1, default=float))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
