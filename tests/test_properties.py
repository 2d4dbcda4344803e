"""Property-based tests (hypothesis) for GAE and the PPO clipped surrogate, against slow reference loops and
closed forms.  (Resampling / ESS properties live with the steering tests.)"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from critic_align.advantages import gae, terminal_rewards
from critic_align.losses import ppo_policy_loss

SETTINGS = settings(max_examples=60, deadline=None)
finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def episodes(draw):
    b = draw(st.integers(1, 3))
    t = draw(st.integers(1, 8))
    k = draw(st.integers(1, 2))
    rewards = torch.tensor(draw(st.lists(finite, min_size=b * t * k, max_size=b * t * k)),
                           dtype=torch.float64).view(b, t, k)
    values = torch.tensor(draw(st.lists(finite, min_size=b * t * k, max_size=b * t * k)),
                          dtype=torch.float64).view(b, t, k)
    last = torch.tensor(draw(st.lists(finite, min_size=b * k, max_size=b * k)), dtype=torch.float64).view(b, k)
    return rewards, values, last


unit = st.floats(0, 1, allow_nan=False, width=64)


def gae_reference(r, v, last, gamma, lam):
    """A_k = Σ_l (γλ)^l δ_{k+l}, δ_k = r_k + γ V_{k+1} − V_k, written as plain nested loops over python floats."""
    b, t, k = r.shape
    adv = torch.zeros_like(r)
    for i in range(b):
        for j in range(k):
            vals = [float(v[i, s, j]) for s in range(t)] + [float(last[i, j])]
            deltas = [float(r[i, s, j]) + gamma * vals[s + 1] - vals[s] for s in range(t)]
            for s in range(t):
                adv[i, s, j] = sum((gamma * lam) ** n * deltas[s + n] for n in range(t - s))
    return adv


@SETTINGS
@given(episodes(), unit, unit)
def test_gae_equals_the_reference_loop(ep, gamma, lam):
    r, v, last = ep
    adv, ret = gae(r, v, gamma, lam, last_value=last)
    ref = gae_reference(r, v, last, gamma, lam)
    torch.testing.assert_close(adv, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ret, ref + v, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(episodes())
def test_gae_lambda1_gamma1_is_monte_carlo_return_minus_value(ep):
    r, v, _ = ep
    adv, ret = gae(r, v, 1.0, 1.0)  # terminal after the last step (last value 0)
    mc = r.flip(1).cumsum(1).flip(1)  # Σ_{s ≥ k} r_s
    torch.testing.assert_close(ret, mc, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(adv, mc - v, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(episodes(), unit)
def test_gae_lambda0_is_the_td_error(ep, gamma):
    r, v, last = ep
    adv, _ = gae(r, v, gamma, 0.0, last_value=last)
    next_v = torch.cat([v[:, 1:], last[:, None]], 1)
    torch.testing.assert_close(adv, r + gamma * next_v - v, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 10), unit, st.lists(finite, min_size=1, max_size=4))
def test_terminal_reward_with_zero_values_gives_discounted_reward(b, t, gamma, final):
    """Reward only at the end and V = 0: A_k = γ^(T-1-k) R for every λ = 1 (and R_k likewise)."""
    R = torch.tensor((final * b)[:b] + [0.0] * max(0, b - len(final)), dtype=torch.float64)
    r = terminal_rewards(R, t)
    adv, ret = gae(r, torch.zeros_like(r), gamma, 1.0)
    expect = R[:, None] * gamma ** torch.arange(t - 1, -1, -1, dtype=torch.float64)
    torch.testing.assert_close(adv, expect, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# PPO clipped surrogate

@st.composite
def ppo_batches(draw):
    n = draw(st.integers(1, 16))
    small = st.floats(-0.5, 0.5, allow_nan=False, width=64)
    old = torch.tensor(draw(st.lists(finite, min_size=n, max_size=n)), dtype=torch.float64)
    shift = torch.tensor(draw(st.lists(small, min_size=n, max_size=n)), dtype=torch.float64)
    adv = torch.tensor(draw(st.lists(finite, min_size=n, max_size=n)), dtype=torch.float64)
    eps = draw(st.floats(1e-4, 0.5, allow_nan=False))
    return old + shift, old, adv, eps


@SETTINGS
@given(ppo_batches())
def test_on_policy_loss_is_minus_mean_advantage(batch):
    _, old, adv, eps = batch
    loss, stats = ppo_policy_loss(old.clone(), old, adv, eps)
    assert math.isclose(loss.item(), -adv.mean().item(), rel_tol=1e-12, abs_tol=1e-12)
    assert stats.clip_fraction == 0.0 and stats.ratio_max == stats.ratio_min == 1.0
    assert stats.approx_kl == 0.0


@SETTINGS
@given(ppo_batches())
def test_loss_matches_the_per_sample_closed_form(batch):
    """A ≥ 0: term = −A·min(ρ, 1+ε);  A < 0: term = −A·max(ρ, 1−ε)  (the pessimistic bound, case by case)."""
    new, old, adv, eps = batch
    loss, stats = ppo_policy_loss(new, old, adv, eps)
    terms = []
    for lp_new, lp_old, a in zip(new.tolist(), old.tolist(), adv.tolist()):
        rho = math.exp(lp_new - lp_old)
        terms.append(-a * min(rho, 1 + eps) if a >= 0 else -a * max(rho, 1 - eps))
    assert math.isclose(loss.item(), sum(terms) / len(terms), rel_tol=1e-9, abs_tol=1e-9)
    ratio = torch.exp(new - old)
    assert math.isclose(stats.clip_fraction, ((ratio - 1).abs() > eps).double().mean().item(), rel_tol=1e-6)


@SETTINGS
@given(ppo_batches())
def test_clipping_bounds_the_objective_and_zeroes_the_gradient_past_the_clip(batch):
    new, old, adv, eps = batch
    new = new.clone().requires_grad_(True)
    loss, _ = ppo_policy_loss(new, old, adv, eps)
    loss.backward()
    rho = torch.exp(new.detach() - old)
    # the surrogate objective never exceeds the clipped one: −loss ≤ mean(A · clip(ρ, 1−ε, 1+ε))
    assert -loss.item() <= (adv * rho.clamp(1 - eps, 1 + eps)).mean().item() + 1e-9
    # past the clip in the direction the advantage favours, a sample's gradient is exactly zero;
    # elsewhere it is the unclipped −A·ρ/N
    past = ((adv > 0) & (rho > 1 + eps)) | ((adv < 0) & (rho < 1 - eps))
    expect = torch.where(past, torch.zeros_like(rho), -adv * rho / len(rho))
    torch.testing.assert_close(new.grad, expect, rtol=1e-9, atol=1e-12)


@SETTINGS
@given(ppo_batches(), st.floats(0.01, 100, allow_nan=False), st.randoms(use_true_random=False))
def test_loss_is_permutation_invariant_and_positively_homogeneous_in_the_advantage(batch, c, rnd):
    new, old, adv, eps = batch
    loss, _ = ppo_policy_loss(new, old, adv, eps)
    perm = list(range(len(adv)))
    rnd.shuffle(perm)
    perm = torch.tensor(perm)
    shuffled, _ = ppo_policy_loss(new[perm], old[perm], adv[perm], eps)
    assert math.isclose(shuffled.item(), loss.item(), rel_tol=1e-9, abs_tol=1e-9)
    scaled, _ = ppo_policy_loss(new, old, c * adv, eps)
    assert math.isclose(scaled.item(), c * loss.item(), rel_tol=1e-9, abs_tol=1e-9)


@SETTINGS
@given(ppo_batches())
def test_sign_symmetry_odd_inside_the_clip_pessimistic_outside(batch):
    """loss(A) + loss(−A) ≥ 0 (each term is a max of two values whose sum with its mirror is 0), with equality
    when no ratio is outside the clip: inside it the surrogate is −mean(A·ρ), odd in A."""
    new, old, adv, eps = batch
    plus, _ = ppo_policy_loss(new, old, adv, eps)
    minus, _ = ppo_policy_loss(new, old, -adv, eps)
    assert plus.item() + minus.item() >= -1e-9
    inside = old + (new - old).clamp(math.log1p(-eps) * 0.99, math.log1p(eps) * 0.99)
    p_in, s_in = ppo_policy_loss(inside, old, adv, eps)
    m_in, _ = ppo_policy_loss(inside, old, -adv, eps)
    assert s_in.clip_fraction == 0.0
    assert math.isclose(p_in.item(), -m_in.item(), rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(p_in.item(), -(adv * torch.exp(inside - old)).mean().item(), rel_tol=1e-9, abs_tol=1e-9)
