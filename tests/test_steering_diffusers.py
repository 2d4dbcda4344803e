"""Steering diffusers pipelines: scheduler checks, SMC callback (constant value == plain, re-indexing), guidance wrapper."""

from __future__ import annotations

import pytest
import torch
from test_sd_pipelines import tiny_sd15_pipeline

from critic_align.steering import SteerResult, effective_sample_size
from critic_align.steering.diffusers import ScoreGuidedScheduler, SMCCallback, check_stochastic_scheduler, steer_pipeline
from critic_align.steps import DDIMStep, NoiseSchedule


def _sched(name, **kw):
    import diffusers

    base = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return getattr(diffusers, name)(**base, **kw)


def test_scheduler_checks_name_the_problem():
    with pytest.raises(ValueError, match="eta=0 is deterministic"):
        check_stochastic_scheduler(_sched("DDIMScheduler"), eta=0.0)
    check_stochastic_scheduler(_sched("DDIMScheduler"), eta=1.0)
    check_stochastic_scheduler(_sched("DDPMScheduler"))
    check_stochastic_scheduler(_sched("EulerAncestralDiscreteScheduler"))
    check_stochastic_scheduler(_sched("DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++"))
    for name in ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "PNDMScheduler"):
        with pytest.raises(ValueError, match="deterministic or unsupported.*EulerAncestral"):
            check_stochastic_scheduler(_sched(name))
    with pytest.raises(ValueError, match="second order"):
        check_stochastic_scheduler(_sched("KDPM2AncestralDiscreteScheduler"))


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_sd15_pipeline(tmp_path_factory.mktemp("sd15"))


def _call(pipe, prompts, n, seed, **kw):
    return pipe(prompts, num_images_per_prompt=n, num_inference_steps=4, guidance_scale=1.0, output_type="pt",
                generator=torch.Generator().manual_seed(seed), **kw).images


@pytest.mark.parametrize("scheduler", ["DDPMScheduler", "EulerAncestralDiscreteScheduler"])
def test_constant_value_smc_callback_equals_plain_pipeline(pipe, scheduler):
    original = pipe.scheduler
    pipe.scheduler = _sched(scheduler)
    try:
        plain = _call(pipe, ["a cat", "a dog"], 3, seed=0)
        cb = SMCCallback(lambda x, t, c: torch.full((x.shape[0],), 0.3), num_particles=3, lam=5.0, ess_threshold=0.99)
        steered = _call(pipe, ["a cat", "a dog"], 3, seed=0, callback_on_step_end=cb,
                        callback_on_step_end_tensor_inputs=cb.tensor_inputs)
    finally:
        pipe.scheduler = original
    torch.testing.assert_close(steered, plain)
    # the last step is not evaluated: its potential would be replaced by λ·r at once
    assert not torch.stack(cb.resampled_history).any() and cb.value_rows == 3 * 6


def test_smc_callback_resamples_within_groups_and_reindexes_embeddings(pipe):
    original = pipe.scheduler
    pipe.scheduler = _sched("DDPMScheduler")
    n = 4
    seen = {}

    def value_fn(latents, t, cond):
        seen.setdefault("cond", []).append(cond.clone())
        return 20 * latents.flatten(1).mean(1)  # uneven: forces resampling

    cb = SMCCallback(value_fn, num_particles=n, lam=1.0, ess_threshold=0.99, scheme="multinomial",
                     generator=torch.Generator().manual_seed(0))
    outputs = []

    def spy(p, i, t, kw):
        before = kw["prompt_embeds"].clone()
        out = cb(p, i, t, kw)
        outputs.append((before, out))
        return out

    try:
        _call(pipe, ["a cat", "a dog"], n, seed=1, callback_on_step_end=spy,
              callback_on_step_end_tensor_inputs=cb.tensor_inputs)
    finally:
        pipe.scheduler = original
    assert torch.stack(cb.resampled_history).any()
    for before, out in outputs:
        if "prompt_embeds" in out:
            # rows stay with their prompt group: every row of group g equals the group's original embedding
            after = out["prompt_embeds"]
            for g in range(2):
                for r in range(g * n, (g + 1) * n):
                    torch.testing.assert_close(after[r], before[g * n])
    # the critic always got the conditioning of its own particles (one embedding per group)
    for cond in seen["cond"]:
        assert not torch.equal(cond[0], cond[n]) and torch.equal(cond[0], cond[n - 1])


def test_steer_pipeline_best_of_n_and_smc(pipe):
    original = pipe.scheduler
    pipe.scheduler = _sched("DDIMScheduler")
    reward = lambda images, prompts: images.mean(dim=(1, 2, 3))  # noqa: E731
    try:
        bon = steer_pipeline(pipe, ["a cat", "a dog"], num_particles=3, reward_fn=reward, num_inference_steps=4,
                             guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
        assert isinstance(bon, SteerResult) and bon.samples.shape == (2, 3, 16, 16)
        torch.testing.assert_close(bon.rewards, bon.particle_rewards.view(2, 3).max(1).values)
        # the chosen images are particles; decoded is what the reward saw ([-1, 1]); best-of-N has no weights
        assert torch.equal(bon.samples, bon.particles[bon.chosen]) and torch.equal(bon.decoded, bon.samples * 2 - 1)
        assert torch.equal(bon.rewards, reward(bon.decoded, None))
        assert torch.equal(bon.log_weights, torch.zeros(2, 3, dtype=torch.float64))
        assert bon.ess.shape == (5, 2) and bon.ess.isnan().all() and not bon.resampled.any()
        # 4 steps of 6 rows through the UNet (guidance_scale=1: no CFG batch), 6 decodes and reward rows, no critic
        c = bon.cost
        assert (c.backbone_rows, c.reward_rows, c.decode_rows, c.critic_forward_rows, c.num_outputs) == (24, 6, 6, 0, 2)
        assert c.nfe == 12
        with pytest.raises(ValueError, match="eta=0"):
            steer_pipeline(pipe, "a cat", num_particles=2, reward_fn=reward, value_fn=lambda x, t, c: x.mean((1, 2, 3)),
                           num_inference_steps=3, guidance_scale=1.0, eta=0.0)
        res = steer_pipeline(pipe, "a cat", num_particles=3, reward_fn=reward, eta=1.0, lam=50.0,
                             value_fn=lambda x, t, c: x.flatten(1).mean(1), ess_threshold=0.99,
                             num_inference_steps=4, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
        assert res.samples.shape[0] == 1 and res.log_weights.shape == (1, 3)
        # rows 1..3: the callback's ESS after steps 0..2 (the last step is not weighed), row 4 the final ESS
        assert res.ess.shape == (5, 1) and res.ess[0].isnan().all() and not res.ess[1:].isnan().any()
        torch.testing.assert_close(res.final_ess, effective_sample_size(res.log_weights).float())
        assert res.resampled.shape == (4, 1) and not res.resampled[0].any()
        # the value ran on 3 rows after each step but the last; CFG at guidance_scale 1 is off (one row per sample)
        assert res.cost.critic_forward_rows == 3 * 3 and res.cost.backbone_rows == 3 * 4
        cfg = steer_pipeline(pipe, "a cat", num_particles=2, reward_fn=reward, num_inference_steps=3, guidance_scale=3.0,
                             generator=torch.Generator().manual_seed(0))
        assert cfg.cost.backbone_rows == 2 * 2 * 3  # CFG: the unconditional and conditional rows of every sample
    finally:
        pipe.scheduler = original
    assert pipe.scheduler is original


def test_score_guided_scheduler_vp_matches_the_step_formula():
    sched = _sched("DDIMScheduler", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(10)
    a_vec = torch.randn(1, 4, 1, 1)
    value_fn = lambda x, t, c: (x * a_vec).flatten(1).sum(1)  # noqa: E731  ∇V = a
    wrapped = ScoreGuidedScheduler(sched, value_fn, scale=2.0)
    x = torch.randn(2, 4, 8, 8)
    eps = torch.randn(2, 4, 8, 8)
    t = sched.timesteps[3]
    got = wrapped.step(eps, t, x, eta=0.0).prev_sample
    step = DDIMStep(NoiseSchedule.from_scheduler(sched), eta=0.0)
    expected_out = step.apply_score_guidance(eps, x, t, 2.0 * a_vec.expand_as(x))
    want = sched.step(expected_out, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(got, want)
    assert wrapped.rows == 2
    assert ScoreGuidedScheduler(sched, value_fn, 0.0).step(eps, t, x, eta=0.0).prev_sample.equal(
        sched.step(eps, t, x, eta=0.0).prev_sample)


def test_score_guided_scheduler_euler_shifts_the_score_of_the_ve_latents():
    """Euler latents x = x0 + σ·ε: the guided ε must satisfy −ε'/σ = −ε/σ + ∇_x V(x/√(1+σ²))."""
    sched = _sched("EulerAncestralDiscreteScheduler")
    sched.set_timesteps(10)
    captured = {}

    class Spy:
        def __getattr__(self, k):
            return getattr(sched, k)

        def step(self, out, t, x, **kw):
            captured["out"] = out
            return sched.step(out, t, x, **kw)

    a_vec = torch.randn(1, 4, 1, 1)
    value_fn = lambda x, t, c: ((x * a_vec) ** 2).flatten(1).sum(1)  # noqa: E731  non-linear
    wrapped = ScoreGuidedScheduler(Spy(), value_fn, scale=1.5)
    object.__setattr__(wrapped, "kind", "sigma")
    t = sched.timesteps[2]
    sigma = sched.sigmas[sched.index_for_timestep(t)]
    x = torch.randn(2, 4, 8, 8) * (sigma**2 + 1).sqrt()
    eps = torch.randn(2, 4, 8, 8)
    sched._step_index = None
    wrapped.step(eps, t, x, generator=torch.Generator().manual_seed(0))
    c = 1 / (sigma**2 + 1).sqrt()
    grad_x = 1.5 * 2 * (x * c) * a_vec**2 * c  # ∇_x of V(c·x), times the scale
    torch.testing.assert_close(-captured["out"] / sigma, -eps / sigma + grad_x, rtol=1e-4, atol=1e-4)


def test_dpm_solver_sde_history_follows_the_particles(pipe):
    """DPM-Solver++ (SDE, multistep) keeps the last model outputs per sample: they are re-indexed with the latents."""
    original = pipe.scheduler
    pipe.scheduler = _sched("DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++", solver_order=2)
    n = 3
    cb = SMCCallback(lambda x, t, c: 30 * x.flatten(1).mean(1), num_particles=n, lam=1.0, ess_threshold=0.99,
                     scheme="multinomial", generator=torch.Generator().manual_seed(0))
    checked = []

    def spy(p, i, t, kw):
        hist_before = [h.clone() if isinstance(h, torch.Tensor) else None for h in p.scheduler.model_outputs]
        out = cb(p, i, t, kw)
        if "latents" in out:
            # recover the ancestors from the latents and check the history moved with them
            lat, new = kw["latents"], out["latents"]
            anc = torch.tensor([next(j for j in range(lat.shape[0]) if torch.equal(new[r], lat[j]))
                                for r in range(new.shape[0])])
            for h_old, h_new in zip(hist_before, p.scheduler.model_outputs):
                if h_old is not None:
                    torch.testing.assert_close(h_new, h_old[anc])
                    checked.append(i)
        return out

    try:
        _call(pipe, ["a cat"], n, seed=2, callback_on_step_end=spy, callback_on_step_end_tensor_inputs=cb.tensor_inputs)
    finally:
        pipe.scheduler = original
    assert checked, "no resampling happened with history present"


def test_scheduler_noise_level_is_the_vp_equivalent_for_every_family():
    """Value functions see VP-scaled inputs: an Euler scheduler's σ maps to ᾱ = 1/(1+σ²), which must be the VP
    schedule's ᾱ_t at the same timestep; flow matching maps σ to (1−σ)²/((1−σ)²+σ²)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from critic_align.steering.diffusers import scheduler_noise_level

    ddim = _sched("DDIMScheduler")
    euler = _sched("EulerAncestralDiscreteScheduler")
    euler.set_timesteps(10)
    for k in (0, 4, 9):
        t = euler.timesteps[k]
        lv = scheduler_noise_level(euler, t, step_index=k)
        torch.testing.assert_close(lv.alpha_bar, ddim.alphas_cumprod[int(t)].double(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(lv.sigma, euler.sigmas[k].double())
        vp = scheduler_noise_level(ddim, t)
        torch.testing.assert_close(vp.alpha_bar, ddim.alphas_cumprod[int(t)].double())
    flow = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    flow.set_timesteps(5)
    lv = scheduler_noise_level(flow, flow.timesteps[2], step_index=2)
    s = flow.sigmas[2].double()
    torch.testing.assert_close(lv.alpha_bar, (1 - s) ** 2 / ((1 - s) ** 2 + s**2))
