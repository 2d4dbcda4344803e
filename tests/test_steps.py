"""Tests of critic_align.steps: the Gaussian log-density, the stochastic DDIM step, the noise schedule."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from critic_align.steps import DDIMStep, NoiseSchedule, gaussian_kl, gaussian_log_prob

PRED_TYPES = ("epsilon", "v_prediction", "sample")


def _schedule(prediction_type="epsilon", clip_sample=False, **kw) -> NoiseSchedule:
    return NoiseSchedule.from_scheduler(
        DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=clip_sample, **kw)
    )


def _normal_lp(x, mean, std):
    """Reference per-sample log-density summed over non-batch dims, via torch.distributions."""
    return torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x).flatten(1).sum(1)


# ---------------------------------------------------------------------------------------------
# gaussian_log_prob / gaussian_kl


def test_gaussian_log_prob_matches_torch_normal_sum_and_mean():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 5, generator=g, dtype=torch.float64)
    mean = torch.randn(3, 2, 4, 5, generator=g, dtype=torch.float64)
    std = torch.rand(3, 1, 1, 1, generator=g, dtype=torch.float64) + 0.2  # per-sample broadcastable std
    ref = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x).flatten(1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), ref.sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std, reduction="mean"), ref.mean(1), rtol=1e-12,
                               atol=1e-12)
    # a full-shape std works too
    std_full = torch.rand(3, 2, 4, 5, generator=g, dtype=torch.float64) + 0.2
    ref_full = torch.distributions.Normal(mean, std_full).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std_full), ref_full, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="reduction"):
        gaussian_log_prob(x, mean, std, reduction="max")


def test_gaussian_log_prob_hand_value():
    # one sample, two dims: x = (1, 0), mean = (0, 0), std = 2
    # log N = -(x-μ)²/(2σ²) - log σ - ½ log 2π per dim
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    mean = torch.zeros(1, 2, dtype=torch.float64)
    std = torch.tensor([[2.0]], dtype=torch.float64)
    per_dim = [-1 / 8 - math.log(2) - 0.5 * math.log(2 * math.pi), -math.log(2) - 0.5 * math.log(2 * math.pi)]
    assert gaussian_log_prob(x, mean, std).item() == pytest.approx(sum(per_dim), abs=1e-12)
    assert gaussian_log_prob(x, mean, std, "mean").item() == pytest.approx(sum(per_dim) / 2, abs=1e-12)


def test_gaussian_kl_matches_torch_kl_divergence():
    g = torch.Generator().manual_seed(1)
    mp = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    mq = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    std = torch.rand(4, 1, 1, generator=g, dtype=torch.float64) + 0.1
    s = std.expand_as(mp)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mp, s), torch.distributions.Normal(mq, s))
    torch.testing.assert_close(gaussian_kl(mp, mq, std), ref.flatten(1).sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gaussian_kl(mp, mq, std, reduction="mean"), ref.flatten(1).mean(1), rtol=1e-12,
                               atol=1e-12)
    assert torch.all(gaussian_kl(mp, mp, std) == 0)


# ---------------------------------------------------------------------------------------------
# DDIMStep: sampling, scoring, batching


@pytest.mark.parametrize("prediction_type", PRED_TYPES)
def test_ddim_step_sample_then_score(prediction_type):
    step = DDIMStep(_schedule(prediction_type), eta=0.8)
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(3, 1, 4, 4, generator=g)
    out_model = torch.randn(3, 1, 4, 4, generator=g)
    t, t_prev = torch.tensor([900, 500, 40]), torch.tensor([880, 300, -1])
    out = step(out_model, x_t, t, t_prev, generator=torch.Generator().manual_seed(3))
    assert out.prev_sample.shape == x_t.shape and out.log_prob.shape == (3,)
    assert out.std.shape == (3, 1, 1, 1)
    # the sample is mean + std * z with z the generator's noise
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out.prev_sample, out.mean + out.std * z)
    # log_prob of the sampled transition is the Normal(mean, std) density
    torch.testing.assert_close(out.log_prob, _normal_lp(out.prev_sample, out.mean, out.std), rtol=1e-5, atol=1e-4)
    # scoring the stored sample reproduces the log-prob exactly
    again = step(out_model, x_t, t, t_prev, prev_sample=out.prev_sample)
    assert torch.equal(again.log_prob, out.log_prob)
    assert torch.equal(again.mean, out.mean) and torch.equal(again.prev_sample, out.prev_sample)
    # scoring a different point gives a lower density in expectation (here: the mean itself is the mode)
    at_mode = step(out_model, x_t, t, t_prev, prev_sample=out.mean)
    assert torch.all(at_mode.log_prob > out.log_prob)


def test_ddim_step_float64_inputs_keep_float64():
    step = DDIMStep(_schedule(), eta=1.0)
    x = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    out = step(torch.zeros_like(x), x, 500, 400, generator=torch.Generator().manual_seed(0))
    assert out.prev_sample.dtype == torch.float64 and out.log_prob.dtype == torch.float64
    again = step(torch.zeros_like(x), x, 500, 400, prev_sample=out.prev_sample)
    assert torch.equal(again.log_prob, out.log_prob)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ddim_step_half_precision_sample_rescores_identically(dtype):
    step = DDIMStep(_schedule(), eta=1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g).to(dtype)
    eps = torch.randn(2, 4, 16, 16, generator=g).to(dtype)
    out = step(eps, x, 100, 80, generator=g)
    assert out.prev_sample.dtype == dtype
    again = step(eps, x, 100, 80, prev_sample=out.prev_sample)
    assert torch.equal(again.log_prob, out.log_prob)


@pytest.mark.parametrize("prediction_type", PRED_TYPES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_ddim_step_batched_equals_per_sample(prediction_type, reduction):
    step = DDIMStep(_schedule(prediction_type, clip_sample=True), eta=1.0, reduction=reduction)
    g = torch.Generator().manual_seed(4)
    b = 4
    x_t = torch.randn(b, 2, 3, 3, generator=g)
    model_out = torch.randn(b, 2, 3, 3, generator=g)
    x_prev = torch.randn(b, 2, 3, 3, generator=g)
    t = torch.tensor([999, 620, 100, 7])
    t_prev = torch.tensor([979, 0, 60, -1])
    batched = step(model_out, x_t, t, t_prev, prev_sample=x_prev)
    for i in range(b):
        one = step(model_out[i:i + 1], x_t[i:i + 1], int(t[i]), int(t_prev[i]), prev_sample=x_prev[i:i + 1])
        torch.testing.assert_close(batched.log_prob[i:i + 1], one.log_prob, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(batched.mean[i:i + 1], one.mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(batched.std[i:i + 1], one.std, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(batched.x0_pred[i:i + 1], one.x0_pred, rtol=1e-6, atol=1e-6)


def test_ddim_mean_std_hand_computed():
    # a 3-step schedule with round numbers: ᾱ = (0.9, 0.5, 0.2); transition t=2 -> t_prev=1, eta = 1
    sched = NoiseSchedule(alphas_cumprod=torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64))
    a_t, a_prev = 0.2, 0.5
    x_t, eps = 1.0, 0.5
    # σ² = (1-ᾱ_prev)/(1-ᾱ_t) · (1 - ᾱ_t/ᾱ_prev) = 0.5/0.8 · 0.6 = 0.375
    var = 0.375
    # x̂0 = (x_t - sqrt(1-ᾱ_t) ε)/sqrt(ᾱ_t) = (1 - sqrt(0.8)·0.5)/sqrt(0.2) = 1.2360680
    x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    assert x0 == pytest.approx(1.2360680, abs=1e-6)
    # μ = sqrt(0.5)·x̂0 + sqrt(1 - 0.5 - 0.375)·ε = 0.8740320 + 0.1767767 = 1.0508087
    mu = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - var) * eps
    assert mu == pytest.approx(1.0508087, abs=1e-6)
    out = DDIMStep(sched, eta=1.0)(torch.tensor([[eps]]), torch.tensor([[x_t]]), 2, 1,
                                  prev_sample=torch.tensor([[0.3]]))
    assert out.std.item() == pytest.approx(math.sqrt(var), rel=1e-6)
    assert out.mean.item() == pytest.approx(mu, rel=1e-6)
    assert out.x0_pred.item() == pytest.approx(x0, rel=1e-6)
    lp = -((0.3 - mu) ** 2) / (2 * var) - 0.5 * math.log(var) - 0.5 * math.log(2 * math.pi)
    assert out.log_prob.item() == pytest.approx(lp, rel=1e-5)
    # eta = 0.5 scales σ and changes the direction term: σ² = 0.25 · 0.375
    out_half = DDIMStep(sched, eta=0.5)(torch.tensor([[eps]]), torch.tensor([[x_t]]), 2, 1)
    var_h = 0.25 * var
    assert out_half.std.item() == pytest.approx(math.sqrt(var_h), rel=1e-6)
    assert out_half.mean.item() == pytest.approx(math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - var_h) * eps,
                                                 rel=1e-6)
    # t_prev = -1 targets ᾱ_0 = 0.9 (not 1.0)
    out_final = DDIMStep(sched, eta=1.0)(torch.tensor([[eps]]), torch.tensor([[x_t]]), 2, -1)
    var_f = (1 - 0.9) / (1 - 0.2) * (1 - 0.2 / 0.9)
    assert out_final.std.item() == pytest.approx(math.sqrt(var_f), rel=1e-6)
    assert out_final.mean.item() == pytest.approx(math.sqrt(0.9) * x0 + math.sqrt(1 - 0.9 - var_f) * eps, rel=1e-6)


def test_ddim_mean_std_hand_computed_on_real_schedule():
    sched = _schedule("epsilon")
    t, t_prev, eta = 500, 480, 0.7
    a_t, a_prev = float(sched.alphas_cumprod[t]), float(sched.alphas_cumprod[t_prev])
    x_t, eps = 0.3, -0.7
    var = eta**2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    mu = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - var) * eps
    out = DDIMStep(sched, eta=eta)(torch.tensor([[eps]]), torch.tensor([[x_t]]), t, t_prev)
    assert out.std.item() == pytest.approx(math.sqrt(var), rel=1e-5)
    assert out.mean.item() == pytest.approx(mu, rel=1e-5)
    assert out.eps_pred.item() == pytest.approx(eps, rel=1e-5)


@pytest.mark.parametrize("prediction_type", PRED_TYPES)
def test_prediction_types_are_consistent_conversions(prediction_type):
    # x_t = sqrt(ᾱ) x0 + sqrt(1-ᾱ) ε; v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x0: each parameterisation recovers (x0, ε)
    sched = _schedule(prediction_type)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 1, 3, 3, generator=g)
    eps = torch.randn(2, 1, 3, 3, generator=g)
    t = torch.tensor([300, 800])
    a = sched.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    model_out = {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[prediction_type]
    out = DDIMStep(sched, eta=1.0)(model_out, x_t, t, t - 20)
    torch.testing.assert_close(out.x0_pred, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.eps_pred, eps, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction_type", PRED_TYPES)
@pytest.mark.parametrize("clip_sample", [False, True])
def test_ddim_step_matches_diffusers_ddim_scheduler(prediction_type, clip_sample):
    """Mean and std agree with diffusers' DDIMScheduler.step (set_alpha_to_one=False, explicit noise).

    Note: our step always recomputes ε from the clipped x̂0; diffusers does that only with
    use_clipped_model_output=True, so that flag is set here.
    """
    n, eta = 10, 0.6
    ddim = DDIMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=clip_sample,
                         set_alpha_to_one=False, timestep_spacing="leading", steps_offset=1)
    ddim.set_timesteps(n)
    sched = NoiseSchedule.from_scheduler(ddim)
    step = DDIMStep(sched, eta=eta)
    timesteps = sched.timesteps(n)
    assert torch.equal(timesteps, ddim.timesteps)
    prev = sched.prev_timesteps(timesteps)
    g = torch.Generator().manual_seed(6)
    for k in (0, 4, n - 1):
        t = int(timesteps[k])
        x_t = torch.randn(2, 1, 4, 4, generator=g)
        model_out = torch.randn(2, 1, 4, 4, generator=g)
        z = torch.randn(2, 1, 4, 4, generator=g)
        ref = ddim.step(model_out, t, x_t, eta=eta, use_clipped_model_output=True, variance_noise=z).prev_sample
        ref_mean = ddim.step(model_out, t, x_t, eta=eta, use_clipped_model_output=True,
                             variance_noise=torch.zeros_like(z)).prev_sample
        out = step(model_out, x_t, t, int(prev[k]))
        torch.testing.assert_close(out.mean, ref_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.mean + out.std * z, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [1, 10, 250, 999])
def test_eta1_consecutive_is_ddpm_posterior(t):
    ddpm = DDPMScheduler(num_train_timesteps=1000, clip_sample=False, variance_type="fixed_small")
    sched = NoiseSchedule.from_scheduler(ddpm)
    acp = sched.alphas_cumprod
    a_t, a_prev = float(acp[t]), float(acp[t - 1])
    beta_t = 1 - a_t / a_prev  # = β_t of the schedule (up to the float32 cumprod's rounding)
    assert beta_t == pytest.approx(float(ddpm.betas[t]), rel=2e-3)
    g = torch.Generator().manual_seed(7)
    x_t = torch.randn(2, 1, 4, 4, generator=g)
    eps = torch.randn(2, 1, 4, 4, generator=g)
    out = DDIMStep(sched, eta=1.0)(eps, x_t, t, t - 1)
    # σ = sqrt(β̃_t) = sqrt((1-ᾱ_{t-1})/(1-ᾱ_t) β_t)
    beta_tilde = (1 - a_prev) / (1 - a_t) * beta_t
    # (the step works in float32: 1 - ᾱ_t/ᾱ_{t-1} loses ~4 digits to cancellation near t = 0)
    torch.testing.assert_close(out.std.flatten(), torch.full((2,), math.sqrt(beta_tilde)), rtol=1e-3, atol=0)
    assert float(ddpm._get_variance(t)) == pytest.approx(beta_tilde, rel=1e-3)  # diffusers: float32
    # μ = (sqrt(ᾱ_{t-1}) β_t/(1-ᾱ_t)) x0 + (sqrt(α_t)(1-ᾱ_{t-1})/(1-ᾱ_t)) x_t
    x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    alpha_t = 1 - beta_t
    mu = (math.sqrt(a_prev) * beta_t / (1 - a_t)) * x0 + (math.sqrt(alpha_t) * (1 - a_prev) / (1 - a_t)) * x_t
    torch.testing.assert_close(out.mean, mu, rtol=1e-4, atol=1e-5)
    # and diffusers' DDPM step with a seeded generator is that mean plus sqrt(β̃_t)·z
    ref = ddpm.step(eps, t, x_t, generator=torch.Generator().manual_seed(11)).prev_sample
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(out.mean + out.std * z, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# NoiseSchedule


def _diffusers_ddim_timesteps(**config) -> callable:
    sched = DDIMScheduler(num_train_timesteps=1000, **config)

    def get(n):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched.set_timesteps(n)
        return sched.timesteps.long()

    return sched, get


@pytest.mark.parametrize("config", [
    dict(timestep_spacing="leading", steps_offset=0),
    dict(timestep_spacing="leading", steps_offset=1),
    dict(timestep_spacing="trailing"),
    dict(timestep_spacing="linspace"),
])
@pytest.mark.parametrize("n", [1, 3, 7, 10, 20, 25, 40, 50, 100, 1000])
def test_timesteps_match_diffusers_ddim(config, n):
    sched, get = _diffusers_ddim_timesteps(**config)
    if config.get("steps_offset") == 1 and n == 1000:
        # diffusers yields t = 1000 here (out of range for ᾱ); we refuse with a clear error instead
        with pytest.raises(ValueError, match="num_train_timesteps"):
            NoiseSchedule.from_scheduler(sched).timesteps(n)
        return
    ours = NoiseSchedule.from_scheduler(sched).timesteps(n)
    assert ours.dtype == torch.long
    assert torch.equal(ours, get(n))
    assert torch.all(ours[1:] < ours[:-1])  # strictly descending
    assert ours.min() >= 0 and ours.max() <= 999


@pytest.mark.parametrize("spacing,n", [("trailing", 48), ("linspace", 27)])
def test_timesteps_match_diffusers_ddim_at_rounding_ties(spacing, n):
    sched, get = _diffusers_ddim_timesteps(timestep_spacing=spacing)
    # diffusers' own formula, for the record
    if spacing == "trailing":
        expected = np.round(np.arange(1000, 0, -1000 / n)).astype(np.int64) - 1
    else:
        expected = np.linspace(0, 999, n).round()[::-1].astype(np.int64)
    assert torch.equal(get(n), torch.from_numpy(expected.copy()))
    assert torch.equal(NoiseSchedule.from_scheduler(sched).timesteps(n), get(n))


def test_timesteps_rejects_bad_counts_and_prev_timesteps():
    sched = _schedule()
    with pytest.raises(ValueError):
        sched.timesteps(0)
    with pytest.raises(ValueError):
        sched.timesteps(1001)
    ts = torch.tensor([900, 600, 300, 0])
    assert sched.prev_timesteps(ts).tolist() == [600, 300, 0, -1]
    # ᾱ at t = -1 is ᾱ_0
    assert sched.alpha_bar(torch.tensor(-1)).item() == sched.alphas_cumprod[0].item()
    assert sched.alpha_bar(torch.tensor([5, -1])).tolist() == [sched.alphas_cumprod[5].item(),
                                                                sched.alphas_cumprod[0].item()]


@pytest.mark.parametrize("beta_schedule,kw", [
    ("linear", dict(beta_start=0.0001, beta_end=0.02)),
    ("scaled_linear", dict(beta_start=0.00085, beta_end=0.012)),
    ("squaredcos_cap_v2", {}),
])
@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_from_scheduler_alphas_cumprod(beta_schedule, kw, cls):
    ref = cls(num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type="v_prediction",
              clip_sample=False, timestep_spacing="trailing", steps_offset=1, **kw)
    ns = NoiseSchedule.from_scheduler(ref)
    assert ns.alphas_cumprod.dtype == torch.float64 and ns.alphas_cumprod.shape == (1000,)
    torch.testing.assert_close(ns.alphas_cumprod, ref.alphas_cumprod.double(), rtol=0, atol=0)
    assert ns.prediction_type == "v_prediction" and ns.clip_sample is False
    assert ns.timestep_spacing == "trailing" and ns.steps_offset == 1
    # config dict works as well as the scheduler
    torch.testing.assert_close(NoiseSchedule.from_scheduler(dict(ref.config)).alphas_cumprod, ns.alphas_cumprod)


def test_from_scheduler_linear_betas_by_hand():
    # ᾱ_t = Π_{s<=t} (1 - β_s), β linear from 1e-4 to 0.02 (float64 reference; diffusers uses float32)
    ns = NoiseSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                    beta_start=1e-4, beta_end=0.02))
    acp, prod = [], 1.0
    for i in range(1000):
        prod *= 1 - (1e-4 + i * (0.02 - 1e-4) / 999)
        acp.append(prod)
    torch.testing.assert_close(ns.alphas_cumprod, torch.tensor(acp, dtype=torch.float64), rtol=1e-4, atol=1e-7)
    # cosine: ᾱ_t ≈ f(t+1)/f(0) with f(t) = cos²((t/T + s)/(1+s) · π/2), β capped at 0.999
    cos = NoiseSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"))
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):
        assert cos.alphas_cumprod[t].item() == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-4)


def test_from_scheduler_zero_snr_is_reproduced_or_refused():
    ref = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
    try:
        ns = NoiseSchedule.from_scheduler(ref)
    except ValueError:
        return
    torch.testing.assert_close(ns.alphas_cumprod, ref.alphas_cumprod.double(), rtol=1e-6, atol=1e-7)


def test_flow_matching_config_is_refused():
    with pytest.raises(ValueError, match="flow-matching"):
        NoiseSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler().config)
    with pytest.raises(ValueError, match="flow-matching"):
        NoiseSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler())


def test_bad_schedule_arguments():
    acp = torch.linspace(0.99, 0.01, 10, dtype=torch.float64)
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule(alphas_cumprod=acp, prediction_type="flow")
    with pytest.raises(ValueError, match="timestep_spacing"):
        NoiseSchedule(alphas_cumprod=acp, timestep_spacing="karras")


# ---------------------------------------------------------------------------------------------
# eta and error paths


def test_eta_zero_is_deterministic_and_cannot_score():
    sched = _schedule()
    step = DDIMStep(sched, eta=0.0)
    assert not step.is_stochastic
    g = torch.Generator().manual_seed(8)
    x_t = torch.randn(2, 1, 3, 3, generator=g)
    eps = torch.randn(2, 1, 3, 3, generator=g)
    out = step(eps, x_t, 700, 600)
    assert out.log_prob is None
    assert torch.equal(out.prev_sample, out.mean)
    assert torch.all(out.std == 0)
    # the deterministic DDIM update: sqrt(ᾱ_prev) x̂0 + sqrt(1-ᾱ_prev) ε
    a_t, a_p = sched.alphas_cumprod[700].item(), sched.alphas_cumprod[600].item()
    x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    torch.testing.assert_close(out.mean, math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * eps, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="eta"):
        step(eps, x_t, 700, 600, prev_sample=out.prev_sample)
    with pytest.raises(ValueError, match="eta"):
        step.require_stochastic()


@pytest.mark.parametrize("eta", [-0.1, -1, float("nan"), float("inf"), "1"])
def test_bad_eta_raises(eta):
    with pytest.raises(ValueError, match="eta"):
        DDIMStep(_schedule(), eta=eta)


def test_step_error_paths():
    step = DDIMStep(_schedule(), eta=1.0)
    x = torch.zeros(2, 1, 3, 3)
    with pytest.raises(ValueError, match="shape"):
        step(torch.zeros(2, 1, 3, 4), x, 10, 5)
    with pytest.raises(ValueError, match="prev_sample"):
        step(x, x, 10, 5, prev_sample=torch.zeros(2, 1, 3, 4))
    with pytest.raises(ValueError, match="timesteps"):
        step(x, x, torch.tensor([10, 9, 8]), 5)
    with pytest.raises(ValueError, match="zero variance"):
        step(x, x, 10, 10)  # t_prev == t
    with pytest.raises(ValueError, match="reduction"):
        DDIMStep(_schedule(), eta=1.0, reduction="none")
