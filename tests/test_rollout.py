"""Tests of critic_align.rollout (sampling with log-probs, the Rollout record) and critic_align.prompts."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from critic_align.backbones import UNetAdapter
from critic_align.losses import ppo_policy_loss
from critic_align.prompts import PromptIterator
from critic_align.rollout import Rollout, cfg_denoiser, sample, sample_trajectories
from critic_align.steps import DDIMStep, NoiseSchedule


def make_step(eta=1.0, spacing="trailing", offset=0, prediction_type="epsilon") -> DDIMStep:
    sched = NoiseSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000, clip_sample=False,
                                                       timestep_spacing=spacing, steps_offset=offset,
                                                       prediction_type=prediction_type))
    return DDIMStep(sched, eta=eta)


def lin_denoiser(x, t, cond):
    return 0.1 * x


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, num_class_embeds=11, attention_head_dim=8).eval()


def make_rollout(b=4, n=5, seed=0, denoiser=lin_denoiser, cond=None, prompts=None, step=None):
    step = step or make_step()
    x_T = torch.randn(b, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    ro = sample_trajectories(denoiser, step, x_T, step.schedule.timesteps(n), cond=cond, prompts=prompts,
                             generator=torch.Generator().manual_seed(seed + 100))
    return ro, step, x_T


# ---------------------------------------------------------------------------------------------
# sample_trajectories


def test_sample_trajectories_shapes_and_rescoring():
    ro, step, x_T = make_rollout(b=3, n=5)
    assert ro.latents.shape == (3, 6, 1, 8, 8)
    assert ro.log_probs.shape == (3, 5)
    assert torch.equal(ro.latents[:, 0], x_T)
    assert torch.equal(ro.final, ro.latents[:, -1])
    assert torch.equal(ro.timesteps, step.schedule.timesteps(5))
    assert ro.prev_timesteps.tolist() == ro.timesteps[1:].tolist() + [-1]
    assert ro.prompts == [""] * 3 and ro.cond is None
    assert ro.batch_size == 3 and ro.num_steps == 5
    assert not ro.latents.requires_grad and not ro.log_probs.is_inference()
    # re-scoring each stored transition gives back the recorded log-prob: the on-policy ratio is exactly 1
    for k in range(5):
        x_k = ro.latents[:, k]
        t = ro.timesteps[k].expand(3)
        out = step(lin_denoiser(x_k, t, None), x_k, t, ro.prev_timesteps[k], prev_sample=ro.latents[:, k + 1])
        assert torch.equal(out.log_prob, ro.log_probs[:, k])
    # the same in one shuffled minibatch that mixes trajectories and timesteps (as the PPO update does)
    pairs = torch.cartesian_prod(torch.arange(3), torch.arange(5))[torch.randperm(15)]
    bi, ki = pairs[:, 0], pairs[:, 1]
    x_t = ro.latents[bi, ki]
    out = step(lin_denoiser(x_t, None, None), x_t, ro.timesteps[ki], ro.prev_timesteps[ki],
               prev_sample=ro.latents[bi, ki + 1])
    torch.testing.assert_close(out.log_prob, ro.log_probs[bi, ki], rtol=1e-6, atol=1e-4)
    _, stats = ppo_policy_loss(out.log_prob, ro.log_probs[bi, ki], torch.randn(15), 0.2)
    assert stats.ratio_max == pytest.approx(1.0, abs=1e-4) and stats.clip_fraction == 0.0


def test_sample_trajectories_transitions_use_generator_noise():
    # each transition is mean + std·z_k with z_k the k-th draw of the generator
    ro, step, _ = make_rollout(b=2, n=4, seed=3)
    g = torch.Generator().manual_seed(103)
    for k in range(4):
        x_k = ro.latents[:, k]
        t = ro.timesteps[k].expand(2)
        out = step(lin_denoiser(x_k, t, None), x_k, t, ro.prev_timesteps[k], prev_sample=ro.latents[:, k + 1])
        z = torch.randn(x_k.shape, generator=g)
        torch.testing.assert_close(ro.latents[:, k + 1], out.mean + out.std * z, rtol=0, atol=1e-6)
    # same seeds -> identical rollout
    ro2, _, _ = make_rollout(b=2, n=4, seed=3)
    assert torch.equal(ro.latents, ro2.latents) and torch.equal(ro.log_probs, ro2.log_probs)


def test_sample_trajectories_with_tiny_unet():
    adapter = UNetAdapter(tiny_unet())
    cond = torch.tensor([1, 7])
    ro, step, _ = make_rollout(b=2, n=3, denoiser=adapter.predict, cond=cond, prompts=["one", "seven"])
    assert ro.latents.shape == (2, 4, 1, 8, 8) and ro.log_probs.shape == (2, 3)
    assert torch.isfinite(ro.log_probs).all()
    assert ro.prompts == ["one", "seven"] and torch.equal(ro.cond, cond)
    with torch.no_grad():
        for k in range(3):
            x_k = ro.latents[:, k]
            t = ro.timesteps[k].expand(2)
            out = step(adapter.predict(x_k, t, cond), x_k, t, ro.prev_timesteps[k], prev_sample=ro.latents[:, k + 1])
            torch.testing.assert_close(out.log_prob, ro.log_probs[:, k], rtol=1e-6, atol=1e-4)


def test_deterministic_step_is_refused_but_plain_sample_works():
    step0 = make_step(eta=0.0)
    x_T = torch.randn(2, 1, 8, 8)
    ts = step0.schedule.timesteps(4)
    with pytest.raises(ValueError, match="eta"):
        sample_trajectories(lin_denoiser, step0, x_T, ts)
    a, b = sample(lin_denoiser, step0, x_T, ts), sample(lin_denoiser, step0, x_T, ts)
    assert torch.equal(a, b) and a.shape == x_T.shape


@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("linspace", 0)])
def test_sample_trajectories_refuses_a_final_step_from_t0(spacing, offset):
    # the final transition t=0 -> t_prev=-1 targets ᾱ_0 = ᾱ_t: zero variance, no log-prob; refused clearly
    step = make_step(spacing=spacing, offset=offset)
    ts = step.schedule.timesteps(4)
    assert ts[-1] == 0
    with pytest.raises(ValueError, match="last timestep is 0.*trailing"):
        sample_trajectories(lin_denoiser, step, torch.randn(2, 1, 8, 8), ts)
    ok = make_step(spacing="trailing", offset=0)
    ro = sample_trajectories(lin_denoiser, ok, torch.randn(2, 1, 8, 8), ok.schedule.timesteps(4))
    assert torch.isfinite(ro.log_probs).all()


def test_cfg_denoiser():
    calls = []

    def den(x, t, cond):
        calls.append(x.shape[0])
        return x * cond.view(-1, 1, 1, 1)

    assert cfg_denoiser(den, 1.0, None) is den
    guided = cfg_denoiser(den, 3.0, lambda n: torch.zeros(n))
    x = torch.ones(2, 1, 2, 2)
    out = guided(x, torch.tensor([5, 5]), torch.tensor([1.0, 2.0]))
    # u + s·(c − u) with u = 0: 3·c
    assert calls == [4]
    assert torch.equal(out[:, 0, 0, 0], torch.tensor([3.0, 6.0]))


# ---------------------------------------------------------------------------------------------
# the Rollout record


def full_rollout(b=4, n=3, k=2):
    ro, _, _ = make_rollout(b=b, n=n, cond=torch.arange(b) * 10, prompts=[f"p{i}" for i in range(b)])
    g = torch.Generator().manual_seed(7)
    ro = replace(ro, samples=torch.randn(b, 1, 8, 8, generator=g), rewards=torch.randn(b, k, generator=g),
                 values=torch.randn(b, n, k, generator=g), advantages=torch.randn(b, n, generator=g),
                 returns=torch.randn(b, n, k, generator=g))
    return ro.validate()


PER_SAMPLE = ("latents", "log_probs", "cond", "samples", "rewards", "values", "advantages", "returns")


@pytest.mark.parametrize("index", [[2, 0], torch.tensor([3, 1, 1]), slice(1, 3)])
def test_rollout_select(index):
    ro = full_rollout()
    before = {f: getattr(ro, f).clone() for f in PER_SAMPLE}
    sub = ro.select(index)
    idx = torch.arange(4)[index] if isinstance(index, slice) else torch.as_tensor(index)
    for f in PER_SAMPLE:
        assert torch.equal(getattr(sub, f), before[f][idx]), f
        assert torch.equal(getattr(ro, f), before[f]), f  # the original is untouched
    assert sub.prompts == [f"p{i}" for i in idx.tolist()]
    # cond and prompts stay aligned with the latents
    assert sub.cond.tolist() == [10 * i for i in idx.tolist()]
    assert torch.equal(sub.timesteps, ro.timesteps) and torch.equal(sub.prev_timesteps, ro.prev_timesteps)
    sub.validate()


def test_rollout_select_with_none_fields():
    ro, _, _ = make_rollout(b=3, n=2)
    sub = ro.select([1])
    assert sub.cond is None and sub.rewards is None and sub.batch_size == 1
    assert torch.equal(sub.log_probs, ro.log_probs[1:2])


def test_rollout_cat_of_halves_is_whole():
    ro = full_rollout()
    a, b = ro.select(slice(0, 2)), ro.select(slice(2, 4))
    whole = Rollout.cat([a, b])
    for f in PER_SAMPLE:
        assert torch.equal(getattr(whole, f), getattr(ro, f)), f
    assert whole.prompts == ro.prompts
    assert torch.equal(whole.timesteps, ro.timesteps)
    whole.validate()
    # inconsistent inputs are refused
    a2 = replace(ro.select(slice(0, 2)), rewards=None)
    with pytest.raises(ValueError, match="rewards"):
        Rollout.cat([a2, b])
    other, _, _ = make_rollout(b=2, n=4)
    with pytest.raises(ValueError, match="timesteps"):
        Rollout.cat([ro.select([0]), other])


def test_rollout_validate_raises_on_inconsistent_shapes():
    from dataclasses import replace

    ro = full_rollout(b=4, n=3)
    bad = [
        dict(latents=ro.latents[:, :-1]),  # T states for T steps
        dict(prev_timesteps=ro.prev_timesteps[:-1]),
        dict(log_probs=ro.log_probs[:, :-1]),
        dict(log_probs=ro.log_probs[:-1]),
        dict(prompts=ro.prompts[:-1]),
        dict(cond=ro.cond[:-1]),
        dict(rewards=ro.rewards[:, 0]),  # (B,) instead of (B, K)
        dict(rewards=ro.rewards[:-1]),
        dict(values=ro.values[:, :-1]),
    ]
    for change in bad:
        with pytest.raises(ValueError):
            replace(ro, **change).validate()
    assert ro.validate() is ro


# ---------------------------------------------------------------------------------------------
# PromptIterator

PROMPTS = [f"prompt {i}" for i in range(5)]


def test_prompt_iterator_deterministic_and_epoch_permutations():
    a, b = PromptIterator(PROMPTS, seed=3), PromptIterator(PROMPTS, seed=3)
    seq_a = [p for _ in range(4) for p in a.next(4)]
    seq_b = b.next(16)
    assert seq_a == seq_b
    # every pass over the list is a permutation of it
    for start in (0, 5, 10):
        assert sorted(seq_a[start:start + 5]) == sorted(PROMPTS)
    assert Counter(seq_a[:15]) == Counter({p: 3 for p in PROMPTS})
    # another seed gives another order (deterministically: these two orders differ)
    assert PromptIterator(PROMPTS, seed=4).next(15) != seq_a[:15]


def test_prompt_iterator_batch_repeats_groups():
    a, b = PromptIterator(PROMPTS, seed=0), PromptIterator(PROMPTS, seed=0)
    batch = a.batch(3, 4)
    firsts = b.next(3)
    assert len(batch) == 12
    assert batch == [p for p in firsts for _ in range(4)]
    assert len(set(batch)) == 3


def test_prompt_iterator_state_dict_round_trip():
    a = PromptIterator(PROMPTS, seed=11)
    a.next(7)  # into the second pass
    state = a.state_dict()
    assert state == {"seed": 11, "pass_index": 1, "position": 2}
    b = PromptIterator(PROMPTS, seed=0)
    b.load_state_dict(state)
    assert a.next(13) == b.next(13)
    assert a.batch(2, 3) == b.batch(2, 3)


def test_prompt_iterator_errors():
    with pytest.raises(ValueError, match="empty"):
        PromptIterator([])
    with pytest.raises(TypeError, match="strings"):
        PromptIterator(["ok", 3])
    with pytest.raises(TypeError):
        PromptIterator(["ok", None])
