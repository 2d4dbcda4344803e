"""GAE (latent critic) vs GRPO vs DDPO on the tiny text-to-image task (`composition` reward), at an equal
budget of reward queries, with the held-out prompts' accuracy before and after.

    python benchmarks/t2i_advantages.py --seeds 0 1 2 --budget 1280
    python benchmarks/t2i_advantages.py --modes gae_group --out /tmp/b      # one mode, merged later:
    python benchmarks/t2i_advantages.py --merge /tmp/a.json /tmp/b.json     # one summary over both files' runs
    python benchmarks/t2i_advantages.py --config t2i_sd3 --modes gae_group grpo   # the flow-matching twin

Modes (:data:`MODES`): gae, gae_group (GAE with ``gae_group_baseline``: advantages centred within each prompt's
group), grpo, ddpo, and gae_x0 / gae_group_x0 (the same with ``critic_x0_reward``: the value head also reads the
reward of the policy's one-step x0 prediction at each state; those reward calls are reported as ``x0_reward_rows``,
apart from the budget of reward queries on samples).

The shipped pipeline ``critic_align/assets/tiny_t2i`` trained through the Stable Diffusion path with
``train/configs/t2i.yaml`` (``--config t2i_sd3``: its flow-matching twin ``tiny_t2i_sd3`` through the SD3 path
with ``train/configs/t2i_sd3.yaml``); only the advantage estimator differs between modes; GAE's value-pretraining
rollouts count against its budget.  Before and after training, the policy samples a fixed set of training
prompts and a fixed set of held-out prompts (never trained on) with fixed noise; both are judged with
``composition`` (dense) and ``composition_correct`` (all clauses right, GenEval's metric).
Writes ``benchmarks/results/<config>_advantages.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from digits_advantages import queries_to_reach  # noqa: E402
from harness import evaluate, machine_info  # noqa: E402
from report_t2i import CONFIGS, CRITIC_MODES, MODES  # noqa: E402,F401  (CONFIGS: t2i_critic_offline imports it from here)

from critic_align.api import build_trainer  # noqa: E402
from critic_align.rewards import CompositionCorrect, CompositionScore, MultiReward  # noqa: E402
from critic_align.tasks.digits import ASSETS  # noqa: E402
from critic_align.tasks.sd import read_prompts  # noqa: E402
from critic_align.train.registry import load_run_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# --config -> (its shipped pipeline under critic_align/assets, the pipeline class and path named in the report)
# mode -> PPOConfig overrides on top of train/configs/<config>.yaml (the only difference between modes)


def eval_prompts(n: int, config: str = "t2i", seed: int = 0) -> dict[str, list[str]]:
    """A fixed draw of ``n`` training and ``n`` held-out prompts of the config's shipped model."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, fname in (("train", "train_prompts.txt"), ("heldout", "heldout_prompts.txt")):
        prompts = read_prompts(ASSETS / CONFIGS[config][0] / fname)
        out[split] = [prompts[i] for i in rng.choice(len(prompts), size=n, replace=False)]
    return out


def evaluate_policy(trainer, prompts: dict[str, list[str]], seed: int = 999) -> dict:
    """composition / composition_correct means of the policy's samples (the trained stochastic sampler, fixed
    noise) on each prompt set."""
    judge = MultiReward([CompositionScore(), CompositionCorrect()])
    return {split: evaluate(trainer, ps, [judge], seed=seed).means for split, ps in prompts.items()}


def run_one(mode: str, seed: int, budget: int, overrides: dict, prompts: dict, workdir: Path,
            config: str = "t2i") -> dict:
    over = dict(overrides)
    over.update(MODES[mode], seed=seed, output_dir=str(workdir / f"{mode}_seed{seed}"), progress=False,
                grid_every=0, checkpoint_every=0, log_tensorboard=False)
    run = load_run_config(config, over)
    cfg = run["ppo"]
    pre = cfg.value_pretrain_epochs * cfg.batch_size if mode in CRITIC_MODES else 0
    cfg.num_epochs = max(1, (budget - pre) // cfg.batch_size)
    if Path(cfg.output_dir).exists():
        shutil.rmtree(cfg.output_dir)  # a scratch directory of this script (benchmarks/results/tmp)
    t0 = time.time()
    trainer = build_trainer(run)
    base_eval = evaluate_policy(trainer, prompts)
    if mode in CRITIC_MODES:
        trainer.pretrain_value()
    history = []
    for _ in range(cfg.num_epochs):
        res = trainer.train_epoch()
        trainer.log(res.metrics)
        history.append(res.metrics)
    final_eval = evaluate_policy(trainer, prompts)
    curve = [{"reward_queries": r["reward_queries"], "reward": r["reward/composition/mean"],
              "composition_correct": r.get("reward/composition_correct/mean"), "value_ev": r.get("value_ev")}
             for r in history]
    return {"mode": mode, "seed": seed, "reward_queries": trainer.reward_queries, "epochs": cfg.num_epochs,
            "pretrain_queries": pre, "x0_reward_rows": trainer.x0_reward_rows,
            "seconds": time.time() - t0, "base_eval": base_eval, "final_eval": final_eval,
            "curve": curve, "mean_epoch_seconds": float(np.mean([r["time_epoch_s"] for r in history]))}


def smoothing(runs: list[dict]) -> int:
    """Epochs of the training-reward moving average: a training batch holds batch_size / group_size prompts (4 at
    the benchmark's settings), so one epoch's mean reward mostly says which prompts were drawn; 1/16 of the run."""
    return max(3, min(len(r["curve"]) for r in runs) // 16)


def summarize(runs: list[dict]) -> dict:
    summary = {}
    smooth = smoothing(runs)
    for m in sorted({r["mode"] for r in runs}):
        rs = [r for r in runs if r["mode"] == m]
        s = {"seeds": [r["seed"] for r in rs], "mean_epoch_seconds": float(np.mean([r["mean_epoch_seconds"] for r in rs])),
             "x0_reward_rows": float(np.mean([r.get("x0_reward_rows", 0) for r in rs])),
             "final_train_reward_smoothed_mean": float(np.mean([np.mean([c["reward"] for c in r["curve"][-smooth:]])
                                                               for r in rs])),
             "first_train_reward_smoothed_mean": float(np.mean([np.mean([c["reward"] for c in r["curve"][:smooth]])
                                                               for r in rs]))}
        evs = [c["value_ev"] for r in rs for c in r["curve"][len(r["curve"]) // 2:] if c.get("value_ev") is not None]
        if evs:  # the critic's explained variance of the returns over the second half of training (training batches).
            # The median too: a batch whose samples are almost all right has a near-zero return variance, and its
            # EV (1 - var(residual) / var(return)) can be -1e4, which then decides the mean alone.
            s["value_ev_second_half_mean"] = float(np.mean(evs))
            s["value_ev_second_half_median"] = float(np.median(evs))
        for when in ("base", "final"):
            for split in ("train", "heldout"):
                for key in ("composition", "composition_correct"):
                    vals = [r[f"{when}_eval"][split][key] for r in rs]
                    s[f"{when}_{split}_{key}_mean"] = float(np.mean(vals))
                    s[f"{when}_{split}_{key}_std"] = float(np.std(vals))
        summary[m] = s
    for mode in CRITIC_MODES:
        if mode in summary and "grpo" in summary:
            target = summary["grpo"]["final_train_reward_smoothed_mean"]
            budget = max(r["reward_queries"] for r in runs)
            reach = [queries_to_reach(r["curve"], target, smooth, full_window=True) for r in runs if r["mode"] == mode]
            summary[f"{mode}_queries_to_reach_grpo_final"] = {
                "grpo_final_train_reward": target, "smoothing_epochs": smooth, "per_seed": reach,
                "median_fraction_of_budget": float(np.median(reach) / budget)}
    return summary


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for m, color in zip(MODES, ["C0", "C3", "C1", "C2", "C4", "C5"]):
        rs = [r for r in runs if r["mode"] == m]
        if not rs:
            continue
        n = min(len(r["curve"]) for r in rs)
        xs = np.array([c["reward_queries"] for c in rs[0]["curve"][:n]])
        ys = np.array([[c["reward"] for c in r["curve"][:n]] for r in rs])
        axes[0].plot(xs, ys.mean(0), color=color, label=f"{m} ({len(rs)} seeds)")
        axes[0].fill_between(xs, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), color=color, alpha=0.2)
        for k, split in enumerate(("train", "heldout")):
            before = np.mean([r["base_eval"][split]["composition_correct"] for r in rs])
            after = [r["final_eval"][split]["composition_correct"] for r in rs]
            x = list(MODES).index(m) * 3 + k
            axes[1].bar(x, np.mean(after), yerr=np.std(after), color=color, alpha=1.0 if k == 0 else 0.5,
                        label=f"{m} {split}")
            axes[1].plot([x - 0.4, x + 0.4], [before, before], color="k", lw=1)
    axes[0].set_xlabel("reward queries")
    axes[0].set_title("composition (trained reward, training batches)")
    axes[1].set_title("all clauses right after training (black: before)")
    axes[1].set_xticks([])
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)




def merge(paths: list[Path]) -> dict:
    """One result over the runs of several files of this benchmark; they must share the budget, the overrides and
    the evaluation prompts, and hold disjoint (mode, seed) runs. The machine recorded is the runs' (their timings were
    taken there), not the one merging; files timed on different machines or thread counts are refused."""
    datas = [json.loads(Path(p).read_text()) for p in paths]
    first = datas[0]
    for p, d in zip(paths[1:], datas[1:]):
        for key in ("budget_reward_queries", "overrides", "eval_prompts", "config", "machine"):
            if d.get(key, "t2i") != first.get(key, "t2i"):
                raise SystemExit(f"{p}: its {key} differs from {paths[0]}'s; merge runs made with the same settings")
    runs = [r for d in datas for r in d["runs"]]
    seen = [(r["mode"], r["seed"]) for r in runs]
    dup = sorted({k for k in seen if seen.count(k) > 1})
    if dup:
        raise SystemExit(f"the same (mode, seed) runs appear in two files: {dup}; merge files with disjoint runs")
    return {"config": first.get("config", "t2i"), "budget_reward_queries": first["budget_reward_queries"],
            "overrides": first["overrides"],
            "eval_prompts": first["eval_prompts"], "summary": summarize(runs), "runs": runs, "machine": first["machine"],
            "merged_from": [str(p) for p in paths]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="t2i", choices=list(CONFIGS), help="train/configs/<config>.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--modes", nargs="+", default=["gae", "grpo", "ddpo"], choices=list(MODES))
    p.add_argument("--budget", type=int, default=1280, help="reward queries per run")
    p.add_argument("--eval-prompts", type=int, default=64, help="training and held-out prompts evaluated")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="PPOConfig overrides")
    p.add_argument("--merge", nargs="+", type=Path, metavar="JSON", help="combine these result files into --out")
    p.add_argument("--out", help="path stem of the .json and .png (default benchmarks/results/<config>_advantages)")
    args = p.parse_args(argv)
    import yaml

    out = Path(args.out) if args.out else RESULTS / f"{args.config}_advantages"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge:
        result = merge(args.merge)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float))
        plot(result["runs"], out.with_suffix(".png"))
        print(f"merged {len(result['runs'])} runs from {len(args.merge)} files into {out.with_suffix('.json')}")
        return result
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    prompts = eval_prompts(args.eval_prompts, args.config)
    workdir = RESULTS / "tmp" / f"{args.config}_advantages"
    runs, result = [], {}
    for seed in args.seeds:
        for mode in args.modes:  # interleaved: every seed runs all modes back to back
            r = run_one(mode, seed, args.budget, overrides, prompts, workdir, args.config)
            print(f"{mode} seed {seed}: base {r['base_eval']} final {r['final_eval']} ({r['seconds']:.0f} s)", flush=True)
            runs.append(r)
            result = {"config": args.config, "budget_reward_queries": args.budget, "overrides": overrides,
                      "eval_prompts": prompts, "summary": summarize(runs), "runs": runs, "machine": machine_info()}
            out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float))
    plot(runs, out.with_suffix(".png"))
    print(json.dumps(result["summary"], indent=2, default=float))
    return result


if __name__ == "__main__":
    main()
