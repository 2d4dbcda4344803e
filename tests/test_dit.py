"""DiTAdapter on tiny DiTTransformer2DModel / SD3Transformer2DModel built from configs (SD3 cond: TextCond)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel, SD3Transformer2DModel

from critic_align.backbones import DiTAdapter, LoraAdapters
from critic_align.cond import TextCond
from critic_align.critic import build_critic
from critic_align.rollout import Rollout, cfg_denoiser
from critic_align.tasks.base import BaseTask

# SD3.5-medium's transformer config (stabilityai/stable-diffusion-3.5-medium, transformer/config.json)
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")


def tiny_dit(out_channels=None, seed=0) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=out_channels,
                              num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    # diffusers zero-initialises nothing here, but make sure outputs are non-trivial
    return m.eval()


def tiny_sd3(seed=0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                              pooled_projection_dim=6, out_channels=4, pos_embed_max_size=8,
                              dual_attention_layers=(0,), qk_norm="rms_norm")
    return m.eval()


def sd3_cond(b, seed=1, length=5) -> TextCond:
    g = torch.Generator().manual_seed(seed)
    return TextCond(torch.randn(b, length, 12, generator=g), torch.randn(b, 6, generator=g))


def test_dit_predict_features_and_output_head_reproduce_model():
    model = tiny_dit()
    ad = DiTAdapter(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=g)
    t = torch.tensor([999, 500, 3])
    y = torch.tensor([1, 7, 10])  # 10 = the null class
    with torch.no_grad():
        ref = model(x, timestep=t, class_labels=y).sample
        out = ad.predict(x, t, y)
        feats = ad.features(x, t, y)
        out2, feats2 = ad.predict_and_features(x, t, y)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(out2, ref, rtol=0, atol=0)
    assert feats.tokens.shape == (3, 16, ad.feature_dim) and ad.feature_dim == 16
    assert feats.temb.shape == (3, ad.temb_dim)
    torch.testing.assert_close(feats.tokens, feats2.tokens)
    emb = model.transformer_blocks[0].norm1.emb
    with torch.no_grad():
        temb = emb.timestep_embedder(emb.time_proj(t).to(x.dtype))
        # the tokens are the hidden states right before the output head: applying the head gives the output
        cond = emb(t, y, hidden_dtype=x.dtype)
        shift, scale = model.proj_out_1(F.silu(cond)).chunk(2, dim=1)
        h = model.proj_out_2(model.norm_out(feats.tokens) * (1 + scale[:, None]) + shift[:, None])
    torch.testing.assert_close(feats.temb, temb)
    h = h.reshape(3, 4, 4, 2, 2, 1)
    img = torch.einsum("nhwpqc->nchpwq", h).reshape(3, 1, 8, 8)
    torch.testing.assert_close(img, ref, rtol=1e-5, atol=1e-6)
    # scalar timestep broadcasts
    with torch.no_grad():
        torch.testing.assert_close(ad.predict(x, 500, y), model(x, timestep=torch.full((3,), 500), class_labels=y).sample)


def test_dit_features_stop_before_the_output_head():
    model = tiny_dit()
    ad = DiTAdapter(model)
    calls = []
    h = model.proj_out_2.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        ad.features(torch.randn(2, 1, 8, 8), torch.tensor([10, 20]), torch.tensor([0, 1]))
    h.remove()
    assert calls == []


def test_dit_learned_sigma_returns_the_prediction_channels():
    model = tiny_dit(out_channels=2)
    ad = DiTAdapter(model)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 600]), torch.tensor([3, 4])
    with torch.no_grad():
        full = model(x, timestep=t, class_labels=y).sample
        out = ad.predict(x, t, y)
    assert full.shape == (2, 2, 8, 8) and out.shape == (2, 1, 8, 8)
    torch.testing.assert_close(out, full[:, :1])


def test_dit_errors():
    model = tiny_dit()
    ad = DiTAdapter(model)
    with pytest.raises(ValueError, match="class labels"):
        ad.predict(torch.randn(1, 1, 8, 8), 3, None)
    model.train()
    with pytest.raises(RuntimeError, match="model.eval"):
        ad.predict(torch.randn(1, 1, 8, 8), 3, torch.tensor([1]))
    with pytest.raises(TypeError, match="DiTTransformer2DModel or SD3Transformer2DModel"):
        DiTAdapter(torch.nn.Linear(2, 2))


def test_sd3_predict_features_and_output_head_reproduce_model():
    model = tiny_sd3()
    ad = DiTAdapter(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([1000.0, 412.5, 7.25])  # flow-matching timesteps σ·1000 are floats
    c = sd3_cond(3)
    with torch.no_grad():
        ref = model(hidden_states=x, encoder_hidden_states=c.embeds, pooled_projections=c.pooled, timestep=t).sample
        out = ad.predict(x, t, c)
        out_tuple = ad.predict(x, t, (c.embeds, c.pooled))
        feats = ad.features(x, t, c)
        temb_full = model.time_text_embed(t, c.pooled)
        h = model.proj_out(model.norm_out(feats.tokens, temb_full))
        temb = model.time_text_embed.timestep_embedder(model.time_text_embed.time_proj(t))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(out_tuple, ref, rtol=0, atol=0)
    assert feats.tokens.shape == (3, 16, 16) and feats.temb.shape == (3, 16)
    assert ad.feature_dim == 16 and ad.temb_dim == 16
    torch.testing.assert_close(feats.temb, temb)
    img = torch.einsum("nhwpqc->nchpwq", h.reshape(3, 4, 4, 2, 2, 4)).reshape(3, 4, 8, 8)
    torch.testing.assert_close(img, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="TextCond"):
        ad.predict(x, t, c.embeds)


def test_sd3_text_cond_through_rollout_and_cfg():
    c = sd3_cond(4)
    ro = Rollout(latents=torch.zeros(4, 3, 1), timesteps=torch.tensor([2, 1]), prev_timesteps=torch.tensor([1, 0]),
                 log_probs=torch.zeros(4, 2), cond=c, prompts=list("abcd")).validate()
    cat = Rollout.cat([ro, ro.select([3, 1])])
    assert isinstance(cat.cond, TextCond) and len(cat.cond) == 6
    torch.testing.assert_close(cat.cond.embeds[5], c.embeds[1])
    model = tiny_sd3()
    ad = DiTAdapter(model)
    null = sd3_cond(1, seed=9)
    x, t = torch.randn(4, 4, 8, 8), torch.full((4,), 500.0)
    den = cfg_denoiser(ad.predict, 3.0, lambda n: null.repeat_interleave(n))
    with torch.no_grad():
        guided = den(x, t, c)
        cond_out, unc = ad.predict(x, t, c), ad.predict(x, t, null.repeat_interleave(4))
    torch.testing.assert_close(guided, unc + 3.0 * (cond_out - unc), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["dit", "sd3"])
def test_lora_critic_on_a_dit(kind):
    model = tiny_dit() if kind == "dit" else tiny_sd3()
    ad = DiTAdapter(model)
    ad.requires_grad_(False)
    adapters = LoraAdapters(model)
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    adapters.add("policy", rank=2, target_modules=targets)
    critic = build_critic(ad, mode="lora", num_rewards=2, adapters=adapters, lora_rank=2, lora_target_modules=targets,
                          hidden_dim=8, num_heads=2)
    if kind == "dit":
        x, t, c = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 900]), torch.tensor([0, 4, 9])
    else:
        x, t, c = torch.randn(3, 4, 8, 8), torch.tensor([10.0, 500.0, 1000.0]), sd3_cond(3)
    v = critic(x, t, c)
    assert v.shape == (3, 2) and torch.isfinite(v).all()
    v.sum().backward()
    grads = [p.grad for p in critic.trainable_parameters()]
    assert any(gr is not None and gr.abs().sum() > 0 for gr in grads)


def test_sd35_medium_full_size_shapes_on_meta_device():
    t0 = time.time()
    with torch.device("meta"):
        model = SD3Transformer2DModel(**SD35_MEDIUM)
    ad = DiTAdapter(model)
    n_params = sum(p.numel() for p in model.parameters())
    assert 2.0e9 < n_params < 2.8e9  # SD3.5-medium's MMDiT-X: ~2.5 B parameters
    x = torch.empty(1, 16, 128, 128, device="meta")  # 1024x1024 images
    c = TextCond(torch.empty(1, 333, 4096, device="meta"), torch.empty(1, 2048, device="meta"))
    t = torch.full((1,), 1000.0, device="meta")
    with torch.no_grad():
        out = ad.predict(x, t, c)
        feats = ad.features(x, t, c)
    assert out.shape == (1, 16, 128, 128)
    assert feats.tokens.shape == (1, 64 * 64, 1536) and feats.temb.shape == (1, 1536)
    assert ad.feature_dim == 1536 and ad.temb_dim == 1536
    assert time.time() - t0 < 10


class _TinyDigits(BaseTask):
    name = "tiny"
    prompts = ("0", "1", "2", "3")
    latent_shape = (1, 8, 8)

    def encode(self, prompts):
        return torch.tensor([int(p) for p in prompts])

    def null_cond(self, n):
        return torch.full((n,), 10, dtype=torch.long)

    def decode(self, latents):
        return latents.clamp(-1, 1)


def test_trainer_runs_ppo_gae_on_a_flow_matching_dit(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from critic_align.config import PPOConfig
    from critic_align.rewards import FunctionReward, MultiReward
    from critic_align.steps import FlowMatchSDEStep
    from critic_align.trainer import Trainer
    from tests.test_trainer import pair_loss, train_pairs

    def bright(samples, prompts):
        target = torch.tensor([int(p) / 3 * 2 - 1 for p in prompts])
        return -(samples.mean(dim=(1, 2, 3)) - target).abs()

    cfg = PPOConfig(num_epochs=1, batch_size=8, group_size=4, num_inference_steps=4, minibatch_size=16, sde_noise_level=0.7,
                    value_pretrain_epochs=1, value_pretrain_passes=1, output_dir=str(tmp_path / "run"), progress=False,
                    log_tensorboard=False, grid_every=0, checkpoint_every=1, lora_rank=2, critic_lora_rank=2,
                    value_head_hidden=16, value_head_heads=2, clip_range=0.2,
                    lora_target_modules=("to_q", "to_k", "to_v", "to_out.0"))
    model = tiny_dit()
    tr = Trainer(cfg, _TinyDigits(), DiTAdapter(model), FlowMatchEulerDiscreteScheduler(shift=3.0),
                 MultiReward([FunctionReward(bright, name="bright", differentiable=True)]))
    assert isinstance(tr.step, FlowMatchSDEStep) and tr.step.noise_level == 0.7
    assert tr.timesteps.dtype == torch.float32 and tr.timesteps[0].item() == 1000.0
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in tr.adapters.parameters("policy"):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ro = tr.compute_advantages(tr.rollout(tr.prompt_iter.batch(2, 4)))
    assert torch.isfinite(ro.log_probs).all() and torch.isfinite(ro.advantages).all()
    _, stats = pair_loss(tr, ro, train_pairs(tr, ro))
    assert abs(stats["ratio_max"] - 1) < 1e-5 and abs(stats["ratio_min"] - 1) < 1e-5
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora" not in k}
    before = [p.clone() for p in tr.adapters.parameters("policy")]
    history = tr.train()
    assert len(history) == 1 and "value_ev" in history[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.adapters.parameters("policy")))
    for k, v in model.state_dict().items():
        if k in base:
            assert torch.equal(v, base[k]), k
