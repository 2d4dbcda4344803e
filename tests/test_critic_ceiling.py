"""benchmarks/critic_ceiling.py's oracle runs: the oracle's queries and NFE are counted apart from the policy's (or in
its budget for the counted Monte-Carlo method), and the oracle's continuations run the policy being trained."""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import critic_ceiling as cc  # noqa: E402

ARGS = argparse.Namespace(gmm_epochs=2, gmm_kl=0.0, gmm_reward="box", K={"gmm": 3}, eval_per_class=2)


def _trainer(tmp_path, **over):
    return cc.gmm_trainer({"advantage": "grpo", "batch_size": 16, "group_size": 16, "sample_chunk_size": 16,
                           "num_inference_steps": 5, **over}, 0, 3e-3, tmp_path, ARGS)[0]


def test_oracle_gae_counts_apart(tmp_path):
    tr = _trainer(tmp_path / "a")
    ledger = {"oracle_queries": 0, "oracle_nfe": 0}
    cc.install_oracle_gae(tr, 3, 0.95, count=False, gen=torch.Generator().manual_seed(0), ledger=ledger)
    tr.train_epoch()
    assert tr.reward_queries == 16                      # the policy's own rollout only
    assert ledger["oracle_queries"] == 16 * 3 * 5       # K continuations at each of the 5 states
    assert ledger["oracle_nfe"] == 16 * 3 * (5 + 4 + 3 + 2 + 1)


def test_counted_mc_pays_for_its_oracle(tmp_path):
    tr = _trainer(tmp_path / "b")
    ledger = {"oracle_queries": 0, "oracle_nfe": 0}
    cc.install_oracle_gae(tr, 3, 0.0, count=True, gen=torch.Generator().manual_seed(0), ledger=ledger)
    tr.train_epoch()
    assert tr.reward_queries == 16 + 16 * 3 * 5


def test_awm_oracle_counts_apart_and_queries_to_reach(tmp_path):
    tr = _trainer(tmp_path / "c", algorithm="awm", awm_advantage="grpo")
    ledger = {"oracle_queries": 0, "oracle_nfe": 0}
    cc.install_awm_oracle(tr, 2, torch.Generator().manual_seed(0), ledger)
    tr.train_epoch()
    assert tr.reward_queries == 16 and ledger["oracle_queries"] == 16 * 5 * 2  # one row per (trajectory, step)
    curve = [{"policy_queries": q, "reward": r} for q, r in ((10, 0.1), (20, 0.5), (30, 0.9), (40, 0.9))]
    assert cc.queries_to_reach(curve, 0.75) == 40 and cc.queries_to_reach(curve, 0.5, smooth=1) == 20
