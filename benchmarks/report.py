"""Render BENCHMARKS.md from the JSON files the benchmarks wrote (no hand-typed numbers).

    python benchmarks/report.py            # rewrites BENCHMARKS.md from benchmarks/results/*.json
"""

from __future__ import annotations

import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from baselines import section as section_baselines  # noqa: E402
from diversity_tradeoff import section as section_diversity_tradeoff  # noqa: E402
from gpu_check import section as section_gpu_check  # noqa: E402
from gpu_throughput import section as section_gpu_throughput  # noqa: E402
from report_ceiling import answer as ceiling_answer  # noqa: E402
from report_ceiling import section_ceiling, section_grafted  # noqa: E402
from report_critic import section_critic_quality  # noqa: E402
from report_perf import (  # noqa: E402
    section_critic_modes,
    section_perf,
    section_scaling,
    section_speed_defaults,
    section_trl_compare,
)
from report_steering import (  # noqa: E402
    section_digits_steering,
    section_gmm_steering,
    section_t2i_steering,
)
from sde_window import section as section_sde_window  # noqa: E402
from t2i_advantages import section as section_t2i_advantages  # noqa: E402
from t2i_critic_offline import section as section_t2i_critic_offline  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _fmt(x, digits=3):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "not reached"
    return f"{x:.{digits}f}"


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
        lines.append(f"| {name} | {_fmt(r['max_rmse_rel'])} | {_fmt(r['mean_rmse_rel'])} | "
                     f"{_fmt(r['max_sampler_bias_debiased_rel'])} | {_fmt(vs)} | "
                     f"{'n/a' if goal is None else ('met' if goal else 'not met')} |")
    lines += ["", "![critic accuracy per timestep](benchmarks/results/gmm_critic.png)", ""]
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


def section_kill_resume(path: Path) -> str:
    d = json.loads(path.read_text())
    m = d["machine"]
    def bucket(phase: str) -> str:
        for start, name in (("during epoch", "during an epoch (rollout, rewards, update)"),
                            ("after epoch", "after an epoch was logged, before its checkpoint"),
                            ("inside a checkpoint write", "inside a checkpoint write")):
            if phase.startswith(start):
                return name
        return phase

    phases: dict = {}
    for k in d["kill_log"]:
        phases[bucket(k["phase"])] = phases.get(bucket(k["phase"]), 0) + 1
    lines = [
        "## Kill and resume: SIGKILL at random moments, then resume",
        "",
        f"Command: `python benchmarks/kill_resume.py --kills {d['kills_requested']} --seed {d['seed']} --epochs "
        f"{d['epochs']}` (writes `benchmarks/results/kill_resume.json`). A small digits run (`{d['command']}`, "
        f"a checkpoint every epoch) runs once uninterrupted ({_fmt(d['uninterrupted_wall_s'], 1)} s), then again "
        f"as a subprocess that is SIGKILLed after a random delay and resumed with `--resume` until "
        f"{d['kills']} kills were made, then finishes. Compared: {d['compared']}. Machine: {m['cpu_count']} CPU "
        f"cores, torch {m['torch']}, {m['threads']} thread.",
        "",
        f"**Result: {d['verdict']}**" + ("" if d["identical"] else ": " + "; ".join(d["differences"][:5])),
        "",
        "| where the kills landed | kills |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in sorted(phases.items(), key=lambda kv: -kv[1])]
    lines += ["", f"Total wall time {_fmt(d['total_wall_s'], 0)} s.", ""]
    multi = [(int(k.split("_")[1]), v) for k, v in d.items() if k.startswith("processes_")]
    if multi:
        lines += ["Several processes (`--processes N`: every command under `torchrun --nproc_per_node N` on CPU, each "
                  "kill SIGKILLs one rank chosen at random, the resume runs on N processes):", "",
                  "| processes | kills | verdict | ranks killed | lost |", "|---|---|---|---|---|"]
        for n, r in sorted(multi):
            ranks = sorted({k.get("rank_killed") for k in r["kill_log"]}, key=str)
            lines.append(f"| {n} | {r['kills']} | {r['verdict']} | {', '.join(map(str, ranks))} | "
                         f"{0 if r['identical'] else len(r['differences'])} |")
        lines.append("")
    return "\n".join(lines)


def section_fault_injection(path: Path) -> str:
    d = json.loads(path.read_text())
    m = d["machine"]
    yes = {True: "yes", False: "no"}
    how = " ".join(d["how_loss_is_detected"].split()).replace("* ", "")
    lines = [
        "## Fault injection: nothing saved is lost",
        "",
        f"Command: `python benchmarks/fault_injection.py` (writes `benchmarks/results/fault_injection.json`). Each fault "
        f"is injected into real `critic-align train` runs of the kill/resume command (`{d['command']}`). How loss is "
        f"detected: {how} Machine: {m['cpu_count']} CPU cores, torch {m['torch']}, "
        f"{m['threads']} thread.",
        "",
        (f"**Data lost in {d['data_lost_count']} of {d['faults_count']} faults; a clear error in "
         f"{d['clear_errors_where_an_error_is_expected']} of the {d['faults_that_should_error']} faults that should "
         f"error; the right silent recovery or report (SIGKILL: an exact resume; a collapse: a warning and summary.json; "
         f"stalled uploads: a real request served) in {d['clear_error_count'] - d['clear_errors_where_an_error_is_expected']}"
         f" of the other {d['faults_count'] - d['faults_that_should_error']}; best/ kept in every collapse: "
         f"{yes[d['best_checkpoint_kept']]}.**") if "faults_that_should_error" in d else
        (f"**Data lost in {d['data_lost_count']} of {d['faults_count']} faults; a clear error (or, for SIGKILL, an exact "
         f"silent resume) in {d['clear_error_count']} of {d['faults_count']}.**"),
        "",
        "| fault | data lost | clear error | what the run said |",
        "|---|---|---|---|",
    ]
    for f in d["faults"]:
        said = f.get("stderr") or f.get("second_stderr") or f.get("first_stderr") or f.get("resume_stderr") \
            or f.get("verdict") or f.get("note") or ""
        said = " ".join(said) if isinstance(said, list) else said
        said = said.replace("|", "\\|").replace("\n", " ")
        if len(said) > 220:
            said = said[:220] + " …"
        lines.append(f"| {f['fault']} | {yes[f['data_lost']]} | {yes[f['clear_error']]} | {said} |")
    lines += ["", f"Total wall time {_fmt(d['total_wall_s'], 0)} s.", ""]
    return "\n".join(lines)


def section_scaleout(path: Path) -> str:
    d = json.loads(path.read_text())
    m = d["machine"]
    lines = [
        "## Scaling out: 1 vs 2 CPU processes, bytes across ranks",
        "",
        f"Command: `python {d['what']}` (writes `benchmarks/results/{path.name}`). `critic-align train` on 1, 2 and 4 "
        f"processes (torchrun, gloo), one torch thread each, each process pinned to its own core, at the same global "
        f"batch and seed; throughput from the epochs after the first; bytes are what a rank receives through "
        f"torch.distributed's collectives during the training epochs (the most of any rank; the old engine's hand-written "
        f"gradient all-reduce apart, 0 since DDP; DDP's C++ all-reduce not counted). Equal to one process: the first "
        f"epoch's rewards and "
        f"advantages within {d['row_atol']:g}, the weights after 2 epochs within rtol {d['weight_rtol']:g} / atol "
        f"{d['weight_atol']:g}. Machine: {m['cores_usable']} usable cores, torch {m['torch']}. The last column is the "
        f"CPU other processes used during the timed runs (a share of the cores): throughput compares only where it "
        f"is near 0.",
        "",
        "| job | global batch | samples/s, 1 process | 2 processes | scaling_efficiency_2 | bytes/sample, 2 procs "
        "| 4 procs | gradient all-reduce / epoch, 2 procs | identical_to_single | max_weight_diff | other processes' CPU "
        "share, 1 / 2 procs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for job, j in d["jobs"].items():
        b = j["cross_rank_bytes_per_sample"]
        load = " / ".join(_fmt(j["runs"][n].get("other_processes_cpu_share"), 2) for n in ("1", "2"))
        lines.append(
            f"| {job} | {j['global_batch']} | {_fmt(j['samples_per_s_1'], 2)} | {_fmt(j['samples_per_s_2'], 2)} | "
            f"{_fmt(j['scaling_efficiency_2'], 3)} | {b['2']:,.0f} B | {b['4']:,.0f} B | "
            f"{j['gradient_allreduce_bytes_per_epoch']['2'] / 1e6:.2f} MB | {j.get('identical_to_single')} | "
            f"{'–' if j.get('max_weight_diff') is None else format(j['max_weight_diff'], '.2e')} | {load} |")
    lines.append("")
    return "\n".join(lines)


SECTIONS = [
    ("critic_ceiling.json", section_ceiling),
    ("critic_grafted.json", section_grafted),
    ("main_job/summary.json", section_main_job),
    ("dit_job/summary.json", section_dit_job),
    ("critic_quality.json", section_critic_quality),
    ("digits_advantages.json", section_advantages),
    ("diversity_tradeoff.json", section_diversity_tradeoff),
    ("t2i_advantages.json", section_t2i_advantages),
    ("t2i_sd3_advantages.json", section_t2i_advantages),
    ("t2i_critic_offline.json", section_t2i_critic_offline),
    ("t2i_critic_offline_x0.json", section_t2i_critic_offline),
    ("t2i_sd3_critic_offline.json", section_t2i_critic_offline),
    ("t2i_sd3_critic_offline_x0.json", section_t2i_critic_offline),
    ("baselines.json", section_baselines),
    ("gmm_critic.json", section_gmm_critic),
    ("gmm_finetune.json", section_gmm_finetune),
    ("reward_hacking.json", section_reward_hacking),
    ("gmm_steering.json", section_gmm_steering),
    ("digits_steering.json", section_digits_steering),
    ("t2i_steering.json", section_t2i_steering),
    ("t2i_steering_x0.json", section_t2i_steering),
    ("kill_resume.json", section_kill_resume),
    ("scaleout.json", section_scaleout),
    ("fault_injection.json", section_fault_injection),
    ("trl_compare.json", section_trl_compare),
    ("speed_defaults.json", section_speed_defaults),
    ("sde_window.json", section_sde_window),
    ("sde_window_t2i.json", section_sde_window),
    ("critic_modes.json", section_critic_modes),
    ("perf.json", section_perf),
    ("scaling.json", section_scaling),
]


def main() -> str:
    parts = [
        "# Benchmarks",
        "",
        "Every number below is rendered by `python benchmarks/report.py` from the JSON a benchmark script wrote; "
        "rerun the script named in each section to reproduce it.",
        "",
        ceiling_answer(RESULTS),
    ]
    for name, fn in SECTIONS:
        path = RESULTS / name
        if path.exists():
            parts.append(fn(path))
    # rendered also while its JSON is missing: then it says the script is ready and has not been run on a GPU yet
    parts.append(section_gpu_check(RESULTS / "gpu_check.json"))
    parts.append(section_gpu_throughput(RESULTS / "gpu_throughput.json"))
    notes = ROOT / "benchmarks" / "NOTES.md"
    if notes.exists():
        parts.append(notes.read_text())
    text = "\n".join(parts)
    (ROOT / "BENCHMARKS.md").write_text(text)
    return text


if __name__ == "__main__":
    print(main())
