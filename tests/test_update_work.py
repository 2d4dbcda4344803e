"""The update's work-saving: micro-batches (fixed or sized from a memory budget) leave the gradient unchanged,
pairs with an advantage of exactly 0 are not forwarded (and the update is the same as without skipping), and
rewards scored in a background thread while the next chunk samples equal the sequential ones."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

import critic_align.algorithms.ppo as ppo
import critic_align.update as upd
from critic_align.config import PPOConfig
from critic_align.rewards import FunctionReward, MultiReward
from tests.test_trainer import make_trainer, perturb_lora


def _one_update_grads(tr, monkeypatch, ro):
    """The gradients of every optimiser step of one PPO update (the optimiser does not step)."""
    seen = []

    def record(opt, losses=()):
        seen.append({n: p.grad.clone() for n, p in tr.adapter.model.named_parameters() if p.grad is not None})
        opt.optimizer.zero_grad(set_to_none=True)
        return {}

    monkeypatch.setattr(upd, "optimizer_step", record)
    sizes = []
    inner = ppo.loss_on_pairs

    def spy(ctx, ro_, part, train_policy=True):
        sizes.append(len(part))
        return inner(ctx, ro_, part, train_policy)

    monkeypatch.setattr(ppo, "loss_on_pairs", spy)
    tr.generator.manual_seed(7)  # the same shuffled pairs in every configuration
    stats = ppo.ppo_update(tr.context(ro.batch_size), ro)
    return seen, sizes, stats


def _trainer_and_rollout(tmp_path, **kw):
    tr = make_trainer(tmp_path, minibatch_size=32, **kw)
    perturb_lora(tr)
    if tr.critic is not None:
        perturb_lora(tr, "critic", seed=2)
    torch.manual_seed(0)
    ro = tr.compute_advantages(tr.rollout(tr.prompt_iter.batch(2, 4)))
    return tr, ro


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_micro_batch_size_fixed_and_auto_leave_the_gradient_unchanged(tmp_path, monkeypatch, advantage):
    runs = {}
    for name, kw in {"full": dict(micro_batch_size=10**6), "fixed3": dict(micro_batch_size=3),
                     "auto": dict(micro_batch_size="auto", micro_batch_memory_mb=0.5)}.items():
        tr, ro = _trainer_and_rollout(tmp_path / name, advantage=advantage, **kw)
        runs[name] = _one_update_grads(tr, monkeypatch, ro) + (tr,)
        monkeypatch.undo()
    full, full_sizes, _, _ = runs["full"]
    assert full_sizes == [32] and len(full) == 1 and len(full[0]) > 0
    assert runs["fixed3"][1] == [3] * 10 + [2]
    # auto: a probe of PROBE_ROWS pairs, then pairs of the measured size; the size follows the budget
    tr_auto = runs["auto"][3]
    per_row = tr_auto.opt.batcher.bytes_per_row["ppo"]
    expect = max(1, int(0.5 * 2**20 // per_row))
    sizes = runs["auto"][1]
    assert sizes[0] == upd.MicroBatcher.PROBE_ROWS and sum(sizes) == 32
    assert all(s == expect for s in sizes[1:-1]) and 1 <= expect < 28
    for name in ("fixed3", "auto"):
        grads = runs[name][0]
        assert grads[0].keys() == full[0].keys()
        for k in full[0]:
            torch.testing.assert_close(grads[0][k], full[0][k], rtol=1e-4, atol=1e-4 * float(full[0][k].abs().max()))


def test_measured_bytes_grow_with_rows_and_respect_the_budget():
    batcher = upd.MicroBatcher("auto", memory_mb=1.0)
    w = torch.nn.Parameter(torch.randn(64, 64))
    for rows in (4, 8):
        with batcher.measure("k", rows):
            x = torch.randn(rows, 1024, 64)
            (torch.tanh(x @ w)).sum()  # saves x (for w's grad) and tanh's output: 2 * rows * 1024 * 64 * 4 bytes
        assert batcher.bytes_per_row["k"] == pytest.approx(2 * 1024 * 64 * 4)  # the parameter is not counted
    assert batcher.size("k") == 2**20 // (2 * 1024 * 64 * 4) == 2
    assert batcher.size("other") is None
    assert upd.MicroBatcher(5, 1.0).size("k") == 5
    # no budget given: per device (a CPU's is CPU_BUDGET_MB)
    assert upd.MicroBatcher("auto", None, "cpu").budget_bytes() == upd.MicroBatcher.CPU_BUDGET_MB * 2**20


@pytest.mark.parametrize("bad", [0, -1, "big", 2.5, True])
def test_micro_batch_size_is_checked(bad):
    with pytest.raises(ValueError, match="micro_batch_size"):
        PPOConfig(micro_batch_size=bad)
    with pytest.raises(ValueError, match="micro_batch_memory_mb"):
        PPOConfig(micro_batch_memory_mb=0)


def test_zero_advantage_pairs_are_skipped_and_the_update_is_unchanged(tmp_path, monkeypatch):
    tr, ro = _trainer_and_rollout(tmp_path / "skip", advantage="grpo", micro_batch_size=10**6)
    adv = ro.advantages.clone()
    adv[:4] = 0.0  # the first prompt's group: identical rewards
    adv[5, 1] = 0.0
    ro = replace(ro, advantages=adv)
    grads, sizes, stats = _one_update_grads(tr, monkeypatch, ro)
    monkeypatch.undo()
    assert sizes == [32 - 17] and stats["skipped_pair_fraction"] == pytest.approx(17 / 32)
    # the same update with skipping switched off
    monkeypatch.setattr(ppo, "can_skip_zero_advantage", lambda *a: False)
    ref, ref_sizes, ref_stats = _one_update_grads(tr, monkeypatch, ro)
    assert ref_sizes == [32] and ref_stats["skipped_pair_fraction"] == 0.0
    for k in ref[0]:
        torch.testing.assert_close(grads[0][k], ref[0][k], rtol=1e-4, atol=1e-4 * float(ref[0][k].abs().max()))


def test_a_fully_skipped_minibatch_still_steps_like_zero_gradients(tmp_path):
    """All advantages 0: nothing is forwarded, and AdamW still steps (weight decay) exactly as with zero grads."""
    tr, ro = _trainer_and_rollout(tmp_path / "zero", advantage="grpo", weight_decay=0.1)
    ro = replace(ro, advantages=torch.zeros_like(ro.advantages))
    before = [p.detach().clone() for p in tr.policy_params]
    stats = ppo.ppo_update(tr.context(ro.batch_size), ro)
    assert stats["skipped_pair_fraction"] == 1.0
    for p, b in zip(tr.policy_params, before):
        torch.testing.assert_close(p.detach(), b * (1 - tr.config.learning_rate * 0.1))


def test_with_a_critic_or_a_kl_nothing_is_skipped(tmp_path, monkeypatch):
    for name, kw in {"gae": dict(advantage="gae"), "kl": dict(advantage="grpo", kl_coef=0.1)}.items():
        tr, ro = _trainer_and_rollout(tmp_path / name, micro_batch_size=10**6, **kw)
        ro = replace(ro, advantages=torch.zeros_like(ro.advantages))
        _, sizes, stats = _one_update_grads(tr, monkeypatch, ro)
        monkeypatch.undo()
        assert sizes == [32] and stats["skipped_pair_fraction"] == 0.0


def _slow_reward_run(tmp_path, overlap):
    import threading

    calls, denoise = [], []

    def slow(samples, prompts):
        t0 = time.perf_counter()
        time.sleep(0.05)
        calls.append((t0, time.perf_counter(), threading.current_thread().name))
        return samples.mean(dim=(1, 2, 3)) * torch.tensor([float(p) for p in prompts])

    tr = make_trainer(tmp_path, advantage="grpo", sample_chunk_size=2, overlap_rewards=overlap)
    tr.rewards = MultiReward([FunctionReward(slow, name="slow")])
    inner = tr.adapter.predict

    def spy(*a, **k):
        denoise.append(time.perf_counter())
        return inner(*a, **k)

    tr.adapter.predict = spy
    ro = tr.rollout(tr.prompt_iter.batch(2, 4))
    return ro, calls, denoise


def test_overlapped_rewards_equal_sequential_and_run_while_sampling(tmp_path):
    seq, seq_calls, seq_den = _slow_reward_run(tmp_path / "seq", overlap=False)
    ovl, ovl_calls, ovl_den = _slow_reward_run(tmp_path / "ovl", overlap=True)
    assert len(seq_calls) == len(ovl_calls) == 4  # one call per chunk of 2
    assert torch.equal(seq.rewards, ovl.rewards) and torch.equal(seq.samples, ovl.samples)
    assert torch.equal(seq.latents, ovl.latents)

    def during(calls, den):  # denoiser calls made while a reward call was running
        return sum(any(a < d < b for a, b, _ in calls) for d in den)

    assert all(name.startswith("rewards") for *_, name in ovl_calls)
    assert during(seq_calls, seq_den) == 0 and during(ovl_calls, ovl_den) > 0


def test_an_error_in_a_background_reward_is_raised(tmp_path):
    def broken(samples, prompts):
        raise RuntimeError("reward server down")

    tr = make_trainer(tmp_path, advantage="grpo", sample_chunk_size=2, overlap_rewards=True)
    tr.rewards = MultiReward([FunctionReward(broken, name="broken")])
    with pytest.raises(RuntimeError, match="reward server down"):
        tr.rollout(tr.prompt_iter.batch(2, 4))


def test_a_group_of_equal_rewards_gets_exactly_zero_advantage():
    from critic_align.advantages import grpo_advantages

    r = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.3, 0.2, 0.4, 0.1, 0.3, 0.2, 0.4, 0.1, 0.3])
    g = torch.tensor([0] * 7 + [1] * 9)
    naive = (r[:7] - r[:7].sum() / 7)  # the float mean of seven 0.1s is not 0.1
    assert naive.abs().max() > 0
    adv = grpo_advantages(r, g)
    assert torch.equal(adv[:7], torch.zeros(7))
    x = r[7:]
    torch.testing.assert_close(adv[7:], (x - x.mean()) / (x.std(unbiased=False) + 1e-4))
