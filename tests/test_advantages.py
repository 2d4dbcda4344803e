"""Tests of critic_align.advantages: GAE, terminal rewards, GRPO, the DDPO per-prompt tracker, normalize."""

from __future__ import annotations

import math
import random

import pytest
import torch

from critic_align.advantages import (
    PerPromptStatTracker,
    gae,
    group_ids,
    grpo_advantages,
    normalize,
    terminal_rewards,
)

# ---------------------------------------------------------------------------------------------
# GAE


def _gae_reference(rewards, values, gamma, lam, last_value):
    """Slow pure-python GAE over nested lists: rewards/values [B][T] (scalars), last_value [B]."""
    adv = [[0.0] * len(rewards[0]) for _ in rewards]
    for b in range(len(rewards)):
        t_len = len(rewards[b])
        running = 0.0
        for k in reversed(range(t_len)):
            next_v = values[b][k + 1] if k + 1 < t_len else last_value[b]
            delta = rewards[b][k] + gamma * next_v - values[b][k]
            running = delta + gamma * lam * running
            adv[b][k] = running
    ret = [[adv[b][k] + values[b][k] for k in range(len(rewards[0]))] for b in range(len(rewards))]
    return adv, ret


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("with_last_value", [False, True])
def test_gae_matches_reference_loop(seed, with_last_value):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    b, t = rng.randint(1, 5), rng.randint(1, 9)
    k = rng.choice([None, 1, 3])  # None -> (B, T); else (B, T, K)
    gamma, lam = rng.uniform(0.5, 1.0), rng.uniform(0.0, 1.0)
    shape = (b, t) if k is None else (b, t, k)
    rewards = torch.randn(shape, generator=g, dtype=torch.float64)
    values = torch.randn(shape, generator=g, dtype=torch.float64)
    last = torch.randn(shape[:1] + shape[2:], generator=g, dtype=torch.float64) if with_last_value else None
    adv, ret = gae(rewards, values, gamma, lam, last_value=last)
    assert adv.shape == shape and ret.shape == shape
    for j in range(1 if k is None else k):
        sel = (lambda x: x) if k is None else (lambda x, j=j: x[..., j])  # noqa: E731
        lv = sel(last).tolist() if last is not None else [0.0] * b
        ref_adv, ref_ret = _gae_reference(sel(rewards).tolist(), sel(values).tolist(), gamma, lam, lv)
        torch.testing.assert_close(sel(adv), torch.tensor(ref_adv, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sel(ret), torch.tensor(ref_ret, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_gae_hand_computed_three_steps_terminal_reward():
    # R = 1 at the end, V = (0.2, 0.5, 0.8), γ = 0.9, λ = 0.5, terminal (last value 0)
    # δ_0 = 0 + 0.9·0.5 − 0.2 = 0.25;  δ_1 = 0 + 0.9·0.8 − 0.5 = 0.22;  δ_2 = 1 + 0 − 0.8 = 0.2
    # A_2 = 0.2;  A_1 = 0.22 + 0.45·0.2 = 0.31;  A_0 = 0.25 + 0.45·0.31 = 0.3895
    # returns = A + V = (0.5895, 0.81, 1.0)
    rewards = terminal_rewards(torch.tensor([1.0], dtype=torch.float64), 3)
    assert rewards.tolist() == [[0.0, 0.0, 1.0]]
    values = torch.tensor([[0.2, 0.5, 0.8]], dtype=torch.float64)
    adv, ret = gae(rewards, values, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.3895, 0.31, 0.2]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[0.5895, 0.81, 1.0]], dtype=torch.float64))
    # with a bootstrap value of 2 after the last step: δ_2 = 1 + 0.9·2 − 0.8 = 2.0, A_1 = 0.22 + 0.45·2 = 1.12,
    # A_0 = 0.25 + 0.45·1.12 = 0.754
    adv2, _ = gae(rewards, values, gamma=0.9, lam=0.5, last_value=torch.tensor([2.0], dtype=torch.float64))
    torch.testing.assert_close(adv2, torch.tensor([[0.754, 1.12, 2.0]], dtype=torch.float64))


def test_gae_lambda_one_gamma_one_is_monte_carlo():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(4, 2, generator=g, dtype=torch.float64)  # (B, K) final rewards
    values = torch.randn(4, 6, 2, generator=g, dtype=torch.float64)
    adv, ret = gae(terminal_rewards(r, 6), values, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, r[:, None, :] - values)  # A_k = R − V_k
    torch.testing.assert_close(ret, r[:, None, :].expand_as(values))


def test_gae_lambda_zero_is_one_step_td():
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(3, 5, generator=g, dtype=torch.float64)
    values = torch.randn(3, 5, generator=g, dtype=torch.float64)
    last = torch.randn(3, generator=g, dtype=torch.float64)
    gamma = 0.7
    adv, ret = gae(rewards, values, gamma=gamma, lam=0.0, last_value=last)
    next_v = torch.cat([values[:, 1:], last[:, None]], 1)
    torch.testing.assert_close(adv, rewards + gamma * next_v - values)
    torch.testing.assert_close(ret, rewards + gamma * next_v)


def test_gae_shape_mismatch_raises():
    with pytest.raises(ValueError):
        gae(torch.zeros(2, 3), torch.zeros(2, 4))


# ---------------------------------------------------------------------------------------------
# terminal_rewards


def test_terminal_rewards_only_last_step():
    r = torch.tensor([1.5, -2.0, 3.0])
    s = terminal_rewards(r, 4)
    assert s.shape == (3, 4)
    assert s.tolist() == [[0, 0, 0, 1.5], [0, 0, 0, -2.0], [0, 0, 0, 3.0]]
    rk = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    sk = terminal_rewards(rk, 3)
    assert sk.shape == (2, 3, 2)
    assert torch.equal(sk[:, -1], rk) and torch.all(sk[:, :-1] == 0)
    assert terminal_rewards(r, 1).tolist() == [[1.5], [-2.0], [3.0]]


# ---------------------------------------------------------------------------------------------
# GRPO


def test_group_ids_first_appearance():
    assert group_ids(["b", "a", "b", "c", "a"]).tolist() == [0, 1, 0, 2, 1]


def test_grpo_hand_computed_two_groups():
    # group 0 = {1, 2, 3}: mean 2, population std sqrt(2/3); group 1 = {4, 8}: mean 6, std 2 (interleaved)
    rewards = torch.tensor([1.0, 4.0, 2.0, 8.0, 3.0], dtype=torch.float64)
    groups = torch.tensor([0, 1, 0, 1, 0])
    eps = 1e-4
    s0 = math.sqrt(2 / 3)
    expected = [-1 / (s0 + eps), -2 / (2 + eps), 0.0, 2 / (2 + eps), 1 / (s0 + eps)]
    out = grpo_advantages(rewards, groups, eps=eps)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))
    # without std scaling: just centred
    torch.testing.assert_close(grpo_advantages(rewards, groups, scale_by_std=False),
                               torch.tensor([-1.0, -2.0, 0.0, 2.0, 1.0], dtype=torch.float64))


def test_grpo_singleton_group_and_constant_group_give_zero():
    rewards = torch.tensor([5.0, 1.0, 1.0, 7.0, 3.0])
    groups = torch.tensor([0, 1, 1, 2, 2])
    out = grpo_advantages(rewards, groups)
    assert out[0].item() == 0.0  # group of size 1
    assert out[1].item() == 0.0 and out[2].item() == 0.0  # constant group
    # group {7, 3}: mean 5, population std 2
    assert out[3].item() == pytest.approx(2 / (2 + 1e-4)) and out[4].item() == pytest.approx(-2 / (2 + 1e-4))


def test_grpo_columns_are_normalised_separately():
    g = torch.Generator().manual_seed(2)
    rewards = torch.randn(6, 3, generator=g, dtype=torch.float64)
    rewards[:, 2] *= 100  # very different scale in one column
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    out = grpo_advantages(rewards, groups)
    assert out.shape == (6, 3)
    for k in range(3):
        torch.testing.assert_close(out[:, k], grpo_advantages(rewards[:, k], groups))
        for grp in (slice(0, 3), slice(3, 6)):
            col = rewards[grp, k]
            torch.testing.assert_close(out[grp, k], (col - col.mean()) / (col.std(unbiased=False) + 1e-4))


# ---------------------------------------------------------------------------------------------
# PerPromptStatTracker


def test_stat_tracker_hand_computed():
    eps = 1e-6
    tr = PerPromptStatTracker(buffer_size=3, min_count=2)
    # batch 1: batch mean 3, batch std sqrt(8/3); "a" has 2 >= min_count rewards -> its own stats (2, 1);
    # "b" has 1 < min_count -> batch stats
    out1 = tr.update(["a", "a", "b"], torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64), eps=eps)
    bstd = math.sqrt(8 / 3)
    torch.testing.assert_close(out1, torch.tensor([-1 / (1 + eps), 1 / (1 + eps), 2 / (bstd + eps)],
                                                  dtype=torch.float64))
    # batch 2: "a" buffer (1, 3, 7): mean 11/3, std sqrt(((8/3)² + (2/3)² + (10/3)²)/3) = sqrt(56/9)/... ;
    # "b" buffer (5, 1): mean 3, std 2
    out2 = tr.update(["a", "b"], torch.tensor([7.0, 1.0], dtype=torch.float64), eps=eps)
    sa = math.sqrt(((8 / 3) ** 2 + (2 / 3) ** 2 + (10 / 3) ** 2) / 3)
    torch.testing.assert_close(out2, torch.tensor([(7 - 11 / 3) / (sa + eps), -2 / (2 + eps)], dtype=torch.float64))
    # batch 3: buffer_size 3 drops the oldest "a" reward: (3, 7, 9)
    out3 = tr.update(["a"], torch.tensor([9.0], dtype=torch.float64), eps=eps)
    assert list(tr.buffers["a"]) == [3.0, 7.0, 9.0]
    assert list(tr.buffers["b"]) == [5.0, 1.0]
    m = 19 / 3
    s = math.sqrt(((3 - m) ** 2 + (7 - m) ** 2 + (9 - m) ** 2) / 3)
    assert out3.item() == pytest.approx((9 - m) / (s + eps), rel=1e-12)


def test_stat_tracker_below_min_count_uses_batch_stats():
    tr = PerPromptStatTracker(buffer_size=16, min_count=16)
    r = torch.tensor([0.5, 1.5, -1.0, 2.0])
    out = tr.update(["x", "y", "x", "z"], r)
    expected = (r.double() - r.double().mean()) / (r.double().std(unbiased=False) + 1e-6)
    torch.testing.assert_close(out, expected.float())
    assert out.dtype == r.dtype


def test_stat_tracker_buffer_size_respected():
    tr = PerPromptStatTracker(buffer_size=4, min_count=1)
    for i in range(10):
        tr.update(["p", "p"], torch.tensor([float(2 * i), float(2 * i + 1)]))
    assert list(tr.buffers["p"]) == [16.0, 17.0, 18.0, 19.0]


def test_stat_tracker_state_dict_round_trip():
    g = torch.Generator().manual_seed(3)
    a = PerPromptStatTracker(buffer_size=5, min_count=3)
    prompts = ["u", "v", "u", "w", "v", "u"]
    for _ in range(2):
        a.update(prompts, torch.randn(6, generator=g))
    b = PerPromptStatTracker()  # other sizes: load_state_dict must restore them (and the deque maxlen)
    b.load_state_dict(a.state_dict())
    assert b.buffer_size == 5 and b.min_count == 3
    for _ in range(3):
        r = torch.randn(6, generator=g)
        assert torch.equal(a.update(prompts, r), b.update(prompts, r))
    assert {k: list(v) for k, v in a.buffers.items()} == {k: list(v) for k, v in b.buffers.items()}
    assert all(len(v) <= 5 for v in b.buffers.values())


def test_stat_tracker_bad_sizes():
    with pytest.raises(ValueError):
        PerPromptStatTracker(buffer_size=0)
    with pytest.raises(ValueError):
        PerPromptStatTracker(min_count=0)


# ---------------------------------------------------------------------------------------------
# normalize


def test_normalize_mean_zero_std_one():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64) * 3 + 10
    y = normalize(x)
    assert y.shape == x.shape
    assert y.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert y.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-7)
    torch.testing.assert_close(y, (x - x.mean()) / x.std(unbiased=False), rtol=1e-7, atol=1e-7)
    assert torch.all(normalize(torch.full((4,), 3.0)) == 0)  # constant input: zeros, not NaN
