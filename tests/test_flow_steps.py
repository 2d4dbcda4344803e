"""Flow matching: FlowMatchSchedule against diffusers, FlowMatchSDEStep against a slow Flow-GRPO reference,
the Euler ODE limit, score guidance on an exact Gaussian, make_step."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from critic_align.steps import DDIMStep, FlowMatchSchedule, FlowMatchSDEStep, make_step


def _flow_grpo_reference(v, x, sigmas, index, noise_level, prev_sample):
    """Flow-GRPO's sde_step_with_logprob, element by element with python floats (index-based, stateful form)."""
    sigma, sigma_prev, sigma_max = float(sigmas[index]), float(sigmas[index + 1]), float(sigmas[1])
    dt = sigma_prev - sigma
    std_t = math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * noise_level
    std = std_t * math.sqrt(-dt)
    means, lps = [], []
    for xi, vi, pi in zip(x.flatten().tolist(), v.flatten().tolist(), prev_sample.flatten().tolist()):
        m = xi * (1 + std_t**2 / (2 * sigma) * dt) + vi * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
        means.append(m)
        lps.append(-((pi - m) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi)))
    return torch.tensor(means, dtype=torch.float64).view_as(x), std, torch.tensor(lps, dtype=torch.float64)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 4, 20, 28])
def test_timesteps_and_sigmas_match_diffusers(shift, n):
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sch.set_timesteps(n)
    fs = FlowMatchSchedule.from_scheduler(sch)
    torch.testing.assert_close(fs.sigmas(n), sch.sigmas[:-1], rtol=0, atol=2e-7)
    torch.testing.assert_close(fs.timesteps(n), sch.timesteps, rtol=0, atol=1e-4)
    assert fs.timesteps(n).dtype == torch.float32
    prev = fs.prev_timesteps(fs.timesteps(n))
    torch.testing.assert_close(prev[:-1], fs.timesteps(n)[1:])
    assert prev[-1].item() == 0.0
    torch.testing.assert_close(fs.sigma(prev).float(), sch.sigmas[1:], rtol=0, atol=2e-7)


def test_shift_terminal_matches_diffusers():
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, shift_terminal=0.02)
    sch.set_timesteps(10)
    fs = FlowMatchSchedule.from_scheduler(sch.config)
    torch.testing.assert_close(fs.sigmas(10), sch.sigmas[:-1], rtol=0, atol=2e-7)


def test_schedule_refuses_what_it_does_not_reproduce():
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        FlowMatchSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        FlowMatchSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True))
    with pytest.raises(ValueError, match="NoiseSchedule"):
        FlowMatchSchedule.from_scheduler(DDPMScheduler())
    with pytest.raises(ValueError, match="shift"):
        FlowMatchSchedule(shift=0.0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        FlowMatchSchedule().timesteps(0)


def test_make_step_picks_the_family():
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    for src in (flow, flow.config, {"num_train_timesteps": 1000, "shift": 3.0}):
        st = make_step(src, 0.7, "mean")
        assert isinstance(st, FlowMatchSDEStep) and st.noise_level == 0.7 and st.reduction == "mean"
        assert st.schedule.shift == 3.0
    for src in (DDPMScheduler(), DDIMScheduler().config, {"num_train_timesteps": 1000, "beta_schedule": "linear"}):
        st = make_step(src, 1.0)
        assert isinstance(st, DDIMStep) and st.eta == 1.0


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sde_step_matches_slow_flow_grpo_reference(shift, reduction):
    fs = FlowMatchSchedule(shift=shift)
    n = 6
    sigmas = torch.cat([fs.sigmas(n), torch.zeros(1)])
    ts, prev = fs.timesteps(n), fs.prev_timesteps(fs.timesteps(n))
    step = FlowMatchSDEStep(fs, noise_level=0.7, reduction=reduction)
    g = torch.Generator().manual_seed(0)
    for k in range(n):  # every step, including σ = 1 (first) and σ' = 0 (last)
        x = torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64)
        v = torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64)
        prev_sample = torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64)
        out = step(v, x, ts[k], prev[k], prev_sample=prev_sample)
        for i in range(2):
            mean, std, lp = _flow_grpo_reference(v[i], x[i], sigmas.double(), k, 0.7, prev_sample[i])
            torch.testing.assert_close(out.mean[i], mean, rtol=1e-6, atol=1e-6)
            assert out.std[i].item() == pytest.approx(std, rel=1e-6)
            ref = lp.sum() if reduction == "sum" else lp.mean()
            assert out.log_prob[i].item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-6)
        # and against torch.distributions
        nd = torch.distributions.Normal(out.mean, out.std.expand_as(out.mean)).log_prob(prev_sample).flatten(1)
        torch.testing.assert_close(out.log_prob, nd.sum(1) if reduction == "sum" else nd.mean(1))


def test_sample_then_score_and_predictions():
    fs = FlowMatchSchedule(shift=3.0)
    step = FlowMatchSDEStep(fs, noise_level=0.9)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 2, 4, 4, generator=g), torch.randn(4, 2, 4, 4, generator=g)
    t = fs.timesteps(10)[3]
    s = float(fs.sigma(t))
    x = (1 - s) * x0 + s * eps
    out = step(eps - x0, x, t, fs.timesteps(10)[4], generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out.x0_pred, x0, rtol=1e-5, atol=1e-5)  # x0 = x − σ·v
    torch.testing.assert_close(out.eps_pred, eps, rtol=1e-5, atol=1e-5)  # ε = x + (1 − σ)·v
    again = step(eps - x0, x, t, fs.timesteps(10)[4], prev_sample=out.prev_sample)
    torch.testing.assert_close(again.log_prob, out.log_prob)
    # same generator seed -> same sample
    out2 = step(eps - x0, x, t, fs.timesteps(10)[4], generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out2.prev_sample, out.prev_sample)


def test_batched_equals_per_sample_with_mixed_timesteps():
    fs = FlowMatchSchedule(shift=3.0)
    step = FlowMatchSDEStep(fs, noise_level=0.7)
    ts = fs.timesteps(8)
    prev = fs.prev_timesteps(ts)
    idx = torch.tensor([0, 7, 3, 5])
    g = torch.Generator().manual_seed(2)
    x, v, xp = (torch.randn(4, 1, 4, 4, generator=g) for _ in range(3))
    batched = step(v, x, ts[idx], prev[idx], prev_sample=xp)
    for i in range(4):
        single = step(v[i:i + 1], x[i:i + 1], ts[idx[i]], prev[idx[i]], prev_sample=xp[i:i + 1])
        torch.testing.assert_close(batched.log_prob[i:i + 1], single.log_prob)
        torch.testing.assert_close(batched.mean[i:i + 1], single.mean)
        torch.testing.assert_close(batched.std[i:i + 1], single.std)


def _velocity_field(x, t):
    return 0.3 * x + torch.sin(t.view(-1, 1, 1, 1) / 100.0) - 0.1 * x**2


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_noise_level_zero_is_diffusers_euler_over_a_trajectory(shift):
    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(12)
    step = make_step(sch.config, 0.0)
    assert not step.is_stochastic
    x_ref = x = torch.randn(3, 1, 5, 5, generator=torch.Generator().manual_seed(3))
    ts, prev = step.schedule.timesteps(12), step.schedule.prev_timesteps(step.schedule.timesteps(12))
    for k, t in enumerate(sch.timesteps):
        x_ref = sch.step(_velocity_field(x_ref, t.expand(3)), t, x_ref).prev_sample
        out = step(_velocity_field(x, ts[k].expand(3)), x, ts[k].expand(3), prev[k])
        assert out.log_prob is None
        x = out.prev_sample
    torch.testing.assert_close(x, x_ref, rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="noise_level > 0"):
        step.require_stochastic("PPO")
    with pytest.raises(ValueError, match="noise_level > 0"):
        step(x, x, ts[0], prev[0], prev_sample=x)


def test_step_errors():
    fs = FlowMatchSchedule()
    step = FlowMatchSDEStep(fs)
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="strictly smaller"):
        step(x, x, 500.0, 600.0)
    with pytest.raises(ValueError, match="σ in"):
        step(x, x, 0.0, 0.0)
    with pytest.raises(ValueError, match="noise_level"):
        FlowMatchSDEStep(fs, noise_level=-0.1)
    with pytest.raises(ValueError, match="shape"):
        step(torch.zeros(2, 1, 2, 3), x, 500.0, 400.0)


# ---- exact Gaussian data: x0 ~ N(μ, s²) per dimension; x_σ = (1 − σ)x0 + σε

def _gauss_velocity(x, sigma, mu, s2):
    """E[ε − x0 | x_σ] computed from the joint Gaussian of (x0, ε, x_σ), not from the score."""
    var = (1 - sigma) ** 2 * s2 + sigma**2
    r = x - (1 - sigma) * mu
    return sigma / var * r - (mu + (1 - sigma) * s2 / var * r)


def _gauss_score(x, sigma, mu, s2):
    return -(x - (1 - sigma) * mu) / ((1 - sigma) ** 2 * s2 + sigma**2)


def test_score_guidance_gives_the_velocity_of_the_shifted_gaussian():
    # grad = score of N(μ', s²) minus score of N(μ, s²) at every σ; the guided velocity must be the exact velocity
    # of data N(μ', s²), computed independently from the posterior means.
    fs = FlowMatchSchedule()
    step = FlowMatchSDEStep(fs)
    mu, mu2, s2 = 0.5, -1.2, 0.3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1, 3, 3, generator=g, dtype=torch.float64) * 1.5
    for sigma in (0.05, 0.3, 0.7, 0.97):
        t = torch.full((5,), sigma * 1000.0, dtype=torch.float64)
        v = _gauss_velocity(x, sigma, mu, s2)
        # consistency of the conventions: the score implied by v is −ε̂/σ with ε̂ = x + (1 − σ)v
        torch.testing.assert_close(-(x + (1 - sigma) * v) / sigma, _gauss_score(x, sigma, mu, s2))
        grad = _gauss_score(x, sigma, mu2, s2) - _gauss_score(x, sigma, mu, s2)
        guided = step.apply_score_guidance(v, x, t, grad)
        torch.testing.assert_close(guided, _gauss_velocity(x, sigma, mu2, s2), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="σ = 1"):
        step.apply_score_guidance(v, x, torch.full((5,), 1000.0), grad)


def test_sde_preserves_the_gaussian_marginals():
    # With the exact velocity, the Flow-GRPO SDE has the same marginals as the ODE: starting at σ = 1 from
    # N(0, 1), it must end at the data N(μ, s²) (up to discretisation error).
    fs = FlowMatchSchedule()
    mu, s2 = 0.7, 0.25
    n = 200
    ts, prev = fs.timesteps(n), fs.prev_timesteps(fs.timesteps(n))
    g = torch.Generator().manual_seed(0)
    for a in (0.0, 0.7):
        step = FlowMatchSDEStep(fs, noise_level=a)
        x = torch.randn(20000, 1, 1, 1, generator=g, dtype=torch.float64)
        for k in range(n):
            sigma = float(fs.sigma(ts[k]))
            x = step(_gauss_velocity(x, sigma, mu, s2), x, ts[k], prev[k], generator=g).prev_sample
        assert x.mean().item() == pytest.approx(mu, abs=0.02)
        assert x.var().item() == pytest.approx(s2, rel=0.06)
