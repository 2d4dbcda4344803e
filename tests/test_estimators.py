"""Advantage estimators as objects chosen by name, and the trainer's state as one state_dict."""

from __future__ import annotations

import math

import pytest
import torch
from test_trainer import make_trainer

from critic_align import registry
from critic_align.advantages import grpo_advantages
from critic_align.estimators import ScoredBatch, build_estimator, estimator_class


def test_each_mode_is_one_registered_file():
    for name, target in registry.ESTIMATORS.items():
        cls = estimator_class(name)
        assert target.startswith(f"critic_align.estimators.{name}:") and hasattr(cls, "compute")
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        estimator_class("ppo")


def test_grpo_estimator_by_hand():
    batch = ScoredBatch(torch.tensor([[1.0], [3.0], [10.0], [10.0]]), torch.ones(1), ("a", "a", "b", "b"), 3)
    from critic_align.config import PPOConfig

    adv, returns = build_estimator(PPOConfig(advantage="grpo", group_size=2, batch_size=4)).compute(batch, None)
    assert returns is None and adv.shape == (4, 3)
    expected = torch.tensor([-1 / (1 + 1e-4), 1 / (1 + 1e-4), 0.0, 0.0])
    torch.testing.assert_close(adv, expected[:, None].expand(-1, 3))
    torch.testing.assert_close(adv[:, 0], grpo_advantages(batch.rewards[:, 0], torch.tensor([0, 0, 1, 1])))


def test_a_new_estimator_needs_only_its_table_entry(tmp_path, monkeypatch):
    """An estimator registered by name trains without any other change: the constant-advantage estimator."""
    import sys
    import types

    module = types.ModuleType("my_estimator")

    class Constant:
        needs_values = False

        @classmethod
        def from_config(cls, cfg):
            return cls()

        def compute(self, batch, values):
            return torch.ones(batch.rewards.shape[0], batch.num_steps), None

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    module.Constant = Constant
    monkeypatch.setitem(sys.modules, "my_estimator", module)
    monkeypatch.setitem(registry.ESTIMATORS, "constant", "my_estimator:Constant")
    tr = make_trainer(tmp_path, advantage="constant")
    assert tr.critic is None
    ro = tr.compute_advantages(tr.rollout(tr.prompt_iter.batch(2, 4)))
    assert torch.equal(ro.advantages, torch.ones(8, 4)) and ro.returns is None
    assert math.isfinite(tr.train(1)[0]["policy_loss"])


@pytest.mark.parametrize("mode", ["gae", "ddpo"])
def test_trainer_state_dict_round_trip(tmp_path, mode):
    extra = {"stat_min_count": 1} if mode == "ddpo" else {}
    a = make_trainer(tmp_path / "a", advantage=mode, **extra)
    a.train(1)
    tensors, state = a.state_dict()
    b = make_trainer(tmp_path / "b", advantage=mode, **extra)
    b.load_state_dict(tensors, state)
    t2, s2 = b.state_dict()
    assert t2.keys() == tensors.keys() and all(torch.equal(t2[k], tensors[k]) for k in tensors)
    assert s2 == state and b.epoch == 1 and b.reward_queries == a.reward_queries
    if mode == "ddpo":
        assert state["stat_tracker"]["buffers"]  # DDPO's per-prompt buffers travel with the estimator


# gae_group_baseline ---------------------------------------------------------------------------------------------
def _gae_group(rewards, prompts, values, **cfg):
    from critic_align.config import PPOConfig

    b = len(prompts)
    conf = PPOConfig(**{"advantage": "gae", "group_size": 2, "batch_size": b, "gae_group_baseline": True, **cfg})
    batch = ScoredBatch(torch.tensor(rewards), torch.ones(len(rewards[0])), tuple(prompts), values.shape[1])
    return build_estimator(conf).compute(batch, values)


def test_gae_group_baseline_by_hand():
    """γ = λ = 1, T = 2: A_t = r − V(s_t); then minus the group's mean at each step; then whitened over the batch
    (normalize_then_sum with one reward).  Values by hand."""
    rewards = [[1.0], [3.0], [0.0], [2.0]]
    values = torch.tensor([[0.5, 1.0], [0.5, 2.0], [0.0, 0.0], [1.0, 1.0]])[..., None]  # (B, T, K)
    adv, ret = _gae_group(rewards, ["a", "a", "b", "b"], values, gamma=1.0, gae_lambda=1.0)
    raw = torch.tensor([[0.5, 0.0], [2.5, 1.0], [0.0, 0.0], [1.0, 1.0]])  # r − V(s_t)
    centred = torch.tensor([[-1.0, -0.5], [1.0, 0.5], [-0.5, -0.5], [0.5, 0.5]])  # minus the group mean per step
    torch.testing.assert_close(raw - torch.tensor([[1.5, 0.5], [1.5, 0.5], [0.5, 0.5], [0.5, 0.5]]), centred)
    expected = (centred - centred.mean()) / (centred.std(unbiased=False) + 1e-8)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret[..., 0], raw + values[..., 0])  # value targets: plain GAE returns


def test_gae_group_baseline_with_a_prompt_only_critic_is_grpo_centred():
    """A critic whose values depend only on the prompt (and the step) adds nothing to a sample's centred
    advantage: every step gets R − mean_g(R), GRPO's centred advantage (before the scaling)."""
    g = torch.Generator().manual_seed(0)
    prompts = [p for p in "abcd" for _ in range(3)]
    rewards = torch.rand(12, 1, generator=g)
    per_prompt = torch.rand(4, 5, generator=g)  # V(prompt, step)
    values = per_prompt.repeat_interleave(3, dim=0)[..., None]
    adv, _ = _gae_group(rewards.tolist(), prompts, values, gamma=1.0, gae_lambda=1.0, group_size=3,
                        advantage_scale="rewards")
    groups = torch.arange(4).repeat_interleave(3)
    centred = grpo_advantages(rewards[:, 0], groups, scale_by_std=False)
    torch.testing.assert_close(adv, (centred / rewards.std(unbiased=False))[:, None].expand(-1, 5), rtol=1e-5,
                               atol=1e-6)


def test_gae_group_baseline_skips_missing_rewards():
    """A NaN reward's sample neither gets an advantage for that head nor enters its group's mean."""
    rewards = [[1.0, 1.0], [3.0, float("nan")], [5.0, 2.0], [0.0, 4.0], [1.0, 0.0]]
    values = torch.zeros(5, 2, 2)
    from critic_align.advantages import gae, terminal_rewards
    from critic_align.estimators.gae import group_centred

    r = torch.tensor(rewards)
    adv_k, _ = gae(terminal_rewards(torch.nan_to_num(r), 2), values, 1.0, 1.0)
    out = group_centred(adv_k, ~torch.isnan(r), torch.tensor([0, 0, 0, 1, 1]))
    # head 0: group 0 = {1, 3, 5} (mean 3), group 1 = {0, 1} (mean 0.5); head 1: group 0 = {1, 2} (sample 1 missing)
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([-2.0, 0.0, 2.0, -0.5, 0.5]))
    torch.testing.assert_close(out[:, 1, 1], torch.tensor([-0.5, 0.0, 0.5, 2.0, -2.0]))


def test_gae_group_baseline_config_checks():
    from critic_align.config import PPOConfig

    with pytest.raises(ValueError, match="gae_group_baseline"):
        PPOConfig(advantage="grpo", gae_group_baseline=True)
    with pytest.raises(ValueError, match="gae_group_baseline"):
        PPOConfig(advantage="gae", group_size=1, batch_size=4, gae_group_baseline=True)
    with pytest.raises(ValueError, match="gae_group_baseline"):
        PPOConfig(gae_group_baseline="yes")
