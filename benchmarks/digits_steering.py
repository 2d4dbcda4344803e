"""Reward vs NFE for test-time steering on digits (issue #5): base / best-of-N / guidance / SMC / guidance + best-of-N.

    .venv/bin/python benchmarks/digits_steering.py        # ≈ 10-15 min on 2 CPU cores

The policy is the shipped digits UNet (T = 20 stochastic DDIM steps, eta = 1).  The critic is the digits
config's LoRA critic, value-pretrained on rollouts of that policy (``--critic-epochs`` batches of 64; it is
saved under benchmarks/results/tmp/digits_steering and reused on the next run unless ``--fresh-critic``), or
a trained run's critic with ``--run``.  The reward is the trained one (digit_prob, classifier confidence at
temperature 6); digit_correct is reported too.  For N ∈ {2, 4, 8} particles per prompt:

    bon             best-of-N by the reward                      NFE = N·T, no critic
    guidance+bon    critic gradient guidance (scale w), then BoN NFE = N·T, + N·T critic forward + backward
    smc             SMC, potentials λ·V_critic                   NFE = N·T, + N·T critic forwards
    smc_x0          SMC, FK steering's potential λ·r(x̂0)         NFE = N·T, + N·(T+1) decodes + reward calls
and at N = 1: base and guidance at several scales (the best scale is used for guidance+bon).
SMC's output per prompt is ``--smc-output``: argmax (default here: this is a reward-vs-NFE comparison with
best-of-N, so SMC also keeps its best particle) or sample (a draw from its weighted particles, the library's
default, which samples p·exp(λ r) rather than maximising r).
"Equivalent NFE" counts a critic forward as one backbone call, a backward as two (the LoRA critic runs the
same UNet) and a decode + reward call as ``--reward-price`` backbone calls.  Writes
benchmarks/results/digits_steering.{json,png} and a grid per method at N = 4.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train.steer import build_steering_trainer, steer_with_trainer  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-digit", type=int, default=10, help="prompts per digit (groups)")
    p.add_argument("--particles", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--scales", type=float, nargs="+", default=[5.0, 20.0, 50.0, 100.0], help="guidance scales w at N = 1")
    p.add_argument("--bon-only", type=int, nargs="*", default=[16],
                   help="extra N for best-of-N alone (a reference at the other methods' equivalent NFE)")
    p.add_argument("--lam", type=float, nargs="+", default=[10.0, 30.0], help="SMC λ values")
    p.add_argument("--ess-threshold", type=float, default=0.9, help="SMC resamples when ESS < κ·N")
    p.add_argument("--smc-output", choices=["argmax", "sample"], default="argmax",
                   help="SMC's choice per prompt (see the module doc)")
    p.add_argument("--reward-price", type=float, default=1.0,
                   help="backbone-call price of one decode + reward call in the equivalent NFE")
    p.add_argument("--critic-epochs", type=int, default=20)
    p.add_argument("--run", help="a trained run directory (policy + critic) instead of a fresh critic")
    p.add_argument("--fresh-critic", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    critic_dir = out / "tmp" / "digits_steering"
    run_dir = args.run
    if run_dir is None and not args.fresh_critic and (critic_dir / "checkpoints").exists():
        run_dir = str(critic_dir)
    t0 = time.time()
    trainer, run = build_steering_trainer(None if run_dir else "digits", run_dir, str(critic_dir),
                                          critic_epochs=None if run_dir else args.critic_epochs)
    critic_time = time.time() - t0
    prompts = [str(d) for d in range(10) for _ in range(args.per_digit)]

    rows = []

    def record(method, n, **kw):
        res, evals = steer_with_trainer(trainer, method, prompts, particles=n, seed=args.seed,
                                        output=args.smc_output, reward_price=args.reward_price, **kw)
        row = {"method": method, "particles": n, **{k: v for k, v in kw.items() if k in ("scale", "lam")},
               "rewards": evals, **res.cost.to_dict(),
               "resample_rate": float(res.resampled.float().mean()) if res.resampled.numel() else 0.0,
               "final_ess_per_particle": float(res.final_ess.nanmean()) / n}
        rows.append(row)
        print(f"{method:13s} N={n} {kw}  digit_prob={evals['digit_prob']:.4f}  correct={evals.get('digit_correct')}"
              f"  eqNFE={row['equivalent_nfe']:.0f}  {row['wall_time_s']:.1f}s", flush=True)
        return res, row

    base_res, _ = record("base", 1)
    best_scale, best = None, -1.0
    for w in args.scales:
        _, row = record("guidance", 1, scale=w)
        if row["rewards"]["digit_prob"] > best:
            best, best_scale = row["rewards"]["digit_prob"], w
    grids = {}
    for n in args.particles:
        res, _ = record("bon", n)
        grids.setdefault("bon", res) if n == 4 else None
        res, _ = record("guidance+bon", n, scale=best_scale)
        grids.setdefault("guidance+bon", res) if n == 4 else None
        for lam in args.lam:
            res, _ = record("smc", n, lam=lam, ess_threshold=args.ess_threshold)
            grids.setdefault("smc", res) if n == 4 else None
        res, _ = record("smc_x0", n, lam=args.lam[0], ess_threshold=args.ess_threshold)
        grids.setdefault("smc_x0", res) if n == 4 else None
    for n in args.bon_only:
        record("bon", n)
    result = {"benchmark": "digits_steering", "args": vars(args), "critic_source": run_dir or "fresh",
              "critic_pretrain_s": critic_time, "best_guidance_scale": best_scale, "rows": rows,
              "time_s": time.time() - t_start}
    (out / "digits_steering.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "digits_steering.png")
    from critic_align.viz import save_grid

    for name, res in [("base", base_res), *grids.items()]:
        save_grid(res.decoded.clamp(-1, 1), out / f"digits_steering_{name.replace('+', '_')}.png",
                  nrow=args.per_digit, labels=[str(d) for d in range(10)])
    print(f"wrote {out / 'digits_steering.json'} ({result['time_s']:.0f} s)")


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    series = {}
    for r in result["rows"]:
        key = r["method"] + (f" λ={r['lam']:g}" if "lam" in r else "") + (f" w={r['scale']:g}" if "scale" in r and
                                                                           r["method"] != "guidance" else "")
        if r["method"] == "guidance":
            key = "guidance (N=1, scales)"
        series.setdefault(key, []).append(r)
    for ax, x_key, label in ((axes[0], "nfe", "backbone NFE per sample"),
                             (axes[1], "equivalent_nfe", "equivalent NFE (critic fwd = 1, bwd = 2)")):
        for key, rs in series.items():
            pts = sorted((r[x_key], r["rewards"]["digit_prob"]) for r in rs)
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "o-" if len(xs) > 1 else "s", label=key)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel("digit_prob of the chosen sample")
        ax.legend(fontsize=7)
    fig.suptitle("Steering the digits UNet with its critic (100 prompts, T = 20)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
