"""The oracle value source (critic_align/oracle.py): exact on the mixture within its Monte-Carlo error, the policy's own
sampler for its continuations, and its reward queries and backbone calls counted apart."""

import torch

from critic_align.oracle import explained_variance, oracle_values, oracle_values_at, rollout_oracle_values
from critic_align.rollout import sample
from critic_align.sde_window import sample_window
from critic_align.steps import make_step
from critic_align.tasks.gmm import GaussianMixture, GMMTask, LinearReward, default_mixture

W = (1.0, 0.5)


def _setup(mixture, steps, eta=1.0):
    task = GMMTask(mixture)
    eps = task.analytic_eps()
    return task, make_step(task.scheduler, eta), task.schedule.timesteps(steps), (lambda x, t, c: eps(x, t))


def _states(task, ts, j, n, g):
    return task.mixture.noised(float(task.schedule.alpha_bar(ts[j]))).sample(n, g).float()


def test_single_gaussian_value_is_exact_within_mc_error():
    # one Gaussian component, linear reward, DDPM-like sampler (eta = 1): every step's mean is the exact conditional
    # mean and E[x0 | x_s] is affine, so the sampler's E[R | x_t] is the closed form for any number of steps
    task, step, ts, den = _setup(GaussianMixture(torch.tensor([[1.0, -0.5]]), torch.ones(1), 0.6), 10)
    lin = LinearReward(W)
    g = torch.Generator().manual_seed(0)
    for j in (0, 5, 8):
        x = _states(task, ts, j, 6, g)
        ov = oracle_values(den, step, x, j, ts, None, lambda f, p: lin(f)[:, None], 4000, g)
        exact = task.value(lin, x.double(), ts[j])
        err = (ov.values[:, 0].double() - exact).abs()
        assert (ov.stderr > 0).all()
        assert (err < 4.5 * ov.stderr[:, 0].double()).all(), (err, ov.stderr)


def test_mixture_value_matches_closed_form_with_fine_sampler():
    # the 8-component mixture: a 100-step sampler's value is the exact posterior value up to MC error (4 s.e.) and a
    # small discretisation allowance (0.005)
    task, step, ts, den = _setup(default_mixture(), 100)
    lin = LinearReward(W)
    g = torch.Generator().manual_seed(1)
    for j in (0, 50, 98):
        x = _states(task, ts, j, 6, g)
        ov = oracle_values(den, step, x, j, ts, None, lambda f, p: lin(f)[:, None], 3000, g)
        exact = task.value(lin, x.double(), ts[j])
        err = (ov.values[:, 0].double() - exact).abs()
        assert (err < 4 * ov.stderr[:, 0].double() + 0.005).all(), (err, ov.stderr)


class _Counting:
    def __init__(self, den):
        self.den, self.rows = den, 0

    def __call__(self, x, t, c):
        self.rows += x.shape[0]
        return self.den(x, t, c)


def test_counts_apart_and_window_future_is_deterministic():
    task, step, ts, den = _setup(default_mixture(), 10)
    lin = LinearReward(W)
    calls = {"rows": 0}

    def reward(f, p):
        calls["rows"] += f.shape[0]
        return lin(f)[:, None]

    cd = _Counting(den)
    g = torch.Generator().manual_seed(2)
    x = _states(task, ts, 3, 5, g)
    ov = oracle_values(cd, step, x, 3, ts, None, reward, 7, g, chunk=8)   # chunks of 8 rows over 35 rows
    assert ov.counts.reward_queries == 35 == calls["rows"]
    assert ov.counts.nfe == 35 * (10 - 3) == cd.rows
    # past the SDE window's end the policy's sampler is its ODE: one continuation, zero stderr, = the ODE's sample
    cd.rows, calls["rows"] = 0, 0
    ov = oracle_values(cd, step, x, 6, ts, None, reward, 7, g, stochastic_stop=6)
    assert ov.counts.reward_queries == 5 and ov.counts.nfe == 5 * 4 and (ov.stderr == 0).all()
    prev = step.schedule.prev_timesteps(ts)
    ode_final = sample(den, step.ode(), x, ts[6:], None, prev_timesteps=prev[6:])
    torch.testing.assert_close(ov.values[:, 0], lin(ode_final))


def test_continuations_use_the_given_sampler():
    # a shifted denoiser is a different policy: its oracle value is that policy's, not the task's exact one
    task, step, ts, den = _setup(GaussianMixture(torch.tensor([[0.0, 0.0]]), torch.ones(1), 0.5), 10)
    lin = LinearReward(W)
    g = torch.Generator().manual_seed(3)
    x = _states(task, ts, 2, 4, g)

    def shifted(x, t, c):
        return den(x, t, c) - 0.3  # ε lower by 0.3: x̂0 higher along every coordinate

    base = oracle_values(den, step, x, 2, ts, None, lambda f, p: lin(f)[:, None], 2000, g)
    moved = oracle_values(shifted, step, x, 2, ts, None, lambda f, p: lin(f)[:, None], 2000, g)
    assert (moved.values - base.values > 10 * (moved.stderr + base.stderr)).all()


def test_rollout_values_and_mixed_timesteps():
    task, step, ts, den = _setup(default_mixture(), 10)
    lin = LinearReward(W)
    g = torch.Generator().manual_seed(4)
    x_T = torch.randn(6, 2, generator=g)
    ro = sample_window(den, step, x_T, ts, (3, 6), generator=g)
    ov = rollout_oracle_values(den, step, ro.latents, 3, ts, None, lambda f, p: lin(f)[:, None], 5, g,
                               stochastic_stop=6)
    assert ov.values.shape == (6, 3, 1)
    assert ov.counts.reward_queries == 6 * 5 * 3 and ov.counts.nfe == 6 * 5 * (7 + 6 + 5)
    # with the deterministic sampler, grouping rows by timestep gives each row's own continuation exactly
    ode = step.ode()
    xs = ro.latents[:, :3].reshape(18, 2)
    tt = ts[3:6].repeat(6)
    at = oracle_values_at(den, ode, xs, tt, ts, None, lambda f, p: lin(f)[:, None], 5, g)
    for k in range(3):
        one = oracle_values(den, ode, ro.latents[:, k], 3 + k, ts, None, lambda f, p: lin(f)[:, None], 5, g)
        torch.testing.assert_close(at.values.view(6, 3, 1)[:, k], one.values)
        assert one.counts.reward_queries == 6  # a deterministic future: one continuation


def test_explained_variance_subtracts_mc_noise():
    g = torch.Generator().manual_seed(5)
    v = torch.randn(20000, generator=g)
    r = v + torch.randn(20000, generator=g)          # EV of the exact value = 0.5
    noisy = v + 0.5 * torch.randn(20000, generator=g)  # its estimate with MC noise variance 0.25
    assert abs(explained_variance(v, r) - 0.5) < 0.02
    assert explained_variance(noisy, r) < 0.4
    assert abs(explained_variance(noisy, r, torch.full((20000,), 0.25)) - 0.5) < 0.03


def _flow_setup(n=6):
    from critic_align.steps import FlowMatchSchedule, FlowMatchSDEStep

    schedule = FlowMatchSchedule()
    m = torch.tensor([1.0, -0.5])
    # an affine velocity field: each SDE step's mean is then affine in x, so E[final | x_t] is the chain of step means
    return FlowMatchSDEStep(schedule, noise_level=0.7), schedule.timesteps(n), (lambda x, t, c: 0.8 * x - m)


def test_flow_match_sde_value_is_the_mean_of_k_continuations():
    # the rectified-flow SDE step (digits_dit's): the estimate is the mean of exactly the K continuations the step
    # draws from the generator, stderr their sample std / sqrt(K)
    step, ts, den = _flow_setup()
    lin = LinearReward(W)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(6))
    ov = oracle_values(den, step, x, 2, ts, None, lambda f, p: lin(f)[:, None], 3, torch.Generator().manual_seed(7))
    g, xr = torch.Generator().manual_seed(7), x.repeat_interleave(3, dim=0)
    prev = torch.cat([ts[1:], torch.zeros(1)])
    for j in range(2, 6):
        t = ts[j].expand(12)
        xr = step(den(xr, t, None), xr, t, prev[j].expand(12), generator=g).prev_sample
    r = lin(xr).view(4, 3)
    torch.testing.assert_close(ov.values[:, 0], r.mean(1))
    torch.testing.assert_close(ov.stderr[:, 0], r.std(1) / 3**0.5)
    assert ov.counts.reward_queries == 12 and ov.counts.nfe == 12 * 4


def test_flow_match_sde_value_of_a_linear_reward_is_the_chain_of_step_means():
    step, ts, den = _flow_setup()
    lin = LinearReward(W)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(8))
    ov = oracle_values(den, step, x, 1, ts, None, lambda f, p: lin(f)[:, None], 4000, torch.Generator().manual_seed(9))
    prev, xm = torch.cat([ts[1:], torch.zeros(1)]), x.double()
    for j in range(1, 6):  # zero-mean Gaussian noise on an affine map: the expectation follows the means
        t = ts[j].expand(3)
        xm = step(den(xm, t, None), xm, t, prev[j].expand(3), generator=torch.Generator()).mean
    err = (ov.values[:, 0].double() - lin(xm).double()).abs()
    assert (ov.stderr > 0).all() and (err < 4.5 * ov.stderr[:, 0].double()).all(), (err, ov.stderr)


def test_flow_match_future_past_the_window_is_the_euler_ode():
    # from the window's end on, the policy's sampler is the Euler ODE x + (σ' − σ)·v: one continuation, by hand
    step, ts, den = _flow_setup()
    lin = LinearReward(W)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(10))
    ov = oracle_values(den, step, x, 3, ts, None, lambda f, p: lin(f)[:, None], 7, torch.Generator(), stochastic_stop=3)
    sig = torch.cat([ts / 1000, torch.zeros(1)]).double()
    xe = x.double()
    for j in range(3, 6):
        xe = xe + (sig[j + 1] - sig[j]) * den(xe, None, None)
    assert ov.counts.reward_queries == 5 and ov.counts.nfe == 5 * 3 and (ov.stderr == 0).all()
    torch.testing.assert_close(ov.values[:, 0].double(), lin(xe).double(), rtol=1e-5, atol=1e-5)
