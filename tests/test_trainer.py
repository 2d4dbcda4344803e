"""Trainer invariants on a tiny class-conditional UNet (8x8): on-policy ratio, accumulation, LoRA-only
updates, the three advantage modes, checkpoint round trip and exact resume, config errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from critic_align.algorithms.ppo import loss_on_pairs
from critic_align.backbones import UNetAdapter
from critic_align.checkpoint import CheckpointError, latest_checkpoint
from critic_align.config import PPOConfig, not_applicable
from critic_align.rewards import FunctionReward, MultiReward
from critic_align.tasks.base import BaseTask
from critic_align.trainer import Trainer
from critic_align.update import pairs as draw_pairs


class TinyTask(BaseTask):
    name = "tiny"
    prompts = ("0", "1", "2", "3")
    latent_shape = (1, 8, 8)

    def encode(self, prompts):
        return torch.tensor([int(p) for p in prompts])

    def null_cond(self, n):
        return torch.full((n,), 10, dtype=torch.long)

    def decode(self, latents):
        return latents.clamp(-1, 1)


def brightness_matches_label(samples, prompts):
    """A cheap reward that depends on both the sample and the prompt."""
    target = torch.tensor([int(p) / 3 * 2 - 1 for p in prompts], device=samples.device)
    return -(samples.mean(dim=(1, 2, 3)) - target).abs()


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, num_class_embeds=11, attention_head_dim=8)


def make_trainer(tmp_path, accelerator=None, **overrides):
    cfg = dict(num_epochs=2, batch_size=8, group_size=4, num_inference_steps=4, minibatch_size=16,
               value_pretrain_epochs=1, value_pretrain_passes=1, output_dir=str(tmp_path / "run"), progress=False,
               log_tensorboard=False, grid_every=0, checkpoint_every=1, lora_rank=2, critic_lora_rank=2,
               value_head_hidden=16, value_head_heads=2, clip_range=0.2)
    cfg.update(overrides)
    # the shared defaults above hold fields one algorithm or estimator does not read (clip_range for nft): drop those
    cfg = {k: v for k, v in cfg.items() if k in overrides or k not in not_applicable(cfg)}
    sched = DDPMScheduler(num_train_timesteps=100, timestep_spacing="trailing", clip_sample=True)
    rewards = MultiReward([FunctionReward(brightness_matches_label, name="bright", differentiable=True)])
    return Trainer(PPOConfig(**cfg), TinyTask(), UNetAdapter(tiny_unet()), sched, rewards, accelerator=accelerator)


def train_pairs(tr, ro):
    """The (trajectory, step) pairs an update of ``ro`` trains on, drawn from the run's generator."""
    return draw_pairs(tr.generator, ro.batch_size, ro.num_steps, tr.config.timestep_fraction)


def pair_loss(tr, ro, part, train_policy=True):
    """The PPO loss (and statistics) on ``part`` of ``ro``'s pairs, as an update of the run computes it."""
    return loss_on_pairs(tr.context(ro.batch_size), ro, part, train_policy)


def perturb_lora(trainer, name="policy", scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainer.adapters.parameters(name):
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * scale)


def test_on_policy_ratio_is_one(tmp_path):
    tr = make_trainer(tmp_path)
    perturb_lora(tr)  # a non-trivial policy
    ro = tr.compute_advantages(tr.rollout(tr.prompt_iter.batch(2, 4)))
    drawn = train_pairs(tr, ro)
    _, stats = pair_loss(tr, ro, drawn)
    assert abs(stats["ratio_max"] - 1) < 1e-5 and abs(stats["ratio_min"] - 1) < 1e-5
    assert stats["clip_fraction"] == 0.0


def _grads_after_update(tmp_path, accumulation):
    tr = make_trainer(tmp_path / f"acc{accumulation}", gradient_accumulation_steps=accumulation, minibatch_size=32)
    perturb_lora(tr)
    perturb_lora(tr, "critic", seed=2)
    torch.manual_seed(0)
    ro = tr.compute_advantages(tr.rollout(tr.prompt_iter.batch(2, 4)))
    pairs = train_pairs(tr, ro)[:32]
    tr.optimizer.zero_grad()
    micro = 32 // accumulation
    for j in range(0, 32, micro):
        part = pairs[j:j + micro]
        loss, _ = pair_loss(tr, ro, part)
        (loss * (len(part) / len(pairs))).backward()
    return {n: p.grad.clone() for n, p in tr.adapter.model.named_parameters() if p.grad is not None}


def test_micro_batch_accumulation_equals_full_batch(tmp_path):
    full = _grads_after_update(tmp_path, 1)
    acc = _grads_after_update(tmp_path, 4)
    assert full.keys() == acc.keys() and len(full) > 0
    assert any(".policy." in k for k in full) and any(".critic." in k for k in full)
    for k in full:
        torch.testing.assert_close(acc[k], full[k], rtol=1e-4, atol=1e-7)


def test_update_changes_only_lora_and_head(tmp_path):
    tr = make_trainer(tmp_path)
    base = {n: p.detach().clone() for n, p in tr.adapter.model.named_parameters() if "lora_" not in n}
    policy = [p.detach().clone() for p in tr.adapters.parameters("policy")]
    head = [p.detach().clone() for p in tr.critic.head.parameters()]
    tr.pretrain_value()
    tr.train_epoch()
    for n, p in tr.adapter.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), f"frozen base weight {n} changed"
    assert any(not torch.equal(a, b) for a, b in zip(policy, tr.adapters.parameters("policy")))
    assert any(not torch.equal(a, b) for a, b in zip(head, tr.critic.head.parameters()))


def test_value_pretraining_does_not_touch_the_policy(tmp_path):
    tr = make_trainer(tmp_path, value_pretrain_epochs=2, value_pretrain_passes=2)
    policy = [p.detach().clone() for p in tr.adapters.parameters("policy")]
    logs = tr.pretrain_value()
    assert len(logs) == 2 and all("value_loss" in r and "pre_value_ev" in r for r in logs)
    assert all(torch.equal(a, b) for a, b in zip(policy, tr.adapters.parameters("policy")))
    assert tr.reward_queries == 16


@pytest.mark.parametrize("mode", ["grpo", "ddpo"])
def test_baseline_modes_have_no_critic_and_broadcast_advantages(tmp_path, mode):
    tr = make_trainer(tmp_path, advantage=mode, **({"stat_min_count": 1} if mode == "ddpo" else {}))
    assert tr.critic is None
    ro = tr.compute_advantages(tr.rollout(tr.prompt_iter.batch(2, 4)))
    assert ro.values is None and ro.advantages.shape == (8, 4)
    assert torch.equal(ro.advantages, ro.advantages[:, :1].expand(-1, 4))  # one number per trajectory
    metrics = tr.train_epoch().metrics
    assert "value_loss" not in metrics and "policy_loss" in metrics


def test_gae_mode_advantages_vary_across_steps(tmp_path):
    tr = make_trainer(tmp_path)
    perturb_lora(tr, "critic")
    ro = tr.compute_advantages(tr.rollout(tr.prompt_iter.batch(2, 4)))
    assert ro.values.shape == (8, 4, 1) and ro.returns.shape == (8, 4, 1)
    assert not torch.allclose(ro.advantages, ro.advantages[:, :1].expand(-1, 4))


def test_metrics_and_checkpoints_written(tmp_path):
    tr = make_trainer(tmp_path, num_epochs=2, keep_last=1)
    tr.train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["value_pretrain", "eval", "train", "train", "eval"]  # eval before + at the end
    assert all("eval/value_ev" in r and "eval/diversity/pairwise_l2" in r for r in rows if r["phase"] == "eval")
    assert all("reward/bright/mean" in r for r in rows if r["phase"] == "train")
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("epoch_*"))
    assert [c.name for c in ckpts] == ["epoch_000002"]  # keep_last=1
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") == ckpts[0]


def test_resume_equals_uninterrupted(tmp_path):
    straight = make_trainer(tmp_path / "a", num_epochs=3)
    hist_a = straight.train()

    first = make_trainer(tmp_path / "b", num_epochs=3)
    hist_b = first.train(num_epochs=1)
    ckpt = latest_checkpoint(tmp_path / "b" / "run" / "checkpoints")
    del first
    torch.manual_seed(12345)  # the resumed process starts from other global RNG state
    resumed = make_trainer(tmp_path / "b", num_epochs=3)
    resumed.load(ckpt)
    hist_b += resumed.train()

    drop = {"time_rollout_s", "time_update_s", "time_epoch_s"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in hist_a] == \
        [{k: v for k, v in r.items() if k not in drop} for r in hist_b]
    for (na, pa), (nb, pb) in zip(straight.adapter.model.named_parameters(), resumed.adapter.model.named_parameters()):
        assert na == nb and torch.equal(pa, pb), na
    for pa, pb in zip(straight.critic.head.parameters(), resumed.critic.head.parameters()):
        assert torch.equal(pa, pb)


def test_checkpoint_from_another_shape_is_refused(tmp_path):
    tr = make_trainer(tmp_path / "a")
    path = tr.save()
    other = make_trainer(tmp_path / "b", lora_rank=4)
    with pytest.raises(CheckpointError, match="another model or config"):
        other.load(path)


def test_corrupt_checkpoint_is_refused_clearly(tmp_path):
    tr = make_trainer(tmp_path)
    path = tr.save()
    data = (path / "tensors.safetensors").read_bytes()
    (path / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"tensors.safetensors is corrupt \(\d+ bytes instead of \d+: truncated"):
        tr.load(path)


def test_half_written_checkpoint_is_ignored(tmp_path):
    tr = make_trainer(tmp_path)
    good = tr.save()
    tmp = good.parent / ".tmp-epoch_000009-1"
    tmp.mkdir()
    (tmp / "state.json").write_text("{")
    assert latest_checkpoint(good.parent) == good


@pytest.mark.parametrize("field,value,match", [
    ("eta", 0.0, "eta"),
    ("batch_size", 10, "multiple of group_size"),
    ("advantage", "ppo", "advantage"),
    ("critic_mode", "twin", "critic_mode"),
    ("gae_lambda", 1.5, r"\[0, 1\]"),
    ("minibatch_size", 10, "gradient_accumulation_steps"),
    ("num_epochs", 0, ">= 1"),
    ("clip_range", float("nan"), "finite"),
])
def test_config_errors_name_the_field(field, value, match):
    kwargs = {field: value}
    if field == "minibatch_size":
        kwargs["gradient_accumulation_steps"] = 4
    with pytest.raises(ValueError, match=match) as info:
        PPOConfig(**kwargs)
    assert field in str(info.value)


def test_config_unknown_key_suggests_the_right_one():
    with pytest.raises(ValueError, match="did you mean 'gae_lambda'"):
        PPOConfig.from_dict({"gae_lamda": 0.9})


def test_reward_weights_must_match_rewards(tmp_path):
    with pytest.raises(ValueError, match="reward_weights"):
        make_trainer(tmp_path, reward_weights=(1.0, 2.0))


def test_kl_to_reference_is_zero_at_init_and_grows(tmp_path):
    tr = make_trainer(tmp_path, kl_coef=0.1)
    ro = tr.compute_advantages(tr.rollout(tr.prompt_iter.batch(2, 4)))
    pairs = train_pairs(tr, ro)
    _, stats = pair_loss(tr, ro, pairs)
    assert stats["kl_to_ref"] == pytest.approx(0.0, abs=1e-10)  # fresh LoRA (B = 0) == the reference
    perturb_lora(tr)
    _, stats = pair_loss(tr, ro, pairs)
    assert stats["kl_to_ref"] > 0


@pytest.mark.parametrize("mode", ["full", "shared"])
def test_other_critic_modes_train(tmp_path, mode):
    tr = make_trainer(tmp_path, critic_mode=mode)
    if mode == "full":
        assert tr.critic.backbone.model is not tr.adapter.model
    head = [p.detach().clone() for p in tr.critic.head.parameters()]
    tr.pretrain_value()
    metrics = tr.train_epoch().metrics
    assert "value_loss" in metrics and "policy_loss" in metrics
    assert any(not torch.equal(a, b) for a, b in zip(head, tr.critic.head.parameters()))


def test_bf16_autocast_trains_and_keeps_fp32_state(tmp_path):
    tr = make_trainer(tmp_path, mixed_precision="bf16")
    tr.pretrain_value()
    metrics = tr.train_epoch().metrics
    assert all(v == v for k, v in metrics.items() if isinstance(v, float) and not k.startswith("value_ev"))
    assert all(p.dtype == torch.float32 for p in tr.adapters.parameters("policy"))
    with pytest.raises(ValueError, match="fp16"):
        PPOConfig(mixed_precision="fp16")


def test_minibatch_statistics_combine_parts_by_pairs():
    """With accumulation (or several processes) a minibatch's statistics come from its parts: pair-weighted
    means, and the extremes for ratio_max / ratio_min."""
    from critic_align.update import combine_stats as _combine_stats

    parts = [(3, {"policy_loss": 1.0, "ratio_max": 1.2, "ratio_min": 0.9}),
             (1, {"policy_loss": 5.0, "ratio_max": 1.5, "ratio_min": 0.95})]
    out = _combine_stats(parts)
    assert out == {"policy_loss": (3 * 1.0 + 5.0) / 4, "ratio_max": 1.5, "ratio_min": 0.9}


def test_gae_trainer_builds_and_trains_on_a_bf16_base(tmp_path):
    """The critic's probe forward (which modules its features reach) runs under the run's autocast: a bf16 base
    (SD configs' torch_dtype: bfloat16) with mixed_precision bf16 builds a GAE trainer and trains an epoch."""
    sched = DDPMScheduler(num_train_timesteps=100, timestep_spacing="trailing", clip_sample=True)
    rewards = MultiReward([FunctionReward(brightness_matches_label, name="bright", differentiable=True)])
    cfg = PPOConfig(num_epochs=1, batch_size=8, group_size=4, num_inference_steps=3, minibatch_size=12,
                    value_pretrain_epochs=1, value_pretrain_passes=1, output_dir=str(tmp_path / "run"), progress=False,
                    log_tensorboard=False, grid_every=0, checkpoint_every=0, eval_every=0, lora_rank=2,
                    critic_lora_rank=2, value_head_hidden=16, value_head_heads=2, mixed_precision="bf16")
    tr = Trainer(cfg, TinyTask(), UNetAdapter(tiny_unet().to(torch.bfloat16)), sched, rewards)
    assert tr.critic is not None and any(p.dtype == torch.bfloat16 for p in tr.adapter.model.parameters())
    tr.pretrain_value()
    row = tr.train_epoch().metrics
    assert math.isfinite(row["value_loss"]) and math.isfinite(row["policy_loss"])
