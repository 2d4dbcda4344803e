"""steer_pipeline and ScoreGuidedScheduler on tiny SD1.5 (VP, UNet) and SD3 (flow matching, MMDiT) pipelines, with a
critic built on the pipeline's own denoiser and with a plain value function: value functions get the denoiser's
input convention (the model input, the timestep, the positive conditioning in the adapter's format)."""

from __future__ import annotations

import pytest
import torch
from test_sd_pipelines import PROMPTS, brightness, tiny_sd3_pipeline, tiny_sd15_pipeline

from critic_align.cond import TextCond
from critic_align.critic import build_critic
from critic_align.steering import critic_value_fn
from critic_align.steering.diffusers import steer_pipeline
from critic_align.tasks.sd import StableDiffusionTask

PAIR = ["a cat", "a dog"]


def _setup(kind, tmp_path):
    if kind == "sd15":
        from diffusers import DDPMScheduler

        pipe = tiny_sd15_pipeline(tmp_path)
        pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        task = StableDiffusionTask(pipe, PROMPTS)
        extra = {}
    else:
        from diffusers import FlowMatchEulerDiscreteScheduler

        pipe = tiny_sd3_pipeline(tmp_path)
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, stochastic_sampling=True)
        task = StableDiffusionTask(pipe, PROMPTS, max_sequence_length=8)
        extra = {"max_sequence_length": 8}
    torch.manual_seed(0)
    critic = build_critic(task.backbone(), mode="full", hidden_dim=16, num_heads=2)
    return pipe, task, critic, extra


def _check_cond(kind, task, cond, m, n):
    """cond is the positive conditioning per latent row, in the adapter's format (CFG's negative half removed)."""
    ref = task.encode(PAIR)
    if kind == "sd15":
        assert isinstance(cond, torch.Tensor) and cond.shape[0] == m
        torch.testing.assert_close(cond, ref.repeat_interleave(n, 0))
    else:
        assert isinstance(cond, TextCond) and len(cond) == m
        torch.testing.assert_close(cond.embeds, ref.embeds.repeat_interleave(n, 0))
        torch.testing.assert_close(cond.pooled, ref.pooled.repeat_interleave(n, 0))


@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_smc_on_a_pipeline_with_its_critic(kind, tmp_path):
    pipe, task, critic, extra = _setup(kind, tmp_path)
    value = critic_value_fn(critic)
    seen = []

    def value_fn(x, t, cond):
        seen.append((x.shape, t.clone(), cond))
        return value(x, t, cond)

    n = 3
    res = steer_pipeline(pipe, PAIR, num_particles=n, reward_fn=brightness, value_fn=value_fn, lam=20.0,
                         ess_threshold=0.9, num_inference_steps=4, guidance_scale=2.0,
                         generator=torch.Generator().manual_seed(0), **extra)
    assert res.samples.shape == (2, 3, 16, 16) and res.log_weights.shape == (2, n)
    assert res.final_ess.shape == (2,) and bool(((res.final_ess >= 1) & (res.final_ess <= n)).all())
    assert len(seen) == 3 and res.cost.critic_forward_rows == 3 * 2 * n  # every step but the last (replaced by λ·r)
    assert res.cost.backbone_rows == 4 * 2 * (2 * n)  # CFG (guidance_scale 2): two rows per sample and step
    ts = pipe.scheduler.timesteps
    for k, (shape, t, cond) in enumerate(seen):
        assert shape == (2 * n, 4, 8, 8)
        torch.testing.assert_close(t, ts[k + 1].expand(2 * n).to(t.dtype))  # the next step's denoiser timestep
        _check_cond(kind, task, cond, 2 * n, n)
    # SMC's default output draws ∝ the final weights: the picked rows are particles with positive weight
    lw = res.log_weights.flatten()
    assert torch.isfinite(lw[res.chosen]).all()


@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_score_guided_scheduler_on_a_pipeline_with_its_critic(kind, tmp_path):
    pipe, task, critic, extra = _setup(kind, tmp_path)
    value = critic_value_fn(critic)
    seen = []

    def value_fn(x, t, cond):
        seen.append(cond)
        return value(x, t, cond)

    n = 2
    kw = dict(num_particles=n, reward_fn=brightness, num_inference_steps=3, guidance_scale=2.0, **extra)
    plain = steer_pipeline(pipe, PAIR, generator=torch.Generator().manual_seed(0), **kw).samples
    res = steer_pipeline(pipe, PAIR, guidance_value_fn=value_fn, guidance_scale_value=50.0,
                         generator=torch.Generator().manual_seed(0), **kw)
    guided = res.samples
    # flow matching skips σ = 1 (the first step): no guidance is defined there
    steps_guided = 3 if kind == "sd15" else 2
    assert len(seen) == steps_guided and res.cost.critic_backward_rows == steps_guided * 2 * n
    assert res.cost.critic_forward_rows == res.cost.critic_backward_rows  # a forward and a backward per guided row
    assert res.guidance_factor.isnan().tolist() == ([False] * 3 if kind == "sd15" else [True, False, False])
    for cond in seen:
        _check_cond(kind, task, cond, 2 * n, n)
    assert not torch.allclose(plain, guided)  # the guidance moved the samples
    # the hook is removed afterwards: a plain call sees no wrapper
    assert type(pipe.scheduler).__name__ != "ScoreGuidedScheduler"
    denoiser = pipe.unet if kind == "sd15" else pipe.transformer
    assert not denoiser._forward_pre_hooks


@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_smc_on_a_pipeline_with_a_plain_value_function_and_a_hard_constraint(kind, tmp_path):
    pipe, _, _, extra = _setup(kind, tmp_path)
    n = 4

    def reward_fn(images, prompts):  # −inf: the darkest image of each batch violates the constraint
        r = brightness(images, prompts)
        return torch.where(r > r.min(), r, torch.full_like(r, float("-inf")))

    res = steer_pipeline(pipe, PAIR, num_particles=n, reward_fn=reward_fn,
                         value_fn=lambda x, t, c: x.flatten(1).mean(1), lam=30.0, ess_threshold=0.9,
                         num_inference_steps=3, guidance_scale=1.0, generator=torch.Generator().manual_seed(1), **extra)
    assert torch.isfinite(res.rewards).all()
    best = steer_pipeline(pipe, PAIR, num_particles=n, reward_fn=reward_fn,
                          value_fn=lambda x, t, c: x.flatten(1).mean(1), lam=30.0, ess_threshold=0.9,
                          output="argmax", num_inference_steps=3, guidance_scale=1.0,
                          generator=torch.Generator().manual_seed(1), **extra)
    torch.testing.assert_close(best.rewards, best.particle_rewards.view(2, n).max(1).values)


def test_flux_pipeline_value_functions_get_the_adapters_layout_and_conditioning(tmp_path):
    """FLUX packs its latents into tokens and its callback offers no pooled embeddings: SMC and value guidance still
    hand value functions the adapter's (M, C, H, W) latents and a TextCond, so a FLUX critic steers the pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from test_flux import tiny_flux_pipeline

    from critic_align.tasks.flux import FluxTask

    pipe = tiny_flux_pipeline(tmp_path)
    task = FluxTask(pipe, PROMPTS, resolution=16, max_sequence_length=8)  # built on the pipeline's own scheduler
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, stochastic_sampling=True)
    torch.manual_seed(0)
    critic = build_critic(task.backbone(), mode="full", hidden_dim=16, num_heads=2)
    value = critic_value_fn(critic)
    seen = []

    def value_fn(x, t, cond):
        seen.append((tuple(x.shape), cond))
        return value(x, t, cond)

    n = 2
    kw = dict(height=16, width=16, max_sequence_length=8, num_inference_steps=3)
    res = steer_pipeline(pipe, PAIR, num_particles=n, reward_fn=brightness, value_fn=value_fn, lam=20.0,
                         ess_threshold=0.9, generator=torch.Generator().manual_seed(0), **kw)
    assert res.samples.shape[0] == 2 and res.cost.critic_forward_rows == 2 * 2 * n
    assert res.cost.backbone_rows == 3 * 2 * n  # FLUX's transformer runs the packed tokens, one row per sample
    ref = task.encode(PAIR)
    for shape, cond in seen:
        assert shape == (2 * n, *task.latent_shape)
        assert isinstance(cond, TextCond)
        torch.testing.assert_close(cond.embeds, ref.embeds.repeat_interleave(n, 0))
        torch.testing.assert_close(cond.pooled, ref.pooled.repeat_interleave(n, 0))
    # value guidance: the gradient is taken through the unpacking, back to the packed latents the scheduler steps
    seen.clear()
    plain = steer_pipeline(pipe, PAIR, num_particles=n, reward_fn=brightness,
                           generator=torch.Generator().manual_seed(0), **kw).samples
    res = steer_pipeline(pipe, PAIR, num_particles=n, reward_fn=brightness, guidance_value_fn=value_fn,
                         guidance_scale_value=50.0, generator=torch.Generator().manual_seed(0), **kw)
    assert res.cost.critic_backward_rows > 0 and all(shape == (2 * n, *task.latent_shape) for shape, _ in seen)
    assert not torch.allclose(plain, res.samples)
    assert not pipe.transformer._forward_pre_hooks  # both hooks removed
