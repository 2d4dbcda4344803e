"""Multi-reward training: weights and both aggregation modes against hand-computed advantages, NaN masking
per reward head, a head's value loss seeing only its own reward, per-head metrics, weights from YAML."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from test_trainer import pair_loss, train_pairs

from critic_align.advantages import combine_advantages, masked_grpo_advantages
from critic_align.backbones import UNetAdapter
from critic_align.config import PPOConfig
from critic_align.estimators import estimate
from critic_align.losses import value_loss, value_loss_per_head
from critic_align.rewards import FunctionReward, MultiReward
from critic_align.tasks.base import BaseTask
from critic_align.trainer import Trainer
from critic_align.value_fit import mc_returns

S101 = math.sqrt(101.0)


# ------------------------------------------------------------------------------------------------------
# combine_advantages: pure function, hand-computed
def test_normalize_then_sum_by_hand():
    a1 = torch.tensor([[0.0, 2.0], [2.0, 0.0]])  # mean 1, std 1 -> [[-1, 1], [1, -1]]
    a2 = torch.tensor([[10.0, 10.0], [20.0, 20.0]])  # mean 15, std 5 -> [[-1, -1], [1, 1]]
    adv = torch.stack([a1, a2], -1)
    w = torch.tensor([1.0, 2.0])
    mask = torch.ones(2, 2, dtype=torch.bool)
    out = combine_advantages(adv, w, mask, "normalize_then_sum")
    torch.testing.assert_close(out, torch.tensor([[-3.0, -1.0], [3.0, 1.0]]))
    # the scale of a reward does not matter after per-reward normalisation
    out_scaled = combine_advantages(torch.stack([a1, 1000 * a2], -1), w, mask, "normalize_then_sum")
    torch.testing.assert_close(out_scaled, out)


def test_sum_then_normalize_by_hand():
    a1 = torch.tensor([[0.0, 2.0], [2.0, 0.0]])
    a2 = torch.tensor([[10.0, 10.0], [20.0, 20.0]])
    adv = torch.stack([a1, a2], -1)
    w = torch.tensor([1.0, 2.0])
    mask = torch.ones(2, 2, dtype=torch.bool)
    # A1 + 2·A2 = [[20, 22], [42, 40]]: mean 31, deviations [[-11, -9], [11, 9]], variance 101
    out = combine_advantages(adv, w, mask, "sum_then_normalize")
    torch.testing.assert_close(out, torch.tensor([[-11.0, -9.0], [11.0, 9.0]]) / S101)
    raw = combine_advantages(adv, w, mask, "sum_then_normalize", normalize_sum=False)
    torch.testing.assert_close(raw, torch.tensor([[20.0, 22.0], [42.0, 40.0]]))


def test_nan_reward_contributes_nothing_and_weights_are_not_rescaled():
    a1 = torch.tensor([[0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])  # mean 1, std 1 over all three samples
    a2 = torch.tensor([[10.0, 10.0], [20.0, 20.0], [999.0, -999.0]])  # sample 2's reward 2 is NaN
    mask = torch.tensor([[True, True], [True, True], [True, False]])
    w = torch.tensor([1.0, 2.0])
    out = combine_advantages(torch.stack([a1, a2], -1), w, mask, "normalize_then_sum")
    # reward 2 is whitened over samples 0 and 1 only -> [[-1, -1], [1, 1]]; sample 2 gets 1·Â1 only (no rescale to 3·Â1)
    torch.testing.assert_close(out, torch.tensor([[-3.0, -1.0], [3.0, 1.0], [-1.0, 1.0]]))
    raw = combine_advantages(torch.stack([a1, a2], -1), w, mask, "sum_then_normalize", normalize_sum=False)
    torch.testing.assert_close(raw, torch.tensor([[20.0, 22.0], [42.0, 40.0], [0.0, 2.0]]))
    # whatever sits in the masked entry has no influence
    a2b = a2.clone()
    a2b[2] = torch.tensor([float("nan"), 1e9])
    for mode in ("normalize_then_sum", "sum_then_normalize"):
        torch.testing.assert_close(combine_advantages(torch.stack([a1, a2b], -1), w, mask, mode),
                                   combine_advantages(torch.stack([a1, a2], -1), w, mask, mode))


def test_combine_advantages_rejects_bad_input():
    adv = torch.zeros(2, 3, 2)
    with pytest.raises(ValueError, match="aggregation 'mean'"):
        combine_advantages(adv, torch.ones(2), torch.ones(2, 2, dtype=torch.bool), "mean")
    with pytest.raises(ValueError, match="expected adv"):
        combine_advantages(adv, torch.ones(3), torch.ones(2, 2, dtype=torch.bool))


def test_masked_grpo_by_hand():
    rewards = torch.tensor([[1.0, 2.0], [3.0, math.nan], [5.0, 4.0], [5.0, 8.0]])
    groups = torch.tensor([0, 0, 1, 1])
    out = masked_grpo_advantages(rewards, groups)
    eps = 1e-4
    expected = torch.tensor([[-1 / (1 + eps), 0.0],  # group 0, reward 2: only sample 0 available -> 0
                             [1 / (1 + eps), 0.0],   # NaN -> 0
                             [0.0, -2 / (2 + eps)],  # group 1, reward 1 constant -> 0
                             [0.0, 2 / (2 + eps)]])
    torch.testing.assert_close(out, expected)


# ------------------------------------------------------------------------------------------------------
# value loss per head
def test_value_loss_is_mean_of_per_head_masked_means():
    v = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    r = torch.tensor([[0.0, 1.0], [0.0, math.nan], [0.0, 3.0]])
    mask = ~torch.isnan(r)
    per = value_loss_per_head(v, v, r, mask=mask)
    # head 0: 0.5·(1 + 4 + 9)/3 = 7/3; head 1 over its 2 kept entries: 0.5·(1 + 9)/2 = 2.5
    torch.testing.assert_close(per, torch.tensor([7 / 3, 2.5]))
    assert value_loss(v, v, r, mask=mask).item() == pytest.approx((7 / 3 + 2.5) / 2)
    with pytest.raises(ValueError, match="mask shape"):
        value_loss(v, v, r, mask=mask[:, 0])


# ------------------------------------------------------------------------------------------------------
# the trainer, on a tiny class-conditional UNet
class TinyTask(BaseTask):
    prompts = ("0", "1", "2", "3")
    latent_shape = (1, 8, 8)

    def encode(self, prompts):
        return torch.tensor([int(p) for p in prompts])

    def null_cond(self, n):
        return torch.full((n,), 10, dtype=torch.long)

    def decode(self, latents):
        return latents.clamp(-1, 1)


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, num_class_embeds=11, attention_head_dim=8)


def mean_pixel(samples, prompts):
    return samples.mean(dim=(1, 2, 3))


def odd_prompts_only(samples, prompts):
    """Applies only to odd digits: NaN ('not applicable') elsewhere."""
    value = samples.std(dim=(1, 2, 3))
    odd = torch.tensor([int(p) % 2 == 1 for p in prompts])
    return torch.where(odd, value, torch.full_like(value, math.nan))


def make_trainer(tmp_path, **overrides):
    cfg = dict(num_epochs=1, batch_size=8, group_size=4, num_inference_steps=2, minibatch_size=16,
               value_pretrain_epochs=1, value_pretrain_passes=1, output_dir=str(tmp_path / "run"), progress=False,
               log_tensorboard=False, grid_every=0, checkpoint_every=0, lora_rank=2, critic_lora_rank=2,
               value_head_hidden=16, value_head_heads=2, reward_weights=(1.0, 2.0))
    cfg.update(overrides)
    sched = DDPMScheduler(num_train_timesteps=100, timestep_spacing="trailing", clip_sample=True)
    rewards = MultiReward([FunctionReward(mean_pixel, name="mean", differentiable=True),
                           FunctionReward(odd_prompts_only, name="odd_std", allows_nan=True)])
    return Trainer(PPOConfig(**cfg), TinyTask(), UNetAdapter(tiny_unet()), sched, rewards)


def _hand_advantages(tr, rewards, values):
    """The trainer's estimate stage on a rollout with these rewards (B, K) and these critic values (B, T, K)."""
    ro = replace(tr.rollout([str(i % 4) for i in range(rewards.shape[0])]), rewards=rewards)
    return estimate(tr.estimator, ro, values, tr.reward_weights, tr.processes, tr.config.adv_clip_max)


@pytest.mark.parametrize("mode", ["normalize_then_sum", "sum_then_normalize"])
def test_trainer_gae_per_head_with_weights_by_hand(tmp_path, mode):
    """γ = λ = 1: A_k(step j) = R_k − V_k(s_j), returns = R_k; then the configured weights and mode."""
    tr = make_trainer(tmp_path, gamma=1.0, gae_lambda=1.0, advantage_aggregation=mode)
    assert tr.reward_weights.tolist() == [1.0, 2.0]
    rewards = torch.tensor([[2.0, 10.0], [0.0, 20.0]])
    values = torch.zeros(2, 2, 2)
    values[..., 0] = torch.tensor([[1.0, 3.0], [-1.0, 1.0]])  # A1 = [[1, -1], [1, -1]]: already whitened
    ro = _hand_advantages(tr, rewards, values)  # head 2: V = 0, A2 = [[10, 10], [20, 20]]
    if mode == "normalize_then_sum":
        expected = torch.tensor([[1.0, -1.0], [1.0, -1.0]]) + 2 * torch.tensor([[-1.0, -1.0], [1.0, 1.0]])
    else:  # A1 + 2·A2 = [[21, 19], [41, 39]]: mean 30, variance 101
        expected = torch.tensor([[-9.0, -11.0], [11.0, 9.0]]) / S101
    torch.testing.assert_close(ro.advantages, expected)
    torch.testing.assert_close(ro.returns, rewards[:, None, :].expand(-1, 2, -1))


def test_trainer_gae_nan_reward_masks_its_head(tmp_path):
    tr = make_trainer(tmp_path, gamma=1.0, gae_lambda=1.0)
    rewards = torch.tensor([[2.0, 10.0], [0.0, 20.0], [1.0, math.nan]])
    values = torch.zeros(3, 2, 2)
    values[..., 0] = torch.tensor([[1.0, 3.0], [-1.0, 1.0], [2.0, 0.0]])  # A1 rows [1, -1]: mean 0, std 1
    ro = _hand_advantages(tr, rewards, values)
    # reward 2 whitened over samples 0, 1 -> [[-1, -1], [1, 1]]; sample 2 keeps only w1·Â1, not rescaled
    expected = torch.tensor([[-1.0, -3.0], [3.0, 1.0], [-1.0, 1.0]])
    torch.testing.assert_close(ro.advantages, expected)


def test_trainer_grpo_normalize_then_sum_masks_nan(tmp_path):
    tr = make_trainer(tmp_path, advantage="grpo", group_size=2, batch_size=4)
    rewards = torch.tensor([[1.0, 2.0], [3.0, math.nan], [5.0, 4.0], [5.0, 8.0]])
    ro = replace(tr.rollout(["0", "0", "1", "1"]), rewards=rewards)
    ro = tr.compute_advantages(ro)
    per_k = masked_grpo_advantages(rewards, torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(ro.advantages, (per_k[:, 0] + 2 * per_k[:, 1])[:, None].expand(-1, 2))


def test_ddpo_needs_sum_then_normalize_for_several_rewards(tmp_path):
    with pytest.raises(ValueError, match="advantage_aggregation: sum_then_normalize"):
        make_trainer(tmp_path, advantage="ddpo")
    make_trainer(tmp_path, advantage="ddpo", advantage_aggregation="sum_then_normalize")


def _head_grads(tr, ro, pairs, k):
    tr.optimizer.zero_grad(set_to_none=True)
    loss, stats = pair_loss(tr, ro, pairs, train_policy=False)
    loss.backward()
    head = tr.critic.head
    grads = [p.grad.clone() for p in head.heads[k].parameters()] + [head.queries.grad[k].clone()]
    return grads, stats


def test_value_loss_of_a_head_only_sees_its_own_reward(tmp_path):
    tr = make_trainer(tmp_path)
    with torch.no_grad():  # a non-trivial critic head
        for p in tr.critic.head.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    ro = tr.compute_advantages(tr.rollout([str(i % 4) for i in range(8)]))
    assert torch.isnan(ro.rewards[:, 1]).sum() == 4  # even prompts: reward 2 not applicable
    pairs = train_pairs(tr, ro)
    g0, s0 = _head_grads(tr, ro, pairs, 0)
    g1, s1 = _head_grads(tr, ro, pairs, 1)
    # perturb reward 2's targets, and mask two more of its samples
    ro2 = replace(ro, rewards=ro.rewards.clone(), returns=ro.returns.clone())
    ro2.returns[..., 1] += 5.0
    ro2.rewards[1, 1] = ro2.rewards[3, 1] = math.nan
    g0b, s0b = _head_grads(tr, ro2, pairs, 0)
    g1b, s1b = _head_grads(tr, ro2, pairs, 1)
    assert s0b["value_loss/mean"] == pytest.approx(s0["value_loss/mean"], rel=1e-6)
    for a, b in zip(g0, g0b):
        assert torch.count_nonzero(a) > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert s1b["value_loss/odd_std"] != pytest.approx(s1["value_loss/odd_std"])
    assert any(not torch.allclose(a, b) for a, b in zip(g1, g1b))


def test_per_head_explained_variance_ignores_nan_rewards(tmp_path):
    tr = make_trainer(tmp_path)
    ro = tr.rollout([str(i % 4) for i in range(8)])
    target = mc_returns(ro, tr.config.gamma)
    values = target.clone()
    values[..., 0] += 0.1 * torch.randn(values[..., 0].shape, generator=torch.Generator().manual_seed(0))
    values[torch.isnan(ro.rewards[:, 1]), :, 1] = 1e6  # garbage where reward 2 is not applicable
    rep = tr.value_report(ro, values)
    assert rep["value_ev/odd_std"] == pytest.approx(1.0)  # perfect on the samples where reward 2 exists
    assert rep["value_ev/mean"] < 1.0 and math.isfinite(rep["value_ev/mean"])
    assert rep["value_ev"] == pytest.approx((rep["value_ev/mean"] + rep["value_ev/odd_std"]) / 2)


def test_epoch_logs_per_reward_metrics(tmp_path):
    tr = make_trainer(tmp_path)
    pre = tr.pretrain_value()
    assert {"pre_value_ev/mean", "pre_value_ev/odd_std", "value_loss/mean", "value_loss/odd_std"} <= set(pre[0])
    m = tr.train_epoch().metrics
    for key in ("reward/mean/mean", "reward/mean/std", "reward/odd_std/mean", "reward/odd_std/std",
                "value_ev/mean", "value_ev/odd_std", "value_loss/mean", "value_loss/odd_std"):
        assert key in m and math.isfinite(m[key]), key


# ------------------------------------------------------------------------------------------------------
# configured reward lists with weights
def test_yaml_reward_list_with_weights_reaches_the_trainer():
    from critic_align.train.registry import build_rewards, load_run_config

    run = load_run_config("digits_hack_joint")
    rewards = build_rewards(run["rewards"])
    assert rewards.names == ("boldness", "digit_prob") and rewards.weights.tolist() == [1.0, 2.0]
    assert run["ppo"].advantage == "gae" and run["ppo"].advantage_aggregation == "normalize_then_sum"
    single = load_run_config("digits_hack_single")
    # the demonstration compares equal budgets
    for field in ("num_epochs", "batch_size", "group_size", "value_pretrain_epochs", "num_inference_steps"):
        assert getattr(single["ppo"], field) == getattr(run["ppo"], field), field


def test_plot_metrics_draws_one_panel_per_logged_key(tmp_path):
    import json

    from PIL import Image

    from critic_align.viz import plot_metrics

    rows = [{"phase": "value_pretrain", "reward_queries": 8, "pre_value_ev/a": 0.1}]
    rows += [{"reward_queries": 8 * i, "reward/a/mean": 0.1 * i, "reward/a/std": 0.05, "value_ev/a": 0.2 * i}
             for i in range(2, 5)]
    log = tmp_path / "metrics.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in rows))
    path = plot_metrics(log, tmp_path / "curves.png", ["reward/a/mean", "value_ev/a", "reward/missing/mean"])
    assert Image.open(path).size == (800, 320)  # 2 panels (the missing key is skipped) of 4 x 3.2 in at 100 dpi
