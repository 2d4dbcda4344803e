"""Training-topic sections (the main jobs, advantage estimators, baselines, the SDE window, reward hacking), rendered from
the benchmarks' JSON; benchmarks/report.py collects them into benchmarks/results/training.md."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from report_fmt import fmt as _fmt


def section_main_job(path: Path) -> str:
    d = json.loads(path.read_text())
    rows = [json.loads(x) for x in (path.parent / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = [r for r in rows if r["phase"] == "train"][-5:]
    ev = sum(r["value_ev"] for r in last) / len(last)
    lines = [
        "## The main job (README's first command)",
        "",
        f"`python benchmarks/main_job.py` runs `{d.get('command', 'critic-align train --config digits')}` and copies "
        f"its outputs to `benchmarks/results/main_job/`: value pretraining + PPO/GAE, {d['epochs']} epochs, "
        f"{d['reward_queries']} reward queries, {d['train_seconds'] / 60:.1f} minutes of pretraining and epochs "
        f"({d.get('wall_seconds_with_startup', d['train_seconds']) / 60:.1f} with start-up, evaluations and grids)"
        + (f" on {m['cores_used']} of the machine's {m['cpu_count']} CPU cores with {m['torch_threads']} torch "
           f"thread(s), torch {m['torch']}." if (m := d.get("machine")) else "."),
        "",
        "| | first epoch | last epoch |",
        "|---|---|---|",
        f"| digit_prob (trained, temperature 6) | {_fmt(d['digit_prob_first_epoch'])} | {_fmt(d['digit_prob_last_epoch'])} |",
        f"| digit_correct (reported) | {_fmt(d['digit_correct_first_epoch'])} | {_fmt(d['digit_correct_last_epoch'])} |",
        "",
        f"Critic explained variance on the training batch, mean of the last 5 epochs: {_fmt(ev, 2)}.",
    ]
    if "eval/diversity/pairwise_l2_base" in d:
        def kept(k):
            return d[f"{k}_final"] / d[f"{k}_base"]

        lines += [
            "",
            f"The fixed held-out batch (10 digits x 8 samples, its own noise; epochs {d['eval_epochs'][0]} and "
            f"{d['eval_epochs'][1]}):",
            "",
            "| held-out | base policy | final policy |",
            "|---|---|---|",
            f"| digit_prob | {_fmt(d['eval/reward/digit_prob_base'])} | {_fmt(d['eval/reward/digit_prob_final'])} |",
            f"| digit_correct | {_fmt(d['eval/reward/digit_correct_base'])} | {_fmt(d['eval/reward/digit_correct_final'])} |",
            f"| within-prompt pairwise L2 | {_fmt(d['eval/diversity/pairwise_l2_base'], 2)} | "
            f"{_fmt(d['eval/diversity/pairwise_l2_final'], 2)} ({kept('eval/diversity/pairwise_l2'):.0%} kept) |",
            f"| within-prompt per-pixel std | {_fmt(d['eval/diversity/pixel_std_base'])} | "
            f"{_fmt(d['eval/diversity/pixel_std_final'])} ({kept('eval/diversity/pixel_std'):.0%} kept) |",
            f"| critic EV (all steps) | {_fmt(d.get('eval/value_ev_base'))} | {_fmt(d.get('eval/value_ev_final'))} |",
            "",
            f"The default job keeps {kept('eval/diversity/pairwise_l2'):.0%} of the base model's within-prompt "
            "pairwise distance at this reward gain: the goal of keeping 80 % is "
            + ("met." if kept("eval/diversity/pairwise_l2") >= 0.8 else
               "not met by the defaults; what KL, early stopping and the critic recipe do to it is measured in "
               "\"Reward vs diversity\" below."),
        ]
    lines += [
        "",
        "![main job curves](benchmarks/results/main_job/reward_curve.png)",
        "",
        "![critic on the held-out batch](benchmarks/results/main_job/critic_eval.png)",
        "",
        "Before / after (fixed noise, one row per digit): `benchmarks/results/main_job/grid_before.png`, "
        "`benchmarks/results/main_job/grid_after.png`.",
        "",
    ]
    return "\n".join(lines)


def _job_row(name: str, path: Path) -> str:
    d = json.loads(path.read_text())
    rows = [json.loads(x) for x in (path.parent / "metrics.jsonl").read_text().splitlines() if x.strip()]
    seconds = sum(r.get("time_s", 0) for r in rows if r["phase"] == "value_pretrain") + \
        sum(r["time_epoch_s"] for r in rows if r["phase"] == "train")
    last = [r for r in rows if r["phase"] == "train"][-5:]
    ev = sum(r["value_ev"] for r in last) / len(last)
    wall = d.get("train_seconds")
    return (f"| {name} | {d['epochs']} | {d['reward_queries']} | {seconds / 60:.1f} | "
            f"{_fmt(wall / 60 if wall is not None else None, 1)} | "
            f"{_fmt(d['digit_prob_first_epoch'])} → {_fmt(d['digit_prob_last_epoch'])} | "
            f"{_fmt(d['digit_correct_first_epoch'])} → {_fmt(d['digit_correct_last_epoch'])} | {_fmt(ev, 2)} |")


def section_dit_job(path: Path) -> str:
    cfg = json.loads((path.parent / "config.json").read_text())
    lines = [
        "## The DiT / flow-matching job next to the UNet main job",
        "",
        "`critic-align train --config digits_dit` on this machine (2 CPU cores, shared): the same value pretraining "
        "+ PPO/GAE on the shipped flow-matching digits DiT (`critic_align/assets/digits_dit`, "
        "`DiTTransformer2DModel`), with the SDE form of the rectified-flow sampler (Flow-GRPO, noise level "
        f"{cfg.get('sde_noise_level', cfg['eta'])}), {cfg['num_inference_steps']} steps, LoRA rank {cfg['lora_rank']} on "
        f"{', '.join(cfg['lora_target_modules'])}. Files copied from `runs/digits_dit/` to "
        "`benchmarks/results/dit_job/`. Minutes count value pretraining and epochs; wall minutes are `train()`'s "
        "wall time from `summary.json` (n/a where the run predates that field); "
        "rewards are the training batch's mean in the first and last epoch; EV is the critic's explained variance, "
        "mean of the last 5 epochs.",
        "",
        "| model | epochs | reward queries | minutes | wall minutes | digit_prob (trained, T = 6) "
        "| digit_correct (reported) | EV |",
        "|---|---|---|---|---|---|---|---|",
    ]
    main_job = path.parent.parent / "main_job" / "summary.json"
    if main_job.exists():
        lines.append(_job_row("UNet DDPM (`digits`)", main_job))
    lines.append(_job_row("DiT flow matching (`digits_dit`)", path))
    lines += [
        "",
        "![DiT job curves](benchmarks/results/dit_job/reward_curve.png)",
        "",
        "Before / after (fixed noise, one row per digit): `benchmarks/results/dit_job/grid_before.png`, "
        "`benchmarks/results/dit_job/grid_after.png`.",
        "",
    ]
    return "\n".join(lines)


def section_advantages(path: Path) -> str:
    data = json.loads(path.read_text())
    s = data["summary"]
    budget = data["budget_reward_queries"]
    m = data["machine"]
    lines = [
        "## GAE (latent critic) vs GRPO vs DDPO on digits, equal reward-query budget",
        "",
        f"Command: `python benchmarks/digits_advantages.py --seeds {' '.join(str(x) for x in s['gae']['seeds'])} "
        f"--budget {budget}"
        + "".join(f" --set {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in data["overrides"].items())
        + (f" --gae-config {data['gae_config']}" if data.get("gae_config", "digits") != "digits" else "") + "` "
        f"(writes `benchmarks/results/digits_advantages.json` and `.png`). Machine: {m['cpu_count']} CPU cores, "
        f"torch {m['torch']}, {m['torch_threads']} threads. Config: `train/configs/digits.yaml` with "
        f"overrides {data['overrides'] or 'none'}; GAE's value-pretraining rollouts count against its budget.",
        "",
        "Final rewards are measured on a fixed evaluation set (20 samples per digit, fixed noise, the trained "
        "stochastic sampler); mean ± std over seeds."
        + (" Step sizes are matched: GAE divides its centred advantages by the rewards' std, as GRPO does "
           "(`advantage_scale: rewards`), instead of whitening them by their own, smaller std, so at the same "
           "learning rate the two modes take steps of the same size and the difference is the estimator's."
           if data["overrides"].get("advantage_scale") == "rewards" else ""),
        "",
        "| advantage | seeds | base digit_prob | final digit_prob | final digit_correct | last-3-epoch train reward "
        "| within-prompt L2 base → final | pixel std base → final | s / epoch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in ("gae", "grpo", "ddpo"):
        if mode not in s:
            continue
        r = s[mode]
        lines.append(
            f"| {mode} | {len(r['seeds'])} | {_fmt(r['base_digit_prob_mean'])} | {_fmt(r['final_digit_prob_mean'])} ± "
            f"{_fmt(r['final_digit_prob_std'])} | {_fmt(r['final_digit_correct_mean'])} | "
            f"{_fmt(r['last3_train_reward_mean'])} | {_fmt(r.get('base_diversity_pairwise_l2'), 2)} → "
            f"{_fmt(r.get('final_diversity_pairwise_l2'), 2)} | {_fmt(r.get('base_diversity_pixel_std'))} → "
            f"{_fmt(r.get('final_diversity_pixel_std'))} | {_fmt(r['mean_epoch_seconds'], 1)} |"
        )
    reach = s.get("gae_queries_to_reach_grpo_final")
    if reach:
        per_seed = ", ".join("not reached" if math.isinf(x) else str(int(x)) for x in reach["per_seed"])
        lines += [
            "",
            f"Reward queries GAE needs to reach GRPO's final training reward ({_fmt(reach['grpo_final_train_reward'])},"
            f" 3-epoch moving average): per seed {per_seed}; median: "
            + ("not reached within the budget" if math.isinf(reach["median_fraction_of_budget"])
               else f"{_fmt(reach['median_fraction_of_budget'], 2)} × the budget") + " (goal: ≤ 0.5×). "
            "`queries_ratio_median` (GAE's queries, value pretraining included, over GRPO's): "
            + ("null (not reached)" if s.get("queries_ratio_median") is None else _fmt(s["queries_ratio_median"], 2))
            + ".",
        ]
    evs = [r["value_ev_after_pretraining"] for r in data["runs"] if r["mode"] == "gae"]
    if evs:
        keys = [k for k in evs[0] if k != "value_ev"]
        lines += [
            "",
            "Critic explained variance after value pretraining, on the first fresh training batch, per bucket of "
            "denoising steps (step 0 = pure noise), per seed:",
            "",
            "| seed | all steps | " + " | ".join(k.replace("value_ev_steps_", "steps ") for k in keys) + " |",
            "|---|---|" + "---|" * len(keys),
        ]
        for r, ev in zip([r for r in data["runs"] if r["mode"] == "gae"], evs):
            lines.append(f"| {r['seed']} | {_fmt(ev['value_ev'])} | " + " | ".join(_fmt(ev[k]) for k in keys) + " |")
    lines += ["", "![reward vs reward queries](benchmarks/results/digits_advantages.png)", ""]
    return "\n".join(lines)


def section_diversity_tradeoff(path: Path) -> str:
    """The section rendered from ``diversity_tradeoff.json``."""
    d = json.loads(Path(path).read_text())
    a = d["args"]

    def fmt(x, digits=3):
        return "n/a" if x is None else f"{x:.{digits}f}"

    lines = ["## Reward vs diversity: KL, early stopping, the critic recipe, and a 3x-budget run (digits main job)", "",
             f"Command: `python benchmarks/diversity_tradeoff.py` (writes `benchmarks/results/diversity_tradeoff.json` "
             f"and `.png`; {d['time_s']:.0f} s). Each variant = `train/configs/digits.yaml` (or the named preset) with "
             f"its overrides, {a['epochs']} epochs, seed {a['seed']}, common overrides {d['extra'] or 'none'}; held-out "
             f"evaluation every {a['eval_every']} epochs (200 samples on fixed noises, full stochastic sampler). "
             "'Diversity kept' = within-prompt pairwise L2 / the base model's. 'Early stop ≥ 80 %' = the best "
             "evaluation on the run's curve that keeps ≥ 80 % of the base diversity (stopping there needs no other "
             "run).", "",
             "| variant | overrides | final digit_prob (gain) | diversity kept | early stop ≥ 80 %: epoch, digit_prob "
             "(gain) | mean KL to ref |", "|---|---|---|---|---|---|"]
    for r in d["runs"]:
        es = r["early_stop_keep80"]
        es_s = "none keeps 80 %" if es is None else \
            f"{es['epoch']}, {fmt(es['digit_prob'])} ({es['reward_gain']:+.3f}), kept {fmt(es['diversity_kept'], 2)}"
        over = r["overrides"] if r["overrides"] else ("preset " + r["config"] if r["config"] != "digits" else "—")
        lines.append(f"| {r['variant']} | {over} | {fmt(r['final_digit_prob'])} ({r['final_reward_gain']:+.3f}) | "
                     f"{fmt(r['final_diversity_kept'], 2)} | {es_s} | {fmt(r['kl_to_ref_mean'], 4)} |")
    lr = d.get("long_run")
    if lr:
        mult = lr["epochs"] / a["epochs"]
        lines += ["", f"**Long run** ({lr['variant']}, {lr['epochs']} epochs = {mult:.0f}x the budget above): "
                  "held-out digit_prob "
                  f"{fmt(lr['base_digit_prob'])} → peak {fmt(lr['peak']['digit_prob'])} at epoch {lr['peak']['epoch']} → "
                  f"final {fmt(lr['final_digit_prob'])}; diversity kept at the end {fmt(lr['final_diversity_kept'], 2)}; "
                  f"rise then collapse: {'yes' if lr['rise_then_collapse'] else 'no'}."]
    lines += ["", "![reward vs diversity](benchmarks/results/diversity_tradeoff.png)", ""]
    return "\n".join(lines)


def section_baselines(path: Path) -> str:
    """The section rendered from ``baselines.json``."""
    d = json.loads(Path(path).read_text())
    a = d["args"]

    def fmt(x, digits=3, none="n/a"):
        return none if x is None else f"{x:.{digits}f}"

    lines = ["## Strongest baselines: GRPO, DiffusionNFT, AWM and the latent critic at an equal reward-query budget", "",
             f"Command: `python benchmarks/baselines.py` (writes `benchmarks/results/baselines.json`; {d['time_s']:.0f} s"
             + (f" of runs, made in {len(d['merged_from'])} parts on one core each and combined with `--merge`"
                if d.get("merged_from") else "") + "); "
             f"seeds {a['seeds']}; budgets: digits DiT {a['budget_digits']} reward queries (overrides "
             f"{d['digits_overrides'] or 'none'}), mixture {a['budget_gmm']}. Value pretraining counts against the "
             "budget. 'Queries to reach' = the median over seeds of the reward queries at which a run's training "
             "reward (3-epoch moving average) first reaches the best baseline's (grpo / nft / awm) final training "
             "reward, as a fraction of that baseline's budget (the goal for a critic method: ≤ 0.5). On the mixture the "
             f"reward is linear (unbounded) and the PPO runs carry gmm_finetune's KL (kl_coef {a['gmm_kl']}, the "
             f"per-step Gaussian KL) while nft / awm carry kl_coef {a['gmm_kl_forward']} (on the outputs' squared "
             "difference): a less regularised method moves further, so compare the mixture rows with that in mind.",
             ""]
    for task, s in d["summary"].items():
        best = s.get("best_baseline", {})
        lines += [f"**{task}** (best baseline: {best.get('method', 'n/a')}, final training reward "
                  f"{fmt(best.get('final_train_reward'))})", "",
                  "| method | base reward | final reward (mean ± std) | queries to reach the best baseline "
                  "(fraction of its budget) |", "|---|---|---|---|"]
        for m, r in s.items():
            if m == "best_baseline":
                continue
            reach = fmt(r.get("queries_fraction_of_best_baseline_budget"), 2, "not reached")
            div = r.get("diverged_seeds") or []
            final = (f"{fmt(r['final_reward_mean'])} ± {fmt(r['final_reward_std'])}" if r["final_reward_mean"] is not None
                     else "—")
            if div:
                final += f" (diverged in {len(div)} of {len(r['seeds'])} seeds: {div})"
            lines.append(f"| {m} | {fmt(r['base_reward_mean'])} | {final} | {reach} |")
        lines.append("")
    return "\n".join(lines)


def section_gmm_finetune(path: Path) -> str:
    d = json.loads(path.read_text())
    a = d["args"]
    floor = d["noise_floor"]
    lines = [
        "## Exact mixture task: fine-tuning against the exact tilted target",
        "",
        f"Command: `python benchmarks/gmm_finetune.py` (writes `benchmarks/results/gmm_finetune.json` and `.png`; "
        f"{d['time_s']:.0f} s). Reward r(x) = w·x with w = {d['w']}, KL-regularised PPO (kl_coef {d['kl_coef']}), "
        f"target = the reference tilted at the self-consistent α = {d['alpha']:.2f} (see the script's docstring "
        f"for why this is a reference point, not a proven fixed point), {a['epochs']} epochs × {a['batch']} "
        f"samples, seeds {a['seeds']}. Target mean reward {d['target_mean_reward']:.3f}; the reference's "
        f"{d['reference_mean_reward']:.3f}; reference vs target: sliced W2 {d['reference_vs_target']['sliced_w2']:.3f}, "
        f"MMD {d['reference_vs_target']['mmd']:.3f}.",
        "",
        f"| advantage | mean reward | sliced W2 to target (noise floor {floor['sliced_w2']['mean']:.3f}) | "
        f"MMD to target (noise floor {floor['mmd']['mean']:.3f}) |",
        "|---|---|---|---|",
    ]
    for mode, r in d["summary"].items():
        lines.append(f"| {mode} (end of run) | {_fmt(r['mean_reward']['mean'])} ± {_fmt(r['mean_reward']['std'])} | "
                     f"{_fmt(r['sliced_w2']['mean'])} ± {_fmt(r['sliced_w2']['std'])} | "
                     f"{_fmt(r['mmd']['mean'])} ± {_fmt(r['mmd']['std'])} |")
    # equal budget: every mode's last evaluation at or below the smallest final query count of all runs
    budget = min(c[-1]["reward_queries"] for c in d["runs"].values())
    for mode in d["summary"]:
        rows = []
        for key, curve in d["runs"].items():
            if key.split("/")[0] == mode:
                rows.append(max((c for c in curve if c["reward_queries"] <= budget), key=lambda c: c["reward_queries"]))
        if not rows:
            continue
        avg = {k: sum(c[k] for c in rows) / len(rows) for k in ("mean_reward", "sliced_w2", "mmd")}
        lines.append(f"| {mode} (≤ {budget} queries) | {_fmt(avg['mean_reward'])} | {_fmt(avg['sliced_w2'])} | "
                     f"{_fmt(avg['mmd'])} |")
    b = d["base_vs_reference"]
    bf = d["base_vs_reference_floor"]
    lines += [
        "",
        f"The untrained {a['steps']}-step sampler vs exact reference samples: sliced W2 {b['sliced_w2']:.3f} (floor "
        f"{bf['sliced_w2']['mean']:.3f}), MMD {b['mmd']:.3f} (floor {bf['mmd']['mean']:.3f}) — the sampler's own "
        "discretisation error. GAE's runs include their value-pretraining queries, so they end "
        "later; the '≤ N queries' rows compare every mode at the same reward-query budget. With one prompt, "
        "DDPO's per-prompt tracker reduces to batch normalisation, so "
        "grpo and ddpo coincide here.",
        "",
        "![fine-tuning vs reward queries](benchmarks/results/gmm_finetune.png)",
        "",
    ]
    return "\n".join(lines)


def section_reward_hacking(path: Path) -> str:
    d = json.loads(path.read_text())
    s, m = d["summary"], d["machine"]
    base = s["base"]
    keys = ("boldness", "digit_prob", "digit_correct")
    seeds = s.get("single", s.get("joint"))["seeds"]
    lines = [
        "## Reward hacking: a hackable reward alone vs jointly with digit_prob",
        "",
        f"Command: `python benchmarks/reward_hacking.py --seeds {' '.join(str(x) for x in seeds)}"
        + "".join(f" --set {k}={v}" for k, v in d["overrides"].items())
        + "` (writes `benchmarks/results/reward_hacking.json`, `.png` and sample grids in "
        f"`benchmarks/results/reward_hacking/`). Machine: {m['cpu_count']} CPU cores, torch {m['torch']}. "
        "Configs: `train/configs/digits_hack_single.yaml` (trains `boldness`, the mean ink, alone) and "
        "`train/configs/digits_hack_joint.yaml` (`boldness` and `digit_prob` at temperature 6 with two critic "
        "heads, GAE per head, `normalize_then_sum`); both GAE, the same epochs, batch and value pretraining, so "
        "the same reward queries. Every reward is measured before and after on the same fixed evaluation set "
        f"— {d['eval_set']}; mean ± std over seeds, per-seed values in the JSON.",
        "",
        "| model | trained on (weights) | seeds | reward queries | " + " | ".join(f"final {k}" for k in keys) + " |",
        "|---|---|---|---|" + "---|" * len(keys),
        "| base model | — | — | — | " + " | ".join(_fmt(base[k]) for k in keys) + " |",
    ]
    for variant in ("single", "joint"):
        if variant not in s:
            continue
        r = s[variant]
        trained = ", ".join(f"{n} ({w:g})" for n, w in zip(r["trained_rewards"], r["weights"]))
        lines.append(f"| {variant} | {trained} | {len(r['seeds'])} | {r['reward_queries']} | "
                     + " | ".join(f"{_fmt(r[f'final_{k}_mean'])} ± {_fmt(r[f'final_{k}_std'])}" for k in keys) + " |")
    lines.append("")
    for variant in ("single", "joint"):
        if f"{variant}_digit_correct_drop_points" in s:
            lines.append(f"- {variant}: digit_correct {_fmt(s[f'{variant}_digit_correct_drop_points'], 1)} points below "
                         f"the base model's; boldness {s[variant]['final_boldness_mean'] - base['boldness']:+.3f} "
                         "relative to it.")
    lines += [
        "",
        "Why `boldness`: it is the hackable reward the policy exploits within this budget (a one-seed probe before the "
        "benchmark: the policy paints the background white and digits stop being recognisable); "
        "`jpeg_compressibility` was not probed, for lack of shared CPU time. Why weights 1 : 2 in the joint run: "
        "`normalize_then_sum` whitens each reward's advantages, so the weights alone set the trade-off; `digit_prob` "
        "gets the larger weight so that it wins where the two rewards conflict, while `boldness` still gets a push "
        "where they do not. The curves are training-batch means per epoch; the dashed line is the base model on the "
        "evaluation set.",
        "",
        "![reward hacking curves](benchmarks/results/reward_hacking.png)",
        "",
        f"Samples (evaluation noise, 8 per digit, seed {seeds[0]}): base "
        f"`benchmarks/results/reward_hacking/grid_base_seed{seeds[0]}.png`, single "
        f"`benchmarks/results/reward_hacking/grid_single_seed{seeds[0]}.png`, joint "
        f"`benchmarks/results/reward_hacking/grid_joint_seed{seeds[0]}.png`.",
        "",
    ]
    return "\n".join(lines)


# per config: the trained reward's key (the metric compared), its 0/1 companion, and whether diversity is measured
METRICS = {"digits": ("digit_prob", "digit_correct", True), "t2i": ("composition", "composition_correct", False)}


def _describe(config: str) -> tuple[str, str]:
    """(the task's name in titles, what its evaluation is) for the section and the plot."""
    if config == "t2i":
        return "tiny text-to-image", ("the held-out composition (dense clause probability, trained) of one sample per "
                                      "held-out prompt on fixed noises from the full stochastic sampler (eta = 1) for "
                                      "every run; composition_correct = all clauses right (GenEval's metric)")
    return "digits", ("the held-out digit_prob of 200 samples on fixed noises from the full stochastic sampler (eta = 1) "
                      "for every run; diversity kept = final / base within-prompt pairwise L2")


def section_sde_window(path: Path) -> str:
    """The section rendered from ``sde_window.json`` or ``sde_window_t2i.json``."""
    path = Path(path)
    d = json.loads(path.read_text())
    a = d["args"]
    metric, correct, _ = METRICS.get(a["config"], METRICS["digits"])
    task, evaluation = _describe(a["config"])
    extra = f" --config {a['config']} --windows {' '.join(map(str, a['windows']))} --seconds {a['seconds']:g}" \
        if a["config"] != "digits" else ""

    def fmt(x, digits=3):
        return "n/a" if x is None else f"{x:.{digits}f}"

    lines = [f"## SDE window vs full trajectories at equal wall-clock ({task})", "",
             f"Command: `python benchmarks/sde_window.py{extra}` (writes `benchmarks/results/{path.name}` and `.png`; "
             f"{d['time_s']:.0f} s in all on {d['machine'].get('cpu_count')} CPU cores). Config `{a['config']}` "
             f"(overrides {d['overrides'] or 'none'}), seeds {a['seeds']}, {a['seconds']:.0f} s of training per run "
             f"(value pretraining included, evaluations not), the configurations of each seed back to back. The reward "
             f"is {evaluation}.", "",
             f"| trajectories | final {metric} (mean ± std) | − full | {correct} | diversity kept | epochs in "
             "the budget | s / epoch | value pretraining s |", "|---|---|---|---|---|---|---|---|"]
    for _w, r in d["summary"].items():
        lines.append(f"| {r['label']} | {fmt(r[f'final_{metric}_mean'])} ± {fmt(r[f'final_{metric}_std'])} | "
                     f"{fmt(r.get('final_minus_full'))} | {fmt(r[f'final_{correct}_mean'])} | "
                     f"{fmt(r['final_diversity_kept_mean'], 2)} | {r['epochs_mean']:.0f} | "
                     f"{fmt(r['seconds_per_epoch_mean'], 2)} | {fmt(r['value_pretrain_seconds_mean'], 0)} |")
    base = [r.get(f"base_{metric}_mean") for r in d["summary"].values()]
    if base[0] is not None:
        lines += ["", f"Base model ({metric} at 0 s): {fmt(float(np.mean(base)))}."]
    lines += ["", f"![reward vs wall-clock](benchmarks/results/{path.with_suffix('.png').name})", ""]
    return "\n".join(lines)
