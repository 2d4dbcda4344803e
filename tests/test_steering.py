"""Steering: resampling schemes, ESS, guidance formulas, SMC weights, re-indexing, exact-value SMC."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from critic_align.distances import noise_floor, sliced_wasserstein
from critic_align.rollout import sample
from critic_align.steering import (
    Resampling,
    SteerOptions,
    best_of_n,
    effective_sample_size,
    flat_ancestors,
    guidance,
    guidance_best_of_n,
    multinomial,
    resample,
    residual,
    smc,
    stratified,
    systematic,
)
from critic_align.steps import DDIMStep, NoiseSchedule, StepOutput, predict_x0_eps
from critic_align.tasks.gmm import GMMTask, LinearReward

SCHEMES = {"systematic": systematic, "stratified": stratified, "residual": residual, "multinomial": multinomial}


# ---------------------------------------------------------------------------------------------------------
# ESS and resampling
def test_ess_hand_values():
    lw = torch.log(torch.tensor([[1.0, 1, 1, 1], [1, 0, 0, 0], [0.5, 0.5, 0, 0], [3, 1, 0, 0]]))
    # (Σw)²/Σw²: 4, 1, 2, 16/10
    torch.testing.assert_close(effective_sample_size(lw), torch.tensor([4.0, 1.0, 2.0, 1.6]))
    # invariant to a constant shift of the log-weights
    torch.testing.assert_close(effective_sample_size(lw + 123.0), effective_sample_size(lw))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-30, 30), min_size=1, max_size=12))
def test_ess_is_between_1_and_n(values):
    lw = torch.tensor([values], dtype=torch.float64)
    ess = float(effective_sample_size(lw))
    assert 1.0 - 1e-5 <= ess <= len(values) + 1e-4


@pytest.mark.parametrize("name", list(SCHEMES))
def test_resampling_is_unbiased(name):
    """E[copies of particle i] = N·w_i, checked over many draws (Monte Carlo, 6σ bounds)."""
    w = torch.tensor([[0.05, 0.4, 0.15, 0.3, 0.1, 0.0]], dtype=torch.float64)
    n = w.shape[1]
    gen = torch.Generator().manual_seed(0)
    reps = 4000
    counts = torch.zeros(reps, n)
    for r in range(reps):
        idx = SCHEMES[name](w, gen)[0]
        assert idx.shape == (n,) and int(idx.min()) >= 0 and int(idx.max()) < n
        counts[r] = torch.bincount(idx, minlength=n).float()
    mean = counts.mean(0)
    se = counts.std(0) / math.sqrt(reps) + 1e-3
    assert torch.all((mean - n * w[0].float()).abs() < 6 * se + 1e-3), (name, mean, n * w[0])
    assert counts[:, -1].max() == 0  # a zero-weight particle is never copied


def _copy_variance(name, w, reps=3000):
    gen = torch.Generator().manual_seed(1)
    counts = torch.stack([torch.bincount(SCHEMES[name](w, gen)[0], minlength=w.shape[1]).float() for _ in range(reps)])
    return float(counts.var(0).sum())


def test_systematic_has_lower_variance_than_multinomial():
    w = torch.softmax(torch.randn(1, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1.5, -1)
    v_sys, v_multi = _copy_variance("systematic", w), _copy_variance("multinomial", w)
    v_res, v_strat = _copy_variance("residual", w), _copy_variance("stratified", w)
    assert v_sys < 0.5 * v_multi and v_res < v_multi and v_strat < v_multi


def test_residual_keeps_the_deterministic_copies():
    w = torch.tensor([[0.5, 0.26, 0.24]], dtype=torch.float64)  # N=3: floor(1.5)=1, floor(.78)=0, floor(.72)=0
    for seed in range(20):
        idx = residual(w, torch.Generator().manual_seed(seed))[0]
        assert (idx == 0).sum() >= 1


def test_resampling_stays_within_groups():
    g, n = 5, 4
    lw = torch.randn(g, n, generator=torch.Generator().manual_seed(0))
    for scheme in SCHEMES:
        flat = flat_ancestors(resample(lw, scheme, torch.Generator().manual_seed(1)))
        assert flat.shape == (g * n,)
        assert torch.equal(flat // n, torch.arange(g).repeat_interleave(n))


def test_resampling_rejects_bad_log_weights():
    with pytest.raises(ValueError, match="NaN"):
        resample(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="weight 0"):
        resample(torch.full((1, 3), -math.inf))
    with pytest.raises(ValueError, match="scheme"):
        resample(torch.zeros(1, 3), "bogus")


# ---------------------------------------------------------------------------------------------------------
# guidance formulas
def _schedule(prediction_type):
    from diffusers import DDPMScheduler

    return NoiseSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type,
                                                      clip_sample=False, timestep_spacing="trailing"))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_score_guidance_adds_the_gradient_to_the_implied_score(prediction_type):
    """x0 ~ N(0, s²): p_t = N(0, ᾱs² + 1 − ᾱ); guided output's implied score must be score + g."""
    sched = _schedule(prediction_type)
    step = DDIMStep(sched, eta=1.0)
    s2 = 0.3
    t = torch.tensor([900, 500, 100, 20])
    a = sched.alpha_bar(t).double().view(-1, 1)
    x = torch.randn(4, 3, dtype=torch.float64)
    score = -x / (a * s2 + 1 - a)
    eps = -(1 - a).sqrt() * score
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    out = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[prediction_type]
    g = torch.randn(4, 3, dtype=torch.float64)
    guided = step.apply_score_guidance(out, x, t, g)
    _, eps_g = predict_x0_eps(sched, guided, x, a)
    torch.testing.assert_close(-eps_g / (1 - a).sqrt(), score + g)


# ---------------------------------------------------------------------------------------------------------
# SMC weights and invariants
def _gmm():
    task = GMMTask()
    model = task.analytic_eps()
    return task, (lambda x, t, cond: model(x, t)), DDIMStep(task.schedule, eta=1.0)


def test_constant_critic_smc_equals_plain_sampling():
    task, den, step = _gmm()
    ts = task.schedule.timesteps(10)
    x_T = torch.randn(12, 2, generator=torch.Generator().manual_seed(0))
    plain = sample(den, step, x_T, ts, generator=torch.Generator().manual_seed(5))
    res = smc(den, step, x_T, ts, num_particles=4, reward_fn=lambda s, p: s[:, 0],
              value_fn=lambda x, t, c: torch.full((x.shape[0],), 0.7), lam=3.0,
              resampling=Resampling(ess_threshold=0.99), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(res.particles, plain)
    assert not res.resampled.any()
    # the increments telescope from the initial weight λ·V(x_T) to the final λ·r(x0): log w = λ·r exactly
    torch.testing.assert_close(res.log_weights, (3.0 * plain[:, 0].double()).view(3, 4))


def test_guided_proposal_weight_matches_brute_force_density_ratio():
    task, den, step = _gmm()
    ts = torch.tensor([600])
    prev = torch.tensor([300])
    x_T = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    a_vec = torch.tensor([0.8, -0.5])
    value_fn = lambda x, t, c: (x.float() ** 2) @ a_vec  # non-linear: the gradient differs per particle
    lam, w = 1.7, 0.9
    res = smc(den, step, x_T, ts, num_particles=3, reward_fn=lambda s, p: s.sum(1), value_fn=value_fn,
              guidance_scale=w, guidance_max_kl=None, lam=lam, resampling=Resampling(ess_threshold=0.0),
              options=SteerOptions(prev_timesteps=prev), generator=torch.Generator().manual_seed(2))
    x1 = res.particles.double()
    t = ts.expand(6)
    out = den(x_T, t, None)
    grad = 2 * x_T * a_vec
    p = step(out, x_T, t, prev.expand(6), prev_sample=x1.float())
    q = step(step.apply_score_guidance(out, x_T, t, w * grad), x_T, t, prev.expand(6), prev_sample=x1.float())
    log_p = torch.distributions.Normal(p.mean.double(), p.std.double()).log_prob(x1).sum(1)
    log_q = torch.distributions.Normal(q.mean.double(), q.std.double()).log_prob(x1).sum(1)
    # λ·V(x_T) − λ·V(x_T) cancels; what is left: λ·r(x0) + log p − log q
    expected = lam * x1.sum(1) + log_p - log_q
    torch.testing.assert_close(res.log_weights.flatten(), expected, rtol=1e-4, atol=1e-4)


class _TagStep:
    """A stub step that keeps channel 0 (the group tag) fixed and diffuses channel 1."""

    schedule = type("S", (), {"prev_timesteps": staticmethod(lambda ts: ts - 1)})()
    is_stochastic = True

    def require_stochastic(self, what=""):
        pass

    def __call__(self, out, x, t, t_prev, prev_sample=None, generator=None):
        if prev_sample is None:
            noise = torch.randn(x.shape, generator=generator)
            noise[:, 0] = 0
            prev_sample = x + noise
        one = torch.ones(x.shape[0], 1)
        return StepOutput(prev_sample, torch.zeros(x.shape[0]), x, one, x, out)


def test_resampling_keeps_particles_conditioning_and_prompts_aligned():
    g, n = 4, 6
    x_T = torch.zeros(g * n, 2)
    x_T[:, 0] = torch.arange(g).repeat_interleave(n).float()
    cond = torch.arange(g).float().unsqueeze(1) * 10
    seen = []

    def den(x, t, c):
        assert torch.equal(c[:, 0], x[:, 0] * 10), "denoiser got another particle's conditioning"
        return torch.zeros_like(x)

    def value_fn(x, t, c):
        assert torch.equal(c[:, 0], x[:, 0] * 10), "critic got another particle's conditioning"
        seen.append(1)
        return 3 * x[:, 1]  # strongly uneven weights: forces resampling

    def reward_fn(samples, prompts):
        assert [int(p) for p in prompts] == samples[:, 0].long().tolist(), "prompts misaligned"
        return samples[:, 1]

    res = smc(den, _TagStep(), x_T, torch.arange(10, 0, -1), cond, [str(i) for i in range(g)], num_particles=n,
              reward_fn=reward_fn, value_fn=value_fn, lam=1.0, resampling=Resampling(0.9, scheme="multinomial"),
              generator=torch.Generator().manual_seed(0))
    assert res.resampled.any() and len(seen) == 10
    assert torch.equal(res.particles[:, 0], x_T[:, 0])  # every particle stayed in its group
    assert torch.equal(res.samples[:, 0], torch.arange(g).float())


def test_smc_refuses_a_deterministic_step():
    task, den, _ = _gmm()
    with pytest.raises(ValueError, match="deterministic"):
        smc(den, DDIMStep(task.schedule, eta=0.0), torch.randn(4, 2), task.schedule.timesteps(5), num_particles=2,
            reward_fn=lambda s, p: s[:, 0], value_fn=lambda x, t, c: x[:, 0])


def test_steer_rejects_bad_inputs():
    task, den, step = _gmm()
    ts = task.schedule.timesteps(3)
    with pytest.raises(ValueError, match="multiple of num_particles"):
        best_of_n(den, step, torch.randn(5, 2), ts, num_particles=2, reward_fn=lambda s, p: s[:, 0])
    with pytest.raises(ValueError, match="guidance: guidance .*need a value_fn"):
        guidance(den, step, torch.randn(4, 2), ts, value_fn=None, scale=1.0, reward_fn=lambda s, p: s[:, 0])
    with pytest.raises(ValueError, match="non-finite"):
        best_of_n(den, step, torch.randn(4, 2), ts, num_particles=2, reward_fn=lambda s, p: s[:, 0] * float("nan"))
    with pytest.raises(ValueError, match=r"\(batch,\)"):
        smc(den, step, torch.randn(4, 2), ts, num_particles=2, reward_fn=lambda s, p: s[:, 0],
            value_fn=lambda x, t, c: x, resampling=Resampling(0.9))
    # κ·N <= 1: ESS >= 1 so SMC could never resample (it would silently be best-of-N / importance sampling)
    with pytest.raises(ValueError, match="never resample"):
        smc(den, step, torch.randn(4, 2), ts, num_particles=2, reward_fn=lambda s, p: s[:, 0],
            value_fn=lambda x, t, c: x[:, 0], resampling=Resampling(0.5))
    with pytest.raises(ValueError, match=r"\+inf|non-finite"):
        best_of_n(den, step, torch.randn(4, 2), ts, num_particles=2, reward_fn=lambda s, p: s[:, 0] + float("inf"))
    with pytest.raises(ValueError, match="smc: potential must be one of .*its own method, smc_x0"):
        smc(den, step, torch.randn(4, 2), ts, num_particles=2, reward_fn=lambda s, p: s[:, 0],
            value_fn=lambda x, t, c: x[:, 0], potential="x0_reward")
    with pytest.raises(ValueError, match="smc: output must be one of"):
        smc(den, step, torch.randn(4, 2), ts, num_particles=2, reward_fn=lambda s, p: s[:, 0],
            value_fn=lambda x, t, c: x[:, 0], output="best", resampling=Resampling(0.9))


def test_best_of_n_picks_the_highest_reward_per_group():
    task, den, step = _gmm()
    res = best_of_n(den, step, torch.randn(12, 2, generator=torch.Generator().manual_seed(0)),
                    task.schedule.timesteps(5), num_particles=4, reward_fn=lambda s, p: s[:, 0],
                    generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(res.rewards, res.particle_rewards.view(3, 4).max(1).values)
    assert torch.equal(res.samples, res.particles[res.chosen])
    assert torch.equal(res.chosen, res.particle_rewards.view(3, 4).argmax(1) + torch.tensor([0, 4, 8]))
    assert res.cost.nfe == 4 * 5 and res.cost.critic_forward_rows == 0 and res.cost.reward_rows == 12


# ---------------------------------------------------------------------------------------------------------
# exact mixture: SMC with the exact soft value reproduces the tilted target
def test_smc_with_the_exact_value_reproduces_the_tilted_target():
    task, den, step = _gmm()
    lin = LinearReward([1.0, 0.5])
    alpha = 0.5
    ts = task.schedule.timesteps(25)
    g, n = 1500, 8
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(g * n, 2, generator=gen)
    value_fn = lambda x, t, c: task.soft_value(lin, x.double(), t, alpha).float()
    res = smc(den, step, x_T, ts, num_particles=n, reward_fn=lambda s, p: lin(s), value_fn=value_fn, lam=1 / alpha,
              resampling=Resampling(ess_threshold=0.5), output="sample", generator=gen)
    target = lin.tilt(task.final_mixture, alpha)
    d = sliced_wasserstein(res.samples.double(), target.sample(g, torch.Generator().manual_seed(1)).double())
    floor = noise_floor(lambda m, gg: target.sample(m, gg).double(), g, sliced_wasserstein, repeats=5)
    assert d < floor["mean"] + 4 * floor["std"] + 0.01, (d, floor)
    # and it moved: plain samples are far from the target
    plain = sample(den, step, x_T[:g], ts, generator=torch.Generator().manual_seed(3))
    base = sliced_wasserstein(plain.double(), target.sample(g, torch.Generator().manual_seed(2)).double())
    assert base > 3 * d


def test_guidance_and_smc_on_a_flow_matching_step_skip_sigma_one():
    """Rectified flow: the first step (σ = 1) has no guidance; later steps are guided and SMC runs."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from critic_align.steps import FlowMatchSchedule, FlowMatchSDEStep

    sched = FlowMatchSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0))
    step = FlowMatchSDEStep(sched, noise_level=0.7)
    ts = sched.timesteps(6)
    assert float(sched.sigma(ts[0])) == 1.0
    den = lambda x, t, c: -x  # noqa: E731  velocity of data at the origin: v = ε − x0 with x0 = 0
    value_fn = lambda x, t, c: x[:, 0]  # noqa: E731
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    kw = dict(num_particles=2, reward_fn=lambda s, p: s[:, 0])
    plain = best_of_n(den, step, x_T, ts, generator=torch.Generator().manual_seed(1), **kw)
    guided = guidance_best_of_n(den, step, x_T, ts, value_fn=value_fn, scale=0.5,
                                generator=torch.Generator().manual_seed(1), **kw)
    assert guided.cost.critic_backward_rows == 8 * (len(ts) - 1)  # every step but σ = 1
    assert float(guided.particles[:, 0].mean()) > float(plain.particles[:, 0].mean())
    res = smc(den, step, x_T, ts, value_fn=value_fn, lam=2.0, guidance_scale=0.5, resampling=Resampling(0.9),
              generator=torch.Generator(), **kw)
    assert torch.isfinite(res.log_weights).all()


def test_resampling_schedule_every_k_and_window():
    task, den, step = _gmm()
    ts = task.schedule.timesteps(10)
    kw = dict(num_particles=4, reward_fn=lambda s, p: s[:, 0], value_fn=lambda x, t, c: 5 * x[:, 0], lam=1.0)
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    every3 = smc(den, step, x_T, ts, generator=torch.Generator().manual_seed(1), resampling=Resampling(1.0, every=3),
                 **kw)
    steps = every3.resampled.any(1).nonzero().flatten().tolist()
    assert steps and all(k % 3 == 0 for k in steps)
    # potentials are only evaluated where resampling may happen: 4 of 10 steps
    assert every3.cost.critic_forward_rows == 16 * 4
    window = smc(den, step, x_T, ts, generator=torch.Generator().manual_seed(1),
                 resampling=Resampling(1.0, window=(0.5, 1.0)), **kw)
    steps = window.resampled.any(1).nonzero().flatten().tolist()
    assert steps and min(steps) >= 5
    with pytest.raises(ValueError, match=r"Resampling.window must be \(start, end\) fractions"):
        Resampling(1.0, window=(0.8, 0.2))
    with pytest.raises(ValueError, match="Resampling.every .* positive int"):
        Resampling(every=0)
    with pytest.raises(ValueError, match="ess_threshold κ must be in"):
        Resampling(ess_threshold=1.5)
    with pytest.raises(ValueError, match="unknown resampling scheme 'best'"):
        Resampling(scheme="best")
