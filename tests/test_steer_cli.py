"""`critic-align steer` and `critic-align bench` wiring (tiny settings)."""

from __future__ import annotations

import json

import pytest

from critic_align.train.bench import SUITES, benchmarks_dir
from critic_align.train.cli import main


def test_steer_cli_pretrains_a_critic_then_reuses_it(tmp_path):
    out = tmp_path / "steer"
    small = ["--set", "batch_size=8", "--set", "group_size=8", "--set", "num_inference_steps=4",
             "--set", "sample_chunk_size=8", "--set", "minibatch_size=16", "--set", "value_pretrain_passes=1"]
    rc = main(["steer", "--config", "digits", "--out", str(out), "--critic-epochs", "1", "--per-prompt", "1",
               "--particles", "2", "--ess-threshold", "0.9", "--method", "base", "smc", "--threads", "1", *small])
    assert rc == 0
    res = json.loads((out / "steer_results.json").read_text())
    assert [r["method"] for r in res["runs"]] == ["base", "smc"]
    smc = res["runs"][1]
    assert smc["cost"]["nfe"] == 2 * 4 and smc["cost"]["critic_forward_rows"] > 0
    assert 0.0 <= smc["rewards"]["digit_prob"] <= 1.0 and (out / "steer_smc_N2.png").exists()
    assert (out / "checkpoints").exists() and (out / "run.json").exists() and (out / "config.json").exists()
    # digits.yaml trains an SDE window; the steering critic is pretrained on full trajectories (every state steering
    # queries), unless the user sets a window
    assert json.loads((out / "config.json").read_text())["sde_window_size"] == 0
    # reuse the saved critic: --run loads it instead of pretraining again
    rc = main(["steer", "--run", str(out), "--out", str(out), "--per-prompt", "1", "--particles", "2",
               "--method", "bon", "--threads", "1"])
    assert rc == 0
    assert [r["method"] for r in json.loads((out / "steer_results.json").read_text())["runs"]] == ["base", "smc", "bon"]


def test_steer_cli_default_methods_are_not_no_ops():
    from critic_align.train.steer import default_methods

    # guidance at scale 0 is the base sampler; SMC with κ·N <= 1 never resamples (it is best-of-N)
    assert default_methods(0.0, 4, 0.5) == ["base", "bon", "smc"]
    assert default_methods(20.0, 4, 0.5) == ["base", "bon", "guidance", "guidance+bon", "smc"]
    assert default_methods(0.0, 2, 0.5) == ["base", "bon"]
    assert "smc" in default_methods(0.0, 2, 0.9)
    with pytest.raises(ValueError, match="scale 0 is the base sampler"):
        main(["steer", "--config", "digits", "--method", "guidance", "--out", "unused"])


def test_steer_cli_options_all_have_help():
    import argparse

    from critic_align.train.steer import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["steer"]
    missing = [a.dest for a in sub._actions if a.dest != "help" and not a.help]
    assert not missing, missing


def test_steer_cli_refuses_a_config_without_critic(tmp_path):
    with pytest.raises(ValueError, match="needs a critic"):
        main(["steer", "--config", "digits_grpo", "--out", str(tmp_path)])


def test_bench_suites_name_existing_scripts():
    bench = benchmarks_dir()
    for scripts in SUITES.values():
        for s in scripts:
            assert (bench / s).exists(), s


def test_evaluate_samples_means_and_splits(tmp_path):
    """evaluate_samples: each reward's mean and its standard error over prompts (hand-computed from the reward
    matrix), and the steering table's per-split scores are the same function on each split's slice."""
    import torch

    from benchmarks.steering_table import TableSpec, split_evals
    from critic_align.api import build_trainer
    from critic_align.train.registry import load_run_config
    from critic_align.train.steer import evaluate_samples

    trainer = build_trainer(load_run_config("digits", {"output_dir": str(tmp_path), "batch_size": 8}))
    prompts = ["0", "1", "2", "3", "4", "5"]
    decoded = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mat = trainer.rewards(decoded, prompts)[:, trainer.rewards.names.index("digit_prob")].double()
    ev = evaluate_samples(trainer.rewards, trainer.eval_rewards, decoded, prompts)
    assert ev["digit_prob"] == pytest.approx(float(mat.mean()))
    assert ev["digit_prob_se"] == pytest.approx(float(mat.std(unbiased=True)) / 6 ** 0.5)
    assert "digit_correct" in ev  # the config's eval reward
    splits = {"a": prompts[:2], "b": prompts[2:]}
    by_split = split_evals(trainer, decoded, splits)
    assert by_split["a"]["digit_prob"] == pytest.approx(float(mat[:2].mean()))
    assert by_split["b"]["digit_prob"] == pytest.approx(float(mat[2:].mean()))
    with pytest.raises(ValueError, match="concatenated in order"):
        TableSpec(name="x", config="digits", reward_key="digit_prob", prompts=prompts,
                  splits={"a": prompts[2:], "b": prompts[:2]})
