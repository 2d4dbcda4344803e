"""Stable Diffusion pipelines as tasks: tiny SD1.5 / SD3 pipelines built offline from configs, post-trained
for one epoch through the Trainer; only LoRA (and critic) weights change; the exported policy LoRA
reloads with ``load_lora_weights`` and reproduces our samples; the typed SD3 conditioning flows through
Rollout and CFG; a full-size SD1.5 UNet shape check on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from critic_align.cond import TextCond, cat_cond
from critic_align.config import PPOConfig
from critic_align.config_sections import sectioned
from critic_align.rewards import FunctionReward, JpegCompressibility, MultiReward
from critic_align.rollout import Rollout, cfg_denoiser, sample
from critic_align.steps import DDIMStep, FlowMatchSDEStep
from critic_align.tasks.sd import StableDiffusionTask, load_pipeline, save_policy_lora
from critic_align.tokenizer import byte_clip_tokenizer
from critic_align.trainer import Trainer

PROMPTS = ("a cat", "a dog", "red fox", "owl")


# ----------------------------------------------------------------------------------------------------
# tiny pipelines, built from configs offline
tiny_clip_tokenizer = byte_clip_tokenizer  # the name the other test files import


def _clip_text_config(tok, hidden=16, projection_dim=None):
    from transformers import CLIPTextConfig

    kw = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
              num_attention_heads=2, max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id,
              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if projection_dim is not None:
        kw["projection_dim"] = projection_dim
    return CLIPTextConfig(**kw)


def tiny_sd15_pipeline(tmp_dir: Path, seed: int = 0):
    """SD1.5-class pipeline: UNet2DConditionModel (attention at 8x8 latents), AutoencoderKL (factor 2),
    CLIPTextModel, DDIMScheduler with SD1.5's schedule (scaled_linear, steps_offset=1, leading)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tok = tiny_clip_tokenizer(tmp_dir / "tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, layers_per_block=1, sample_size=16)
    text_encoder = CLIPTextModel(_clip_text_config(tok))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              timestep_spacing="leading")
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def tiny_sd3_pipeline(tmp_dir: Path, seed: int = 0):
    """SD3-class pipeline without T5: SD3Transformer2DModel (patch 2 on 8x8 latents), an SD3-style
    AutoencoderKL (no quant convs, shift and scaling factors), two CLIPTextModelWithProjection,
    FlowMatchEulerDiscreteScheduler with SD3.5's shift 3."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tok = tiny_clip_tokenizer(tmp_dir / "tokenizer")
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, layers_per_block=1, sample_size=16, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    text_encoder = CLIPTextModelWithProjection(_clip_text_config(tok, hidden=16, projection_dim=16))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tok, hidden=16, projection_dim=16))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                    tokenizer=tok, text_encoder_2=text_encoder_2, tokenizer_2=tok, text_encoder_3=None,
                                    tokenizer_3=None)


SD3_LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                    "attn.to_out.0", "attn.to_q", "attn.to_v")


def brightness(samples, prompts):
    return samples.mean(dim=(1, 2, 3))


def small_config(tmp_path, **overrides) -> PPOConfig:
    cfg = dict(num_epochs=1, batch_size=4, group_size=2, num_inference_steps=4, minibatch_size=16,
               value_pretrain_epochs=1, value_pretrain_passes=1, output_dir=str(tmp_path / "run"), progress=False,
               log_tensorboard=False, grid_every=0, checkpoint_every=0, lora_rank=2, critic_lora_rank=2,
               value_head_hidden=16, value_head_heads=2, clip_range=0.2, learning_rate=1e-2)
    cfg.update(overrides)
    return PPOConfig(**cfg)


def frozen_snapshot(pipe, denoiser_name: str) -> dict[str, torch.Tensor]:
    """Every non-LoRA parameter and buffer of the pipeline's torch modules."""
    out = {}
    for comp in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", denoiser_name):
        module = getattr(pipe, comp, None)
        if module is None:
            continue
        for n, p in list(module.named_parameters()) + list(module.named_buffers()):
            if "lora_" not in n:
                out[f"{comp}.{n}"] = p.detach().clone()
    return out


def assert_only_lora_changed(trainer, pipe, denoiser_name, before_frozen, before_lora):
    after = frozen_snapshot(pipe, denoiser_name)
    assert set(after) == set(before_frozen)
    changed = [k for k in after if not torch.equal(after[k], before_frozen[k])]
    assert not changed, f"frozen weights changed: {changed[:5]}"
    for name in ("policy", "critic"):
        now = trainer.adapters.state_dict(name)
        assert any(not torch.equal(now[k], before_lora[name][k]) for k in now), f"{name} LoRA did not change"
    for comp in ("vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, comp, None)
        if module is not None:
            assert not module.training and not any(p.requires_grad for p in module.parameters())


# ----------------------------------------------------------------------------------------------------
# the typed conditioning
def test_textcond_batch_ops_and_rollout():
    g = torch.Generator().manual_seed(0)
    c = TextCond(torch.randn(4, 3, 5, generator=g), torch.randn(4, 2, generator=g))
    assert len(c) == 4
    idx = torch.tensor([2, 0])
    sub = c[idx]
    assert torch.equal(sub.embeds, c.embeds[idx]) and torch.equal(sub.pooled, c.pooled[idx])
    assert torch.equal(c[1:3].pooled, c.pooled[1:3])
    rep = c.repeat_interleave(3, dim=0)
    assert torch.equal(rep.embeds, c.embeds.repeat_interleave(3, dim=0)) and len(rep) == 12
    both = cat_cond([c, c[0:1]])
    assert torch.equal(both.pooled, torch.cat([c.pooled, c.pooled[0:1]]))
    assert c.to(torch.float64).embeds.dtype == torch.float64
    with pytest.raises(TypeError, match="batch indexing"):
        c[0]
    with pytest.raises(ValueError, match="dim=0"):
        c.repeat_interleave(2, dim=1)
    with pytest.raises(TypeError, match="same kind"):
        cat_cond([c, torch.zeros(1, 3)])
    with pytest.raises(ValueError, match="batch"):
        TextCond(torch.zeros(2, 3, 5), torch.zeros(3, 2))

    # Rollout: select, cat, to keep the two tensors aligned with the trajectories
    ro = Rollout(latents=torch.randn(4, 3, 1, 2, 2), timesteps=torch.tensor([20, 10]),
                 prev_timesteps=torch.tensor([10, -1]), log_probs=torch.randn(4, 2), cond=c,
                 prompts=list("abcd")).validate()
    sel = ro.select(torch.tensor([3, 1]))
    assert torch.equal(sel.cond.embeds, c.embeds[[3, 1]]) and sel.prompts == ["d", "b"]
    joined = Rollout.cat([ro.select([0, 1]), ro.select([2, 3])])
    assert torch.equal(joined.cond.embeds, c.embeds) and torch.equal(joined.cond.pooled, c.pooled)
    assert ro.to("cpu").cond.device.type == "cpu"
    bad = Rollout(latents=ro.latents, timesteps=ro.timesteps, prev_timesteps=ro.prev_timesteps,
                  log_probs=ro.log_probs, cond=c[0:3], prompts=list("abcd"))
    with pytest.raises(ValueError, match="cond has batch 3"):
        bad.validate()

    # CFG with a TextCond: the null half goes through the same batched forward
    def den(x, t, cond):
        return x * 0 + cond.pooled.sum(1).view(-1, 1, 1, 1)

    null = TextCond(torch.zeros(1, 3, 5), torch.ones(1, 2))
    guided = cfg_denoiser(den, 3.0, lambda n: null.repeat_interleave(n, dim=0))
    x = torch.zeros(4, 1, 2, 2)
    out = guided(x, torch.zeros(4), c)
    expected = 2.0 + 3.0 * (c.pooled.sum(1) - 2.0)
    assert torch.allclose(out[:, 0, 0, 0], expected)


# ----------------------------------------------------------------------------------------------------
# SD1.5
def test_sd15_task_contract(tmp_path):
    pipe = tiny_sd15_pipeline(tmp_path)
    task = StableDiffusionTask(pipe, PROMPTS)
    assert task.kind == "sd15" and task.latent_shape == (4, 8, 8) and task.resolution == 16
    cond = task.encode(["a cat", "owl"])
    assert cond.shape == (2, 16, 16)
    ref, _ = pipe.encode_prompt(["a cat", "owl"], "cpu", 1, False)
    assert torch.equal(cond, ref)
    null = task.null_cond(3)
    assert null.shape == (3, 16, 16) and torch.equal(null[0], task.encode([""])[0])
    z = torch.randn(2, *task.latent_shape)
    img = task.decode(z)
    assert img.shape == (2, 3, 16, 16) and img.dtype == torch.float32 and img.abs().max() <= 1
    ref_img = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
    assert torch.allclose(img, ref_img)
    with pytest.raises(ValueError, match="multiple of the VAE factor"):
        StableDiffusionTask(pipe, PROMPTS, resolution=15)
    with pytest.raises(ValueError, match="non-empty list"):
        StableDiffusionTask(pipe, [])
    with pytest.raises(TypeError, match="StableDiffusionPipeline"):
        StableDiffusionTask(object(), PROMPTS)


def test_load_pipeline_local_and_clear_errors(tmp_path, monkeypatch):
    pipe = tiny_sd15_pipeline(tmp_path)
    pipe.save_pretrained(tmp_path / "sd15")
    loaded = load_pipeline(tmp_path / "sd15", kind="sd15")
    x = torch.randn(1, 4, 8, 8)
    cond = torch.randn(1, 16, 16)
    assert torch.equal(loaded.unet(x, 10, cond).sample, pipe.unet(x, 10, cond).sample)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(tmp_path, kind="sd15")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pipeline(tmp_path / "nope", kind="sd15")
    with pytest.raises(ValueError, match="unknown pipeline kind"):
        load_pipeline(tmp_path / "sd15", kind="sdxl")
    with pytest.raises(ValueError, match="drop_t5"):
        load_pipeline(tmp_path / "sd15", kind="sd15", drop_t5=True)
    # a hub name on a machine without the hub: the error says to pass a local path
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="pass the local path as model_path"):
        load_pipeline("critic-align-test/no-such-model", kind="sd15")


def test_sd15_one_epoch_only_lora_changes_and_lora_roundtrip(tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = tiny_sd15_pipeline(tmp_path)
    pipe.save_pretrained(tmp_path / "base")  # the fresh copy the exported LoRA is loaded into
    task = StableDiffusionTask(pipe, PROMPTS)
    rewards = MultiReward([JpegCompressibility(), FunctionReward(brightness, name="brightness")])
    trainer = Trainer(small_config(tmp_path), task, task.backbone(), task.scheduler, rewards)
    before_frozen = frozen_snapshot(pipe, "unet")
    before_lora = {n: {k: v.clone() for k, v in trainer.adapters.state_dict(n).items()} for n in ("policy", "critic")}
    history = trainer.train()
    assert len(history) == 1 and history[0]["reward_queries"] == 8
    assert_only_lora_changed(trainer, pipe, "unet", before_frozen, before_lora)

    out = save_policy_lora(trainer.task, trainer.models, trainer.config, tmp_path / "lora")
    assert (out / "pytorch_lora_weights.safetensors").exists()
    fresh = StableDiffusionPipeline.from_pretrained(tmp_path / "base", local_files_only=True)
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(out)

    # the same network output for the same inputs
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, *task.latent_shape, generator=g)
    cond = task.encode(["a cat", "owl"])
    t = torch.tensor([751, 251])
    ours = trainer.policy_output(x, t, cond)
    theirs = fresh.unet(x, t, encoder_hidden_states=cond).sample
    base = trainer.reference_output(x, t, cond)
    assert not torch.allclose(ours, base, atol=1e-4)  # the LoRA matters ...
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)  # ... and is reproduced

    # the same samples: deterministic DDIM (eta=0) and stochastic DDIM (eta=1, same generator)
    x_T = torch.randn(2, *task.latent_shape, generator=g)
    ts = trainer.timesteps
    # and with classifier-free guidance (our null_cond = the pipeline's empty negative prompt)
    for eta, scale in ((0.0, 1.0), (1.0, 1.0), (0.0, 3.0)):
        step = DDIMStep(trainer.schedule, eta=eta)
        den = cfg_denoiser(trainer.policy_output, scale, task.null_cond)
        ours = sample(den, step, x_T, ts, cond, generator=torch.Generator().manual_seed(7))
        theirs = fresh(["a cat", "owl"], latents=x_T.clone(), num_inference_steps=len(ts), guidance_scale=scale,
                       eta=eta, generator=torch.Generator().manual_seed(7), output_type="latent").images
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# SD3 (flow matching, MMDiT, no T5)
def test_sd3_task_contract(tmp_path):
    pipe = tiny_sd3_pipeline(tmp_path)
    task = StableDiffusionTask(pipe, PROMPTS, max_sequence_length=8)
    assert task.kind == "sd3" and task.latent_shape == (4, 8, 8) and task.resolution == 16
    cond = task.encode(["a cat", "owl"])
    assert isinstance(cond, TextCond)
    ref, _, pooled, _ = pipe.encode_prompt(["a cat", "owl"], None, None, device="cpu", do_classifier_free_guidance=False,
                                           max_sequence_length=8)
    assert torch.equal(cond.embeds, ref) and torch.equal(cond.pooled, pooled)
    assert cond.embeds.shape == (2, 16 + 8, 32) and cond.pooled.shape == (2, 32)
    null = task.null_cond(3)
    assert len(null) == 3 and torch.equal(null.pooled[2], task.encode([""]).pooled[0])
    z = torch.randn(2, *task.latent_shape)
    ref_img = pipe.vae.decode(z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample.clamp(-1, 1)
    assert torch.allclose(task.decode(z), ref_img)
    with pytest.raises(ValueError, match="patch size"):
        StableDiffusionTask(pipe, PROMPTS, resolution=18)


def test_sd3_one_epoch_only_lora_changes_and_lora_roundtrip(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    pipe = tiny_sd3_pipeline(tmp_path)
    pipe.save_pretrained(tmp_path / "base")
    task = StableDiffusionTask(pipe, PROMPTS, max_sequence_length=8)
    rewards = MultiReward([JpegCompressibility(), FunctionReward(brightness, name="brightness")])
    cfg = small_config(tmp_path, sde_noise_level=0.7, lora_target_modules=SD3_LORA_TARGETS, lora_alpha=4.0)
    trainer = Trainer(cfg, task, task.backbone(), task.scheduler, rewards)
    assert isinstance(trainer.step, FlowMatchSDEStep)
    before_frozen = frozen_snapshot(pipe, "transformer")
    before_lora = {n: {k: v.clone() for k, v in trainer.adapters.state_dict(n).items()} for n in ("policy", "critic")}
    history = trainer.train()
    assert len(history) == 1 and history[0]["reward_queries"] == 8
    assert_only_lora_changed(trainer, pipe, "transformer", before_frozen, before_lora)

    out = save_policy_lora(trainer.task, trainer.models, trainer.config, tmp_path / "lora")
    with pytest.raises(ValueError, match="drop_t5=True"):
        load_pipeline(tmp_path / "base", kind="sd3")
    fresh = load_pipeline(tmp_path / "base", kind="sd3", drop_t5=True)
    assert isinstance(fresh, StableDiffusion3Pipeline) and fresh.text_encoder_3 is None
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(out)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, *task.latent_shape, generator=g)
    cond = task.encode(["a cat", "owl"])
    t = trainer.timesteps[[0, 2]]
    ours = trainer.policy_output(x, t, cond)
    theirs = fresh.transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds,
                               pooled_projections=cond.pooled).sample
    assert not torch.allclose(ours, trainer.reference_output(x, t, cond), atol=1e-4)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    # the same samples with the deterministic (Euler, noise_level 0) sampler and the same x_T
    x_T = torch.randn(2, *task.latent_shape, generator=g)
    # (and with classifier-free guidance: our null_cond is the pipeline's empty negative prompt)
    step = FlowMatchSDEStep(trainer.schedule, noise_level=0.0)
    for scale in (1.0, 3.0):
        ours = sample(cfg_denoiser(trainer.policy_output, scale, task.null_cond), step, x_T, trainer.timesteps, cond)
        theirs = fresh(["a cat", "owl"], latents=x_T.clone(), num_inference_steps=len(trainer.timesteps),
                       guidance_scale=scale, max_sequence_length=8, output_type="latent").images
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# full-size SD1.5 UNet, shapes only (meta device: no memory, no compute)
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)


def test_sd15_full_size_unet_shapes_on_meta():
    from diffusers import UNet2DConditionModel

    from critic_align.backbones import LoraAdapters, UNetAdapter
    from critic_align.critic import build_critic

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    assert 855e6 < sum(p.numel() for p in unet.parameters()) < 865e6  # SD1.5's UNet: 859.5 M parameters
    adapter = UNetAdapter(unet)
    adapters = LoraAdapters(unet)
    cfg = PPOConfig()
    adapters.add("policy", rank=4, target_modules=cfg.lora_target_modules)
    critic = build_critic(adapter, mode="lora", num_rewards=2, adapters=adapters, lora_rank=4,
                          lora_target_modules=cfg.lora_target_modules, hidden_dim=64, num_heads=8)
    critic.head.to("meta")
    x = torch.empty(2, 4, 64, 64, device="meta")
    t = torch.full((2,), 500, device="meta")
    cond = torch.empty(2, 77, 768, device="meta")
    with adapters.using("policy"):
        assert adapter.predict(x, t, cond).shape == (2, 4, 64, 64)
    feats = adapter.features(x, t, cond)
    assert feats.tokens.shape == (2, 8 * 8, 1280) and feats.temb.shape == (2, 1280)
    assert adapter.feature_dim == 1280 and adapter.temb_dim == 1280
    assert critic(x, t, cond).shape == (2, 2)
    n_policy = sum(p.numel() for p in adapters.parameters("policy"))
    assert 1e6 < n_policy < 20e6  # rank-4 LoRA on attention + resnet convs: a few million parameters


# ----------------------------------------------------------------------------------------------------
# configs and the command line
SD_CONFIGS = ("sd15_jpeg", "sd15_pickscore", "sd15_hpsv2", "sd35m_jpeg", "sd35m_pickscore")


@pytest.mark.parametrize("name", SD_CONFIGS)
def test_shipped_sd_configs_load_and_name_their_missing_weights(name):
    from critic_align.api import build_trainer
    from critic_align.train.registry import build_rewards, load_run_config

    run = load_run_config(name)
    assert run["task"] in ("sd15", "sd3") and run["ppo"].guidance_scale == 1.0  # CFG-free
    assert build_rewards(run["rewards"]).names  # reward objects build lazily, without their weights
    with pytest.raises(FileNotFoundError, match="model_path .* does not exist"):
        build_trainer(run)  # the shipped prompt file is found; model_path is a placeholder to set


def test_cli_train_and_export_lora_sd15(tmp_path):
    import yaml
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from critic_align.api import build_trainer
    from critic_align.backbones import LoraAdapters
    from critic_align.checkpoint import latest_checkpoint
    from critic_align.train.cli import main
    from critic_align.train.registry import load_run_config

    tiny_sd15_pipeline(tmp_path).save_pretrained(tmp_path / "base")
    (tmp_path / "prompts.txt").write_text("# animals\na cat\n\nowl\n")
    ppo = dict(num_epochs=1, batch_size=4, group_size=2, num_inference_steps=4, minibatch_size=16,
               value_pretrain_epochs=1, value_pretrain_passes=1, progress=False, log_tensorboard=False, grid_every=0,
               lora_rank=2, critic_lora_rank=2, value_head_hidden=16, value_head_heads=2, clip_range=0.2,
               learning_rate=1e-2)
    config = {"task": "sd15", "model_path": str(tmp_path / "base"), "prompts": "prompts.txt",
              "sd": {"decode_chunk_size": 3}, "rewards": ["jpeg_compressibility"], **sectioned(ppo)}
    cfg_file = tmp_path / "sd15_tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(cfg_file), "--out", str(run_dir)]) == 0
    assert json.loads((run_dir / "run.json").read_text())["task"] == "sd15"
    assert (run_dir / "grid_after.png").exists()
    assert main(["export-lora", "--run", str(run_dir), "--out", str(tmp_path / "lora")]) == 0

    # the exported file holds the checkpoint's policy LoRA: a fresh pipeline with it equals the base UNet
    # carrying the checkpoint's policy adapter
    fresh = StableDiffusionPipeline.from_pretrained(tmp_path / "base", local_files_only=True)
    fresh.load_lora_weights(tmp_path / "lora")
    ref = StableDiffusionPipeline.from_pretrained(tmp_path / "base", local_files_only=True)
    adapters = LoraAdapters(ref.unet)
    adapters.add("policy", rank=2, target_modules=PPOConfig().lora_target_modules)
    tensors = load_file(str(latest_checkpoint(run_dir / "checkpoints") / "tensors.safetensors"))
    adapters.load_state_dict("policy", {k[7:]: v for k, v in tensors.items() if k.startswith("policy.")})
    x, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fresh.unet(x, 500, cond).sample, ref.unet(x, 500, cond).sample, rtol=1e-5, atol=1e-5)

    # config errors name the problem
    for bad, match in [({"sd": {"resolutoin": 16}}, "unknown sd: option"), ({"model_path": None}, "needs model_path"),
                       ({"prompts": []}, "needs prompts"), ({"sd": {"torch_dtype": "bfloat16"}}, "mixed_precision: bf16")]:
        cfg_file.write_text(yaml.safe_dump({**config, **bad}))
        with pytest.raises(ValueError, match=match):
            build_trainer(load_run_config(str(cfg_file)))
    with pytest.raises(SystemExit, match="no complete checkpoint that verifies"):
        main(["export-lora", "--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    (run_dir / "run.json").write_text(json.dumps({"task": "digits"}))
    with pytest.raises(SystemExit, match="Stable Diffusion tasks"):
        main(["export-lora", "--run", str(run_dir), "--out", str(tmp_path / "x")])
