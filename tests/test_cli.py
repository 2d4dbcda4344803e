"""The command line and the shipped assets, end to end (small sizes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from critic_align.train.cli import main
from critic_align.train.registry import build_rewards, load_run_config


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "critic_align.train.cli", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("train", "sample", "pretrain-digits", "train-classifier", "evaluate-digits"):
        assert cmd in out.stdout


def test_sample_writes_a_grid_of_recognisable_digits(tmp_path):
    from critic_align.tasks.digits import load_digit_classifier

    out = tmp_path / "grid.png"
    assert main(["sample", "--steps", "10", "--per-class", "3", "--out", str(out)]) == 0
    img = Image.open(out)
    assert img.width > 3 * 16 * 4 and img.height >= 10 * 16 * 4  # 10 rows, scaled x4
    # the shipped base model's samples are classified as their prompted digit
    from critic_align.rollout import sample
    from critic_align.steps import DDIMStep, NoiseSchedule
    from critic_align.tasks.digits import load_base_model

    unet, sched = load_base_model()
    step = DDIMStep(NoiseSchedule.from_scheduler(sched), eta=0.0)
    labels = torch.arange(10).repeat_interleave(10)
    x = sample(lambda x, t, c: unet(x, t, class_labels=c).sample, step, torch.randn(100, 1, 16, 16,
               generator=torch.Generator().manual_seed(1)), step.schedule.timesteps(20), labels)
    acc = (load_digit_classifier()(x.clamp(-1, 1)).argmax(1) == labels).float().mean().item()
    assert acc >= 0.9


def test_shipped_classifier_is_accurate_on_heldout_digits():
    from critic_align.tasks.digits import load_digit_classifier, load_digits_dataset, train_val_split

    images, labels = load_digits_dataset()
    _, heldout = train_val_split(len(images), 0.2, seed=0)
    with torch.no_grad():
        pred = load_digit_classifier()(images[heldout]).argmax(1)
    assert (pred == labels[heldout]).float().mean().item() >= 0.97


def test_train_command_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    code = main(["train", "--out", str(out), "--epochs", "2", "--set", "batch_size=16", "--set", "group_size=8",
                 "--set", "num_inference_steps=5", "--set", "value_pretrain_epochs=1", "--set", "progress=false",
                 "--set", "minibatch_size=40", "--set", "checkpoint_every=1"])
    assert code == 0
    for name in ("metrics.jsonl", "reward_curve.png", "grid_before.png", "grid_after.png", "summary.json",
                 "config.json"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["reward_queries"] == 16 * 3
    assert (out / "tensorboard").is_dir() and any((out / "tensorboard").iterdir())
    # a second run into the same directory is refused unless --resume
    with pytest.raises(SystemExit, match="--resume"):
        main(["train", "--out", str(out), "--epochs", "2"])
    # --resume continues from the last checkpoint (already at 2 of 3 epochs)
    assert main(["train", "--out", str(out), "--epochs", "3", "--resume", "--set", "batch_size=16", "--set",
                 "group_size=8", "--set", "num_inference_steps=5", "--set", "value_pretrain_epochs=1", "--set",
                 "progress=false", "--set", "minibatch_size=40", "--set", "checkpoint_every=1"]) == 0
    assert json.loads((out / "summary.json").read_text())["epochs"] == 3
    # the trained policy LoRA can be sampled from
    grid = tmp_path / "after.png"
    assert main(["sample", "--run", str(out), "--steps", "5", "--per-class", "2", "--out", str(grid)]) == 0
    assert grid.exists()


def test_run_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: digits\nrewardz: []\n")
    with pytest.raises(ValueError, match="unknown top-level keys.*rewardz"):
        load_run_config(str(bad))
    bad.write_text("optimization:\n  learning_rat: 0.1\n")
    with pytest.raises(ValueError, match="did you mean 'learning_rate', under optimization:"):
        load_run_config(str(bad))
    bad.write_text("sampling:\n  eta: 0\n")
    with pytest.raises(ValueError, match="eta"):
        load_run_config(str(bad))
    with pytest.raises(FileNotFoundError, match="named configs"):
        load_run_config("no_such_config")
    with pytest.raises(ValueError, match="unknown reward 'clip'"):
        build_rewards([{"name": "clip"}])
    with pytest.raises(ValueError, match="bad options"):
        build_rewards([{"name": "boldness", "temperature": 2}])
    with pytest.raises(ValueError, match="no rewards"):
        build_rewards([])


def test_named_configs_load():
    for name in ("digits", "digits_grpo", "digits_ddpo"):
        run = load_run_config(name)
        assert run["ppo"].advantage == {"digits": "gae", "digits_grpo": "grpo", "digits_ddpo": "ddpo"}[name]
