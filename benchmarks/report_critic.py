"""Critic-page sections (benchmarks/results/critic.md): the critic-quality ablation (benchmarks/critic_quality.py) and
the exact mixture critic (benchmarks/gmm_critic.py), rendered from their JSON."""

from __future__ import annotations

import json
from pathlib import Path

from report_fmt import fmt as _f


def section_critic_quality(path: Path) -> str:
    d = json.loads(path.read_text())
    a = d["args"]
    table = d["table"]
    names = table[0]["bucket_names"]
    best = d["best"]
    lines = [
        "## Critic quality after value pretraining (digits)",
        "",
        f"Command: `python benchmarks/critic_quality.py --seeds {' '.join(map(str, a['seeds']))}` (writes "
        "`benchmarks/results/critic_quality.json` and `.png`"
        + ("; this file was written in two parts on the same code: the Monte-Carlo-target grid with the ceiling "
           "(`--targets mc`), then `--recipes today --targets td_lambda --merge <the first part> --no-ceiling`"
           if a.get("merge") else "") + "). Each cell pretrains the critic of a fresh digits "
        "trainer on the frozen base policy and scores it on a fresh held-out batch of "
        f"{a['heldout']} trajectories (its own noise seed): explained variance of V(x_t) against the realised "
        "return, over all (trajectory, step) pairs and per bucket of denoising steps (steps 0-4 are the noisiest). "
        f"Mean ± std over {best['seeds']} seeds. Factors: critic body (`mid` = UNet mid block 4x4 | `multi` = down "
        "blocks + mid block with the class embedding in the AdaLN), value data (rollouts | + forward-perturbed "
        f"states, {a['perturbed']} per sample), recipe (`today` = digits.yaml | `seed` = digits_ecg.yaml: the core "
        "seed's 2-batch warm-up, one sample per prompt, clipped value loss), pretraining targets (`mc` = R at every "
        "step | `td_lambda` = the critic's own λ-return).",
        "",
        "| body | value data | recipe | targets | EV all steps | " + " | ".join(f"steps {n}" for n in names)
        + " | reward queries | fit s |",
        "|---|---|---|---|---|" + "---|" * len(names) + "---|---|",
    ]
    for r in table:
        c = r["config"]
        lines.append(
            f"| {c['critic_features']} | {c['value_data']} | {c['recipe']} | {c.get('value_pretrain_target', 'mc')} | "
            f"{_f(r['ev_all'])} ± {_f(r['ev_all_std'])} | "
            + " | ".join(f"{_f(m)} ± {_f(s)}" for m, s in zip(r["ev_buckets"], r["ev_buckets_std"]))
            + f" | {r['pretrain_reward_queries']} | {_f(r['fit_seconds'], 0)} |")
    if d.get("ev_ceiling_buckets"):
        ceil = d["ev_ceiling_buckets"]
        lines.append("| *ceiling: E[R \\| x_t] from the sampler's own continuations* | | | | "
                     f"{_f(sum(ceil) / len(ceil))} (bucket mean) | " + " | ".join(_f(x) for x in ceil) + " | | |")
    g = d["goal"]
    if d.get("ev_ceiling_buckets"):
        ceil = d["ev_ceiling_buckets"]
        lines += ["", "Best cell as a fraction of the ceiling, per bucket: "
                  + ", ".join(f"{_f(b / c, 2)}" for b, c in zip(best["ev_buckets"], ceil))
                  + f"; overall {_f(best['ev_all'] / (sum(ceil) / len(ceil)), 2)}. The overall goal of 0.6 is the "
                  f"ceiling itself ({_f(sum(ceil) / len(ceil))}): only an exact critic would meet it."]
    lines += [
        "",
        f"Best cell: {best['config']} with EV {_f(best['ev_all'])} overall and "
        f"{', '.join(_f(x) for x in best['ev_buckets'])} per bucket. Goal (EV ≥ 0.6 overall and ≥ 0.3 in every "
        f"bucket): overall {'met' if g['ev_all_ge_0.6'] else 'not met'}, every bucket "
        f"{'met' if g['every_bucket_ge_0.3'] else 'not met'}.",
    ]
    if d.get("ev_ceiling_buckets"):
        ceil = d["ev_ceiling_buckets"]
        lines += [
            "",
            f"The ceiling row is the explained variance of the sampler's own value E[R | x_t], estimated with "
            f"{a['continuations']} continuations from the middle step of each bucket for {a['ceiling_states']} held-out "
            "states per seed (MC noise subtracted): no critic can beat it in expectation. At the noisiest steps "
            f"E[R | x_t] explains {_f(ceil[0])} of Var(R) — most of the return is decided by noise the stochastic "
            "(η = 1) sampler has not drawn yet — so a bucket goal of 0.3 there is "
            + ("above" if ceil[0] < 0.3 else "within") + " what any critic can reach.",
        ]
    lines += ["", "![critic quality](benchmarks/results/critic_quality.png)", ""]
    return "\n".join(lines)


def section_gmm_critic(path: Path) -> str:
    d = json.loads(path.read_text())
    a = d["args"]
    lines = [
        "## Exact mixture task: critic accuracy after value pretraining",
        "",
        f"Command: `python benchmarks/gmm_critic.py` (writes `benchmarks/results/gmm_critic.json` and `.png`; "
        f"{d['time_s']:.0f} s). {a['epochs']} pretraining batches of {a['batch']} trajectories, {a['steps']} steps, "
        f"critic mode '{a['critic_mode']}'. RMSE of the critic to the exact E[r(x0) | x_t], relative to the "
        "reward's std (goal: ≤ 5 % at every t). 'Sampler bias' is how far the T-step sampler's own value "
        "(Monte Carlo continuations) is from the exact one: a critic fitted to sampler returns cannot beat it.",
        "",
        "| reward | max RMSE / std (vs exact) | mean RMSE / std | max sampler bias / std | max RMSE / std vs the "
        "sampler's own value | goal (≤ 5 % vs the sampler's value at every t) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in d["summary"].items():
        vs = r.get("max_critic_vs_sampler_debiased_rel")
        goal = r.get("goal_met_5pct_vs_sampler")
        lines.append(f"| {name} | {_f(r['max_rmse_rel'])} | {_f(r['mean_rmse_rel'])} | "
                     f"{_f(r['max_sampler_bias_debiased_rel'])} | {_f(vs)} | "
                     f"{'n/a' if goal is None else ('met' if goal else 'not met')} |")
    lines += ["", "![critic accuracy per timestep](benchmarks/results/gmm_critic.png)", ""]
    return "\n".join(lines)
