"""The flow-matching twin of the tiny text-to-image model: a StableDiffusion3Pipeline without T5
(critic_align/assets/tiny_t2i_sd3), its training script (`pretrain-t2i --kind sd3`), its evaluation and its RL config."""

from __future__ import annotations

import json

import pytest
import torch

PROMPTS = ["a red 3 left of a blue 7", "two green 5s", ""]


def _asset():
    from critic_align.tasks.digits import ASSETS

    return ASSETS / "tiny_t2i_sd3"


def _tiny_pipeline(tmp_path):
    """The twin's components at test size (the training script's configs and pipeline builder)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from critic_align.train.train_t2i import (
        build_sd3_pipeline,
        flow_scheduler_config,
        load_vae,
        sd3_text_config,
        transformer_config,
        write_tokenizer,
    )

    tok = write_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    te = CLIPTextModelWithProjection(CLIPTextConfig(**sd3_text_config(tok, 32)))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**sd3_text_config(tok, 32)))
    tr = SD3Transformer2DModel(**transformer_config(32, width=32, layers=1, patch_size=2))
    vae = load_vae("critic_align/assets/tiny_t2i")
    return build_sd3_pipeline(vae, te, te2, tok, tok, tr, FlowMatchEulerDiscreteScheduler(**flow_scheduler_config()))


def test_rectified_flow_pair_by_hand():
    from critic_align.train.pretrain_digits_dit import rectified_flow_pair

    x0 = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    eps = torch.tensor([[3.0, 1.0], [-1.0, 2.0]])
    x, v = rectified_flow_pair(x0, eps, torch.tensor([0.25, 1.0]))
    torch.testing.assert_close(x, torch.tensor([[0.75 * 1 + 0.25 * 3, 0.75 * -2 + 0.25 * 1], [-1.0, 2.0]]))
    torch.testing.assert_close(v, torch.tensor([[2.0, 3.0], [-1.5, 2.0]]))


def test_training_conditioning_is_encode_prompt_and_fits_the_transformer(tmp_path):
    """The training loss sees exactly what the pipeline (and the RL task) feed the transformer: the CLIP encoders'
    penultimate states side by side + max_sequence_length zero T5 tokens, pooled projections side by side; and the
    gradient reaches both text encoders (they are trained jointly)."""
    from critic_align.tasks.sd import StableDiffusionTask
    from critic_align.train.train_t2i import MAX_TOKENS, sd3_conditioning

    pipe = _tiny_pipeline(tmp_path)
    embeds, pooled = sd3_conditioning(pipe, PROMPTS, 8)
    cfg = pipe.transformer.config
    assert embeds.shape == (3, MAX_TOKENS + 8, cfg.joint_attention_dim) and pooled.shape == (3, cfg.pooled_projection_dim)
    assert torch.all(embeds[:, MAX_TOKENS:] == 0)  # no T5: zeros
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
    h1 = pipe.text_encoder(ids, output_hidden_states=True)
    h2 = pipe.text_encoder_2(ids, output_hidden_states=True)
    torch.testing.assert_close(embeds[:, :MAX_TOKENS], torch.cat([h1.hidden_states[-2], h2.hidden_states[-2]], -1))
    torch.testing.assert_close(pooled, torch.cat([h1.text_embeds, h2.text_embeds], -1))
    out = pipe.transformer(hidden_states=torch.randn(3, 4, 8, 8), timestep=torch.tensor([10.0, 500.0, 990.0]),
                           encoder_hidden_states=embeds, pooled_projections=pooled).sample
    (out ** 2).sum().backward()
    for enc in (pipe.text_encoder, pipe.text_encoder_2):
        assert enc.text_model.embeddings.token_embedding.weight.grad.abs().sum() > 0
        assert enc.text_projection.weight.grad.abs().sum() > 0  # the pooled projection is trained too

    # what the RL task (tasks/sd.py, which freezes the encoders) conditions on is the same
    task = StableDiffusionTask(pipe, PROMPTS[:2], max_sequence_length=8)
    cond = task.encode(PROMPTS)
    assert torch.equal(cond.embeds, embeds.detach()) and torch.equal(cond.pooled, pooled.detach())


def test_transformer_config_refuses_bad_sizes():
    from critic_align.train.train_t2i import transformer_config

    with pytest.raises(ValueError, match="multiple of the head size 32"):
        transformer_config(width=100)
    with pytest.raises(ValueError, match="patch size 3 must divide"):
        transformer_config(patch_size=3)


def test_pretrain_t2i_sd3_writes_a_loadable_pipeline_and_evaluates(tmp_path):
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline
    from safetensors.torch import load_file

    from critic_align.train.evaluate_t2i import main as evaluate
    from critic_align.train.evaluate_t2i import saved_kind
    from critic_align.train.train_t2i import main

    out = tmp_path / "sd3"
    main(["--kind", "sd3", "--out", str(out), "--steps", "2", "--batch-size", "4", "--width", "32", "--layers", "1",
          "--text-hidden", "32", "--patch-size", "2"])
    assert saved_kind(out) == "sd3"
    # diffusers loads a pipeline saved without T5 when told so (its documented way of dropping T5)
    with pytest.raises(ValueError, match="text_encoder_3"):
        StableDiffusion3Pipeline.from_pretrained(out, local_files_only=True)
    pipe = StableDiffusion3Pipeline.from_pretrained(out, local_files_only=True, text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert pipe.transformer.config.patch_size == 2 and pipe.vae.config.shift_factor == 0.0
    # the reused VAE is tiny_t2i's, weights unchanged
    shipped = load_file("critic_align/assets/tiny_t2i/vae/diffusion_pytorch_model.safetensors")
    ours = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    assert shipped.keys() == ours.keys() and all(torch.equal(shipped[k], ours[k]) for k in shipped)
    assert AutoencoderKL.load_config("critic_align/assets/tiny_t2i/vae")["shift_factor"] is None  # shipped one untouched
    assert (out / "tokenizer_2" / "vocab.json").read_text() == (out / "tokenizer" / "vocab.json").read_text()
    pipe.set_progress_bar_config(disable=True)
    img = pipe(PROMPTS[:2], num_inference_steps=2, guidance_scale=1.0, max_sequence_length=8, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (2, 3, 32, 32) and torch.isfinite(img).all()
    log = json.loads((out / "training_log.json").read_text())
    assert log["args"]["kind"] == "sd3" and log["args"]["max_sequence_length"] == 8
    assert set(log["params"]) == {"transformer", "vae", "text_encoder", "text_encoder_2"}

    with pytest.raises(SystemExit, match="already holds a pipeline; pass another --out"):
        main(["--kind", "sd3", "--out", str(out), "--steps", "1"])

    results = evaluate(["--model", str(out), "--per-split", "2", "--steps", "2", "--out", str(tmp_path / "eval")])
    card = (tmp_path / "eval" / "MODEL_CARD.md").read_text()
    assert "StableDiffusion3Pipeline" in card and "max_sequence_length=8" in card
    r = results["heldout_cfg1"]
    assert f"| heldout ({r['n']}) | 1 | {r['count']:.3f} |" in card


def test_saved_kind_names_unknown_pipelines(tmp_path):
    from critic_align.train.evaluate_t2i import saved_kind

    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        saved_kind(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="'FluxPipeline'; evaluate-t2i evaluates"):
        saved_kind(tmp_path)


# ------------------------------------------------------------------------------------------------------
# the shipped pipeline
def test_shipped_sd3_pipeline_loads_offline_generates_and_has_its_card():
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from test_t2i import check_shipped_asset

    asset = _asset()
    # vae, 2 text encoders, transformer; the card's table for CFG 1 and 3
    card = check_shipped_asset(asset, n_weights=4, max_bytes=10e6, guidance_scales=("1", "3"))
    pipe = StableDiffusion3Pipeline.from_pretrained(asset, local_files_only=True, text_encoder_3=None, tokenizer_3=None)
    assert isinstance(pipe.transformer, SD3Transformer2DModel) and pipe.text_encoder_3 is None
    assert 0.8e6 < sum(p.numel() for p in pipe.transformer.parameters()) < 1.6e6  # sized like tiny_t2i's UNet
    pipe.set_progress_bar_config(disable=True)
    msl = json.loads((asset / "training_log.json").read_text())["args"]["max_sequence_length"]
    out = pipe(PROMPTS[:2], num_inference_steps=5, guidance_scale=1.0, max_sequence_length=msl, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    assert f"max_sequence_length={msl}" in card


def test_t2i_sd3_config_trains_through_the_sd3_path(tmp_path):
    """critic-align train --config t2i_sd3 (tiny settings, its SDE window): the SD3 task, the flow SDE step, the
    pipeline's max_sequence_length; the policy LoRA exports and loads into the shipped pipeline."""
    from critic_align.api import build_trainer, load_run_dir
    from critic_align.steps import FlowMatchSDEStep
    from critic_align.train.cli import main
    from critic_align.train.registry import load_run_config

    run = load_run_config("t2i_sd3")
    assert run["task"] == "sd3" and run["ppo"].guidance_scale == 1.0 and run["ppo"].sde_window_size == 4
    msl = json.loads((_asset() / "training_log.json").read_text())["args"]["max_sequence_length"]
    assert run["sd"]["max_sequence_length"] == msl and run["sd"]["drop_t5"] is True

    from test_t2i import tiny_train_argv

    run_dir = tmp_path / "run"
    assert main(tiny_train_argv("t2i_sd3", run_dir)) == 0
    assert json.loads((run_dir / "run.json").read_text())["task"] == "sd3"
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("sde_window_start" in r for r in rows)
    trainer = build_trainer(load_run_dir(run_dir))
    assert isinstance(trainer.step, FlowMatchSDEStep) and trainer.task.max_sequence_length == msl
    assert main(["export-lora", "--run", str(run_dir), "--out", str(tmp_path / "lora")]) == 0
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").exists()
    card = (tmp_path / "lora" / "README.md").read_text()
    assert "task `sd3`" in card and "StableDiffusion3Pipeline" in card and "SDE noise level" in card
    # sample --run with the run's flow SDE sampler and prompts from the command line
    assert main(["sample", "--run", str(run_dir), "--prompt", "two green 5s", "--n", "2"]) == 0
    assert (run_dir / "samples.png").exists()
