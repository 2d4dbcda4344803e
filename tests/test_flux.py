"""FLUX.1: the FluxTransformer2DModel adapter (packing, guidance, features), the FluxPipeline task (its encode_prompt,
VAE decode, FLUX's resolution-shifted sigmas equal to what the pipeline's scheduler gets), and the must-show round
trip: a tiny FluxPipeline built offline, trained 2 epochs, its policy LoRA exported, loaded with
``FluxPipeline.load_lora_weights`` and reproducing the policy's samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_sd_pipelines import (
    _clip_text_config,
    assert_only_lora_changed,
    brightness,
    frozen_snapshot,
    small_config,
    tiny_clip_tokenizer,
)

from critic_align.backbones import FluxAdapter
from critic_align.cond import TextCond
from critic_align.config_sections import sectioned
from critic_align.rewards import FunctionReward, JpegCompressibility, MultiReward
from critic_align.rollout import cfg_denoiser, sample
from critic_align.steps import FlowMatchSchedule, FlowMatchSDEStep, make_step
from critic_align.tasks.flux import FluxTask, flux_mu
from critic_align.tasks.sd import StableDiffusionTask, save_policy_lora
from critic_align.trainer import Trainer

PROMPTS = ("a cat", "a dog", "red fox", "owl")
# FLUX.1-dev's scheduler config (black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json)
FLUX_DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                          max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
# Flow-GRPO's FLUX LoRA targets (yifan123/flow_grpo scripts/train_flux.py), attention only here to stay small
FLUX_LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                     "attn.add_v_proj", "attn.to_add_out")


def tiny_flux_transformer(guidance_embeds=True, seed=0, num_layers=1, num_single_layers=2):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=num_layers,
                                  num_single_layers=num_single_layers, attention_head_dim=8, num_attention_heads=2,
                                  joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance_embeds,
                                  axes_dims_rope=(2, 2, 4))


def tiny_t5_tokenizer():
    """A T5 (Unigram) tokenizer over single characters: <pad>=0, </s>=1, <unk>=2, then ▁ and a-z."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_flux_pipeline(tmp_dir: Path, seed: int = 0, guidance_embeds: bool = True):
    """FLUX.1-class pipeline: tiny FluxTransformer2DModel (1 double + 2 single blocks, guidance embedding), a
    FLUX-style AutoencoderKL (4 latent channels for the 16 in-channels of 2x2 packing; no quant convs, shift and scaling
    factors, factor 2), CLIP text
    model (pooled) + T5 encoder, FLUX.1-dev's dynamically shifted scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tok = tiny_clip_tokenizer(tmp_dir / "tokenizer")
    tok2 = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = tiny_flux_transformer(guidance_embeds, seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, layers_per_block=1, sample_size=16, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    text_encoder = CLIPTextModel(_clip_text_config(tok, hidden=16))
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=32, d_kv=8, d_ff=32, num_layers=1,
                                             num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                        text_encoder_2=text_encoder_2, tokenizer_2=tok2, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text_cond(b, seed=0, length=5):
    g = torch.Generator().manual_seed(seed)
    return TextCond(torch.randn(b, length, 32, generator=g), torch.randn(b, 16, generator=g))


# ----------------------------------------------------------------------------------------------------
# the adapter
def test_flux_adapter_matches_the_pipeline_call_and_its_features():
    from diffusers import FluxPipeline

    model = tiny_flux_transformer().eval()
    adapter = FluxAdapter(model, guidance=3.5)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = text_cond(3)
    t = torch.tensor([1000.0, 613.5, 41.0])
    out = adapter.predict(x, t, cond)
    assert out.shape == x.shape
    # what FluxPipeline.__call__ does around the transformer, written out: pack, ids, t / 1000, guidance, unpack
    packed = FluxPipeline._pack_latents(x, 3, 4, 8, 8)
    assert packed.shape == (3, 16, 16)
    ref = model(hidden_states=packed, timestep=t / 1000, guidance=torch.full((3,), 3.5),
                pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds, txt_ids=torch.zeros(5, 3),
                img_ids=FluxPipeline._prepare_latent_image_ids(3, 4, 4, "cpu", torch.float32), return_dict=False)[0]
    torch.testing.assert_close(out, FluxPipeline._unpack_latents(ref, 16, 16, 2), rtol=0, atol=0)
    torch.testing.assert_close(adapter.pack(x), packed, rtol=0, atol=0)
    # the guidance value is an input of the model
    assert not torch.allclose(FluxAdapter(model, guidance=1.0).predict(x, t, cond), out, atol=1e-5)

    # batched == per sample, scalar t == per-sample t
    one = torch.cat([adapter.predict(x[i:i + 1], t[i:i + 1], cond[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(one, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adapter.predict(x, 500.0, cond), adapter.predict(x, torch.full((3,), 500.0), cond))

    # features: 'mid' = the last single-stream block's image tokens, 'multi' = three depths of both block kinds
    assert adapter.feature_layers("mid") == ["single_transformer_blocks.1"]
    assert adapter.feature_layers("multi") == ["transformer_blocks.0", "single_transformer_blocks.0",
                                               "single_transformer_blocks.1"]
    deep = FluxAdapter(tiny_flux_transformer(num_layers=19, num_single_layers=38).to("meta"), guidance=3.5)
    assert deep.feature_layers("multi") == ["transformer_blocks.18", "single_transformer_blocks.18",
                                            "single_transformer_blocks.37"]
    mid = adapter.features(x, t, cond)
    assert [lv.shape for lv in mid.levels] == [(3, 16, 16)]
    assert mid.temb.shape == (3, adapter.temb_dim) and mid.cemb.shape == (3, adapter.cond_dim)
    assert adapter.feature_dim == 16 and adapter.temb_dim == 16 and adapter.cond_dim == 16
    multi = adapter.features(x, t, cond, which="multi")
    assert [lv.shape for lv in multi.levels] == [(3, 16, 16)] * 3
    # the last level is the hidden state the output norm reads: same as the full forward's
    pred, feats = adapter.predict_and_features(x, t, cond, which="multi")
    torch.testing.assert_close(pred, out)
    for a, b in zip(feats.levels, multi.levels):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(mid.levels[0], multi.levels[-1])
    # the temb is the timestep embedder's output (no guidance / text), the cemb the pooled projection's
    te = model.time_text_embed
    proj = te.time_proj((t / 1000) * 1000)  # the transformer multiplies the t / 1000 it gets by 1000
    torch.testing.assert_close(mid.temb, te.timestep_embedder(proj.to(x.dtype)))
    torch.testing.assert_close(mid.cemb, te.text_embedder(cond.pooled))
    # features per sample == batched
    one = [adapter.features(x[i:i + 1], t[i:i + 1], cond[i:i + 1], which="multi") for i in range(3)]
    for k in range(3):
        torch.testing.assert_close(torch.cat([f.levels[k] for f in one]), multi.levels[k], rtol=1e-5, atol=1e-6)


def test_flux_adapter_refuses_bad_inputs():
    model = tiny_flux_transformer().eval()
    with pytest.raises(ValueError, match="guidance-distilled"):
        FluxAdapter(model)
    with pytest.raises(ValueError, match="no guidance embedding"):
        FluxAdapter(tiny_flux_transformer(guidance_embeds=False), guidance=3.5)
    with pytest.raises(TypeError, match="FluxTransformer2DModel"):
        FluxAdapter(torch.nn.Linear(2, 2))
    adapter = FluxAdapter(model, guidance=3.5)
    with pytest.raises(ValueError, match="even H and W"):
        adapter.predict(torch.zeros(1, 4, 7, 8), 500.0, text_cond(1))
    with pytest.raises(ValueError, match=r"unpacked latents \(B, 4, H, W\)"):
        adapter.predict(torch.zeros(1, 16, 4, 4), 500.0, text_cond(1))
    with pytest.raises(TypeError, match="TextCond"):
        adapter.predict(torch.zeros(1, 4, 8, 8), 500.0, torch.zeros(1, 5, 32))
    with pytest.raises(ValueError, match="critic_features names"):
        adapter.feature_layers(["transformer_blocks.9"])


def test_full_size_flux_shapes_and_lora_size_on_meta():
    """FLUX.1-dev's transformer (default config + guidance embedding) on the meta device (no memory, no compute):
    the parameter counts flux_pickscore.yaml's memory estimate uses, and the adapter's shapes at 512 px."""
    from diffusers import FluxTransformer2DModel

    from critic_align.backbones import LoraAdapters
    from critic_align.train.registry import load_run_config

    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=True)
    assert 11.85e9 < sum(p.numel() for p in model.parameters()) < 11.95e9  # FLUX.1-dev: 11.9 B
    adapter = FluxAdapter(model, guidance=3.5)
    x = torch.empty(2, 16, 64, 64, device="meta")  # 512 px: 64x64 latents, 32x32 = 1024 tokens
    cond = TextCond(torch.empty(2, 128, 4096, device="meta"), torch.empty(2, 768, device="meta"))
    t = torch.full((2,), 500.0, device="meta")
    assert adapter.predict(x, t, cond).shape == x.shape
    feats = adapter.features(x, t, cond, which="multi")
    assert [lv.shape for lv in feats.levels] == [(2, 1024, 3072)] * 3
    assert feats.temb.shape == (2, 3072) and feats.cemb.shape == (2, 3072)
    cfg = load_run_config("flux_pickscore")["ppo"]
    adapters = LoraAdapters(model)
    adapters.add("policy", rank=cfg.lora_rank, alpha=cfg.lora_alpha, target_modules=cfg.lora_target_modules)
    assert 178e6 < sum(p.numel() for p in adapters.parameters("policy")) < 180e6  # the YAML's "179 M"


# ----------------------------------------------------------------------------------------------------
# FLUX's sigmas
@pytest.mark.parametrize("n", [1, 6, 28])
@pytest.mark.parametrize("seq_len", [16, 1024, 4096])
def test_flux_schedule_is_the_pipelines(n, seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sch = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)  # FluxPipeline.__call__, step 5
    assert flux_mu(sch.config, seq_len) == pytest.approx(mu, rel=0, abs=0)
    sch.set_timesteps(n, sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    fs = FlowMatchSchedule.from_scheduler(sch, mu=mu, sigma_grid="linspace")
    assert torch.equal(fs.timesteps(n), sch.timesteps) and torch.equal(fs.sigmas(n), sch.sigmas[:-1])
    # hand-computed: exp(mu) / (exp(mu) + 1/s - 1) on s = linspace(1, 1/n, n)
    s = np.linspace(1.0, 1 / n, n)
    torch.testing.assert_close(fs.sigmas(n).double(), torch.tensor(np.exp(mu) / (np.exp(mu) + 1 / s - 1)),
                               rtol=0, atol=1e-6)
    # the forward process gets the same grid
    from critic_align.value_data import ForwardProcess

    fp = ForwardProcess(fs, n)
    assert torch.equal(fp.scheduler.timesteps, sch.timesteps)
    x0, eps = torch.randn(2, 3), torch.randn(2, 3)
    k = n // 2
    torch.testing.assert_close(fp(x0, eps, fs.timesteps(n)[[k, k]]), (1 - sch.sigmas[k]) * x0 + sch.sigmas[k] * eps)
    assert isinstance(make_step(fs, 0.9), FlowMatchSDEStep)


def test_dynamic_schedule_needs_mu():
    from diffusers import FlowMatchEulerDiscreteScheduler

    with pytest.raises(ValueError, match="use_dynamic_shifting=True.*pass mu"):
        FlowMatchSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER))
    with pytest.raises(ValueError, match="ignores mu"):
        FlowMatchSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), mu=0.8)
    with pytest.raises(ValueError, match="sigma_grid"):
        FlowMatchSchedule(sigma_grid="karras")
    assert flux_mu(FlowMatchEulerDiscreteScheduler(shift=1.0).config, 1024) is None  # schnell: no dynamic shift


# ----------------------------------------------------------------------------------------------------
# the task
def test_flux_task_contract(tmp_path):
    pipe = tiny_flux_pipeline(tmp_path)
    task = FluxTask(pipe, PROMPTS, max_sequence_length=8)
    assert task.kind == "flux" and task.resolution == 256 and task.latent_shape == (4, 128, 128)
    task = FluxTask(pipe, PROMPTS, resolution=16, max_sequence_length=8)
    assert task.latent_shape == (4, 8, 8) and task.guidance == 3.5
    cond = task.encode(["a cat", "owl"])
    embeds, pooled, text_ids = pipe.encode_prompt(["a cat", "owl"], None, device="cpu", max_sequence_length=8)
    assert isinstance(cond, TextCond) and torch.equal(cond.embeds, embeds) and torch.equal(cond.pooled, pooled)
    assert cond.embeds.shape == (2, 8, 32) and cond.pooled.shape == (2, 16) and text_ids.shape == (8, 3)
    assert torch.equal(task.null_cond(3).pooled[1], task.encode([""]).pooled[0])
    z = torch.randn(2, *task.latent_shape)
    cfg = pipe.vae.config
    ref = pipe.vae.decode(z / cfg.scaling_factor + cfg.shift_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(task.decode(z), ref)
    torch.testing.assert_close(task.unpack(task.pack(z)), z, rtol=0, atol=0)
    # the schedule is FluxPipeline's at this resolution: 4x4 = 16 packed tokens
    assert task.mu == pytest.approx(0.5 + (1.15 - 0.5) / (4096 - 256) * (16 - 256))
    assert task.scheduler is task.schedule and task.schedule.sigma_grid == "linspace"
    assert isinstance(task.backbone(), FluxAdapter) and task.backbone().guidance == 3.5
    assert FluxTask(pipe, PROMPTS, resolution=16, guidance=2.0).backbone().guidance == 2.0
    with pytest.raises(ValueError, match="patch size 2; use a multiple of 4"):
        FluxTask(pipe, PROMPTS, resolution=18)
    with pytest.raises(ValueError, match="512"):
        FluxTask(pipe, PROMPTS, resolution=16, max_sequence_length=513)
    with pytest.raises(ValueError, match="finite number"):
        FluxTask(pipe, PROMPTS, resolution=16, guidance=float("nan"))
    with pytest.raises(TypeError, match="critic_align.tasks.flux.FluxTask"):
        StableDiffusionTask(pipe, PROMPTS)
    pipe.transformer.register_to_config(guidance_embeds=False)  # as schnell's config reads
    with pytest.raises(ValueError, match="no guidance embedding"):
        FluxTask(pipe, PROMPTS, resolution=16, guidance=3.5)


# ----------------------------------------------------------------------------------------------------
# must show: train 2 epochs, export, load with FluxPipeline.load_lora_weights, reproduce the samples
def test_flux_two_epochs_lora_export_reproduces_policy_samples(tmp_path):
    from diffusers import FluxPipeline

    pipe = tiny_flux_pipeline(tmp_path)
    pipe.save_pretrained(tmp_path / "base")  # the fresh copy the exported LoRA is loaded into
    task = FluxTask(pipe, PROMPTS, resolution=16, max_sequence_length=8)
    rewards = MultiReward([JpegCompressibility(), FunctionReward(brightness, name="brightness")])
    cfg = small_config(tmp_path, num_epochs=2, sde_noise_level=0.9, lora_target_modules=FLUX_LORA_TARGETS,
                       lora_alpha=4.0, critic_features="multi")
    trainer = Trainer(cfg, task, task.backbone(), task.scheduler, rewards)
    assert isinstance(trainer.step, FlowMatchSDEStep)
    # the trainer samples on the pipeline scheduler's own timesteps at this resolution
    ref_sch = FluxPipeline.from_pretrained(tmp_path / "base", local_files_only=True).scheduler
    ref_sch.set_timesteps(4, sigmas=np.linspace(1.0, 1 / 4, 4), mu=task.mu)
    assert torch.equal(trainer.timesteps, ref_sch.timesteps)
    before_frozen = frozen_snapshot(pipe, "transformer")
    before_lora = {n: {k: v.clone() for k, v in trainer.adapters.state_dict(n).items()} for n in ("policy", "critic")}
    history = trainer.train()
    # epoch 1: 4 samples to pretrain the value + 4 trained on; epoch 2: 4 more
    assert [h["epoch"] for h in history] == [1, 2] and history[-1]["reward_queries"] == 12
    assert_only_lora_changed(trainer, pipe, "transformer", before_frozen, before_lora)

    out = save_policy_lora(trainer.task, trainer.models, trainer.config, tmp_path / "lora")
    assert (out / "pytorch_lora_weights.safetensors").exists()
    fresh = FluxPipeline.from_pretrained(tmp_path / "base", local_files_only=True)
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(out)

    # the same network output for the same inputs
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, *task.latent_shape, generator=g)
    cond = task.encode(["a cat", "owl"])
    t = trainer.timesteps[[0, 2]]
    ours = trainer.policy_output(x, t, cond)
    theirs = FluxAdapter(fresh.transformer, guidance=task.guidance).predict(x, t, cond)
    assert not torch.allclose(ours, trainer.reference_output(x, t, cond), atol=1e-4)  # the LoRA matters ...
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)  # ... and is reproduced

    # the same samples: the pipeline's Euler sampler (our SDE step at noise level 0) from the same x_T, with FLUX's
    # embedded guidance, and with true CFG against the empty negative prompt (our CFG with null_cond)
    x_T = torch.randn(2, *task.latent_shape, generator=g)
    step = FlowMatchSDEStep(trainer.schedule, noise_level=0.0)
    for scale in (1.0, 3.0):
        ours = sample(cfg_denoiser(trainer.policy_output, scale, task.null_cond), step, x_T, trainer.timesteps, cond)
        kw = dict(negative_prompt=["", ""], true_cfg_scale=scale) if scale > 1 else {}
        theirs = fresh(["a cat", "owl"], latents=task.pack(x_T), height=16, width=16,
                       num_inference_steps=len(trainer.timesteps), guidance_scale=task.guidance, max_sequence_length=8,
                       output_type="latent", **kw).images
        torch.testing.assert_close(task.unpack(theirs), ours, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["shared", "full"])
def test_flux_other_critic_modes_train(tmp_path, mode):
    """The critic sharing the policy's trunk, or a trainable copy of the transformer, with the pooled text in its
    AdaLN: one epoch trains the value head (finite value loss) and the critic gives finite values."""
    pipe = tiny_flux_pipeline(tmp_path)
    task = FluxTask(pipe, PROMPTS, resolution=16, max_sequence_length=8)
    cfg = small_config(tmp_path, critic_mode=mode, critic_cond=True, critic_features="multi", sde_noise_level=0.9,
                       lora_target_modules=FLUX_LORA_TARGETS)
    trainer = Trainer(cfg, task, task.backbone(), task.scheduler, MultiReward([FunctionReward(brightness, name="b")]))
    head = [p.detach().clone() for p in trainer.critic.head.parameters()]
    history = trainer.train()
    assert np.isfinite(history[-1]["value_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(head, trainer.critic.head.parameters()))
    x = torch.randn(2, *task.latent_shape)
    values = trainer.critic(x, trainer.timesteps[[0, 1]], task.encode(["a cat", "owl"]))
    assert values.shape == (2, 1) and torch.isfinite(values).all()


def test_flux_run_config_builds_and_exports(tmp_path):
    """task: flux in a run config: the trainer builds from a local pipeline directory; export-lora writes the FLUX
    LoRA that FluxPipeline loads; the shipped flux_pickscore.yaml loads and names its missing weights."""
    import yaml
    from diffusers import FluxPipeline

    from critic_align.api import build_trainer
    from critic_align.train.cli import main
    from critic_align.train.registry import load_run_config

    run = load_run_config("flux_pickscore")
    assert run["task"] == "flux" and run["ppo"].guidance_scale == 1.0
    with pytest.raises(FileNotFoundError, match="model_path .* does not exist"):
        build_trainer(run)

    tiny_flux_pipeline(tmp_path).save_pretrained(tmp_path / "base")
    ppo = dict(num_epochs=1, batch_size=4, group_size=2, num_inference_steps=3, minibatch_size=16,
               value_pretrain_epochs=1, value_pretrain_passes=1, progress=False, log_tensorboard=False, grid_every=0,
               lora_rank=2, critic_lora_rank=2, value_head_hidden=16, value_head_heads=2, sde_noise_level=0.9,
               lora_target_modules=list(FLUX_LORA_TARGETS))
    config = {"task": "flux", "model_path": str(tmp_path / "base"), "prompts": ["a cat", "owl"],
              "sd": {"resolution": 16, "max_sequence_length": 8, "guidance": 2.5}, "rewards": ["jpeg_compressibility"],
              **sectioned(ppo)}
    cfg_file = tmp_path / "flux_tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(config))
    trainer = build_trainer(load_run_config(str(cfg_file)))
    assert isinstance(trainer.task, FluxTask) and trainer.adapter.guidance == 2.5
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(cfg_file), "--out", str(run_dir)]) == 0
    assert json.loads((run_dir / "run.json").read_text())["task"] == "flux"
    assert main(["export-lora", "--run", str(run_dir), "--out", str(tmp_path / "lora"), "--task", "flux"]) == 0
    assert "task `flux`" in (tmp_path / "lora" / "README.md").read_text()
    assert main(["sample", "--run", str(run_dir), "--prompt", "a cat", "--prompt", "owl", "--n", "2"]) == 0
    assert (run_dir / "samples.png").exists()  # sample --run on a FLUX run, prompts from the command line
    fresh = FluxPipeline.from_pretrained(tmp_path / "base", local_files_only=True)
    fresh.load_lora_weights(tmp_path / "lora")
    assert any("lora_A" in n for n, _ in fresh.transformer.named_parameters())
    # test-time steering of the trained run: value guidance (the critic's gradient in velocity form)
    steer_out = tmp_path / "steer"
    assert main(["steer", "--run", str(run_dir), "--out", str(steer_out), "--per-prompt", "1", "--particles", "2",
                 "--method", "guidance", "--scale", "5", "--threads", "1"]) == 0
    runs = json.loads((steer_out / "steer_results.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["guidance"] and runs[0]["cost"]["nfe"] > 0
    cfg_file.write_text(yaml.safe_dump({**config, "task": "sd3"}))
    with pytest.raises(ValueError, match="embedded guidance"):
        build_trainer(load_run_config(str(cfg_file)))
