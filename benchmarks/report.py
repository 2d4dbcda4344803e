"""Render BENCHMARKS.md from the JSON files the benchmarks wrote (no hand-typed numbers).

    python benchmarks/report.py            # rewrites BENCHMARKS.md from benchmarks/results/*.json
"""

from __future__ import annotations

import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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
        f"--budget {budget}` "
        f"(writes `benchmarks/results/digits_advantages.json` and `.png`). Machine: {m['cpu_count']} CPU cores, "
        f"torch {m['torch']}, {m['torch_threads']} threads. Config: `train/configs/digits.yaml` with "
        f"overrides {data['overrides'] or 'none'}; GAE's value-pretraining rollouts count against its budget.",
        "",
        "Final rewards are measured on a fixed evaluation set (20 samples per digit, fixed noise, the trained "
        "stochastic sampler); mean ± std over seeds.",
        "",
        "| advantage | seeds | base digit_prob | final digit_prob | final digit_correct | last-3-epoch train reward "
        "| s / epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in ("gae", "grpo", "ddpo"):
        if mode not in s:
            continue
        r = s[mode]
        lines.append(
            f"| {mode} | {len(r['seeds'])} | {_fmt(r['base_digit_prob_mean'])} | {_fmt(r['final_digit_prob_mean'])} ± "
            f"{_fmt(r['final_digit_prob_std'])} | {_fmt(r['final_digit_correct_mean'])} | "
            f"{_fmt(r['last3_train_reward_mean'])} | {_fmt(r['mean_epoch_seconds'], 1)} |"
        )
    reach = s.get("gae_queries_to_reach_grpo_final")
    if reach:
        per_seed = ", ".join("not reached" if math.isinf(x) else str(int(x)) for x in reach["per_seed"])
        lines += [
            "",
            f"Reward queries GAE needs to reach GRPO's final training reward ({_fmt(reach['grpo_final_train_reward'])},"
            f" 3-epoch moving average): per seed {per_seed}; median = "
            f"{_fmt(reach['median_fraction_of_budget'], 2)} × the budget (goal: ≤ 0.5×).",
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


SECTIONS = [("digits_advantages.json", section_advantages)]


def main() -> str:
    parts = [
        "# Benchmarks",
        "",
        "Every number below is rendered by `python benchmarks/report.py` from the JSON a benchmark script wrote; "
        "rerun the script named in each section to reproduce it.",
        "",
    ]
    for name, fn in SECTIONS:
        path = RESULTS / name
        if path.exists():
            parts.append(fn(path))
    notes = ROOT / "benchmarks" / "NOTES.md"
    if notes.exists():
        parts.append(notes.read_text())
    text = "\n".join(parts)
    (ROOT / "BENCHMARKS.md").write_text(text)
    return text


if __name__ == "__main__":
    print(main())
