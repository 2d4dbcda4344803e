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
    a = make_trainer(tmp_path / "a", advantage=mode, stat_min_count=1)
    a.train(1)
    tensors, state = a.state_dict()
    b = make_trainer(tmp_path / "b", advantage=mode, stat_min_count=1)
    b.load_state_dict(tensors, state)
    t2, s2 = b.state_dict()
    assert t2.keys() == tensors.keys() and all(torch.equal(t2[k], tensors[k]) for k in tensors)
    assert s2 == state and b.epoch == 1 and b.reward_queries == a.reward_queries
    if mode == "ddpo":
        assert state["stat_tracker"]["buffers"]  # DDPO's per-prompt buffers travel with the estimator
