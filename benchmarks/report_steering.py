"""Steering sections (benchmarks/results/steering.md and t2i.md), rendered from the steering benchmarks' JSON."""

from __future__ import annotations

import json
from pathlib import Path


def _f(x, d=3):
    return "n/a" if x is None else f"{x:.{d}f}"


def section_gmm_steering(path: Path) -> str:
    d = json.loads(path.read_text())
    a = d["args"]
    ns = a["particles"]
    lines = [
        "## Steering on the exact Gaussian mixture: SMC potentials vs the exact tilted target",
        "",
        f"Command: `python benchmarks/gmm_steering.py` (writes `benchmarks/results/gmm_steering.json` and `.png`; "
        f"{d['time_s']:.0f} s on {a['threads']} thread(s)). Exact model (analytic ε), {a['steps']} stochastic DDIM "
        f"steps, target p·exp(λ·r), {a['groups']} output samples per method, each drawn from its group's weighted "
        "particles (SMC's default output). Potentials: `value` = λ·E[r | x_t], `soft_value` = log E[exp(λ·r) | x_t] "
        "(the optimal twist), `x0_reward` = λ·r(x̂0); `exact` from the closed forms of `critic_align/tasks/gmm.py`, "
        "`critic` from a value-pretrained critic (one head per target, "
        f"{d['critic_reward_queries']} Monte-Carlo returns, {d['critic_pretrain_s']:.0f} s): for the 0/1 box the soft "
        "value is log(1 + (e^λ − 1)·P) from the box head's P(r = 1 | x_t); for the linear reward a head trained on "
        f"exp(λ(r − {a['exp_c']:g})). Distances: sliced W2 to exact target samples; the noise floor is exact vs exact "
        "at the same n (mean ± std of 5). **Converges** (the script's definition): the distance does not grow with "
        "N (each doubling adds at most 2 floor stds, and it ends below where it started) and at the largest N lies "
        "within floor + 3 std + the sampler's discretisation excess (the plain T-step sampler's distance to the "
        "*untilted* exact law minus that distance's floor: an error SMC's weights cannot remove).",
        "",
        f"**`soft_value_converges`: {str(d['soft_value_converges']).lower()}** (exact soft value, every reward); "
        f"with the learned critic's soft value: {str(d.get('soft_value_converges_critic')).lower()}.",
        "",
    ]
    for name, res in d["rewards"].items():
        fl = res["noise_floor"]
        conv = res["converges"]
        lines += [
            f"**{name} reward, λ = {res['lam']:g}** — target mean reward {_f(res['target_mean_reward'])}; noise floor "
            f"{_f(fl['mean'])} ± {_f(fl['std'])}; discretisation excess {_f(res['discretisation_excess'])} (plain "
            f"sampler vs untilted law {_f(res['sampler_vs_untilted_reference_w2'])}, its floor "
            f"{_f(res['untilted_reference_noise_floor']['mean'])}); reachable band "
            f"{_f(conv['smc/soft_value/exact']['band'])}.",
            "",
            "| method | " + " | ".join(f"W2, N={n}" for n in ns) + " | converges | mean reward at N=" + str(ns[-1])
            + " | final ESS/N at N=" + str(ns[-1]) + " |",
            "|---|" + "---|" * (len(ns) + 3),
        ]
        for m, v in conv.items():
            last = next(r for r in res["rows"] if r["method"] == m and r["particles"] == ns[-1])
            ess = last["final_ess_per_particle"]
            lines.append(f"| {m} | " + " | ".join(_f(w) for w in v["sliced_w2"]) + f" | {'yes' if v['converges'] else 'no'}"
                         + f" | {_f(last['mean_reward'])} | {'—' if ess != ess else _f(ess, 2)} |")
        n1 = {r["method"]: r for r in res["rows"] if r["particles"] == 1}
        lines += ["", "At N = 1: " + ", ".join(f"{m} W2 {_f(r['sliced_w2'])} (mean reward {_f(r['mean_reward'])})"
                                               for m, r in n1.items()) + "."]
        mid = ns[len(ns) // 2]
        lines += ["", f"Cost per output sample at N = {mid} (critic rows are forward / backward; equivalent NFE prices a "
                  "critic forward at 1, a backward at 2 and a reward call at 1):", "",
                  "| method | backbone NFE | critic fwd | critic bwd | reward calls | equivalent NFE |",
                  "|---|---|---|---|---|---|"]
        for r in res["rows"]:
            if r["particles"] == mid:
                lines.append(f"| {r['method']} | {r['nfe']:.0f} | {r['critic_forward_rows_per_output']:.0f} | "
                             f"{r['critic_backward_rows_per_output']:.0f} | {r['reward_rows_per_output']:.0f} | "
                             f"{r['equivalent_nfe']:.0f} |")
        lines += ["", "Guided-proposal SMC (guidance λ·∇E[r | x_t], value potential): the final ESS / N with and without the "
                  "per-step KL cap:", "", "| variant | N | sliced W2 | final ESS / N | mean reward |", "|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['particles']} | {_f(r['sliced_w2'])} | {_f(r['final_ess_per_particle'], 2)} | "
                  f"{_f(r['mean_reward'])} |" for r in res["guided"]]
        if res.get("convergence"):
            lines += ["", "SMC with the exact soft value as the sampler is refined: " + "; ".join(
                f"T = {r['steps']}, N = {r['particles']}: W2 {_f(r['sliced_w2'])}" for r in res["convergence"])
                + f" (noise floor {_f(fl['mean'])} ± {_f(fl['std'])})."]
        lines.append("")
    lines += ["![steering vs the exact target](benchmarks/results/gmm_steering.png)", ""]
    return "\n".join(lines)


def section_digits_steering(path: Path) -> str:
    d = json.loads(path.read_text())
    a = d["args"]
    rows = d["rows"]
    base = next(r for r in rows if r["method"] == "base")
    lines = [
        "## Steering digits with the critic: reward vs NFE",
        "",
        f"Command: `python benchmarks/digits_steering.py` (writes `benchmarks/results/digits_steering.json`, `.png` "
        f"and grids `benchmarks/results/digits_steering_*.png`; {d['time_s'] / 60:.1f} min). "
        + ("The shipped digits UNet" if not a.get("run") else
           f"The RL-post-trained policy of the main job's run (`--run {a['run']}`), steered with its own critic "
           "(the core seed's setting)")
        + f", 20 stochastic DDIM steps, {10 * a['per_digit']} prompts; critic: "
        + ("the digits config's LoRA critic value-pretrained on the base policy "
           f"({a['critic_epochs']} batches of 64 rollouts)" if d["critic_source"] == "fresh" else
           "the digits config's LoRA critic value-pretrained on the base policy by an earlier run of this script "
           f"({a['critic_epochs']} batches of 64 rollouts; cached in benchmarks/results/tmp/, reused)"
           if d["critic_source"].endswith("tmp/digits_steering") else
           ("the run's own critic, trained jointly with the policy" if a.get("run") else
            f"from `{d['critic_source']}`"))
        + f". Reward: digit_prob (the classifier's confidence at temperature 6). Guidance scale w = "
        f"{d['best_guidance_scale']:g} (best of {a['scales']} at N = 1); SMC resamples when ESS < "
        f"{a['ess_threshold']}·N" + (f", SMC's output: {a['smc_output']}" if "smc_output" in a else "")
        + ". Equivalent NFE counts a critic forward as 1 backbone call and a backward as 2"
        + (f", a decode + reward call as {a['reward_price']:g}." if "reward_price" in a else "."),
        "",
        "| method | N | w / λ | digit_prob (± s.e. over prompts) | digit_correct | NFE | equivalent NFE "
        "| resampled (fraction of steps×groups) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['particles']} | {_knob(r)} | {_with_se(r['rewards'], 'digit_prob')} | "
                     f"{_f(r['rewards'].get('digit_correct'))} | {r['nfe']:.0f} | {r['equivalent_nfe']:.0f} | "
                     f"{_f(r.get('resample_rate'), 2)} |")
    verdict = _verdicts(rows, a["particles"], "digit_prob")
    lines += ["", f"Base model: digit_prob {_f(base['rewards']['digit_prob'])}. Against best-of-N (the best λ of each "
              "method at each N):", "", *verdict, "",
              "![reward vs NFE](benchmarks/results/digits_steering.png)", ""]
    return "\n".join(lines)


def _knob(r) -> str:
    return f"w={r['scale']:g}" if "scale" in r else (f"λ={r['lam']:g}" if "lam" in r else "")


def _with_se(rewards: dict, key: str) -> str:
    return _f(rewards[key]) + (f" ± {_f(rewards[key + '_se'])}" if key + "_se" in rewards else "")


def _verdict_of(r: dict, bon: dict, key: str) -> str:
    """r's reward minus best-of-N's, judged against the noise (2 standard errors of the difference)."""
    diff = r[key] - bon[key]
    se = (r.get(f"{key}_se", 0.0) ** 2 + bon.get(f"{key}_se", 0.0) ** 2) ** 0.5
    if se == 0:
        return f"{diff:+.3f} (no s.e. recorded)"
    word = "beats" if diff > 2 * se else ("loses to" if diff < -2 * se else "ties with (within 2 s.e.)")
    return f"{word} BoN, {diff:+.3f} ± {se:.3f}"


def _verdicts(rows: list[dict], particles: list[int], key: str, rewards_of=lambda r: r["rewards"],
              rel_tol: float = 0.0) -> list[str]:
    """The issue's goal: critic SMC and guidance+BoN beat BoN(N) at equal NFE (the best λ of each method at each
    N, ranked by ``rewards_of(row)[key]``); and, where a BoN run's NFE matches a method's equivalent NFE (within
    ``rel_tol`` of it), at equal total compute."""
    verdict = []
    for n in particles:
        bon = next((r for r in rows if r["method"] == "bon" and r["particles"] == n), None)
        if bon is None:
            continue
        for m in ("smc", "guidance+bon", "smc_x0"):
            cands = [r for r in rows if r["method"] == m and r["particles"] == n]
            if cands:
                best = max(cands, key=lambda r: rewards_of(r)[key])
                verdict.append(f"- N={n}, equal backbone NFE ({bon['nfe']:.0f}): {m} "
                               f"{_verdict_of(rewards_of(best), rewards_of(bon), key)}")
                match = next((r for r in rows if r["method"] == "bon"
                              and abs(r["nfe"] - best["equivalent_nfe"]) <= rel_tol * best["equivalent_nfe"]), None)
                if match is not None and match is not bon:
                    same = "equal" if match["nfe"] == best["equivalent_nfe"] else "about equal"
                    verdict.append(f"- N={n}, {same} equivalent NFE ({match['nfe']:.0f} vs {best['equivalent_nfe']:.0f}): {m} "
                                   f"{_verdict_of(rewards_of(best), rewards_of(match), key)} (N={match['particles']})")
    return verdict


def section_t2i_steering(path: Path) -> str:
    d = json.loads(path.read_text())
    a = d["args"]
    rows = d["rows"]
    key, ev = d["reward_key"], d["eval_keys"][0]
    n_split = {s: len(ps) for s, ps in d["splits"].items()}
    pre = d.get("critic_value_pretrain")
    name = d["benchmark"]  # t2i_steering, or t2i_steering_x0 (--critic-x0-reward)
    x0 = a.get("critic_x0_reward", False)
    flags = " ".join(f"--{k.replace('_', '-')} " + (" ".join(f"{x:g}" for x in v) if isinstance(v, list) else f"{v:g}")
                     for k, v in a.items() if k in ("prompts_per_split", "particles", "scales", "lam", "bon_only",
                                                     "critic_epochs", "threads") and v != []
                     and not (k == "scales" and a.get("critic_x0_reward")))  # no guidance rows: --scales unused
    flags += " --critic-body grafted" if a.get("critic_body") == "grafted" else ""
    grafted_note = ("The critic is the grafted one (`critic_body: grafted`): its forward also decodes x̂0 and runs the "
                    "reward network's later layers, which the equivalent NFE does not count (a critic forward is priced "
                    "as one backbone call): at equal NFE it is favoured; `t2i_steering_grafted_flops.json` prices it in "
                    "full. " if a.get("critic_body") == "grafted" else "")
    if d["critic_source"] == "fresh":
        critic = "value-pretrained on the frozen base policy by this run"
    elif d["critic_source"].endswith(f"tmp/{name}"):
        critic = "value-pretrained on the frozen base policy by an earlier run of this script (cached, reused)"
    else:
        critic = f"from `{d['critic_source']}`"
    if pre:
        buckets = ", ".join(f"steps {k.split('_')[-1]}: {_f(v, 2)}" for k, v in pre.items()
                            if k.startswith("pre_value_ev_steps_"))
        critic += (f" ({pre['batches']} batches of 64 rollouts, {pre['reward_queries']} reward queries, "
                   f"{pre['seconds'] / 60:.1f} min); explained variance of its value on each batch before it was "
                   f"fitted on it (fresh prompts and noise), mean of the last 5 batches: "
                   f"{_f(pre['pre_value_ev_last5_mean'], 2)}; last batch: {_f(pre['pre_value_ev'], 2)} ({buckets})")

    def cell(r, split, k, binary=False):
        v = r["rewards_by_split"][split]
        if binary:  # 0/1 per prompt: binomial standard error
            p = v[k]
            return f"{_f(p)} ± {_f((p * (1 - p) / n_split[split]) ** 0.5)}"
        return _with_se(v, k)

    if x0:
        flags += " --critic-x0-reward"
        critic += ("; with `critic_x0_reward`: its head also reads r(decode(x̂0(x_t))) of the step's own x0 prediction "
                   "(a decode + reward call per particle and step, in the equivalent NFE), so it has no gradient in "
                   "x_t and the guidance rows are left out")
        knobs = ""
    else:
        knobs = f"Guidance scale w = {d['best_guidance_scale']:g} (best of {a['scales']} at N = 1 by {key}); "
    lines = [
        "## Steering the tiny text-to-image pipeline with the critic: reward vs NFE"
        + (" (a critic reading r(decode(x̂0)))" if x0 else "")
        + (" (the grafted critic: the reward network's own later layers)" if a.get("critic_body") == "grafted" else ""),
        "",
        f"Command: `python benchmarks/t2i_steering.py {flags}` (writes `benchmarks/results/{name}.json`, `.png` "
        f"and grids `benchmarks/results/{name}_*.png`; {d['time_s'] / 60:.1f} min). The shipped "
        "`critic_align/assets/tiny_t2i` pipeline through the Stable Diffusion path of `train/configs/t2i.yaml` "
        f"(20 stochastic DDIM steps, eta = 1, CFG-free), {n_split['train']} training and {n_split['heldout']} held-out "
        f"prompts (a fixed draw, seed {a['prompt_seed']}); critic: the t2i config's LoRA critic {critic}. "
        f"Steered reward: {key} (dense: mean clause probability); {ev} is GenEval's all-clauses-right metric. "
        f"{knobs}SMC resamples "
        f"when ESS < {a['ess_threshold']}·N, SMC's output: {a['smc_output']}. Equivalent NFE counts a critic forward "
        f"as 1 backbone call, a backward as 2, a decode + reward call as {a['reward_price']:g}. {grafted_note}"
        "Standard errors: over prompts (for the 0/1 metric, binomial).",
        "",
        f"| method | N | w / λ | {key}, train | {key}, held-out | {ev}, train | {ev}, held-out | NFE "
        "| equivalent NFE | resampled |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['particles']} | {_knob(r)} | {cell(r, 'train', key)} | "
                     f"{cell(r, 'heldout', key)} | {cell(r, 'train', ev, True)} | {cell(r, 'heldout', ev, True)} | "
                     f"{r['nfe']:.0f} | {r['equivalent_nfe']:.0f} | {_f(r.get('resample_rate'), 2)} |")
    base = next(r for r in rows if r["method"] == "base")
    lines += ["", f"Base model: {key} {_f(base['rewards'][key])}, {ev} {_f(base['rewards'][ev])} over all "
              f"{sum(n_split.values())} prompts. Against best-of-N on {key} (the best λ of each method at each N), all "
              "prompts (and against a larger best-of-N whose backbone NFE is within 5 % of a method's equivalent NFE):",
              "", *_verdicts(rows, a["particles"], key, rel_tol=0.05),
              "", "held-out prompts only:", "",
              *_verdicts(rows, a["particles"], key, rewards_of=lambda r: r["rewards_by_split"]["heldout"], rel_tol=0.05),
              "",
              f"![reward vs NFE](benchmarks/results/{name}.png)", ""]
    return "\n".join(lines)


def section_t2i_steering_flops(path: Path) -> str:
    """The FLOP-matched rows (t2i_steering.py --flops-matched): the critic against FK's x0-reward SMC at equal FLOPs
    counted at real scale."""
    d = json.loads(path.read_text())
    a, key = d["args"], d["reward_key"]
    n_split = {s: len(ps) for s, ps in d["splits"].items()}
    names = {"smc": "critic SMC", "guidance+bon": "critic guidance + BoN", "bon": "best-of-N (no critic)"}
    prices = "; ".join(f"{s}: " + ", ".join(f"{m} {v:,.0f}" for m, v in p.items())
                       for s, p in d["per_particle_step_gflops"].items())
    lines = [
        "## Steering the tiny text-to-image pipeline at equal FLOPs counted at real scale"
        + (" (the grafted critic)" if d.get("critic_body") == "grafted" else ""),
        "",
        f"Command: `python benchmarks/t2i_steering.py --flops-matched {d['flops_source']} "
        + ("--critic-body grafted " if d.get("critic_body") == "grafted" else "") + "--prompts-per-split "
        f"{a['prompts_per_split']} --particles {' '.join(str(n) for n in a['particles'])} --lam "
        f"{' '.join(f'{x:g}' for x in a['lam'])} --flops-rounding {' '.join(a['flops_rounding'])}"
        + (f" --later-matchings-lam {' '.join(f'{x:g}' for x in a['later_matchings_lam'])}"
           if a.get("later_matchings_lam") else "")
        + f"` (writes `benchmarks/results/{d['benchmark']}.json`; {d['rows_wall_time_s'] / 60:.0f} min of steering "
        f"rows, the last run {d['time_s'] / 60:.0f} min with {d['rows_reused_from_an_earlier_run']} rows reused from "
        f"an earlier, cut-short run). {d['stand_in'][0].upper() + d['stand_in'][1:]}. GFLOPs per particle-step "
        f"({d['flops_source']}): {prices}. Matched particle counts: {d['rounding']}; {d['matched_on']}. "
        f"{n_split['train']} training + {n_split['heldout']} held-out prompts, one noise seed; guidance scale "
        f"w = {d['best_guidance_scale']:g} (best of {a['scales']} at N = 1); each SMC at its best λ of {a['lam']}. "
        f"{d['ties_or_beats_rule'][0].upper() + d['ties_or_beats_rule'][1:]}."
        + (f" Reduced: {d['reduction_vs_issue']}." if d.get("reduction_vs_issue") else "")
        + (f" {d['grafted'][0].upper() + d['grafted'][1:]}." if d.get("grafted") else ""),
        "",
        f"| scale | FK N | FK {key} | method | N' | FLOPs / FK's (per step, whole sample) | {key} | − FK ± s.e. "
        "| ties or beats |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for scale, by_n in d["critic_vs_fk_equal_flops"].items():
        for n, e in by_n.items():
            for m, label in names.items():
                r = e[m]
                if "reward" not in r:
                    lines.append(f"| {scale} | {n} | {_f(e['fk_reward'])} | {label} | {r['particles']} | not run: "
                                 f"{r['not_run']} | | | no |")
                    continue
                knob = f" (λ={r['lam']:g})" if "lam" in r else (f" (w={r['scale']:g})" if "scale" in r else "")
                lines.append(f"| {scale} | {n} | {_f(e['fk_reward'])} | {label}{knob} | {r['particles']} | "
                             f"{_f(r['flop_ratio_per_step'], 2)}, {_f(r['flop_ratio_whole_sample'], 2)} | "
                             f"{_f(r['reward'])} | {r['difference']:+.3f} ± {r['se']:.3f} | "
                             f"{'yes' if r['ties_or_beats'] else 'no'} |")
    keys = [k for k in d if k.startswith("critic_vs_fk_equal_flops")]  # the first rounding's, then the others'
    for key_v in keys:
        what = "" if key_v == "critic_vs_fk_equal_flops" else " (another matching: see the rounding above)"
        lines += ["", f"`{key_v}`{what}: the best critic method against FK, and best-of-N without a critic:", ""]
        for scale, by_n in d[key_v].items():
            for n, e in by_n.items():
                b = e["bon"]
                control = (f"; best-of-N at N' = {b['particles']}: {b['difference']:+.3f} ± {b['se']:.3f}"
                           if "reward" in b else "")
                if e["best_critic_method"] is None:
                    lines.append(f"- {scale}, N = {n}: no critic method fits FK's budget{control}")
                    continue
                lines.append(f"- {scale}, N = {n}: {names[e['best_critic_method']]} at N' = "
                             f"{e['best_critic_particles']} {_f(e['best_critic_reward'])} vs FK {_f(e['fk_reward'])}: "
                             f"{e['difference']:+.3f} ± {e['se']:.3f}, "
                             f"{'ties or beats' if e['ties_or_beats'] else 'loses'}{control}")
    return "\n".join(lines + [""])
