"""``policy: full``: the policy trains every backbone weight (no policy LoRA), on one process; the FSDP form is in
tests/test_fsdp.py.

Design checks: no frozen copy of the base is kept, so a KL reference (kl_coef > 0) and a critic that reads the
policy's base (critic_mode 'lora' / 'shared') are refused with the field and the fix; a 'full' critic (its own
copy of the base) or an estimator without a critic trains.
"""

from __future__ import annotations

import pytest
import torch
from test_trainer import make_trainer

from critic_align.config import PPOConfig
from critic_align.tasks.sd import save_policy_lora

SMALL = dict(num_epochs=1, batch_size=8, group_size=4, sample_chunk_size=4, minibatch_size=16)


@pytest.mark.parametrize("fields,match", [
    (dict(policy="qlora"), r"config field policy='qlora': use 'lora' .* or 'full'"),
    (dict(policy="full", kl_coef=0.1, advantage="grpo"),
     r"config field kl_coef=0.1: policy: full trains the base weights, and the KL reference is the frozen base, of "
     r"which no copy is kept: set kl_coef: 0"),
    (dict(policy="full"), r"config field critic_mode='lora': policy: full trains the base weights that a 'lora' critic "
                          r"reads .* use critic_mode: full .* or an advantage without a critic \(grpo, ddpo\) instead of gae"),
    (dict(policy="full", critic_mode="shared"), r"critic_mode='shared': policy: full trains the base weights"),
])
def test_policy_full_refusals(fields, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig(**fields)


@pytest.mark.parametrize("fields", [dict(policy="full", advantage="grpo"), dict(policy="full", critic_mode="full"),
                                    dict(policy="full", advantage="ddpo"), dict(policy="lora", kl_coef=0.1)])
def test_policy_full_accepted_forms(fields):
    assert PPOConfig(**fields).policy == fields["policy"]


def _base_weights(tr) -> dict:
    return {k: v.detach().clone() for k, v in tr.adapter.model.state_dict().items()}


def test_full_policy_trains_every_backbone_weight_and_round_trips(tmp_path):
    tr = make_trainer(tmp_path / "a", policy="full", critic_mode="full", **SMALL)
    assert tr.adapters.names == []  # no policy LoRA, and the 'full' critic has its own copy instead of one
    params = list(tr.adapter.model.parameters())
    assert all(p.requires_grad for p in params) and {id(p) for p in tr.policy_params} == {id(p) for p in params}
    assert tr.optimizer.param_groups[0]["params"] == tr.policy_params
    # the critic's own copy does not share a tensor with the policy
    assert not {id(p) for p in tr.critic.backbone.parameters()} & {id(p) for p in params}
    before = _base_weights(tr)
    critic_before = {k: v.clone() for k, v in tr.critic.state_tensors().items()}
    tr.train()
    after = _base_weights(tr)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(moved) > len(before) // 2, "a full policy update moves (nearly) every base weight"
    assert any(not torch.equal(critic_before[k], v) for k, v in tr.critic.state_tensors().items())

    # the checkpoint holds the backbone's state dict as policy.*; a fresh trainer loads it exactly
    from critic_align.checkpoint import latest_checkpoint, read_checkpoint

    ckpt = latest_checkpoint(tmp_path / "a" / "run" / "checkpoints")
    tensors, state = read_checkpoint(ckpt)
    assert {k[7:] for k in tensors if k.startswith("policy.")} == set(after)
    assert set(state["fingerprint"]["policy"]) == set(after)
    fresh = make_trainer(tmp_path / "b", policy="full", critic_mode="full", **SMALL)
    fresh.load(ckpt)
    assert all(torch.equal(v, after[k]) for k, v in _base_weights(fresh).items())
    assert fresh.epoch == 1

    # no frozen base is kept: no reference output, no 'before' samples once training moved the weights
    with pytest.raises(ValueError, match="policy: full has no LoRA adapter to export"):
        save_policy_lora(tr.task, tr.models, tr.config, tmp_path / "lora")
    from critic_align.train.cli import main

    with pytest.raises(SystemExit, match="is a policy: full run: its policy.* tensors are the backbone's full weights"):
        main(["export-lora", "--run", str(ckpt), "--out", str(tmp_path / "lora"), "--task", "sd15"])
    assert not (tmp_path / "lora").exists()
    with pytest.raises(ValueError, match="keeps no frozen copy of the base: the base model cannot be sampled"):
        tr.sample(["1"], use_policy=False)
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match="there is no reference output"):
        tr.models.reference_output(x, tr.timesteps[:1], torch.tensor([1]))


def test_full_policy_before_training_samples_the_base(tmp_path):
    """At epoch 0 the 'before' grid (use_policy=False) is the untrained policy, which is the base."""
    tr = make_trainer(tmp_path, policy="full", advantage="grpo", **SMALL)
    a = tr.sample(["1", "2"], use_policy=False)
    b = tr.sample(["1", "2"], use_policy=True)
    assert torch.equal(a, b)


def test_lora_policy_is_unchanged_by_the_field(tmp_path):
    """The default, policy: lora: the base stays frozen and only the adapter trains."""
    tr = make_trainer(tmp_path, **SMALL)
    base = {n: p for n, p in tr.adapter.model.named_parameters() if "lora_" not in n}
    assert not any(p.requires_grad for p in base.values())
    assert all("lora_" in n for n, p in tr.adapter.model.named_parameters() if any(p is q for q in tr.policy_params))
