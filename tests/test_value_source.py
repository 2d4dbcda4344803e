"""``value_source: oracle``: GAE's values from K continuations of the policy's own sampler, inside a run."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from critic_align.config import PPOConfig
from critic_align.oracle import rollout_oracle_values
from critic_align.value_source import ValueSource
from tests.test_trainer import make_trainer

ORACLE = dict(advantage="gae", value_source="oracle", oracle_continuations=2, sample_chunk_size=4)


class _Rank:
    """One of ``n`` processes, for the value source alone: its shard of the batch; gather returns its own rows (the
    counts are then this rank's, which the test does not compare)."""

    def __init__(self, rank: int, n: int):
        self.rank, self.num_processes = rank, n

    def shard(self, total: int) -> slice:
        per = total // self.num_processes
        return slice(self.rank * per, (self.rank + 1) * per)

    def gather(self, t):
        return t


@pytest.fixture(scope="module")
def oracle_run(tmp_path_factory):
    tr = make_trainer(tmp_path_factory.mktemp("oracle"), **ORACLE)
    ro = tr.rollout(tr.prompt_iter.batch(2, 4))
    return tr, ro


def test_no_critic_is_built_and_the_values_are_the_oracles(oracle_run):
    tr, ro = oracle_run
    assert tr.critic is None and tr.values_from.kind == "oracle"
    state = tr.generator.get_state()
    before = tr.reward_queries
    out = tr.compute_advantages(ro)
    assert tr.reward_queries == before  # counted apart
    # the reference: the oracle called directly, one generator per chunk of 4 trajectories seeded as the source seeds it
    g = torch.Generator().set_state(state)
    seeds = torch.randint(0, 2**62, (math.ceil(ro.batch_size / 4),), generator=g).tolist()
    ts = tr.timesteps

    def reward_fn(final, prompts):
        return tr.rewards(tr.task.decode(final), prompts).float()

    ref = torch.cat([rollout_oracle_values(tr.policy_output, tr.step, ro.latents[i:i + 4], 0, ts,
                                           None if ro.cond is None else ro.cond[i:i + 4], reward_fn, 2,
                                           torch.Generator().manual_seed(seeds[i // 4]), list(ro.prompts[i:i + 4])).values
                     for i in range(0, ro.batch_size, 4)])
    torch.testing.assert_close(out.values, ref, rtol=0, atol=0)
    # K continuations per state, each scored once; the last state's future is one deterministic step: still K rows
    b, t = ro.batch_size, ro.num_steps
    assert tr.values_from.reward_queries == b * t * 2
    assert tr.values_from.metrics() == {"oracle_reward_queries": b * t * 2, "oracle_nfe": tr.values_from.nfe}
    assert tr.values_from.nfe == sum(b * 2 * (t - k) for k in range(t))


def test_counted_oracle_adds_its_queries_to_the_runs(tmp_path):
    tr = make_trainer(tmp_path, **ORACLE, oracle_counted=True)
    ro = tr.rollout(tr.prompt_iter.batch(2, 4))
    before = tr.reward_queries
    tr.compute_advantages(ro)
    assert tr.reward_queries - before == tr.values_from.reward_queries == ro.batch_size * ro.num_steps * 2


def test_values_do_not_depend_on_the_number_of_processes(oracle_run):
    """Two ranks' halves, each with its own shard, concatenate to one process's values (the same generator state)."""
    tr, ro = oracle_run
    state = tr.generator.get_state()
    one = ValueSource("oracle", _Rank(0, 1), 2, False, 4)
    whole, _ = one.values(tr.models, tr.task, tr.rewards, tr.timesteps, ro, torch.Generator().set_state(state))
    halves = []
    for rank in (0, 1):
        sl = slice(rank * ro.batch_size // 2, (rank + 1) * ro.batch_size // 2)
        part = ro.select(torch.arange(ro.batch_size)[sl])
        src = ValueSource("oracle", _Rank(rank, 2), 2, False, 4)
        v, _ = src.values(tr.models, tr.task, tr.rewards, tr.timesteps, part, torch.Generator().set_state(state))
        halves.append(v)
    torch.testing.assert_close(torch.cat(halves), whole, rtol=0, atol=0)


def test_an_oracle_epoch_logs_its_spending_and_resumes(tmp_path):
    tr = make_trainer(tmp_path, **ORACLE, num_epochs=1)
    row = tr.train_epoch().metrics
    assert row["oracle_reward_queries"] == tr.values_from.reward_queries > 0
    assert row["reward_queries"] == tr.config.batch_size
    tensors, state = tr.state_dict()
    other = make_trainer(tmp_path / "other", **ORACLE, num_epochs=1)
    other.load_state_dict(tensors, state)
    assert other.values_from.metrics() == tr.values_from.metrics()


@pytest.mark.parametrize("kw,match", [
    (dict(advantage="grpo", value_source="oracle"), r"value_source"),  # refused as a field grpo does not read
    (dict(advantage="gae", value_source="oracle", algorithm="awm", awm_advantage="critic"),
     r"value_source='oracle': the oracle feeds GAE's values: use algorithm: ppo"),
    (dict(advantage="gae", value_source="critics"), r"value_source='critics': use 'critic' or 'oracle'"),
    (dict(advantage="gae", value_source="oracle", oracle_continuations=0), r"oracle_continuations=0: must be an integer"),
    (dict(advantage="gae", oracle_counted="yes"), r"oracle_counted='yes': must be true or false"),
])
def test_bad_value_source_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig(**kw)


def test_a_source_kind_outside_the_table_is_refused():
    with pytest.raises(ValueError, match="value source 'x'"):
        ValueSource("x", SimpleNamespace())
