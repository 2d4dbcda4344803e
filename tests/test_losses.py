"""Tests of critic_align.losses: the clipped PPO surrogate, the (clipped) value loss, explained variance."""

from __future__ import annotations

import math

import pytest
import torch

from critic_align.losses import explained_variance, ppo_policy_loss, value_loss

# ---------------------------------------------------------------------------------------------
# ppo_policy_loss


def test_ppo_on_policy_ratio_is_one():
    g = torch.Generator().manual_seed(0)
    old = torch.randn(8, generator=g, dtype=torch.float64) * 10
    new = old.clone().requires_grad_(True)
    adv = torch.randn(8, generator=g, dtype=torch.float64)
    loss, stats = ppo_policy_loss(new, old, adv, clip_range=0.2)
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-12)
    assert stats.clip_fraction == 0.0
    assert stats.approx_kl == 0.0
    assert stats.ratio_mean == 1.0 and stats.ratio_max == 1.0 and stats.ratio_min == 1.0
    loss.backward()
    # d/d logp of mean(−A·exp(logp − logp_old)) at ratio 1 = −A/N
    torch.testing.assert_close(new.grad, -adv / 8)


def test_ppo_hand_computed_with_clipping():
    eps = 0.2
    ratios = torch.tensor([1.5, 0.5, 1.1, 0.7, 1.5], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -2.0, -1.0, -1.0], dtype=torch.float64)
    old = torch.tensor([0.3, -1.0, 2.0, 0.0, 5.0], dtype=torch.float64)
    new = (old + ratios.log()).requires_grad_(True)
    # per entry max(−A·ρ, −A·clip(ρ, 0.8, 1.2)):
    #   0: ρ=1.5, A=+1: max(−1.5, −1.2) = −1.2  (clipped, no gradient)
    #   1: ρ=0.5, A=+1: max(−0.5, −0.8) = −0.5  (unclipped: a worse action keeps its gradient)
    #   2: ρ=1.1, A=−2: max( 2.2,  2.2) =  2.2  (inside the range)
    #   3: ρ=0.7, A=−1: max( 0.7,  0.8) =  0.8  (clipped, no gradient)
    #   4: ρ=1.5, A=−1: max( 1.5,  1.2) =  1.5  (unclipped)
    # loss = (−1.2 − 0.5 + 2.2 + 0.8 + 1.5)/5 = 0.56
    loss, stats = ppo_policy_loss(new, old, adv, clip_range=eps)
    assert loss.item() == pytest.approx(0.56, abs=1e-12)
    # |ρ − 1| > 0.2 for entries 0, 1, 3, 4
    assert stats.clip_fraction == pytest.approx(0.8)
    assert stats.ratio_max == pytest.approx(1.5) and stats.ratio_min == pytest.approx(0.5)
    assert stats.ratio_mean == pytest.approx((1.5 + 0.5 + 1.1 + 0.7 + 1.5) / 5)
    kl = sum((r - 1) - math.log(r) for r in ratios.tolist()) / 5
    assert stats.approx_kl == pytest.approx(kl, rel=1e-9)
    loss.backward()
    # gradient −A·ρ/N on unclipped entries, exactly 0 on clipped ones
    expected = torch.tensor([0.0, -0.5 / 5, 2.2 / 5, 0.0, 1.5 / 5], dtype=torch.float64)
    torch.testing.assert_close(new.grad, expected, rtol=1e-12, atol=1e-15)
    assert new.grad[0].item() == 0.0 and new.grad[3].item() == 0.0


def test_ppo_old_log_prob_and_advantages_get_no_gradient():
    old = torch.tensor([0.0, 1.0], requires_grad=True)
    adv = torch.tensor([1.0, -1.0], requires_grad=True)
    new = torch.tensor([0.1, 0.9], requires_grad=True)
    loss, _ = ppo_policy_loss(new, old, adv, clip_range=0.2)
    loss.backward()
    assert old.grad is None and adv.grad is None
    assert new.grad is not None and torch.all(new.grad != 0)


def test_ppo_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shapes"):
        ppo_policy_loss(torch.zeros(3), torch.zeros(3), torch.zeros(4), 0.2)
    with pytest.raises(ValueError, match="shapes"):
        ppo_policy_loss(torch.zeros(3, 1), torch.zeros(3), torch.zeros(3), 0.2)


# ---------------------------------------------------------------------------------------------
# value_loss


def test_value_loss_unclipped_is_half_mse():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(5, 3, generator=g, dtype=torch.float64)
    r = torch.randn(5, 3, generator=g, dtype=torch.float64)
    assert value_loss(v, v + 100, r).item() == pytest.approx(0.5 * ((v - r) ** 2).mean().item(), rel=1e-12)
    assert value_loss(v, v, v).item() == 0.0


def test_value_loss_hand_computed_clipped_and_masked():
    new = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([1.5, 1.5, 1.5], dtype=torch.float64)
    ret = torch.tensor([0.0, 0.0, 4.0], dtype=torch.float64)
    # unclipped (V − R)² = (1, 4, 1) -> 0.5·mean = 1.0
    assert value_loss(new, old, ret).item() == pytest.approx(1.0, abs=1e-12)
    # V_clip = old + clip(V − old, ±0.2) = (1.3, 1.7, 1.7): (V_clip − R)² = (1.69, 2.89, 5.29)
    # max with the unclipped errors: (1.69, 4, 5.29) -> 0.5 · 10.98/3 = 1.83
    loss = value_loss(new, old, ret, clip_range=0.2)
    assert loss.item() == pytest.approx(1.83, abs=1e-12)
    loss.backward()
    # entries 0 and 2 take the clipped branch (V_clip is constant in V outside the clip) -> zero gradient;
    # entry 1: d/dV 0.5·(V − R)²/3 = (2 − 0)/3
    torch.testing.assert_close(new.grad, torch.tensor([0.0, 2 / 3, 0.0], dtype=torch.float64))
    # mask drops entry 1: unclipped 0.5·(1 + 1)/2 = 0.5; clipped 0.5·(1.69 + 5.29)/2 = 1.745
    mask = torch.tensor([True, False, True])
    assert value_loss(new, old, ret, mask=mask).item() == pytest.approx(0.5, abs=1e-12)
    assert value_loss(new, old, ret, clip_range=0.2, mask=mask).item() == pytest.approx(1.745, abs=1e-12)
    # the masked entry has no influence whatever its value
    ret2 = ret.clone()
    ret2[1] = 1e6
    assert value_loss(new, old, ret2, clip_range=0.2, mask=mask).item() == pytest.approx(1.745, abs=1e-12)
    # all masked: 0, not NaN
    assert value_loss(new, old, ret, mask=torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_value_loss_mask_drops_nan_targets():
    new = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    ret = torch.tensor([0.0, float("nan"), 4.0])
    mask = ~torch.isnan(ret)
    loss = value_loss(new, new.detach(), ret, mask=mask)
    assert loss.item() == pytest.approx(0.5 * (1 + 1) / 2)
    loss.backward()
    assert torch.isfinite(new.grad).all()


# ---------------------------------------------------------------------------------------------
# explained_variance


def test_explained_variance():
    target = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert explained_variance(target, target) == pytest.approx(1.0, abs=1e-12)
    assert explained_variance(torch.full((4,), target.mean().item()), target) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(explained_variance(torch.tensor([1.0, 2.0, 3.0]), torch.full((3,), 5.0)))
    # hand value: target (1, 2, 3), pred (1, 2, 2): Var[residual (0, 0, 1)] = 2/9, Var[target] = 2/3 -> 1 − 1/3
    assert explained_variance(torch.tensor([1.0, 2.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(2 / 3)
    # a constant offset does not cost explained variance; a sign flip does (1 − 4 = −3)
    assert explained_variance(target + 5, target) == pytest.approx(1.0, abs=1e-12)
    assert explained_variance(-target + 2 * target.mean(), target) == pytest.approx(-3.0, abs=1e-12)
    # shapes are flattened: (B, T, K) works
    t3 = torch.arange(12.0).view(2, 3, 2)
    assert explained_variance(t3, t3) == pytest.approx(1.0)
