"""The library's entry points (critic_align.api): a trained run's trainer and critic come back from its directory with
the trained weights; a run without a critic is refused before any model loads; an older run.json names its YAML."""

from __future__ import annotations

import json

import pytest
import torch

from critic_align import api
from critic_align.checkpoint import latest_checkpoint
from critic_align.train.registry import load_run_config

TINY = {"batch_size": 8, "group_size": 4, "num_inference_steps": 4, "sample_chunk_size": 8, "minibatch_size": 16,
        "value_pretrain_epochs": 1, "value_pretrain_passes": 1, "num_epochs": 1, "progress": False,
        "log_tensorboard": False, "grid_every": 0, "checkpoint_every": 1, "eval_every": 0}


def _trained_run(tmp_path, config="digits"):
    out = tmp_path / "run"
    run = load_run_config(config, {"output_dir": str(out), **TINY})
    trainer = api.build_trainer(run)
    api.write_run_dir(out, run)
    trainer.train()
    return out, trainer


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_run_and_load_critic_bring_back_the_trained_weights(tmp_path):
    out, trained = _trained_run(tmp_path)
    policy = trained.models.adapters.state_dict("policy")
    critic = trained.critic.state_tensors()
    assert any(v.abs().sum() > 0 for k, v in policy.items() if "lora_B" in k)  # training moved the policy
    final = latest_checkpoint(out / "checkpoints")
    assert final.name == "epoch_000001"

    again = api.load_run(out)  # the newest checkpoint that verifies
    assert again is not trained and again.epoch == 1 and again.reward_queries == trained.reward_queries
    assert _same(again.models.adapters.state_dict("policy"), policy) and _same(again.critic.state_tensors(), critic)
    # a checkpoint directory itself, here the value-pretrained epoch 0: its own weights, the LoRA B still 0
    first = api.load_run(out / "checkpoints" / "epoch_000000", {"num_inference_steps": 6})
    assert first.epoch == 0 and first.config.num_inference_steps == 6 and len(first.timesteps) == 6
    assert all(v.abs().sum() == 0 for k, v in first.models.adapters.state_dict("policy").items() if "lora_B" in k)
    assert _same(api.load_critic(out).state_tensors(), critic)
    assert (out / "metrics.jsonl").read_text().count("\n") == 2  # reuse writes nothing: value_pretrain + epoch 1


def test_load_critic_refuses_a_run_without_one_before_building_it(tmp_path, monkeypatch):
    out = tmp_path / "grpo"
    api.write_run_dir(out, load_run_config("digits_grpo", {"output_dir": str(out)}))

    def no_model(run):
        raise AssertionError("a model was built")

    monkeypatch.setattr(api, "build_trainer", no_model)
    with pytest.raises(ValueError, match=r"advantage='grpo', which fits no critic"):
        api.load_critic(out)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint under .*checkpoints verifies"):
        api.load_run(out)  # no checkpoint: refused before a model is built too


def test_an_older_run_json_takes_its_rewards_from_the_yaml_it_names(tmp_path):
    out = tmp_path / "old"
    run = load_run_config("digits", {"output_dir": str(out)})
    api.write_run_dir(out, run)
    (out / "run.json").write_text(json.dumps({"task": "digits", "base_model": None, "config_file": run["_path"]}))
    again = api.load_run_dir(out)
    assert again["rewards"] == run["rewards"] and again["eval_rewards"] == run["eval_rewards"]
    assert again["ppo"].to_dict() == run["ppo"].to_dict() and again["task"] == "digits"
    (out / "run.json").write_text(json.dumps({"task": "digits", "config_file": str(tmp_path / "gone.yaml")}))
    with pytest.raises(FileNotFoundError, match=r"names no rewards and its config file .*gone.yaml.* is gone"):
        api.load_run_dir(out)
