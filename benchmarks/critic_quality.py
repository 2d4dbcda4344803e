"""How good is the latent critic after value pretraining?  An ablation on digits (issue #13).

    python benchmarks/critic_quality.py --seeds 0 1 2            # ≈ 45 min on one core
    # or in two parts: --targets mc --out A.json, then --targets td_lambda --merge A.json --no-ceiling

Grid: critic body (``mid``: the UNet mid block, 4x4 tokens | ``multi``: down blocks + mid block, patchified,
with the class embedding in the AdaLN) x value data (``rollouts``: Monte-Carlo returns of the frozen policy's
rollouts | ``+perturbed``: plus forward-perturbed states of the same samples, no extra reward query) x recipe
(``today``: digits.yaml — 6 pretraining batches of 64, 4 passes, groups of 8 | ``seed``: digits_ecg.yaml — the
core seed's short warm-up, 2 batches, one sample per prompt, clipped value loss) x pretraining targets (``mc``:
the Monte-Carlo return R at every step | ``td_lambda``: the current critic's λ-return, λ = gae_lambda).  Every
cell pretrains the critic of a fresh trainer on the frozen base policy and is then scored on a *fresh held-out
batch* (its own noise seed, the same for every cell of a seed): explained variance of V(x_t) against the realised
return R, overall and per timestep bucket (steps 0-4 are the noisiest).

The ceiling: at early steps the return R is mostly decided by noise the sampler has not drawn yet, so even the
exact value E[R | x_t] explains only part of Var(R).  ``ev_ceiling_buckets`` estimates that bound per bucket from
Monte-Carlo continuations of the sampler (the explained variance of E[R | x_t] estimated by M continuations, with
the estimate's own noise subtracted): no critic can exceed it in expectation.

Writes benchmarks/results/critic_quality.json (``best`` = the cell with the highest mean ev_all over seeds) and
critic_quality.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from harness import machine_info

ROOT = Path(__file__).resolve().parents[1]

from critic_align.api import build_trainer  # noqa: E402
from critic_align.collect import critic_values  # noqa: E402
from critic_align.diagnostics import bucket_edges  # noqa: E402
from critic_align.rollout import sample  # noqa: E402
from critic_align.train.registry import load_run_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BODIES = {"mid": {"critic_features": "mid", "critic_cond": False}, "multi": {"critic_features": "multi", "critic_cond": True},
          # extra bodies for single-factor checks (not in the default grid)
          "mid+cond": {"critic_features": "mid", "critic_cond": True},
          "multi-cond": {"critic_features": "multi", "critic_cond": False}}
RECIPES = {"today": "digits", "seed": "digits_ecg"}


def heldout_batch(trainer, n: int, seed: int):
    prompts = [str(i % 10) for i in range(n)]
    return trainer.rollout(prompts, generator=torch.Generator().manual_seed(50_000 + seed), count=False)


def run_cell(body: str, data: str, recipe: str, targets: str, seed: int, args, workdir: Path) -> dict:
    over = dict(BODIES[body], seed=seed, output_dir=str(workdir / f"{body}_{data}_{recipe}_{targets}_{seed}"),
                progress=False, grid_every=0, checkpoint_every=0, log_tensorboard=False, eval_every=0,
                value_perturbed_per_sample=args.perturbed if data == "+perturbed" else 0, value_pretrain_target=targets)
    over.update(args.overrides)
    run = load_run_config(RECIPES[recipe], over)
    shutil.rmtree(run["ppo"].output_dir, ignore_errors=True)
    t0 = time.time()
    trainer = build_trainer(run)
    trainer.pretrain_value()
    t_fit = time.time() - t0
    ro = heldout_batch(trainer, args.heldout, seed)
    rep = trainer.value_report(ro, critic_values(trainer.models, ro))
    buckets = [k for k in rep if k.startswith("value_ev_steps_")]
    calib = [k for k in rep if k.startswith("value_calib_steps_")]
    return {"body": body, "data": data, "recipe": recipe, "targets": targets, "seed": seed, "ev_all": rep["value_ev"],
            "ev_buckets": [rep[k] for k in buckets], "bucket_names": [k[len("value_ev_steps_"):] for k in buckets],
            "calib_buckets": [rep[k] for k in calib], "pretrain_reward_queries": trainer.reward_queries,
            "fit_seconds": t_fit, "reward_std": float(ro.rewards.float().std())}


@torch.no_grad()
def ev_ceiling(seed: int, args, workdir: Path) -> dict:
    """Per bucket: the explained variance of the sampler's own value E[R | x_t] (M continuations from the middle step
    of the bucket), debiased for the MC noise: 1 − (mean (R − V̂)² − mean s²/M) / Var(R)."""
    run = load_run_config("digits", dict(seed=seed, output_dir=str(workdir / f"ceiling_{seed}"), progress=False,
                                         log_tensorboard=False, eval_every=0, advantage="grpo"))
    trainer = build_trainer(run)
    ro = heldout_batch(trainer, args.ceiling_states, seed)
    r = ro.rewards[:, 0].double()
    var_r = float(r.var(unbiased=False))
    out = []
    g = torch.Generator().manual_seed(90_000 + seed)
    for a, b in bucket_edges(ro.num_steps):
        k = (a + b - 1) // 2
        x = ro.latents[:, k].repeat_interleave(args.continuations, 0)
        cond = ro.cond.repeat_interleave(args.continuations, 0)
        final = sample(trainer.policy_output, trainer.step, x, trainer.timesteps[k:], cond,
                       prev_timesteps=trainer.schedule.prev_timesteps(trainer.timesteps)[k:], generator=g)
        prompts = [p for p in ro.prompts for _ in range(args.continuations)]
        rc = trainer.rewards(trainer.task.decode(final), prompts)[:, 0].double().view(-1, args.continuations)
        v_hat, s2 = rc.mean(1), rc.var(1, unbiased=True)
        resid = float(((r - v_hat) ** 2).mean() - (s2 / args.continuations).mean())
        out.append({"bucket": f"{a}-{b - 1}", "step": k, "ev_ceiling": 1 - resid / var_r})
    return {"seed": seed, "buckets": out}


def summarize(cells: list[dict]) -> dict:
    groups: dict = {}
    for c in cells:
        groups.setdefault((c["body"], c["data"], c["recipe"], c.get("targets", "mc")), []).append(c)
    table = []
    for (body, data, recipe, targets), cs in groups.items():
        evb = np.array([c["ev_buckets"] for c in cs])
        table.append({"config": {"critic_features": body, "value_data": data, "recipe": recipe,
                                 "value_pretrain_target": targets},
                      "ev_all": float(np.mean([c["ev_all"] for c in cs])),
                      "ev_all_std": float(np.std([c["ev_all"] for c in cs])),
                      "ev_buckets": evb.mean(0).tolist(), "ev_buckets_std": evb.std(0).tolist(),
                      "bucket_names": cs[0]["bucket_names"], "seeds": len(cs),
                      "pretrain_reward_queries": cs[0]["pretrain_reward_queries"],
                      "fit_seconds": float(np.mean([c["fit_seconds"] for c in cs]))})
    table.sort(key=lambda r: -r["ev_all"])
    return {"table": table, "best": table[0]}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = result["table"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    ax = axes[0]
    labels = ["/".join(str(v) for v in r["config"].values()) for r in table]
    ax.barh(range(len(table)), [r["ev_all"] for r in table], xerr=[r["ev_all_std"] for r in table], color="C0")
    ax.set_yticks(range(len(table)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0.6, color="k", ls=":", lw=0.8, label="goal 0.6")
    ax.set_xlabel("explained variance on a fresh held-out batch (mean ± std over seeds)")
    ax.legend(fontsize=8)
    ax = axes[1]
    names = table[0]["bucket_names"]
    for i, r in enumerate(table):
        ax.plot(range(len(names)), r["ev_buckets"], "o-", label=labels[i], alpha=0.85)
    if result.get("ev_ceiling_buckets"):
        ax.plot(range(len(names)), result["ev_ceiling_buckets"], "k--", lw=2, label="ceiling: E[R | x_t] (MC)")
    ax.axhline(0.3, color="gray", ls=":", lw=0.8, label="goal 0.3 per bucket")
    ax.set_xticks(range(len(names)), [f"steps {n}" for n in names])
    ax.set_ylabel("explained variance")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.suptitle("Latent critic after value pretraining on digits (frozen base policy)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--bodies", nargs="+", default=["mid", "multi"], choices=list(BODIES))
    p.add_argument("--data", nargs="+", default=["rollouts", "+perturbed"])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES))
    p.add_argument("--targets", nargs="+", default=["mc", "td_lambda"], choices=["mc", "td_lambda"],
                   help="value pretraining targets (PPOConfig.value_pretrain_target)")
    p.add_argument("--merge", default=None,
                   help="a previous critic_quality.json whose cells (and ceiling) are kept: run the grid in parts")
    p.add_argument("--perturbed", type=int, default=16, help="forward-perturbed states per finished sample")
    p.add_argument("--heldout", type=int, default=128, help="held-out trajectories per seed")
    p.add_argument("--ceiling-states", type=int, default=64)
    p.add_argument("--continuations", type=int, default=8)
    p.add_argument("--no-ceiling", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="PPOConfig overrides applied to every cell (e.g. critic_learning_rate=3e-3)")
    p.add_argument("--out", default=str(RESULTS / "critic_quality.json"))
    args = p.parse_args(argv)
    import yaml

    args.overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = RESULTS / "tmp" / "critic_quality"
    t0 = time.time()
    cells, previous = [], None
    if args.merge:
        previous = json.loads(Path(args.merge).read_text())
        cells = [dict(c, targets=c.get("targets", "mc")) for c in previous["cells"]]
    for seed, body, data, recipe, targets in itertools.product(args.seeds, args.bodies, args.data, args.recipes,
                                                                args.targets):
        c = run_cell(body, data, recipe, targets, seed, args, workdir)
        cells.append(c)
        print(f"seed {seed} {body:5s} {data:10s} {recipe:5s} {targets:9s}: ev_all {c['ev_all']:.3f} buckets "
              f"{[round(e, 3) for e in c['ev_buckets']]} ({c['fit_seconds']:.0f} s)", flush=True)
    result = {"benchmark": "critic_quality", "args": vars(args), **summarize(cells), "cells": cells}
    if previous is not None and "ev_ceiling" in previous and args.no_ceiling:
        result["ev_ceiling"], result["ev_ceiling_buckets"] = previous["ev_ceiling"], previous["ev_ceiling_buckets"]
    elif not args.no_ceiling:
        ceilings = [ev_ceiling(s, args, workdir) for s in args.seeds]
        result["ev_ceiling"] = ceilings
        result["ev_ceiling_buckets"] = np.mean([[b["ev_ceiling"] for b in c["buckets"]] for c in ceilings], 0).tolist()
        print("ceiling per bucket:", [round(e, 3) for e in result["ev_ceiling_buckets"]], flush=True)
    best = result["best"]
    result["goal"] = {"ev_all_ge_0.6": best["ev_all"] >= 0.6, "every_bucket_ge_0.3": min(best["ev_buckets"]) >= 0.3}
    result["machine"] = machine_info()
    result["seconds"] = time.time() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(json.dumps(result["best"], indent=2))
    print(f"wrote {out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
