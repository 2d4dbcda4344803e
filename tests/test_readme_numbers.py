"""The README's stated main-job numbers are the ones benchmarks/main_job.py measured (issue 18: "the README's
stated times come from that file"): rerunning the benchmark without updating the README fails this test."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_quotes_the_measured_main_job():
    summary = json.loads((ROOT / "benchmarks" / "results" / "main_job" / "summary.json").read_text())
    text = " ".join((ROOT / "README.md").read_text().split())  # line breaks do not matter
    m = re.search(r"measured by `benchmarks/main_job.py`[^:]*: ([\d.]+) minutes of training", text)
    assert m, "the README must state the main job's measured training time (benchmarks/main_job.py)"
    assert abs(float(m.group(1)) - summary["train_seconds"] / 60) <= 0.25, (m.group(1), summary["train_seconds"])
    m = re.search(r"held-out digit_prob ([\d.]+) → ([\d.]+)", text)
    assert m, "the README must state the main job's held-out reward before and after"
    assert float(m.group(1)) == round(summary["eval/reward/digit_prob_base"], 3)
    assert float(m.group(2)) == round(summary["eval/reward/digit_prob_final"], 3)


def test_readme_quotes_the_gpu_check():
    d = json.loads((ROOT / "benchmarks" / "results" / "gpu_check.json").read_text())
    text = " ".join((ROOT / "README.md").read_text().split())
    m = re.search(r"([\d.]+)× TRL's samples/s on SD1.5 at ([\d.]+)× its peak memory", text)
    assert m, "the README must quote the GPU check's SD1.5 comparison with TRL"
    assert float(m.group(1)) == round(d["sd15_vs_trl"], 2) and float(m.group(2)) == round(d["sd15_peak_mem_vs_trl"], 1)
    m = re.search(r"([\d.]+)× TRL's samples/s at ([\d.]+)× its peak memory with `micro_batch_memory_mb: (\d+)`", text)
    at = d["sd15_at_trl_memory"]
    assert m, "the README must quote the SD1.5 comparison at TRL's memory"
    assert (float(m.group(1)), float(m.group(2)), int(m.group(3))) == \
        (round(at["vs_trl"], 2), round(at["peak_mem_vs_trl"], 2), int(at["micro_batch_memory_mb"]))
    m = re.search(r"(\d+) of (\d+) CUDA tests pass", text)
    assert m and int(m.group(1)) == d["cuda_tests_passed"]
    assert int(m.group(2)) == d["cuda_tests_failed"] + d["cuda_tests_passed"]


def test_readme_quotes_the_critic_ceiling():
    """The critic section's digits ratios are critic_ceiling.json's (rerunning it without updating the README fails)."""
    d = json.loads((ROOT / "benchmarks" / "results" / "critic_ceiling.json").read_text())["summary"]
    text = " ".join((ROOT / "README.md").read_text().split())
    m = re.search(r"the oracle reaches GRPO's final held-out reward with ([\d.]+) of GRPO's queries \(final ([\d.]+)", text)
    assert m, "the README must quote the digits oracle's queries ratio"
    assert float(m.group(1)) == round(d["digits"]["oracle_queries_ratio"], 2)
    assert float(m.group(2)) == round(d["digits"]["methods"]["oracle_gae"]["final_reward_mean"], 3)
    m = re.search(r"the grafted critic in PPO with ([\d.]+) \(final ([\d.]+)\)", text)
    assert m, "the README must quote the grafted critic's queries ratio on digits"
    g = d["digits"]["methods"]["grafted_gae"]
    assert (float(m.group(1)), float(m.group(2))) == (round(g["queries_ratio_median"], 2), round(g["final_reward_mean"], 3))
    m = re.search(r"reaches (\w+)'s final training reward with ([\d.]+) of its queries \(final ([\d.]+)", text)
    assert m, "the README must quote the digits DiT oracle's queries ratio"
    assert m.group(1).lower() == d["digits_dit"]["best_critic_free"]  # the baseline the ratio is measured against
    assert float(m.group(2)) == round(d["digits_dit"]["oracle_queries_ratio"], 2)
    assert float(m.group(3)) == round(d["digits_dit"]["methods"]["oracle_gae"]["final_reward_mean"], 3)
    m = re.search(r"cost ([\d.]+)× \(digits\), ([\d.]+)× \(digits DiT\) and ([\d.]+)× \(mixture\)", text)
    assert m, "the README must quote counted Monte-Carlo advantages' queries ratios"
    assert [float(x) for x in m.groups()] == [round(d[t]["methods"]["mc_counted"]["queries_ratio_median"], 0)
                                              for t in ("digits", "digits_dit", "gmm")]
