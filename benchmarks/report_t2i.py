"""Text-to-image-topic sections (GAE vs GRPO vs DDPO, the offline critic fit), rendered from the benchmarks' JSON;
benchmarks/report.py collects them into benchmarks/results/t2i.md. The mode and config tables live here because
the section renders them; benchmarks/t2i_advantages.py imports them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CONFIGS = {"t2i": ("tiny_t2i", "Stable Diffusion"), "t2i_sd3": ("tiny_t2i_sd3", "Stable Diffusion 3")}


MODES = {"gae": {"advantage": "gae", "gae_group_baseline": False, "critic_x0_reward": False},
         "gae_group": {"advantage": "gae", "gae_group_baseline": True, "critic_x0_reward": False},
         "grpo": {"advantage": "grpo", "gae_group_baseline": False, "critic_x0_reward": False},
         "ddpo": {"advantage": "ddpo", "gae_group_baseline": False, "critic_x0_reward": False},
         "gae_x0": {"advantage": "gae", "gae_group_baseline": False, "critic_x0_reward": True},
         "gae_group_x0": {"advantage": "gae", "gae_group_baseline": True, "critic_x0_reward": True}}


CRITIC_MODES = ("gae", "gae_group", "gae_x0", "gae_group_x0")


def section_t2i_advantages(path: Path) -> str:
    """The section rendered from this benchmark's JSON."""
    import math

    data = json.loads(path.read_text())
    s, m = data["summary"], data["machine"]
    config = data.get("config", "t2i")
    asset, family = CONFIGS[config]
    seeds = " ".join(str(x) for x in sorted({r["seed"] for r in data["runs"]}))
    modes = [mode for mode in MODES if mode in s]
    sets = " ".join(f"--set {k}={v}" for k, v in data["overrides"].items())
    n_eval = len(data["eval_prompts"]["train"])
    how = (f"{len(data['merged_from'])} files of runs combined with `--merge`; " if data.get("merged_from") else "")

    def f(x, d=3):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"

    def ev_cell(r):
        return f"{f(r.get('value_ev_second_half_median'), 2)} ({f(r.get('value_ev_second_half_mean'), 2)})"

    lines = [
        "## GAE vs GRPO vs DDPO on the tiny text-to-image task (`composition`), equal reward-query budget"
        + ("" if config == "t2i" else f" (`{config}`: the flow-matching twin)"),
        "",
        f"Command: `python benchmarks/t2i_advantages.py{'' if config == 't2i' else ' --config ' + config} "
        f"--seeds {seeds} --modes {' '.join(modes)} --budget "
        f"{data['budget_reward_queries']} --eval-prompts {n_eval}{' ' + sets if sets else ''}` ({how}writes "
        f"`benchmarks/results/{config}_advantages.json` and `.png`). Machine: "
        f"{m['cpu_count']} CPU cores, torch {m['torch']}, {m['torch_threads']} threads. The shipped "
        f"`critic_align/assets/{asset}` pipeline through the {family} path (`train/configs/{config}.yaml`); "
        f"before and after training the policy samples {n_eval} training and {n_eval} held-out prompts (fixed "
        "noise); *all clauses* = `composition_correct` (GenEval's metric), mean ± std over seeds.",
        "",
        "| advantage | seeds | train: all clauses before → after | held-out: all clauses before → after "
        "| train: composition before → after | held-out: composition before → after | s / epoch "
        "| critic EV (2nd half): median (mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in modes:
        r = s[mode]
        cells = []
        for key in ("composition_correct", "composition"):
            for split in ("train", "heldout"):
                cells.append(f"{f(r[f'base_{split}_{key}_mean'])} → {f(r[f'final_{split}_{key}_mean'])} ± "
                             f"{f(r[f'final_{split}_{key}_std'])}")
        lines.append(f"| {mode} | {len(r['seeds'])} | " + " | ".join(cells) + f" | {f(r['mean_epoch_seconds'], 1)} | "
                     f"{ev_cell(r) if mode in CRITIC_MODES else '—'} |")
    x0_modes = [mode for mode in modes if s[mode].get("x0_reward_rows")]
    if x0_modes:
        lines += ["", "Modes ending in `_x0` train with `critic_x0_reward` (the value head also reads the reward of the "
                      "policy's one-step x0 prediction at each recorded state). Those reward calls are outside the "
                      "budget above: per run " + ", ".join(f"{mode} {s[mode]['x0_reward_rows']:.0f}" for mode in x0_modes)
                  + " decoded and scored x0 predictions, next to the budget's "
                  + f"{data['budget_reward_queries']} samples."]
    for mode in CRITIC_MODES:
        reach = s.get(f"{mode}_queries_to_reach_grpo_final")
        if not reach:
            continue
        per_seed = ", ".join("not reached" if math.isinf(x) else str(int(x)) for x in reach["per_seed"])
        frac = reach["median_fraction_of_budget"]
        lines += ["", f"Reward queries {mode} needs to reach GRPO's final training reward "
                      f"({f(reach['grpo_final_train_reward'])}, {reach.get('smoothing_epochs', 3)}-epoch moving average"
                      f"): per seed {per_seed}; median: "
                      + ("not reached within the budget" if math.isinf(frac) else f"{f(frac, 2)} × the budget")
                      + " (goal: ≤ 0.5×)."]
    if "grpo" in s and any(f"{mode}_queries_to_reach_grpo_final" in s for mode in CRITIC_MODES):
        g = s["grpo"]
        grpo_first = g.get("first_train_reward_smoothed_mean", float(np.mean(
            [r["curve"][0]["reward"] for r in data["runs"] if r["mode"] == "grpo"])))
        grpo_last = g.get("final_train_reward_smoothed_mean", g.get("last3_train_reward_mean"))
        # the noise of one smoothed window: the epoch-to-epoch std of GRPO's training reward / sqrt(window)
        smooth = next(iter(s[f"{m}_queries_to_reach_grpo_final"] for m in CRITIC_MODES
                           if f"{m}_queries_to_reach_grpo_final" in s)).get("smoothing_epochs", 3)
        epoch_std = float(np.mean([np.std([c["reward"] for c in r["curve"]]) for r in data["runs"]
                                   if r["mode"] == "grpo"]))
        noise = epoch_std / math.sqrt(smooth)
        if grpo_last - grpo_first <= 2 * noise:
            lines += ["", f"Caveat: GRPO's smoothed training reward rose from {f(grpo_first)} (first {smooth} epochs) to "
                          f"{f(grpo_last)} (last {smooth}), within twice the noise of one such average "
                          f"({f(noise)}: an epoch's reward varies by {f(epoch_std)} with the prompts drawn), so "
                          "reaching it says little about GAE's efficiency; compare the evaluations above."]
    lines += ["", f"![{config} advantages](benchmarks/results/{config}_advantages.png)", ""]
    return "\n".join(lines)


def section_t2i_critic_offline(path: Path) -> str:
    """The section rendered from this benchmark's JSON."""
    data = json.loads(path.read_text())
    a, refs, rows, m = data["args"], data["reference_ev"], data["rounds"], data["machine"]
    config = data.get("config", "t2i")
    blocks = [k for k in rows[0]["test"] if k.startswith("value_ev_steps_")]

    def cells(report: dict) -> str:
        return " | ".join(f"{report[k]:.2f}" for k in ["value_ev", *blocks])

    critic = "latent critic" + (" reading r(decode(x̂0))" if data.get("overrides", {}).get("critic_x0_reward") else "")
    best = max(rows[1:], key=lambda r: r["test"]["value_ev"]) if len(rows) > 1 else rows[0]
    sets = "".join(f" --set {k}={v}" for k, v in data.get("overrides", {}).items())
    lines = [
        f"## Can the text-to-image critic learn? An offline fit (`{config}`"
        + (", `critic_x0_reward`)" if data.get("overrides", {}).get("critic_x0_reward") else ")"),
        "",
        f"Command: `python benchmarks/t2i_critic_offline.py --config {config} --train-prompts {a['train_prompts']} "
        f"--test-prompts {a['test_prompts']} --group {a['group']} --rounds {a['rounds']} --passes {a['passes']}"
        f"{sets}` (writes `benchmarks/results/{path.name}`). Machine: {m['cpu_count']} CPU cores, "
        f"torch {m['torch']}, {m['torch_threads']} threads. The frozen base policy's {data['train_samples']} "
        f"training trajectories ({a['train_prompts']} prompts × {a['group']}) and {data['test_samples']} held-out ones "
        f"({a['test_prompts']} other prompts × {a['group']}), {data['num_steps']} stochastic steps each; the config's "
        "critic is fitted "
        "on every training state with Monte-Carlo targets. Explained variance (EV) of the return on the **held-out "
        "prompts' states**, overall and per block of steps (step 0 = pure noise); *fit* = on its own training "
        "states.",
        "",
        "| predictor of the return | EV | " + " | ".join(b.replace("value_ev_steps_", "steps ") for b in blocks) + " |",
        "|---|---|" + "---|" * len(blocks),
        f"| {critic}, best round ({best['passes']} passes; fit EV {best['fit']['value_ev']:.2f}) | "
        f"{cells(best['test'])} |",
        f"| {critic}, last round ({rows[-1]['passes']} passes; fit EV {rows[-1]['fit']['value_ev']:.2f}) | "
        f"{cells(rows[-1]['test'])} |",
        f"| r(decode(x̂0(x_t))), as is | {cells(refs['x0_reward'])} |",
        f"| r(decode(x̂0(x_t))), calibrated per step on the training states | {cells(refs['x0_reward_calibrated'])} |",
        "",
        f"Prompt-level predictors of the same held-out samples (every step alike): the mean of the prompt's "
        f"{a['group'] - 1} other samples, EV {refs['prompt_loo']:.2f}; the mean training reward of the prompt's "
        f"arrangement (one / two / three digits, left of / right of / above / below), EV {refs['arrangement']:.2f}. "
        f"Scoring one x0 prediction costs {1000 * refs['x0_reward_seconds_per_state']:.1f} ms (decode + reward).",
        "",
    ]
    return "\n".join(lines)
