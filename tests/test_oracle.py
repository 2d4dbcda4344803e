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
