"""benchmarks/t2i_advantages.py: merging part files and summarising runs (pure functions on the JSON records)."""

import json

import numpy as np
import pytest

from benchmarks.t2i_advantages import merge, summarize

MACHINE = {"cpu_count": 2, "torch_threads": 1, "platform": "p", "torch": "t"}


def _run(mode, seed, evs):
    ev = {"train": {"composition": 0.5, "composition_correct": 0.1},
          "heldout": {"composition": 0.4, "composition_correct": 0.05}}
    curve = [{"reward_queries": 32 * (i + 1), "reward": 0.5 + 0.01 * i, "composition_correct": 0.1, "value_ev": e}
             for i, e in enumerate(evs)]
    return {"mode": mode, "seed": seed, "reward_queries": 32 * len(evs), "epochs": len(evs), "pretrain_queries": 0,
            "x0_reward_rows": 0, "seconds": 1.0, "base_eval": ev, "final_eval": ev, "curve": curve,
            "mean_epoch_seconds": 0.5}


def _part(tmp_path, name, runs, machine=MACHINE):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"config": "t2i", "budget_reward_queries": 256, "overrides": {},
                                "eval_prompts": {"train": ["a red 3"], "heldout": ["a blue 7"]},
                                "summary": {}, "runs": runs, "machine": machine}))
    return path


def test_second_half_ev_mean_and_median():
    # Second half of 8 epochs: 0.2, 0.3, -1000, 0.25 -> one near-zero-variance batch decides the mean, not the median.
    s = summarize([_run("gae", 0, [0.0, 0.0, 0.0, 0.0, 0.2, 0.3, -1000.0, 0.25])])["gae"]
    assert s["value_ev_second_half_mean"] == pytest.approx(np.mean([0.2, 0.3, -1000.0, 0.25]))
    assert s["value_ev_second_half_median"] == pytest.approx(0.225)


def test_merge_keeps_the_runs_machine_and_refuses_mixed_settings(tmp_path):
    a = _part(tmp_path, "a", [_run("gae", 0, [0.1] * 8)])
    b = _part(tmp_path, "b", [_run("grpo", 0, [None] * 8)])
    merged = merge([a, b])
    assert merged["machine"] == MACHINE and [r["mode"] for r in merged["runs"]] == ["gae", "grpo"]
    c = _part(tmp_path, "c", [_run("grpo", 1, [None] * 8)], machine={**MACHINE, "torch_threads": 2})
    with pytest.raises(SystemExit, match="machine differs"):
        merge([a, c])
    with pytest.raises(SystemExit, match="same \\(mode, seed\\)"):
        merge([a, _part(tmp_path, "d", [_run("gae", 0, [0.1] * 8)])])
