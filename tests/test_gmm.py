"""Exact Gaussian-mixture references (issue #4): analytic ε, posterior, values, tilted targets, the MLP
adapter and the trainer on the unconditional vector task."""

from __future__ import annotations

import math

import pytest
import torch

from critic_align.backbones import MLP_LORA_TARGETS, MLPAdapter, MLPDenoiser, ResidualMLP
from critic_align.config import PPOConfig
from critic_align.distances import mmd, noise_floor, sliced_wasserstein
from critic_align.rewards import FunctionReward, MultiReward
from critic_align.tasks.gmm import BoxReward, GaussianMixture, GMMTask, LinearReward, grid_density


def uneven_mixture() -> GaussianMixture:
    """Unequal stds, so the tilt's s_k²|w|²/(2α²) term does not cancel."""
    means = torch.tensor([[-1.5, 0.0], [1.0, 1.0], [0.5, -1.5]])
    return GaussianMixture(means, torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.3, 0.6, 0.45]))


def test_analytic_eps_matches_autograd_of_log_pt():
    mix = uneven_mixture()
    g = torch.Generator().manual_seed(0)
    x = torch.randn((64, 2), generator=g, dtype=torch.float64) * 2
    abar = torch.rand(64, generator=g, dtype=torch.float64) * 0.98 + 0.01
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(mix.log_prob_t(xr, abar).sum(), xr)
    expected = -(1 - abar)[:, None].sqrt() * grad
    torch.testing.assert_close(mix.eps(x, abar), expected, rtol=1e-10, atol=1e-10)
    # the marginal at ᾱ is the mixture noised to ᾱ
    torch.testing.assert_close(mix.log_prob_t(x, 0.3), mix.noised(0.3).log_prob(x))


def test_analytic_eps_matches_monte_carlo_noise_regression():
    """ε*(x_t) = E[ε | x_t]: check on the mean of ε against the exact value over a bin-free statistic."""
    mix = uneven_mixture()
    g = torch.Generator().manual_seed(1)
    n, a = 200_000, 0.5
    x0 = mix.sample(n, g)
    eps = torch.randn((n, 2), generator=g, dtype=torch.float64)
    xt = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
    # E[ε·f(x_t)] = E[ε*(x_t)·f(x_t)] for any f; use a few features f
    for f in (lambda z: z[:, :1], lambda z: torch.tanh(z[:, 1:]), lambda z: (z**2).sum(1, keepdim=True)):
        lhs = (eps * f(xt)).mean(0)
        rhs = (mix.eps(xt, a) * f(xt)).mean(0)
        torch.testing.assert_close(lhs, rhs, atol=0.03, rtol=0.0)


@pytest.mark.parametrize("alpha", [0.7, 2.0])
def test_linear_tilt_matches_importance_reweighting(alpha):
    mix = uneven_mixture()
    w = torch.tensor([1.0, -0.5], dtype=torch.float64)
    tilted = mix.tilt_linear(w, alpha)
    g = torch.Generator().manual_seed(2)
    x = mix.sample(400_000, g)
    iw = torch.softmax(x @ w / alpha, 0)
    is_mean = (iw[:, None] * x).sum(0)
    is_second = (iw[:, None, None] * x[:, :, None] * x[:, None, :]).sum(0)
    exact = tilted.sample(400_000, g)
    torch.testing.assert_close(exact.mean(0), is_mean, atol=0.02, rtol=0)
    torch.testing.assert_close((exact[:, :, None] * exact[:, None, :]).mean(0), is_second, atol=0.04, rtol=0)
    # the density itself: log p*(x) − log p0(x) − w·x/α is the constant −log Z
    pts = torch.randn((50, 2), generator=g, dtype=torch.float64)
    diff = tilted.log_prob(pts) - mix.log_prob(pts) - pts @ w / alpha
    torch.testing.assert_close(diff, diff.mean().expand(50), atol=1e-10, rtol=0)
    # dropping the s_k²|w|²/(2α²) term is wrong when the stds differ ...
    wrong = torch.softmax(mix.weights.log() + mix.means @ w / alpha, 0)
    assert (wrong - tilted.weights).abs().max() > 1e-3
    # ... and harmless when they are equal
    same = GaussianMixture(mix.means, mix.weights, 0.4)
    torch.testing.assert_close(same.tilt_linear(w, alpha).weights,
                               torch.softmax(same.weights.log() + same.means @ w / alpha, 0))


def test_box_tilt_grid_and_rejection_sampling():
    mix = uneven_mixture()
    box = BoxReward([0.0, -0.5], [float("inf"), 2.0])
    alpha = 0.5
    _, dens, log_z = grid_density(mix, box, alpha, lim=6.0, n=600)
    assert abs(log_z - box.log_normalizer(mix, alpha)) < 2e-2  # box edges cost a little on the grid
    g = torch.Generator().manual_seed(3)
    from critic_align.tasks.gmm import sample_tilted_bounded

    x = mix.sample(300_000, g)
    iw = torch.softmax(box(x).double() / alpha, 0)
    y = sample_tilted_bounded(mix, box, alpha, 200_000, g)
    torch.testing.assert_close(y.mean(0), (iw[:, None] * x).sum(0), atol=0.02, rtol=0)
    torch.testing.assert_close(box(y).double().mean(), (iw * box(x).double()).sum(), atol=0.01, rtol=0)


def _is_posterior(mix, x_t, a, n, g):
    """Self-normalised importance sampling of x0 | x_t: proposals x0 ~ p0, weights N(x_t; √a x0, 1 − a)."""
    x0 = mix.sample(n, g)
    logw = -((x_t[None] - math.sqrt(a) * x0) ** 2).sum(1) / (2 * (1 - a))
    return x0, torch.softmax(logw, 0)


@pytest.mark.parametrize("a", [0.05, 0.5, 0.95])
def test_posterior_mean_and_values_match_monte_carlo(a):
    mix = uneven_mixture()
    g = torch.Generator().manual_seed(4)
    lin, box, alpha = LinearReward([0.7, 0.3]), BoxReward([-1.0, -1.0], [1.2, 0.8]), 0.8
    xs = mix.noised(a).sample(4, g)
    for x_t in xs:
        x0, w = _is_posterior(mix, x_t, a, 400_000, g)
        xt = x_t[None]
        torch.testing.assert_close(mix.posterior_mean(xt, a)[0], (w[:, None] * x0).sum(0), atol=0.02, rtol=0)
        r_lin, r_box = lin(x0).double(), box(x0).double()
        torch.testing.assert_close(lin.value(mix, xt, a)[0], (w * r_lin).sum(), atol=0.02, rtol=0)
        torch.testing.assert_close(box.value(mix, xt, a)[0], (w * r_box).sum(), atol=0.01, rtol=0)
        soft_lin = alpha * torch.log((w * torch.exp(r_lin / alpha)).sum())
        soft_box = alpha * torch.log((w * torch.exp(r_box / alpha)).sum())
        torch.testing.assert_close(lin.soft_value(mix, xt, a, alpha)[0], soft_lin, atol=0.03, rtol=0)
        torch.testing.assert_close(box.soft_value(mix, xt, a, alpha)[0], soft_box, atol=0.02, rtol=0)
    # exact posterior samples agree with the closed-form mean
    post = mix.sample_posterior(xs, a, 100_000, g)
    torch.testing.assert_close(post.mean(1), mix.posterior_mean(xs, a), atol=0.02, rtol=0)


def test_distances_and_noise_floor():
    mix = uneven_mixture()
    g = torch.Generator().manual_seed(5)
    shifted = GaussianMixture(mix.means + 0.3, mix.weights, mix.stds)
    for metric in (sliced_wasserstein, mmd):
        floor = noise_floor(mix.sample, 1000, metric, repeats=3)
        d_same = metric(mix.sample(1000, g), mix.sample(1000, g))
        d_shift = metric(mix.sample(1000, g), shifted.sample(1000, g))
        assert d_same < 3 * floor["mean"] + 1e-9
        assert d_shift > 3 * floor["mean"]
    assert sliced_wasserstein(torch.zeros(10, 2), torch.ones(10, 2)) == pytest.approx(1.0, rel=0.2)


def test_mlp_adapter_features_and_zero_residual():
    task = GMMTask(uneven_mixture())
    model = MLPDenoiser(ResidualMLP(hidden=32, num_layers=2), task.analytic_eps())
    adapter = MLPAdapter(model)
    x = torch.randn(6, 2)
    t = torch.tensor([999, 500, 10, 0, 300, 700])
    feats = adapter.features(x, t)
    assert feats.tokens.shape == (6, 3, 32) and feats.temb.shape == (6, 32)
    out, feats2 = adapter.predict_and_features(x, t)
    torch.testing.assert_close(feats2.tokens, feats.tokens)
    abar = task.schedule.alphas_cumprod[t]
    torch.testing.assert_close(out, task.mixture.eps(x.double(), abar).float())
    with pytest.raises(ValueError, match="unconditional"):
        adapter.predict(x, t, torch.zeros(6))


@pytest.mark.parametrize("mode", ["gae", "grpo"])
def test_trainer_runs_on_the_unconditional_vector_task(tmp_path, mode):
    from critic_align.trainer import Trainer

    task = GMMTask(uneven_mixture())
    torch.manual_seed(0)
    model = MLPDenoiser(ResidualMLP(hidden=32, num_layers=2), task.analytic_eps())
    lin = LinearReward([1.0, 0.0])
    cfg = PPOConfig(advantage=mode, num_epochs=2, num_inference_steps=5, batch_size=16, group_size=16,
                    minibatch_size=40, value_pretrain_epochs=1, value_pretrain_passes=1, lora_rank=4,
                    lora_target_modules=MLP_LORA_TARGETS, critic_lora_rank=4, value_head_hidden=32,
                    value_head_heads=2, kl_coef=0.1, log_prob_reduction="sum", output_dir=str(tmp_path),
                    log_tensorboard=False, progress=False, grid_every=0, checkpoint_every=0, seed=0)
    trainer = Trainer(cfg, task, MLPAdapter(model), task.scheduler, rewards=MultiReward([FunctionReward(lin, "linear")]))
    x = torch.randn(8, 2)
    t = torch.full((8,), 999)
    # LoRA starts at zero: the starting policy is the exact analytic model
    torch.testing.assert_close(trainer.policy_output(x, t, None), trainer.reference_output(x, t, None))
    history = trainer.train()
    assert len(history) == 2 and math.isfinite(history[-1]["reward/linear/mean"])
    assert "kl_to_ref" in history[-1]
    assert trainer.sample(["", ""]).shape == (2, 2)
