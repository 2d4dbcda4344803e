"""Critic-page sections for the oracle ceiling (benchmarks/critic_ceiling.py) and the grafted critic
(benchmarks/critic_grafted.py), rendered from their JSON; ``answer`` is the short opening verdict."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _f(x, d=3):
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return "n/a"
    return f"{x:.{d}f}"


def _q(x):
    return "not reached" if x is None else f"{x:.0f}"


def section_ceiling(path: Path) -> str:
    d = json.loads(path.read_text())
    m = d["machine"]
    lines = ["## What a perfect critic buys: the oracle ceiling per task", "",
             "Command: `python benchmarks/critic_ceiling.py` (writes `benchmarks/results/critic_ceiling.json` and `.png`; "
             "each task by its own invocation, merged). The oracle value source (`critic_align/oracle.py`) estimates "
             "E[R | x_t] by K continuations of the current policy's own sampler; `oracle_gae` uses it in GAE with its "
             "queries *not* counted (the ceiling a perfect critic gives), `mc_counted` is the same oracle's step-level "
             "Monte-Carlo advantage (λ = 0) with every query counted, `awm_oracle` is AWM with the oracle's R − V(x_t) "
             "at its forward-noised states; `awm_grafted` / `nft_grafted` weight each forward-noised row by the grafted "
             "critic's advantage at that state (`awm_advantage` / `nft_advantage: critic`). Final = held-out reward "
             "at the end of the budget, mean ± std over seeds at "
             "the chosen learning rate (the best mean over the swept values); queries to reach = policy reward queries "
             "until the 3-epoch mean training reward reached the best critic-free method's final training reward "
             "(`mc_counted`: all its queries). Machine: " + f"{m['cpu_count']} CPU cores, torch {m['torch']}, "
             f"{m['torch_threads']} thread ({m['note']}).", ""]
    for inv in d.get("invocations", []):
        if inv.get("reduction_vs_issue"):
            lines.append(f"Reduced versus the issue ({', '.join(inv['tasks'])}): {inv['reduction_vs_issue']}.")
    lines.append("")
    for task, s in d["summary"].items():
        budget = d["budget_policy_queries"].get(task) if isinstance(d["budget_policy_queries"], dict) else None
        lines += [f"### {task}" + (f" ({budget} policy reward queries per run)" if budget else ""), "",
                  "| method | final reward | chosen lr | sweep (lr: mean) | policy queries | oracle queries | "
                  "queries to reach the baseline's final (per seed) | baseline | ratio |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in s["methods"].items():
            sweep = ", ".join(f"{k}: {_f(v['mean'])}" for k, v in r["sweep"].items())
            reach = r.get("total_queries_to_reach_best_baseline") or r.get("policy_queries_to_reach_best_baseline") or []
            lines.append(f"| {name} | {_f(r['final_reward_mean'])} ± {_f(r['final_reward_std'])} "
                         f"({len(r['seeds'])} seeds) | {r['chosen_lr']:g} | {sweep} | {r['policy_queries']} | "
                         f"{r['oracle_queries']} | {', '.join(_q(x) for x in reach)} | {r.get('baseline_for_queries')} | "
                         f"{_f(r.get('queries_ratio_median'), 2)} |")
        if task == "gmm" and not any("grafted" in name for name in s["methods"]):
            lines += ["", "No grafted-critic rows: the mixture's reward is a formula (a box on the sample), with no "
                          "network whose later layers a critic could be grafted onto."]
        if len(s.get("sampler_families", [[], []])) == 1:  # e.g. digits_dit: no SDE window, one sampler for all
            family = ("Queries to reach are measured against the best critic-free method of all (PPO, NFT and AWM all "
                      "sample full trajectories of the same SDE step here). Baseline: ")
        else:
            family = ("Queries to reach are measured against the best critic-free method that samples the same way "
                      "(PPO's rollouts: GRPO; NFT / AWM's full trajectories: the better of the two), as their training "
                      "rewards come from different samplers. PPO family's baseline: ")
        lines += ["", f"Best critic-free method by final held-out reward: {s.get('best_critic_free_final_reward')}. "
                      + family + f"{s.get('best_critic_free')} (final training reward "
                      f"{_f(s.get('best_critic_free_final_train_reward'))}). **`oracle_queries_ratio` = "
                      f"{_f(s.get('oracle_queries_ratio'), 2)}**, `learned_share_of_oracle_gain` = "
                      f"{_f(s.get('learned_share_of_oracle_gain'), 2)} (best learned critic: "
                      f"{s.get('best_learned_critic')})."
                  + ("" if s.get("goal_p1_met") is None else
                     f" Goal P1 (the oracle shows room, so a learned critic should need ≤ 0.5 of the queries): "
                     f"**{'met' if s['goal_p1_met'] else 'missed'}**, the best learned critic needs "
                     f"{_f(s.get('learned_queries_ratio'), 2)}.")]
        if s.get("queries_to_reach_informative") is False:
            gain = s.get("best_critic_free_train_gain")
            lines[-1] += (f" **Here queries to reach say nothing**: {s.get('best_critic_free')}'s training reward "
                          f"changes by {'n/a' if gain is None else format(gain, '+.3f')} from its first three epochs' "
                          f"({_f(s.get('best_critic_free_first3_train_reward'))}) to its last three's, against an "
                          f"epoch-to-epoch swing of "
                          f"{_f(s.get('train_reward_epoch_swing'), 3)} (z = {_f(s.get('train_gain_z'), 2)}; a gain counts "
                          "from z = 2): the training reward swings more with the prompts and noise each epoch draws than "
                          "the run gains, so reaching its level reads the swing, not speed; compare the final held-out "
                          "rewards.")
        lines.append("")
        vd = d["variance_decomposition"].get(task)
        if vd:
            lines += [f"Variance decomposition ({vd['n_trajectories']} full stochastic trajectories of the base policy, "
                      f"K = {vd['K']} continuations per state, Var(R) = {_f(vd['var_R'], 4)}): explained variance of the "
                      f"exact value per bucket of steps {', '.join(_f(x, 2) for x in vd['ev_per_bucket'])}; explained "
                      f"before the first step (prompt and initial noise) {_f(vd['ev_per_step'][0], 2)}; share of "
                      f"Var(R) resolved in each bucket {', '.join(_f(x, 2) for x in vd['share_of_var_R_resolved_per_bucket'])}"
                      " (the last bucket includes the final step, after which V = R).", "",
                      "| advantage | variance per bucket of steps (reward units²; GRPO normalised: unit) |", "|---|---|"]
            for k, v in vd["advantage_variance_per_bucket"].items():
                lines.append(f"| {k} | {', '.join(_f(x, 4) for x in v)} |")
            if "closed_form_check" in vd:
                c = vd["closed_form_check"]
                lines += ["", f"The oracle against the mixture's closed-form value at the base policy: mean |diff| "
                              f"{_f(c['mean_abs_diff'], 4)} at mean s.e. {_f(c['mean_stderr'], 4)} "
                              f"({_f(c['fraction_within_3se'], 2)} within 3 s.e.; the rest is the 20-step sampler's "
                              "discretisation, which the unit test removes with 100 steps)."]
            lines.append("")
    return "\n".join(lines)


def section_grafted(path: Path) -> str:
    d = json.loads(path.read_text())
    lines = ["## A critic grafted onto the reward model: held-out explained variance per bucket of steps", "",
             "Command: `python benchmarks/critic_grafted.py --task TASK` (merges its task into "
             "`benchmarks/results/critic_grafted.json`). Held-out set: the base policy's full stochastic trajectories "
             "on fresh noise; EV = 1 − E[(R − V)²]/Var(R) per step, averaged per bucket of steps (the oracle's "
             "corrected for its own Monte-Carlo noise). `grafted_init` is the grafted critic before training "
             "(r(decode(x̂0)) of the base prediction); `x0_reward_raw` the raw x0-prediction reward with no "
             "calibration. On t2i and t2i_sd3 the graft is `composition`'s: the digit classifier's later layers per "
             "cell, the non-neural clauses (count, colour, position) read from decode(x̂0)'s pixels.", ""]
    if d.get("reduction_vs_issue"):  # a file written before entries held their own run details
        lines += [f"Reduced versus the issue: {d['reduction_vs_issue']}.", ""]
    for task, t in d["tasks"].items():
        h = t["heldout"]
        lines += [f"### {task} ({h['n_trajectories']} held-out trajectories, oracle K = {h['K']}; reward mean "
                  f"{_f(h['mean_R'], 3)}, variance {_f(h['var_R'], 4)})", ""]
        m = t.get("machine", d.get("machine"))
        if m:
            lines += [f"Machine: {m['cpu_count']} CPU cores, torch {m['torch']}, {m['torch_threads']} thread "
                      f"({m['note']})" + (f"; {t['seconds'] / 60:.0f} min." if "seconds" in t else "."), ""]
        if t.get("reduction_vs_issue"):
            lines += [f"Reduced versus the issue: {t['reduction_vs_issue']}.", ""]
        lines += ["| critic | EV per bucket of steps (noisiest first) | EV overall | value-pretraining queries |",
                  "|---|---|---|---|"]
        for name, r in t["critics"].items():
            lines.append(f"| {name} | {', '.join(_f(x, 2) for x in r['ev_per_bucket'])} | {_f(r['ev_overall'], 2)} | "
                         f"{r.get('pretrain_queries', '')} |")
        if "grafted_over_oracle_min_bucket" in t:
            lines += ["", f"**`grafted_over_oracle_min_bucket` = {_f(t['grafted_over_oracle_min_bucket'], 2)}** "
                          f"(goal ≥ 0.8); per bucket {', '.join(_f(x, 2) for x in t['grafted_over_oracle_per_bucket'])}."]
        lines.append("")
    return "\n".join(lines)


def answer(results: Path) -> str:
    """The short, plain verdict the critic page opens with: per task, how many of the best critic-free method's queries a
    perfect critic and the learned ones need to reach its final reward, and the grafted critic's held-out EV."""
    ceiling, grafted = results / "critic_ceiling.json", results / "critic_grafted.json"
    if not ceiling.exists():
        return ""
    d = json.loads(ceiling.read_text())
    out = ["**When does the critic pay?** (`critic_ceiling.json`, `critic_grafted.json`; sections below.) A ratio is "
           "the policy reward queries a method needed to reach the best critic-free method's final reward over that "
           "method's own; ≤ 0.5 is the goal.", ""]
    for task, s in d["summary"].items():
        ms = s["methods"]
        free = s.get("best_critic_free")
        parts = [f"- **{task}**: against {free} (same sampler), a perfect critic (oracle GAE, its queries not counted) "
                 f"needs {_f(s.get('oracle_queries_ratio'), 2)} of its queries"]
        for name in ("learned_gae", "grafted_gae", "awm_grafted", "nft_grafted", "awm_oracle", "mc_counted"):
            if name in ms:
                r = ms[name].get("queries_ratio_median")
                vs = ms[name].get("baseline_for_queries")
                div = "" if math.isfinite(ms[name]["final_reward_mean"]) else ", then diverged"
                parts.append(f"{name} {'does not reach it' if r is None else _f(r, 2)}"
                             + (f" (against {vs}{div})" if vs != free else f"{div and ' (' + div[2:] + ')'}"))
        room = s.get("oracle_queries_ratio")
        verdict = ("queries to reach not measurable: the training reward's epoch-to-epoch swing with the prompts drawn "
                   "exceeds the gain" if s.get("queries_to_reach_informative") is False else
                   "room for a critic" if room is not None and room <= 0.5 else
                   "no room: even a perfect critic does not halve the queries")
        if s.get("goal_p1_met") is not None:
            verdict += (f"; goal P1 {'met' if s['goal_p1_met'] else 'missed'} (best learned critic "
                        f"{_f(s.get('learned_queries_ratio'), 2)})")
        best = s.get("best_critic_free_final_reward")
        out.append(", ".join(parts) + f" — {verdict}. Best final held-out reward of a critic-free method: {best} "
                   f"{_f(ms[best]['final_reward_mean'])}; of all: " + max(
                       ((k, v["final_reward_mean"]) for k, v in ms.items() if math.isfinite(v["final_reward_mean"])),
                       key=lambda kv: kv[1])[0] + ".")
    if grafted.exists():
        g = json.loads(grafted.read_text())
        for task, t in g["tasks"].items():
            c = t["critics"]
            out.append(f"- **{task}, held-out explained variance per bucket of steps** (noisiest first): oracle "
                       f"{', '.join(_f(x, 2) for x in c['oracle']['ev_per_bucket'])}; today's head "
                       f"{', '.join(_f(x, 2) for x in c['head']['ev_per_bucket'])}; grafted "
                       f"{', '.join(_f(x, 2) for x in c['grafted']['ev_per_bucket'])} "
                       f"(`grafted_over_oracle_min_bucket` {_f(t.get('grafted_over_oracle_min_bucket'), 2)}).")
    out.append("")
    return "\n".join(out)
