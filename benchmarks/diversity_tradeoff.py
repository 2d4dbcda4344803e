"""The reward–diversity trade-off of the main job (issue 13, item 5): KL to the reference, early stopping, the
critic recipe, and a run 3x the budget.

    python benchmarks/diversity_tradeoff.py                  # the variants below, seed 0, then the long run
    python benchmarks/diversity_tradeoff.py --variants default kl_0.1 --epochs 10 --eval-every 5 --long-epochs 0 \\
        --out /tmp/d.json                                    # a quick look

Every run is the main job's configuration (``train/configs/digits.yaml``) with the variant's overrides.  Every
``--eval-every`` epochs the policy is evaluated on fixed noises (200 samples, 20 per digit, the full stochastic
sampler): digit_prob (the trained reward), digit_correct, and within-prompt diversity (mean pairwise L2 between
the samples of one digit; ``kept`` = / the base model's).  Early stopping needs no extra run: each evaluation on a
run's curve is the policy that stopping there would give, so the trade-off frontier is read off the curves.

Reported per variant: base and final reward and diversity kept, and the best reward among the evaluations that
keep >= 80 % of the base diversity (the early-stopping point).  The long run (``--long-epochs``, default 3x the
main job's, run first: the default row is its first ``--epochs`` epochs, as nothing depends on num_epochs) reports its
peak and final eval reward: 'rise then collapse' = final < peak − 0.02 with diversity
falling further.  Writes ``--out`` (default benchmarks/results/diversity_tradeoff.json) and a plot after every run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from digits_advantages import evaluate_policy  # noqa: E402
from harness import machine_info  # noqa: E402

from critic_align.api import build_trainer  # noqa: E402
from critic_align.train.registry import load_run_config  # noqa: E402

VARIANTS = {
    "default": {},
    "kl_0.1": {"kl_coef": 0.1},
    "kl_1": {"kl_coef": 1.0},
    "ecg_recipe": "digits_ecg",  # the core seed's critic recipe (its own preset)
}
KEEP = 0.8


def run_one(name: str, overrides: dict, config: str, seed: int, epochs: int, eval_every: int, workdir: Path,
            extra: dict) -> dict:
    over = {**extra, **overrides, "seed": seed, "num_epochs": epochs, "output_dir": str(workdir / f"{name}_seed{seed}"),
            "progress": False, "grid_every": 0, "checkpoint_every": 0, "log_tensorboard": False, "eval_every": 0}
    run = load_run_config(config, over)
    shutil.rmtree(run["ppo"].output_dir, ignore_errors=True)
    trainer = build_trainer(run)
    curve = []
    t0 = time.time()

    def evaluate():
        ev = evaluate_policy(trainer)
        curve.append({"epoch": trainer.epoch, "reward_queries": trainer.reward_queries, **ev})

    evaluate()
    if trainer.critic is not None:
        trainer.pretrain_value()
    kl = []
    for e in range(epochs):
        res = trainer.train_epoch()
        if "kl_to_ref" in res.metrics:
            kl.append(res.metrics["kl_to_ref"])
        if (e + 1) % eval_every == 0 or e + 1 == epochs:
            evaluate()
    return summarize_curve({"variant": name, "config": config, "overrides": overrides, "seed": seed, "epochs": epochs,
                            "seconds": time.time() - t0, "kl_to_ref_mean": sum(kl) / len(kl) if kl else None}, curve)


def truncate(run: dict, epochs: int) -> dict:
    """The same run as if it had stopped after ``epochs`` epochs (its evaluations up to there)."""
    curve = [c for c in run["curve"] if c["epoch"] <= epochs]
    meta = {k: run[k] for k in ("variant", "config", "overrides", "seed", "seconds", "kl_to_ref_mean")}
    return summarize_curve({**meta, "epochs": epochs, "truncated_from_epochs": run["epochs"]}, curve)


def summarize_curve(meta: dict, curve: list[dict]) -> dict:
    base = curve[0]
    for c in curve:
        c["diversity_kept"] = c["diversity_pairwise_l2"] / base["diversity_pairwise_l2"]
        c["reward_gain"] = c["digit_prob"] - base["digit_prob"]
    keep = [c for c in curve[1:] if c["diversity_kept"] >= KEEP]
    best_keep = max(keep, key=lambda c: c["digit_prob"]) if keep else None
    peak = max(curve, key=lambda c: c["digit_prob"])
    final = curve[-1]
    return {**meta, "base_digit_prob": base["digit_prob"], "final_digit_prob": final["digit_prob"],
            "final_reward_gain": final["reward_gain"], "final_diversity_kept": final["diversity_kept"],
            "final_digit_correct": final.get("digit_correct"),
            "early_stop_keep80": None if best_keep is None else
            {"epoch": best_keep["epoch"], "digit_prob": best_keep["digit_prob"], "reward_gain": best_keep["reward_gain"],
             "diversity_kept": best_keep["diversity_kept"]},
            "peak": {"epoch": peak["epoch"], "digit_prob": peak["digit_prob"], "diversity_kept": peak["diversity_kept"]},
            "rise_then_collapse": bool(final["digit_prob"] < peak["digit_prob"] - 0.02
                                       and final["diversity_kept"] < peak["diversity_kept"]),
            "curve": curve}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in result["runs"] + ([result["long_run"]] if result.get("long_run") else []):
        label = r["variant"] + (f" ({r['epochs']} ep)" if r is result.get("long_run") else "")
        ep = [c["epoch"] for c in r["curve"]]
        a1.plot(ep, [c["digit_prob"] for c in r["curve"]], marker=".", label=label)
        a2.plot([c["diversity_kept"] for c in r["curve"]], [c["digit_prob"] for c in r["curve"]], marker=".", label=label)
    a1.set_xlabel("epoch")
    a1.set_ylabel("held-out digit_prob")
    a2.axvline(KEEP, color="gray", ls="--", lw=1)
    a2.set_xlabel("within-prompt diversity kept (pairwise L2 / base)")
    a2.set_ylabel("held-out digit_prob")
    a2.invert_xaxis()
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a1.legend(fontsize=7)
    a2.set_title("each point = stopping at that evaluation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)




def merge(paths: list[Path], out: Path) -> dict:
    """One result from partial ones: the runs of all (a variant's first occurrence), the first long run, the
    per-part commands and machines kept; the settings (seed, epochs, eval_every, overrides) must agree."""
    parts = [json.loads(p.read_text()) for p in paths]
    key = ("seed", "epochs", "eval_every")
    for p, d in zip(paths, parts):
        if {k: d["args"][k] for k in key} != {k: parts[0]["args"][k] for k in key} or d["extra"] != parts[0]["extra"]:
            raise ValueError(f"{p} was run with other settings ({ {k: d['args'][k] for k in key} }, {d['extra']}) than "
                             f"{paths[0]}; only runs of the same settings compare")
    runs, seen = [], set()
    for d in parts:
        for r in d["runs"]:
            if r["variant"] not in seen:
                seen.add(r["variant"])
                runs.append(r)
    result = {**parts[0], "runs": runs, "long_run": next((d["long_run"] for d in parts if d.get("long_run")), None),
              "time_s": sum(d["time_s"] for d in parts), "merged_from": [str(p) for p in paths],
              "parts_args": [d["args"] for d in parts], "parts_machines": [d["machine"] for d in parts]}
    out.write_text(json.dumps(result, indent=1, default=float))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} ({len(runs)} runs from {len(parts)} parts)")
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=80, help="the main job's budget")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--long-epochs", type=int, default=240, help="the long run of the default (0 = none)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="overrides for every run")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "diversity_tradeoff.json"))
    p.add_argument("--merge", nargs="+", metavar="JSON", help="combine partial results of this script (e.g. the long "
                   "run and the variants run as two processes) into --out instead of running anything")
    args = p.parse_args(argv)
    if args.merge:
        return merge([Path(m) for m in args.merge], Path(args.out))
    import yaml

    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = ROOT / "benchmarks" / "results" / "tmp" / "diversity_tradeoff"
    t0 = time.time()
    result = {"benchmark": "diversity_tradeoff", "args": vars(args), "extra": extra, "runs": [], "long_run": None,
              "machine": machine_info()}

    def save():
        result["time_s"] = time.time() - t0
        out.write_text(json.dumps(result, indent=1, default=float))
        plot(result, out.with_suffix(".png"))

    long_first = args.long_epochs and "default" in args.variants
    if long_first:  # the default's first `epochs` epochs are the long run's (nothing depends on num_epochs)
        r = run_one("default", {}, "digits", args.seed, args.long_epochs, args.eval_every, workdir, extra)
        result["long_run"] = r
        result["runs"].append(truncate(r, args.epochs))
        print(f"long run: peak {r['peak']} final {r['final_digit_prob']:.3f} collapse {r['rise_then_collapse']}")
        save()
    for name in args.variants:
        if long_first and name == "default":
            continue
        v = VARIANTS[name]
        config, over = (v, {}) if isinstance(v, str) else ("digits", v)
        r = run_one(name, over, config, args.seed, args.epochs, args.eval_every, workdir, extra)
        result["runs"].append(r)
        print(f"{name}: digit_prob {r['base_digit_prob']:.3f} -> {r['final_digit_prob']:.3f}, diversity kept "
              f"{r['final_diversity_kept']:.2f}, early stop >= 80%: {r['early_stop_keep80']}", flush=True)
        save()
    if args.long_epochs and not long_first:
        r = run_one("default", {}, "digits", args.seed, args.long_epochs, args.eval_every, workdir, extra)
        result["long_run"] = r
        print(f"long run: peak {r['peak']} final {r['final_digit_prob']:.3f} collapse {r['rise_then_collapse']}")
        save()
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
