"""The strongest baselines next to the latent critic, at an equal budget of reward queries (issue 19).

    python benchmarks/baselines.py                           # 5 methods x 2 tasks x 3 seeds (hours on one core)
    python benchmarks/baselines.py --tasks gmm --seeds 0 --budget-gmm 320 --budget-digits 48 \\
        --digits-set num_inference_steps=4 --digits-set batch_size=16 --digits-set group_size=4 \\
        --out /tmp/baselines.json                            # smoke run

Methods (one engine; only the update / the advantage differ):
  gae         PPO with the latent critic's GAE advantages (value pretraining counts against the budget; on digits
              the critic settings benchmarks/digits_advantages.py found best, ``DIGITS_CRITIC``)
  grpo        PPO with group-relative advantages (Flow-GRPO)
  nft         DiffusionNFT (critic_align/algorithms/nft.py), r from the group-relative advantage
  awm         advantage-weighted matching with the group-relative advantage
  awm_critic  advantage-weighted matching with the critic's per-timestep advantage R − V(x_t, t)

Tasks: ``digits_dit`` (the shipped rectified-flow DiT, ``train/configs/digits_dit.yaml``, reward digit_prob) and
``gmm`` (the exact 2-D mixture, critic_align/tasks/gmm.py, an ε-prediction model = the exact ε + a zero-initialised
residual MLP, linear reward w·x, the same settings as benchmarks/gmm_finetune.py).

Reported per task and method: the final reward (mean ± std over seeds; digits: digit_prob of the final policy on
fixed noises, 20 samples per class; gmm: the mean linear reward of ``--n-eval`` samples), and the reward queries
each seed needed for its training reward (3-epoch moving average) to reach the best *baseline's* final training
reward (the best of grpo / nft / awm by final training reward; null if never reached).  The issue's goal: a
critic method (gae, awm_critic) reaches it with <= 0.5x the queries.  Writes ``--out`` (default
benchmarks/results/baselines.json) after every run.

A run of all 30 takes hours on one core, so it can be split and picked up again:

    python benchmarks/baselines.py --resume                  # skip the (task, method, seed) runs already in --out
    python benchmarks/baselines.py --tasks gmm --seeds 0 1 --out /tmp/a.json   # ... one part per core, then
    python benchmarks/baselines.py --merge /tmp/a.json /tmp/b.json            # one summary over all parts

Resume and merge refuse files whose settings (budgets, overrides, mixture settings) differ from this run's.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from digits_advantages import evaluate_policy, queries_to_reach  # noqa: E402
from harness import machine_info  # noqa: E402

from critic_align.backbones import MLP_LORA_TARGETS, MLPAdapter, MLPDenoiser, ResidualMLP  # noqa: E402
from critic_align.checkpoint import DivergenceError  # noqa: E402
from critic_align.config import PPOConfig, not_applicable  # noqa: E402
from critic_align.rewards import FunctionReward, MultiReward  # noqa: E402
from critic_align.tasks.gmm import GMMTask, LinearReward  # noqa: E402
from critic_align.trainer import Trainer  # noqa: E402

METHODS = {
    "gae": dict(algorithm="ppo", advantage="gae"),
    "grpo": dict(algorithm="ppo", advantage="grpo"),
    "nft": dict(algorithm="nft", advantage="grpo"),
    "awm": dict(algorithm="awm", advantage="grpo", awm_advantage="grpo"),
    "awm_critic": dict(algorithm="awm", advantage="gae", awm_advantage="critic"),
}
# the digits critic the advantage comparison found best (benchmarks/results/digits_advantages.json's overrides:
# mid features, λ-return value pretraining, GAE at GRPO's advantage unit); --digits-set overrides it
DIGITS_CRITIC = dict(critic_features="mid", critic_cond=False, value_perturbed_per_sample=0,
                     value_pretrain_target="td_lambda", advantage_scale="rewards")
BASELINES = ("grpo", "nft", "awm")
CRITIC_METHODS = ("gae", "awm_critic")
GMM_W = (1.0, 0.5)


def epochs_for(budget: int, batch: int, pretrain_batches: int, needs_critic: bool) -> tuple[int, int]:
    """(training epochs, value-pretraining queries) that fit ``budget`` reward queries."""
    pre = pretrain_batches * batch if needs_critic else 0
    return max(1, (budget - pre) // batch), pre


def run_digits(method: str, seed: int, budget: int, overrides: dict, workdir: Path) -> dict:
    from critic_align.api import build_trainer
    from critic_align.train.registry import load_run_config

    critic = DIGITS_CRITIC if METHODS[method]["advantage"] == "gae" else {}
    over = {**critic, **overrides, **METHODS[method], "seed": seed, "output_dir": str(workdir / f"digits_{method}_seed{seed}"),
            "progress": False, "grid_every": 0, "checkpoint_every": 0, "log_tensorboard": False, "eval_every": 0}
    run = load_run_config("digits_dit", over)
    cfg = run["ppo"]
    cfg.num_epochs, pre = epochs_for(budget, cfg.batch_size, cfg.value_pretrain_epochs, cfg.advantage == "gae")
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    trainer = build_trainer(run)
    return train_and_measure(trainer, cfg, pre, lambda: evaluate_policy(trainer)["digit_prob"])


def run_gmm(method: str, seed: int, budget: int, args, workdir: Path) -> dict:
    task = GMMTask()
    torch.manual_seed(seed)
    model = MLPDenoiser(ResidualMLP(hidden=64, num_layers=2), task.analytic_eps())
    fields = dict(
        seed=seed, num_inference_steps=20, batch_size=args.gmm_batch, group_size=args.gmm_batch,
        sample_chunk_size=args.gmm_batch, minibatch_size=320, ppo_epochs=1, clip_range=0.2, learning_rate=3e-3,
        log_prob_reduction="sum", lora_rank=8, lora_target_modules=MLP_LORA_TARGETS, critic_mode="full",
        critic_learning_rate=1e-3, value_head_hidden=128, value_pretrain_epochs=args.gmm_value_pretrain,
        value_pretrain_passes=4, stat_buffer_size=args.gmm_batch, stat_min_count=args.gmm_batch // 2,
        output_dir=str(workdir / f"gmm_{method}_seed{seed}"), log_tensorboard=False, progress=False, grid_every=0,
        checkpoint_every=0, **METHODS[method])
    # gmm_finetune's KL (closed-form per-step Gaussian KL, kl_coef 2) is PPO's; nft / awm's kl_coef acts on the
    # outputs' squared difference (another unit), so they get --gmm-kl-forward (default 1: without it AWM diverged
    # on this unbounded linear reward in every seed, benchmarks/results/baselines_gmm_klf0.json)
    fields["kl_coef"] = args.gmm_kl if fields["algorithm"] == "ppo" else args.gmm_kl_forward
    fields["num_epochs"], pre = epochs_for(budget, args.gmm_batch, args.gmm_value_pretrain, fields["advantage"] == "gae")
    lin = LinearReward(GMM_W)
    fields = {k: v for k, v in fields.items() if k not in not_applicable(fields)}  # one set of settings, every method
    trainer = Trainer(PPOConfig(**fields), task, MLPAdapter(model), task.scheduler,
                      rewards=MultiReward([FunctionReward(lin, "linear")]))
    trainer.out.mkdir(parents=True, exist_ok=True)

    def final():
        return float(lin(trainer.sample([""] * args.n_eval, seed=1000 + seed)).mean())

    return train_and_measure(trainer, trainer.config, pre, final)


def train_and_measure(trainer, cfg, pre: int, final_reward) -> dict:
    t0 = time.time()
    base = final_reward()
    if trainer.critic is not None:
        trainer.pretrain_value()
    curve = []
    key = f"reward/{trainer.rewards.names[0]}/mean"
    for _ in range(cfg.num_epochs):
        try:
            res = trainer.train_epoch()
        except DivergenceError as e:
            # a method that diverges is a result, not a crash of the benchmark: recorded with where it stopped
            # (the guard refused the non-finite step, so no final policy is scored)
            return {"base_reward": base, "final_reward": None, "reward_queries": trainer.reward_queries,
                    "pretrain_queries": pre, "epochs": len(curve), "seconds": time.time() - t0, "curve": curve,
                    "diverged": {"epoch": len(curve) + 1, "reward_queries": trainer.reward_queries, "error": str(e)}}
        curve.append({"reward_queries": res.metrics["reward_queries"], "reward": res.metrics[key]})
    return {"base_reward": base, "final_reward": final_reward(), "reward_queries": trainer.reward_queries,
            "pretrain_queries": pre, "epochs": cfg.num_epochs, "seconds": time.time() - t0, "curve": curve}


def summarize(runs: list[dict]) -> dict:
    """Per task: final reward mean ± std per method, the best baseline, and queries to reach its final reward."""
    out = {}
    for task in sorted({r["task"] for r in runs}):
        rs = [r for r in runs if r["task"] == task]
        methods = [m for m in METHODS if any(r["method"] == m for r in rs)]
        s = {}
        for m in methods:
            mine = [r for r in rs if r["method"] == m]
            ok = [r for r in mine if not r.get("diverged")]  # a diverged run has no final reward: counted apart
            fin = [r["final_reward"] for r in ok]
            s[m] = {"seeds": [r["seed"] for r in mine], "diverged_seeds": [r["seed"] for r in mine if r.get("diverged")],
                    "final_reward_mean": float(np.mean(fin)) if ok else None,
                    "final_reward_std": float(np.std(fin)) if ok else None,
                    "base_reward_mean": float(np.mean([r["base_reward"] for r in mine])),
                    "last3_train_reward_mean": float(np.mean([np.mean([c["reward"] for c in r["curve"][-3:]])
                                                              for r in ok])) if ok else None,
                    "budget_reward_queries": max(r["reward_queries"] for r in mine)}
        baselines = [m for m in BASELINES if m in s and s[m]["final_reward_mean"] is not None]
        if baselines:
            best = max(baselines, key=lambda m: s[m]["final_reward_mean"])
            target = s[best]["last3_train_reward_mean"]
            budget = s[best]["budget_reward_queries"]
            for m in methods:
                reach = [queries_to_reach(r["curve"], target) for r in rs if r["method"] == m]
                med = float(np.median(reach))
                s[m]["queries_to_reach_best_baseline"] = [q if math.isfinite(q) else None for q in reach]
                s[m]["queries_fraction_of_best_baseline_budget"] = med / budget if math.isfinite(med) else None
            s["best_baseline"] = {"method": best, "final_train_reward": target, "budget_reward_queries": budget}
        out[task] = s
    return out




# per task, the settings that make two runs comparable: resume and merge refuse a file whose runs of a task were
# made with other values of that task's settings (a digits-only part may differ in the mixture's, and vice versa)
_SETTINGS = {"digits_dit": ("budget_digits",),
             "gmm": ("budget_gmm", "gmm_batch", "gmm_value_pretrain", "gmm_kl", "gmm_kl_forward", "n_eval")}


def load_compatible(path: Path, args, overrides: dict) -> list[dict]:
    """The runs of a baselines.json written with the same settings as ``args``; raises naming the difference."""
    d = json.loads(Path(path).read_text())
    if d.get("benchmark") != "baselines":
        raise SystemExit(f"{path} is not a baselines.py result (benchmark={d.get('benchmark')!r})")
    keys = [k for task in sorted({r["task"] for r in d["runs"]}) for k in _SETTINGS[task]]
    diff = {k: (d["args"].get(k), getattr(args, k)) for k in keys if d["args"].get(k) != getattr(args, k)}
    if any(r["task"] == "digits_dit" for r in d["runs"]) and d.get("digits_overrides", {}) != overrides:
        diff["digits_set"] = (d.get("digits_overrides"), overrides)
    if diff:
        what = ", ".join(f"{k}: file {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise SystemExit(f"{path} was run with other settings ({what}); "
                         "pass the same flags, or write to another --out")
    return d["runs"]


def _merge_runs(runs: list[dict], more: list[dict]) -> list[dict]:
    seen = {(r["task"], r["method"], r["seed"]) for r in runs}
    dup = [k for k in ((r["task"], r["method"], r["seed"]) for r in more) if k in seen]
    if dup:
        raise SystemExit(f"the same run appears in two files: {dup}; merge files with disjoint runs")
    return runs + list(more)


def _union(order: list[str], found: list[str]) -> list[str]:
    return [x for x in order if x in found] + sorted(set(found) - set(order))


def _result(args, overrides: dict, runs: list[dict]) -> dict:
    # time_s: the runs' own seconds summed, so a resumed or merged result reports the compute it took
    return {"benchmark": "baselines", "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                               if k not in ("resume", "merge")},
            "digits_overrides": overrides, "methods": METHODS, "summary": summarize(runs), "runs": runs,
            "machine": machine_info(), "time_s": float(sum(r["seconds"] for r in runs))}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["digits_dit", "gmm"], choices=["digits_dit", "gmm"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--budget-digits", type=int, default=1920, help="reward queries per digits run")
    p.add_argument("--budget-gmm", type=int, default=2560, help="reward queries per mixture run")
    p.add_argument("--digits-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="PPOConfig overrides for every digits run (e.g. num_inference_steps=4 for a smoke run)")
    p.add_argument("--gmm-batch", type=int, default=64)
    p.add_argument("--gmm-value-pretrain", type=int, default=10)
    p.add_argument("--gmm-kl", type=float, default=2.0, help="PPO's kl_coef on the mixture (gmm_finetune's)")
    p.add_argument("--gmm-kl-forward", type=float, default=1.0,
                   help="nft / awm kl_coef on the mixture (at 0, AWM diverges on the unbounded linear reward)")
    p.add_argument("--n-eval", type=int, default=2000)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "baselines.json"))
    p.add_argument("--resume", action="store_true", help="keep the runs already in --out and skip them")
    p.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                   help="combine the runs of these files (same settings) into --out instead of running")
    args = p.parse_args(argv)
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.digits_set)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = out.parent / "tmp" / "baselines"
    runs = []
    sources = list(args.merge or []) + ([out] if args.resume and out.exists() else [])
    for src in sources:
        runs = _merge_runs(runs, load_compatible(src, args, overrides))
    if args.merge:
        # the union of the parts' tasks / methods / seeds, in this run's order where it names them
        args.tasks = _union(args.tasks, [r["task"] for r in runs])
        args.methods = _union(args.methods, [r["method"] for r in runs])
        args.seeds = sorted({r["seed"] for r in runs})
        result = {**_result(args, overrides, runs), "merged_from": [str(m) for m in args.merge]}
        out.write_text(json.dumps(result, indent=1, default=float))
        print(json.dumps(result["summary"], indent=2, default=float))
        print(f"merged {len(runs)} runs from {len(args.merge)} files into {out}")
        return result
    done = {(r["task"], r["method"], r["seed"]) for r in runs}
    result = _result(args, overrides, runs)
    for task in args.tasks:
        for seed in args.seeds:
            for method in args.methods:  # interleaved: every seed runs all methods back to back
                if (task, method, seed) in done:
                    print(f"{task} {method} seed {seed}: already in {out}, skipped", flush=True)
                    continue
                if task == "digits_dit":
                    r = run_digits(method, seed, args.budget_digits, overrides, workdir)
                else:
                    r = run_gmm(method, seed, args.budget_gmm, args, workdir)
                r.update(task=task, method=method, seed=seed)
                runs.append(r)
                end = f"{r['final_reward']:.4f}" if not r.get("diverged") else f"diverged in epoch {r['diverged']['epoch']}"
                print(f"{task} {method} seed {seed}: reward {r['base_reward']:.4f} -> {end} "
                      f"({r['reward_queries']} queries, {r['seconds']:.0f} s)", flush=True)
                result = _result(args, overrides, runs)
                out.write_text(json.dumps(result, indent=1, default=float))
    print(json.dumps(result["summary"], indent=2, default=float))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
