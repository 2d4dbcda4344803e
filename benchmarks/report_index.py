"""The headline table of each topic in BENCHMARKS.md (the index), rendered from the same JSON as the topic's page.

A row is (what was measured, the number, its JSON under benchmarks/results/); a JSON that is missing drops its rows, so
the index never quotes a file that is not there (tests/test_benchmark_pages.py checks it)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

from report_fmt import fmt

Row = tuple[str, str, str]


def _load(results: Path, name: str) -> dict | None:
    path = results / name
    return json.loads(path.read_text()) if path.exists() else None


def _table(rows: list[Row]) -> list[str]:
    if not rows:
        return ["No results yet: run the scripts named on the topic page."]
    return ["| result | value | JSON |", "|---|---|---|"] + [f"| {what} | {value} | `{name}` |"
                                                             for what, value, name in rows]


def critic(results: Path) -> list[str]:
    rows: list[Row] = []
    if (d := _load(results, "critic_ceiling.json")) is not None:
        for task, s in d["summary"].items():
            rows.append((f"{task}: queries a perfect critic needs to reach {s.get('best_critic_free')}'s final reward, "
                         "as a fraction of its queries (goal ≤ 0.5)", fmt(s.get("oracle_queries_ratio"), 2)
                         + (f" (not informative: its training reward gains less than its epoch-to-epoch swing, "
                            f"z = {fmt(s.get('train_gain_z'), 2)})"
                            if s.get("queries_to_reach_informative") is False else ""), "critic_ceiling.json"))
            rows.append((f"{task}: share of the oracle's gain the best learned critic ({s.get('best_learned_critic')}) "
                         "takes", fmt(s.get("learned_share_of_oracle_gain"), 2), "critic_ceiling.json"))
    if (d := _load(results, "critic_grafted.json")) is not None:
        for task, t in d["tasks"].items():
            if "grafted_over_oracle_min_bucket" in t:
                rows.append((f"{task}: grafted critic's held-out EV over the oracle's, worst bucket of steps (goal ≥ 0.8)",
                             fmt(t["grafted_over_oracle_min_bucket"], 2), "critic_grafted.json"))
    if (d := _load(results, "critic_quality.json")) is not None:
        ceil = d.get("ev_ceiling_buckets")
        rows.append(("digits: critic EV after value pretraining, best cell (ceiling: bucket mean)",
                     fmt(d["best"]["ev_all"]) + (f" ({fmt(sum(ceil) / len(ceil))})" if ceil else ""),
                     "critic_quality.json"))
    if (d := _load(results, "gmm_critic.json")) is not None:
        for name, r in d["summary"].items():
            rows.append((f"exact mixture ({name}): critic's max RMSE / reward std against the exact value",
                         fmt(r["max_rmse_rel"]), "gmm_critic.json"))
    return _table(rows)


def training(results: Path) -> list[str]:
    rows: list[Row] = []
    if (d := _load(results, "main_job/summary.json")) is not None and "eval/reward/digit_prob_base" in d:
        kept = d["eval/diversity/pairwise_l2_final"] / d["eval/diversity/pairwise_l2_base"]
        rows.append(("main job (`critic-align train --config digits`): held-out digit_prob base → final, diversity kept",
                     f"{fmt(d['eval/reward/digit_prob_base'])} → {fmt(d['eval/reward/digit_prob_final'])}, {kept:.0%}",
                     "main_job/summary.json"))
    if (d := _load(results, "digits_advantages.json")) is not None:
        s = d["summary"]
        modes = [m for m in ("gae", "grpo", "ddpo") if m in s]
        rows.append((f"digits, equal reward-query budget: final digit_prob {' / '.join(modes)}",
                     " / ".join(fmt(s[m]["final_digit_prob_mean"]) for m in modes), "digits_advantages.json"))
    if (d := _load(results, "baselines.json")) is not None:
        for task, s in d["summary"].items():
            methods = [m for m in s if m != "best_baseline"]
            rows.append((f"{task}, equal budget: final reward {' / '.join(methods)}",
                         " / ".join(fmt(s[m]["final_reward_mean"]) for m in methods), "baselines.json"))
    if (d := _load(results, "reward_hacking.json")) is not None:
        s = d["summary"]
        variants = [v for v in ("single", "joint") if f"{v}_digit_correct_drop_points" in s]
        rows.append((f"reward hacking: digit_correct points lost, {' / '.join(variants)}",
                     " / ".join(fmt(s[f"{v}_digit_correct_drop_points"], 1) for v in variants), "reward_hacking.json"))
    return _table(rows)


def _best_steering(d: dict, key: str) -> tuple[str, str]:
    """(the base sampler's reward, the best method's reward with its particles and NFE)."""
    rows = [r for r in d["rows"] if math.isfinite(r["rewards"].get(key, math.nan))]
    base = next(r for r in rows if r["method"] == "base")
    best = max(rows, key=lambda r: r["rewards"][key])
    return (fmt(base["rewards"][key]),
            f"{fmt(best['rewards'][key])} ({best['method']}, {best['particles']} particles, "
            f"{best['equivalent_nfe']:.0f} equivalent NFE)")


def steering(results: Path) -> list[str]:
    rows: list[Row] = []
    if (d := _load(results, "gmm_steering.json")) is not None:
        rows.append(("exact mixture: SMC with the soft value converges to the tilted target (exact / learned critic)",
                     f"{str(d['soft_value_converges']).lower()} / {str(d.get('soft_value_converges_critic')).lower()}",
                     "gmm_steering.json"))
    if (d := _load(results, "digits_steering.json")) is not None:
        base, best = _best_steering(d, "digit_prob")
        rows.append(("digits: digit_prob of the base sampler → the best steered row", f"{base} → {best}",
                     "digits_steering.json"))
    return _table(rows)


def t2i(results: Path) -> list[str]:
    rows: list[Row] = []
    for name in ("t2i_advantages.json", "t2i_sd3_advantages.json"):
        if (d := _load(results, name)) is not None:
            s = d["summary"]
            modes = [m for m in s if isinstance(s[m], dict) and "final_heldout_composition_correct_mean" in s[m]]
            rows.append((f"`{d.get('config', 't2i')}`, equal budget: held-out all clauses right, base → final "
                         f"{' / '.join(modes)}",
                         f"{fmt(s[modes[0]]['base_heldout_composition_correct_mean'])} → "
                         + " / ".join(fmt(s[m]["final_heldout_composition_correct_mean"]) for m in modes), name))
    if (d := _load(results, "t2i_critic_offline.json")) is not None:
        rounds = d["rounds"]
        best = max(rounds[1:], key=lambda r: r["test"]["value_ev"]) if len(rounds) > 1 else rounds[0]
        rows.append(("`t2i`: held-out EV of the offline-fitted critic (best round) / of r(decode(x̂0)) calibrated",
                     f"{fmt(best['test']['value_ev'], 2)} / {fmt(d['reference_ev']['x0_reward_calibrated']['value_ev'], 2)}",
                     "t2i_critic_offline.json"))
    if (d := _load(results, "t2i_steering.json")) is not None:
        key = d.get("reward_key", "composition")
        base, best = _best_steering(d, key)
        rows.append((f"steering the pipeline: {key} of the base sampler → the best steered row", f"{base} → {best}",
                     "t2i_steering.json"))
    return _table(rows)


def perf(results: Path) -> list[str]:
    rows: list[Row] = []
    if (d := _load(results, "trl_compare.json")) is not None:
        modes = list(d["overall_vs_trl"])
        rows.append((f"CPU, tiny SD1.5: samples/s over TRL's DDPOTrainer, {' / '.join(modes)}",
                     " / ".join(f"{d['overall_vs_trl'][m]:.2f}×" for m in modes), "trl_compare.json"))
    if (d := _load(results, "gpu_check.json")) is not None:
        dev = d["device"]["name"]
        if "sd15_vs_trl" in d:
            rows.append((f"{dev}, SD1.5: epoch samples/s over TRL / peak memory over TRL",
                         f"{d['sd15_vs_trl']:.2f}× / {d['sd15_peak_mem_vs_trl']:.2f}×", "gpu_check.json"))
        if "cuda_tests_passed" in d:
            rows.append((f"{dev}: CUDA tests passed / failed", f"{d['cuda_tests_passed']} / {d['cuda_tests_failed']}",
                         "gpu_check.json"))
    if (d := _load(results, "scaleout.json")) is not None:
        for job, j in d["jobs"].items():
            ratio = j.get("engine_diff_over_round_off")
            floor = "" if j.get("identical_to_single") or ratio is None else \
                f" (weights: {fmt(ratio, 2)}× the round-off floor of one process)"
            rows.append((f"{job}: scaling efficiency at 2 CPU processes; equal to one process",
                         f"{fmt(j['scaling_efficiency_2'], 2)}; {'yes' if j.get('identical_to_single') else 'no'}{floor}",
                         "scaleout.json"))
            if "engine_efficiency_2" in j:
                rows.append((f"{job}: of which the machine (two independent half-batch processes) / the engine",
                             f"{fmt(j['machine_efficiency_2'], 2)} / {fmt(j['engine_efficiency_2'], 2)}",
                             "scaleout.json"))
    return _table(rows)


def reliability(results: Path) -> list[str]:
    rows: list[Row] = []
    if (d := _load(results, "kill_resume.json")) is not None:
        more = sorted((int(k.split("_")[1]), v) for k, v in d.items() if k.startswith("processes_"))
        runs = [(d.get("processes", 1), d), *more]
        rows.append(("SIGKILL at random moments then resume, bit-identical to an uninterrupted run (processes: verdict)",
                     "; ".join(f"{n}: {r['verdict']}" for n, r in runs), "kill_resume.json"))
    if (d := _load(results, "fault_injection.json")) is not None:
        rows.append(("injected faults that lost data / faults", f"{d['data_lost_count']} / {d['faults_count']}",
                     "fault_injection.json"))
    if (d := _load(results, "engine_equivalence_after.json")) is not None:
        before = _load(results, "engine_equivalence_before.json") or {"runs": {}}
        same = sum(before["runs"].get(c) == r for c, r in d["runs"].items())
        rows.append(("engine restructure: configs with identical rows and weights for the same seed",
                     f"{same} / {len(d['runs'])}", "engine_equivalence_after.json"))
    return _table(rows)


HEADLINES: dict[str, Callable[[Path], list[str]]] = {
    "critic": critic, "training": training, "steering": steering, "t2i": t2i, "perf": perf, "reliability": reliability}
