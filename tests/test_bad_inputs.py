"""The bad-input catalogue (docs/bad_inputs.md): the rows no other test file covers.

Each bad input must raise an error that names the problem and what to do, and lose nothing already saved:
after the error, the previous checkpoint still loads.
"""

from __future__ import annotations

import errno
import math

import pytest
import torch
from diffusers import DDPMScheduler
from test_trainer import TinyTask, brightness_matches_label, make_trainer, tiny_unet

from critic_align.backbones import UNetAdapter
from critic_align.checkpoint import CheckpointError, latest_checkpoint
from critic_align.config import PPOConfig
from critic_align.rewards import FunctionReward, MultiReward, RewardError
from critic_align.trainer import Trainer


def _reward(fn, name="flaky"):
    return MultiReward([FunctionReward(fn, name=name)])


def _nan(s, p):
    out = torch.zeros(len(p))
    out[1] = math.nan
    return out


def _inf(s, p):
    return torch.full((len(p),), math.inf)


def _raises(s, p):
    raise ConnectionError("scorer unreachable")


def _column(s, p):
    return torch.zeros(len(p), 1)


def _ints_as_text(s, p):
    return ["1"] * len(p)


@pytest.mark.parametrize("fn,match", [
    (_nan, r"reward 'flaky' returned NaN for samples \[1\].*allows_nan=True"),
    (_inf, r"reward 'flaky' returned inf .*must be finite"),
    (_raises, r"reward 'flaky' failed: ConnectionError: scorer unreachable"),
    (_column, r"reward 'flaky' returned shape \(8, 1\), expected \(B,\) = \(8,\)"),
    (_ints_as_text, r"reward 'flaky' returned dtype|reward 'flaky' returned a list that cannot be converted"),
])
def test_bad_reward_during_training_names_it_and_keeps_the_checkpoint(tmp_path, fn, match):
    tr = make_trainer(tmp_path)
    tr.train(num_epochs=1)
    saved = latest_checkpoint(tmp_path / "run" / "checkpoints")
    tr.rewards = _reward(fn)
    with pytest.raises(RewardError, match=match):
        tr.train_epoch()
    fresh = make_trainer(tmp_path)
    fresh.load(saved)  # nothing already saved was lost
    assert fresh.epoch == 1


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    tr = make_trainer(tmp_path)
    tr.train(num_epochs=1)
    ckpts = tmp_path / "run" / "checkpoints"
    before = latest_checkpoint(ckpts)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    tr.epoch = 2
    with pytest.raises(CheckpointError, match=r"epoch_000002.*No space left.*disk is full: free disk space") as info:
        tr.save()
    assert "earlier checkpoints" in str(info.value) and "untouched" in str(info.value)
    monkeypatch.undo()
    assert latest_checkpoint(ckpts) == before
    assert not list(ckpts.glob(".tmp-*")), "the half-written checkpoint was left behind"
    fresh = make_trainer(tmp_path)
    fresh.load(before)
    assert fresh.epoch == 1


def test_checkpoint_of_another_base_model_is_refused(tmp_path):
    tr = make_trainer(tmp_path / "a")
    path = tr.save()
    sched = DDPMScheduler(num_train_timesteps=100, timestep_spacing="trailing", clip_sample=True)
    rewards = MultiReward([FunctionReward(brightness_matches_label, name="bright", differentiable=True)])
    other = Trainer(tr.config, TinyTask(), UNetAdapter(tiny_unet(seed=1)), sched, rewards)  # same shapes
    with pytest.raises(CheckpointError, match=r"state.json was saved from another model.*base model's weights differ"):
        other.load(path)


def test_checkpoint_of_another_config_is_refused_naming_the_fields(tmp_path):
    path = make_trainer(tmp_path / "a").save()
    other = make_trainer(tmp_path / "b", learning_rate=3e-4, gamma=0.9, num_epochs=7)  # num_epochs may change
    with pytest.raises(CheckpointError, match=r"another config: gamma=1.0 in the checkpoint vs 0.9 now, "
                                              r"learning_rate=0.001 in the checkpoint vs 0.0003 now\. Resume"):
        other.load(path)


def test_corrupt_or_missing_checkpoint_files_are_named(tmp_path):
    tr = make_trainer(tmp_path)
    path = tr.save()
    with pytest.raises(CheckpointError, match="does not exist"):
        tr.load(path.parent / "epoch_999999")
    (path / "state.json").write_text('{"format_version": 1, "epoch": 3')
    with pytest.raises(CheckpointError, match=r"state.json is corrupt \(not valid JSON"):
        tr.load(path)
    (path / "state.json").write_text('{"format_version": 1, "epoch": 3}')
    with pytest.raises(CheckpointError, match=r"state.json is corrupt: it lacks \['reward_queries'"):
        tr.load(path)
    (path / "state.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete: state.json is missing"):
        tr.load(path)
    assert latest_checkpoint(path.parent) is None  # an incomplete checkpoint is never picked up


class _FakeProcesses:
    """What the trainer reads from an accelerator, for N processes (only the checks before any communication)."""

    def __init__(self, n):
        self.num_processes, self.process_index, self.is_main_process = n, 0, True
        self.device = torch.device("cpu")


@pytest.mark.parametrize("n,kw,match", [
    (3, {}, r"batch_size=8 does not split over 3 processes: use a multiple of 3"),
    (2, {"sample_chunk_size": 8}, r"sample_chunk_size=8: with 2 processes each samples batch_size/2 = 4 trajectories in "
                                  r"whole chunks .* set sample_chunk_size to a divisor of 4, e\.g\. 4"),
])
def test_batch_that_does_not_split_over_processes(tmp_path, monkeypatch, n, kw, match):
    monkeypatch.setenv("WORLD_SIZE", str(n))
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, accelerator=_FakeProcesses(n), **kw)


def test_a_launch_accelerate_does_not_see_is_refused(tmp_path, monkeypatch):
    """torchrun on CPU without ACCELERATE_USE_CPU: each process would train alone into the same directory."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"launched as 2 processes \(WORLD_SIZE=2\) but accelerate sees 1: every "
                                           r"process would train alone.*ACCELERATE_USE_CPU=1"):
        make_trainer(tmp_path, accelerator=_FakeProcesses(1))


@pytest.mark.parametrize("kw,match", [
    ({"learning_rate": "1e-3"}, r"learning_rate='1e-3': must be a finite number > 0 .*PyYAML reads 1e-3 as a string"),
    ({"batch_size": "64"}, r"batch_size='64': must be an integer >= 1 \(got the string '64'"),
    ({"batch_size": 64.0}, r"batch_size=64.0: must be an integer"),
    ({"gamma": [1.0]}, r"gamma=\[1.0\]: must be in \[0, 1\] \(got a list\)"),
    ({"progress": "yes"}, r"progress='yes': must be true or false"),
    ({"cudnn_attention": 1}, r"cudnn_attention=1: must be true or false"),
    ({"keep_last": 0}, r"keep_last=0: must be an integer >= 1"),
])
def test_config_values_of_the_wrong_type_or_range(kw, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig(**kw)


def test_empty_prompt_list_and_wrong_prompt_types_at_trainer_construction(tmp_path):
    class NoPrompts(TinyTask):
        prompts = ()

    class IntPrompts(TinyTask):
        prompts = (0, 1)

    sched = DDPMScheduler(num_train_timesteps=100, timestep_spacing="trailing")
    rewards = MultiReward([FunctionReward(brightness_matches_label, name="bright")])
    cfg = PPOConfig(output_dir=str(tmp_path), batch_size=8, group_size=4, progress=False)
    with pytest.raises(ValueError, match="the prompt list is empty: give at least one prompt"):
        Trainer(cfg, NoPrompts(), UNetAdapter(tiny_unet()), sched, rewards)
    with pytest.raises(TypeError, match=r"prompts must be strings, got int \(0\)"):
        Trainer(cfg, IntPrompts(), UNetAdapter(tiny_unet()), sched, rewards)


def test_remote_reward_server_down_during_training_keeps_the_checkpoint(tmp_path):
    import socket

    from critic_align.rewards.remote import RemoteReward

    tr = make_trainer(tmp_path)
    tr.train(num_epochs=1)
    saved = latest_checkpoint(tmp_path / "run" / "checkpoints")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/score"
    tr.rewards = MultiReward([RemoteReward(url, encoding="list", timeout=1.0, retries=1, backoff=0.01)])
    with pytest.raises(RewardError, match=r"could not connect .*is the reward server running") as info:
        tr.train_epoch()
    assert url in str(info.value)
    fresh = make_trainer(tmp_path)
    fresh.load(saved)
    assert fresh.epoch == 1


def test_resume_without_a_checkpoint_says_what_to_do(tmp_path):
    from critic_align.train.cli import main

    run = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"--resume: no complete checkpoint in .*checkpoints \(the run stopped before "
                                         r"its first one was written\); start it again without --resume after removing"):
        main(["train", "--out", str(run), "--resume", "--set", "progress=false", "--set", "log_tensorboard=false"])


def test_the_catalogue_names_only_tests_that_exist():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    refs = set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", (root / "docs" / "bad_inputs.md").read_text()))
    assert len(refs) >= 20
    missing = [f"{f}::{n}" for f, n in sorted(refs) if f"def {n}(" not in (root / f).read_text()]
    assert not missing, f"docs/bad_inputs.md names tests that do not exist: {missing}"


def test_loading_weights_for_reuse_accepts_another_sampling_config(tmp_path):
    """resume=False (e.g. steering with a trained critic): only the model must match, and the logs are untouched."""
    src = make_trainer(tmp_path / "a")
    path = src.save()
    other = make_trainer(tmp_path / "b", num_inference_steps=6, batch_size=16)
    other.load(path, resume=False)
    assert all(torch.equal(a, b) for a, b in zip(src.critic.head.parameters(), other.critic.head.parameters()))
    with pytest.raises(CheckpointError, match="another config"):
        other.load(path)


# ------------------------------------------------------------------------ issue 30: refuse what cannot work
def _all_nan(s, p):
    return torch.full((len(p),), math.nan)


def test_all_nan_rewards_for_a_whole_batch_stop_the_run_naming_the_reward(tmp_path):
    tr = make_trainer(tmp_path)
    tr.train(num_epochs=1)
    saved = latest_checkpoint(tmp_path / "run" / "checkpoints")
    tr.rewards = MultiReward([FunctionReward(_all_nan, name="judge", allows_nan=True)])
    with pytest.raises(RewardError, match=r"reward 'judge' returned NaN for all 8 samples of the batch: NaN means "
                                          r"'not applicable' \(allows_nan=True\), and a batch where nothing is scored "
                                          r"trains nothing"):
        tr.train_epoch()
    assert tr.epoch == 1
    fresh = make_trainer(tmp_path)
    fresh.load(saved)
    # one reward NaN for the whole batch next to one that scored it still trains (that head skips it)
    from critic_align.guard import check_reward_magnitude

    check_reward_magnitude(torch.tensor([[1.0, math.nan], [0.5, math.nan]]), ["a", "b"])


def test_steering_api_checks_scale_and_particle_counts():
    from critic_align.steering.diffusers import steer_pipeline
    from critic_align.steering.samplers import SteerOptions, best_of_n, guidance, guidance_best_of_n, smc, smc_x0

    x = torch.zeros(2, 1, 4, 4)
    ts = torch.tensor([3, 2, 1])

    def reward(s, p):
        return s.mean(dim=(1, 2, 3))

    def value(x, t, c):
        return x.mean(dim=(1, 2, 3))

    for kw, match in [(dict(scale=math.inf), r"guidance scale must be a finite number >= 0, got inf"),
                      (dict(scale=math.nan), r"guidance scale must be a finite number >= 0, got nan"),
                      (dict(scale=-1.0), r"guidance scale must be a finite number >= 0, got -1.0")]:
        with pytest.raises(ValueError, match=match):
            guidance(None, None, x, ts, value_fn=value, reward_fn=reward, **kw)
    with pytest.raises(ValueError, match=r"num_particles must be an integer >= 1 \(samples per prompt\), got 0"):
        best_of_n(None, None, x, ts, num_particles=0, reward_fn=reward)
    with pytest.raises(ValueError, match=r"the guidance lam must be a finite number, got inf"):
        smc(None, None, x, ts, num_particles=2, reward_fn=reward, value_fn=value, lam=math.inf)
    with pytest.raises(ValueError, match=r"^smc_x0: the guidance lam must be a finite number, got nan"):
        smc_x0(None, None, x, ts, num_particles=2, reward_fn=reward, lam=math.nan)
    with pytest.raises(ValueError, match=r"^guidance_best_of_n: num_particles must be an integer >= 1"):
        guidance_best_of_n(None, None, x, ts, num_particles=True, value_fn=value, scale=1.0, reward_fn=reward)
    with pytest.raises(ValueError, match=r"SteerOptions.backbone_rows_per_call must be an int >= 1"):
        SteerOptions(backbone_rows_per_call=0)
    with pytest.raises(ValueError, match=r"SteerOptions.reward_price must be a finite number >= 0"):
        SteerOptions(reward_price=-1.0)
    with pytest.raises(ValueError, match=r"steer_pipeline: num_particles must be an integer >= 1 .*got 0"):
        steer_pipeline(None, "a cat", num_particles=0, reward_fn=reward)
    with pytest.raises(ValueError, match=r"steer_pipeline: the guidance scale must be a finite number >= 0, got nan"):
        steer_pipeline(None, "a cat", num_particles=2, reward_fn=reward, guidance_value_fn=value,
                       guidance_scale_value=math.nan)


def test_sample_per_class_zero_is_refused(capsys):
    from critic_align.train.cli import cli

    with pytest.raises(SystemExit) as info:
        cli(["sample", "--per-class", "0"])
    assert info.value.code == 2
    assert "--per-class: must be an integer >= 1, got 0" in capsys.readouterr().err


def test_trainer_argument_types_are_named_with_an_example(tmp_path):
    from critic_align.rewards import DigitProb

    cfg = PPOConfig(batch_size=8, group_size=4, output_dir=str(tmp_path / "run"))
    sched = DDPMScheduler(num_train_timesteps=100)
    rewards = _reward(brightness_matches_label, "bright")
    unet = tiny_unet()
    cases = [
        (dict(rewards=DigitProb()), r"Trainer\(rewards=...\) takes a critic_align.rewards.MultiReward, got a "
                                    r"critic_align.DigitProb; wrap it: rewards=MultiReward\(\[DigitProb\(...\)\]\)"),
        (dict(adapter=unet), r"Trainer\(adapter=...\) takes a BackboneAdapter wrapping the model, got the raw module "
                             r"UNet2DModel; wrap it, e.g. UNetAdapter\(unet\)"),
        (dict(config=cfg.to_dict()), r"Trainer\(config=...\) takes a critic_align.PPOConfig, got a builtins.dict \(build "
                                     r"it from the dict: PPOConfig\(\*\*d\)"),
        (dict(eval_rewards=[DigitProb()]), r"Trainer\(eval_rewards=...\) takes a critic_align.rewards.MultiReward or "
                                           r"None, got a builtins.list; wrap the list: eval_rewards=MultiReward"),
    ]
    for kw, match in cases:
        args = dict(config=cfg, task=TinyTask(), adapter=UNetAdapter(unet), scheduler=sched, rewards=rewards) | kw
        with pytest.raises(TypeError, match=match):
            Trainer(**args)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_yaml_section_that_is_not_a_mapping_is_refused(tmp_path):
    from critic_align.train.registry import load_run_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("rewards: [digit_prob]\nrun: 5\n")
    with pytest.raises(ValueError, match=r"bad.yaml: run: must be a mapping of fields, e.g. run: "
                                         r"\{output_dir: ...\}, got int 5"):
        load_run_config(str(bad))


def test_an_unwritable_run_directory_is_a_clear_error(tmp_path, monkeypatch):
    import os

    from critic_align.runlock import RunDirNotWritable, acquire, check_writable

    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the run directory's parent should be: a real OSError
    with pytest.raises(RunDirNotWritable, match=rf"cannot write to {blocker}/run: the run directory is not writable "
                                                r"\(.*Error: .*\); use a writable --out"):
        check_writable(blocker / "run")

    def read_only(*a, **k):  # a read-only filesystem (chmod does not stop root, who runs these tests in CI)
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "link", read_only)
    with pytest.raises(RunDirNotWritable, match=r"cannot resume .*: the run directory is not writable \(OSError: "
                                                r"Read-only file system\)"):
        acquire(tmp_path / "ro", "resume")
    assert not (tmp_path / "ro" / "run.lock").exists()


def test_resume_with_no_epochs_left_says_so(tmp_path, capsys):
    from critic_align.train.cli import _check_epochs_left

    tr = make_trainer(tmp_path, num_epochs=2)
    tr.train()
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    with pytest.raises(SystemExit, match=r"--resume: .*epoch_000002 has already trained 2 epochs, more than "
                                         r"num_epochs=1: a resume cannot go back; pass --epochs N with N > 2"):
        _check_epochs_left(ckpt, 1)
    _check_epochs_left(ckpt, 2)
    assert "nothing to do: " in capsys.readouterr().err
    _check_epochs_left(ckpt, 3)
    assert capsys.readouterr().err == ""


def test_the_number_hint_is_only_for_numbers_written_as_text():
    with pytest.raises(ValueError) as info:
        PPOConfig(mixed_precision="fp16")
    assert "use 'no' or 'bf16'" in str(info.value) and "write a number" not in str(info.value)
    with pytest.raises(ValueError, match=r"learning_rate='1e-3'.*write a number, not a quoted string"):
        PPOConfig(learning_rate="1e-3")
    with pytest.raises(ValueError) as info:
        PPOConfig(learning_rate="fast")
    assert "got the string 'fast'" in str(info.value) and "write a number" not in str(info.value)
