"""One test per bug of the code review (issue 14), each failing before its fix:

1. ``steer --run RUN`` on a run directory that ``train`` wrote (and its ``--set`` overrides);
2. ``critic_mode: shared`` value pretraining must not move the policy's LoRA;
3. the gradient all-reduce buffer lives on the gradients' device (CUDA with NCCL);
4. ``grpo`` with group_size 1 is refused; ``gae`` without value pretraining still sets the head's output scale;
5. one rule for a missing (NaN) reward in every advantage mode;
6. the digits maintenance commands take options and ``--help``, and write under runs/ by default;
7. ``sample --run RUN`` samples with the run's own sampler and writes into the run directory.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_multi_reward import make_trainer as make_multi_trainer
from test_trainer import make_trainer

from critic_align.advantages import grpo_advantages
from critic_align.train.cli import main

TINY = ["--set", "batch_size=8", "--set", "group_size=8", "--set", "num_inference_steps=3", "--set",
        "sde_window_size=2", "--set", "sample_chunk_size=8", "--set", "minibatch_size=24", "--set",
        "value_pretrain_epochs=1", "--set",
        "value_pretrain_passes=1", "--set", "progress=false", "--set", "log_tensorboard=false", "--set",
        "grid_every=0"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A one-epoch digits run written by `critic-align train`, with a non-default LoRA rank (an override that
    must survive a reload: a checkpoint of rank 4 does not load into rank-8 adapters)."""
    out = tmp_path_factory.mktemp("bugs") / "run"
    assert main(["train", "--out", str(out), "--epochs", "1", *TINY, "--set", "lora_rank=4"]) == 0
    return out


# 1 ---------------------------------------------------------------------------------------------------------
def test_steer_reuses_a_train_run_with_its_overrides(trained_run, tmp_path):
    from critic_align.train.steer import build_steering_trainer

    trainer, run = build_steering_trainer(None, str(trained_run), str(tmp_path / "steer"))
    assert trainer.config.lora_rank == 4 and trainer.config.num_inference_steps == 3
    assert run["task"] == "digits"
    rc = main(["steer", "--run", str(trained_run), "--out", str(tmp_path / "steer"), "--per-prompt", "1",
               "--method", "base", "--threads", "1"])
    assert rc == 0 and (tmp_path / "steer" / "steer_results.json").exists()


# 2 ---------------------------------------------------------------------------------------------------------
def test_shared_critic_value_pretraining_leaves_the_policy_alone(tmp_path):
    tr = make_trainer(tmp_path, critic_mode="shared", value_pretrain_epochs=1, value_pretrain_passes=2)
    policy = {k: v.detach().clone() for k, v in tr.adapters.state_dict("policy").items()}
    head = [p.detach().clone() for p in tr.critic.head.parameters()]
    tr.pretrain_value()
    changed = [k for k, v in tr.adapters.state_dict("policy").items() if not torch.equal(v, policy[k])]
    assert changed == [], f"value pretraining moved {len(changed)} of {len(policy)} policy tensors"
    assert any(not torch.equal(a, b) for a, b in zip(head, tr.critic.head.parameters()))


# 3: the hand-written gradient all-reduce is gone (the engine syncs gradients: tests/test_multiprocess.py)


# 4 ---------------------------------------------------------------------------------------------------------
def test_grpo_with_groups_of_one_is_refused():
    from critic_align.config import PPOConfig

    with pytest.raises(ValueError, match="group_size"):
        PPOConfig(advantage="grpo", group_size=1, batch_size=8)


def test_gae_without_value_pretraining_sets_the_output_scale(tmp_path):
    tr = make_trainer(tmp_path, value_pretrain_epochs=0)
    tr.train(1)
    head = tr.critic.head
    assert not torch.equal(head.out_scale, torch.ones_like(head.out_scale))
    assert not torch.equal(head.out_mean, torch.zeros_like(head.out_mean))


# 5 ---------------------------------------------------------------------------------------------------------
def test_grpo_sum_then_normalize_missing_reward_contributes_nothing(tmp_path):
    """The rule of combine_advantages in every mode: a missing reward adds 0 to the (centred) advantage and the
    other weights are not rescaled.  Group 0: reward 2 is missing for sample 1; it is filled with the mean of
    the group's available reward-2 values (2, 4, 0 -> 2), so it contributes nothing after centring."""
    tr = make_multi_trainer(tmp_path, advantage="grpo", advantage_aggregation="sum_then_normalize", group_size=4,
                            batch_size=8)
    rewards = torch.tensor([[1.0, 2.0], [3.0, math.nan], [2.0, 4.0], [0.0, 0.0]] + [[1.0, 1.0]] * 4)
    ro = replace(tr.rollout(["1"] * 4 + ["3"] * 4), rewards=rewards)
    ro = tr.compute_advantages(ro)
    combined = torch.tensor([1 + 2 * 2, 3 + 2 * 2, 2 + 2 * 4, 0 + 0, 3, 3, 3, 3], dtype=torch.float32)
    expected = grpo_advantages(combined, torch.tensor([0] * 4 + [1] * 4))
    torch.testing.assert_close(ro.advantages[:, 0], expected)


# 6 ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["pretrain-digits", "pretrain-digits-dit", "train-classifier", "evaluate-digits"])
def test_digits_commands_take_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "--out" in capsys.readouterr().out


def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_digits_commands_take_options_and_write_under_runs(tmp_path, monkeypatch):
    """Run from a directory with the package's layout (as from the repository root): the defaults write under
    runs/, and the shipped assets are untouched."""
    from critic_align.tasks.digits import ASSETS

    before = _digest(ASSETS)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "critic_align" / "assets" / "digits_unet").mkdir(parents=True)  # what the old default overwrote
    main(["pretrain-digits", "--steps", "2", "--batch-size", "4", "--warmup", "1"])
    main(["pretrain-digits-dit", "--steps", "2", "--batch-size", "4", "--warmup", "1"])
    main(["train-classifier", "--epochs", "1"])
    main(["evaluate-digits", "--model", "runs/digits_unet", "--per-class", "1", "--steps", "2"])
    runs = tmp_path / "runs"
    for sub in ("digits_unet", "digits_dit", "digit_classifier"):
        assert (runs / sub / "config.json").exists(), sub
    assert json.loads((runs / "digits_unet" / "training_log.json").read_text())["args"]["steps"] == 2
    assert (runs / "evaluate_digits" / "digits_unet" / "eval.json").exists()
    assert not any((tmp_path / "critic_align").rglob("*.*"))
    assert _digest(ASSETS) == before, "a command wrote into the package's assets"


def test_evaluate_digits_of_a_shipped_model_does_not_write_into_the_package(tmp_path, monkeypatch):
    from critic_align.tasks.digits import ASSETS

    before = _digest(ASSETS)
    monkeypatch.chdir(tmp_path)
    main(["evaluate-digits", "--per-class", "1", "--steps", "2"])
    assert _digest(ASSETS) == before
    assert list((tmp_path / "runs").rglob("eval.json"))


# 7 ---------------------------------------------------------------------------------------------------------
def test_sample_from_a_run_uses_its_sampler_and_writes_into_the_run(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--run", str(trained_run), "--per-class", "1"]) == 0
    grid = trained_run / "samples.png"
    assert grid.exists() and not (tmp_path / "samples.png").exists()
    cfg = json.loads((trained_run / "config.json").read_text())
    explicit = tmp_path / "explicit.png"
    main(["sample", "--run", str(trained_run), "--per-class", "1", "--steps", str(cfg["num_inference_steps"]),
          "--eta", str(cfg["eta"]), "--out", str(explicit)])
    assert explicit.read_bytes() == grid.read_bytes()
    ode = tmp_path / "ode.png"
    main(["sample", "--run", str(trained_run), "--per-class", "1", "--steps", "50", "--eta", "0", "--out", str(ode)])
    assert ode.read_bytes() != grid.read_bytes()


def test_sample_options_have_help():
    import argparse

    from critic_align.train.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [a.option_strings[0] for a in sub.choices["sample"]._actions if a.option_strings and not a.help]
    assert missing == []


# config: DDIM's eta and the flow SDE's noise level are two fields --------------------------------------------
def test_eta_is_ddim_only_and_sde_noise_level_is_flow_only(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from test_dit import _TinyDigits, tiny_dit

    from critic_align.backbones import DiTAdapter
    from critic_align.config import PPOConfig
    from critic_align.rewards import FunctionReward, MultiReward
    from critic_align.trainer import Trainer

    vp = make_trainer(tmp_path / "vp", eta=0.5, sde_noise_level=0.3)
    assert vp.step.eta == 0.5
    cfg = PPOConfig(batch_size=8, group_size=4, eta=0.5, sde_noise_level=0.3, output_dir=str(tmp_path / "flow"),
                    lora_target_modules=("to_q", "to_k"), progress=False)
    reward = MultiReward([FunctionReward(lambda s, p: s.mean(dim=(1, 2, 3)), name="mean")])
    flow = Trainer(cfg, _TinyDigits(), DiTAdapter(tiny_dit()), FlowMatchEulerDiscreteScheduler(), reward)
    assert flow.step.noise_level == 0.3

    with pytest.raises(ValueError, match="sde_noise_level=0"):
        PPOConfig(sde_noise_level=0.0)


# the Task protocol ----------------------------------------------------------------------------------------------
def test_a_task_missing_protocol_members_is_refused_by_name(tmp_path):
    from test_trainer import TinyTask, tiny_unet

    from critic_align.tasks.base import BaseTask, Task

    class Bare:  # the three methods and two attributes, without BaseTask's defaults
        prompts, latent_shape = TinyTask.prompts, TinyTask.latent_shape
        encode, null_cond, decode = TinyTask.encode, TinyTask.null_cond, TinyTask.decode

    assert isinstance(TinyTask(), Task) and not isinstance(Bare(), Task) and issubclass(TinyTask, BaseTask)
    from diffusers import DDPMScheduler

    from critic_align.backbones import UNetAdapter
    from critic_align.config import PPOConfig
    from critic_align.rewards import FunctionReward, MultiReward
    from critic_align.trainer import Trainer

    with pytest.raises(TypeError, match=r"lacks \['to', 'grid_prompts', 'grid_scale'\]"):
        Trainer(PPOConfig(batch_size=8, group_size=4, output_dir=str(tmp_path)), Bare(), UNetAdapter(tiny_unet()),
                DDPMScheduler(num_train_timesteps=100), MultiReward([FunctionReward(lambda s, p: s.mean((1, 2, 3)),
                                                                                   name="m")]))
