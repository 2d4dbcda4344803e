"""benchmarks/gpu_check.py without a GPU: its rehearsal (``--tiny --device cpu``) runs a part end to end, records
merge as documented (an earlier file's part wins unless it was skipped; other devices refused), and its section
(benchmarks/results/perf.md) renders the committed H200 record with its missed goals marked."""

from __future__ import annotations

import json

import gpu_check
import pytest
from report_gpu import section_gpu_check


def test_rehearsal_runs_the_flux_part_and_merges(tmp_path):
    out = tmp_path / "a.json"
    d = gpu_check.main(["--tiny", "--device", "cpu", "--parts", "flux", "--out", str(out), "--no-report"])
    assert d["flux_step_fits"] is True and d["flux_step_variant"] == "1024_auto"
    flux = d["parts"]["flux"]
    assert flux["peak_memory_mb"] > 0 and flux["epoch_s_including_warmup"] > 0
    assert json.loads(out.read_text())["parts"]["flux"]["fits"] is True

    # a later record whose flux part was skipped for time does not replace the measured one
    skipped = dict(d, parts={"flux": {"skipped": "0 s left"}, "tests": {"passed": 2, "failed": 1, "tests": []}})
    (tmp_path / "b.json").write_text(json.dumps(skipped))
    merged = gpu_check.main(["--merge-only", "--merge", str(tmp_path / "b.json"), "--merge", str(out),
                             "--out", str(tmp_path / "m.json"), "--no-report"])
    assert merged["parts"]["flux"]["fits"] is True
    assert (merged["cuda_tests_passed"], merged["cuda_tests_failed"]) == (2, 1)
    assert merged["device"] == d["device"]

    other = dict(d, device={"type": "cuda", "name": "another GPU"})
    (tmp_path / "c.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="same kind of device"):
        gpu_check.main(["--merge-only", "--merge", str(out), "--merge", str(tmp_path / "c.json"),
                        "--out", str(tmp_path / "n.json"), "--no-report"])


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="--tiny needs --out"):
        gpu_check.main(["--tiny", "--device", "cpu"])
    with pytest.raises(SystemExit, match="choose from"):
        gpu_check.main(["--parts", "sd16", "--tiny", "--device", "cpu", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="needs --merge"):
        gpu_check.main(["--merge-only", "--out", str(tmp_path / "x.json")])


def test_the_committed_record_renders_with_its_goals():
    path = gpu_check.DEFAULT_OUT
    d = json.loads(path.read_text())
    text = section_gpu_check(path)
    assert d["device"]["name"] in text
    for key in ("cuda_tests_passed", "cuda_tests_failed", "sd15_vs_trl", "sd15_peak_mem_vs_trl", "gae_vs_grpo_epoch"):
        assert f"`{key}`" in text
    for key, (op, goal) in gpu_check.GOALS.items():
        met = d[key] >= goal if op == ">=" else d[key] <= goal
        row = next(line for line in text.splitlines() if line.startswith(f"| `{key}`"))
        assert ("✓" in row) == met and ("missed" in row) == (not met)
