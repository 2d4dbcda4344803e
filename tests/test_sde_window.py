"""The SDE window (Flow-GRPO-Fast / MixGRPO): only a window of steps stochastic and trained, the rest the ODE.

Checked against a slow step-by-step reference loop, for the DDIM step and the flow-matching SDE step; the trainer
trains exactly the window's (trajectory, step) pairs, on-policy ratio 1, and resumes bit-identically."""

from __future__ import annotations

import pytest
import torch
from test_rollout import lin_denoiser, make_step
from test_trainer import make_trainer, pair_loss, perturb_lora, train_pairs

from critic_align.config import PPOConfig
from critic_align.rollout import sample, sample_trajectories
from critic_align.sde_window import draw_window, sample_window
from critic_align.steps import FlowMatchSchedule, FlowMatchSDEStep


def flow_step():
    return FlowMatchSDEStep(FlowMatchSchedule(shift=3.0), noise_level=0.7)


def reference_window(denoiser, step, x_T, timesteps, window, generator):
    """Slow reference: one step at a time, the stochastic step inside [start, stop), its ODE form outside."""
    prev = step.schedule.prev_timesteps(timesteps)
    x, states, log_probs = x_T, [], []
    for k in range(len(timesteps)):
        inside = window[0] <= k < window[1]
        if k == window[0]:
            states.append(x)
        st = step if inside else step.ode()
        t = timesteps[k].expand(x.shape[0])
        out = st(denoiser(x, t, None), x, t, prev[k], generator=generator if inside else None)
        x = out.prev_sample
        if inside:
            states.append(x)
            log_probs.append(out.log_prob)
    return torch.stack(states, 1), torch.stack(log_probs, 1), x


@pytest.mark.parametrize("make", [make_step, flow_step], ids=["ddim", "flow"])
@pytest.mark.parametrize("window", [(0, 6), (0, 2), (2, 4), (4, 6), (3, 4)])
def test_window_matches_slow_reference(make, window):
    step = make()
    n = 6
    ts = step.schedule.timesteps(n)
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ro = sample_window(lin_denoiser, step, x_T, ts, window, generator=torch.Generator().manual_seed(5))
    lat, lp, x0 = reference_window(lin_denoiser, step, x_T, ts, window, torch.Generator().manual_seed(5))
    w = window[1] - window[0]
    assert ro.num_steps == w and ro.latents.shape == (3, w + 1, 1, 8, 8)
    assert torch.equal(ro.timesteps, ts[window[0]:window[1]])
    torch.testing.assert_close(ro.latents, lat)
    torch.testing.assert_close(ro.log_probs, lp)
    torch.testing.assert_close(ro.final, x0)
    # re-scoring the recorded window transitions gives the recorded log-probs: the on-policy ratio is 1
    for k in range(w):
        t = ro.timesteps[k].expand(3)
        out = step(lin_denoiser(ro.latents[:, k], t, None), ro.latents[:, k], t, ro.prev_timesteps[k],
                   prev_sample=ro.latents[:, k + 1])
        torch.testing.assert_close(out.log_prob, ro.log_probs[:, k], rtol=0, atol=1e-5)


def test_full_window_is_the_plain_rollout_and_ode_outside_is_deterministic():
    step = make_step()
    ts = step.schedule.timesteps(5)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    full = sample_trajectories(lin_denoiser, step, x_T, ts, generator=torch.Generator().manual_seed(3))
    win = sample_window(lin_denoiser, step, x_T, ts, (0, 5), generator=torch.Generator().manual_seed(3))
    assert torch.equal(full.latents, win.latents) and torch.equal(full.log_probs, win.log_probs)
    assert torch.equal(win.final, full.final)
    # the state at the window's start does not depend on the noise: the prefix is the ODE
    a = sample_window(lin_denoiser, step, x_T, ts, (3, 4), generator=torch.Generator().manual_seed(7))
    b = sample_window(lin_denoiser, step, x_T, ts, (3, 4), generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.latents[:, 0], b.latents[:, 0])
    assert torch.equal(a.latents[:, 0], sample(lin_denoiser, step.ode(), x_T, ts[:3],
                                               prev_timesteps=step.schedule.prev_timesteps(ts)[:3]))
    assert not torch.equal(a.final, b.final)
    with pytest.raises(ValueError, match="0 <= start < stop <= 5"):
        sample_window(lin_denoiser, step, x_T, ts, (4, 4))


def test_select_and_cat_carry_x0():
    step = make_step()
    ts = step.schedule.timesteps(4)
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ro = sample_window(lin_denoiser, step, x_T, ts, (1, 3), generator=torch.Generator().manual_seed(3))
    sub = ro.select([2, 0])
    assert torch.equal(sub.final, ro.final[[2, 0]])
    cat = type(ro).cat([ro.select([0, 1]), ro.select([2, 3])])
    assert torch.equal(cat.final, ro.final)


def test_config_checks_the_window():
    PPOConfig(sde_window_size=2, num_inference_steps=10, sde_window_range=[0, 3])
    with pytest.raises(ValueError, match="sde_window_size"):
        PPOConfig(sde_window_size=11, num_inference_steps=10)
    with pytest.raises(ValueError, match="sde_window_range.*= 8 "):
        PPOConfig(sde_window_size=2, num_inference_steps=10, sde_window_range=[0, 9])
    with pytest.raises(ValueError, match="only used with sde_window_size"):
        PPOConfig(sde_window_range=[0, 1])
    with pytest.raises(ValueError, match="algorithm: ppo"):
        PPOConfig(sde_window_size=2, algorithm="nft", advantage="grpo")


def test_trainer_trains_only_the_window(tmp_path):
    tr = make_trainer(tmp_path, sde_window_size=2, sde_window_range=[1, 2], num_inference_steps=4)
    perturb_lora(tr)
    starts = {draw_window(tr.config, tr.generator)[0] for _ in range(40)}
    assert starts == {1, 2}
    win = draw_window(tr.config, tr.generator)
    ro = tr.compute_advantages(tr.rollout(tr.prompt_iter.batch(2, 4), window=win))
    assert ro.num_steps == 2 and ro.values.shape[:2] == (8, 2) and ro.advantages.shape == (8, 2)
    assert torch.equal(ro.timesteps, tr.timesteps[win[0]:win[1]])
    assert len(train_pairs(tr, ro)) == 8 * 2
    _, stats = pair_loss(tr, ro, train_pairs(tr, ro))
    assert abs(stats["ratio_max"] - 1) < 1e-5 and abs(stats["ratio_min"] - 1) < 1e-5
    row = tr.train_epoch().metrics
    assert row["sde_window_start"] in (1, 2)


def test_window_resume_equals_uninterrupted(tmp_path):
    kw = dict(num_epochs=3, sde_window_size=2)
    straight = make_trainer(tmp_path / "a", **kw)
    hist_a = straight.train()
    first = make_trainer(tmp_path / "b", **kw)
    hist_b = first.train(num_epochs=1)
    from critic_align.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(tmp_path / "b" / "run" / "checkpoints")
    torch.manual_seed(999)
    resumed = make_trainer(tmp_path / "b", **kw)
    resumed.load(ckpt)
    hist_b += resumed.train()
    drop = {"time_rollout_s", "time_update_s", "time_epoch_s", "time_s"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in hist_a] == \
        [{k: v for k, v in r.items() if k not in drop} for r in hist_b]
    assert len({r["sde_window_start"] for r in hist_a if "sde_window_start" in r}) >= 1


def test_window_record_names_every_step_or_a_span():
    """Window: EVERY_STEP (no window) or (start, stop); of() takes what callers name; its sampler and metrics row."""
    from critic_align.sde_window import EVERY_STEP, Window

    assert Window.of(None) is EVERY_STEP and EVERY_STEP.every_step and EVERY_STEP.metrics() == {}
    w = Window.of((1, 3))
    assert w == Window(1, 3) and tuple(w) == (1, 3) and w[0] == 1 and not w.every_step
    assert Window.of(w) == w and w.metrics() == {"sde_window_start": 1}
    for bad in ((3, 3), (-1, 2), (None, 2), (2, 1)):
        with pytest.raises(ValueError, match="0 <= start < stop, or None"):
            Window.of(bad)
    step = make_step()
    ts = step.schedule.timesteps(5)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    full = EVERY_STEP.sample(lin_denoiser, step, x_T, ts, generator=torch.Generator().manual_seed(4))
    ref = sample_trajectories(lin_denoiser, step, x_T, ts, generator=torch.Generator().manual_seed(4))
    assert full.x0 is None and torch.equal(full.latents, ref.latents) and torch.equal(full.log_probs, ref.log_probs)
    win = w.sample(lin_denoiser, step, x_T, ts, generator=torch.Generator().manual_seed(4))
    direct = sample_window(lin_denoiser, step, x_T, ts, (1, 3), generator=torch.Generator().manual_seed(4))
    assert win.num_steps == 2 and torch.equal(win.latents, direct.latents) and torch.equal(win.final, direct.final)


def test_draw_window_leaves_the_generator_alone_without_a_window():
    from critic_align.sde_window import EVERY_STEP

    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    assert draw_window(PPOConfig(num_inference_steps=10), g) is EVERY_STEP
    assert torch.equal(g.get_state(), state)  # a run without a window draws the same noise as before windows existed
    cfg = PPOConfig(sde_window_size=3, num_inference_steps=10)  # starts anywhere in [0, 10 - 3]
    starts = {draw_window(cfg, g).start for _ in range(200)}
    assert starts == set(range(8))
    assert {tuple(draw_window(cfg, g)) for _ in range(20)} <= {(s, s + 3) for s in range(8)}
