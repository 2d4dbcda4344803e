"""The tiny text-to-image pipeline (critic_align/assets/tiny_t2i): its training script's pieces."""

from __future__ import annotations

import json

import numpy as np
import torch

from critic_align.tasks.composition import is_held_out, parse_prompt, vocabulary_words


def test_written_tokenizer_keeps_every_grammar_word_whole(tmp_path):
    from transformers import CLIPTokenizer

    from critic_align.train.train_t2i import MAX_TOKENS, write_tokenizer

    tok = write_tokenizer(tmp_path / "tok")
    again = CLIPTokenizer.from_pretrained(tmp_path / "tok")  # what the pipeline loads
    for t in (tok, again):
        for w in vocabulary_words():
            assert len(t(w, add_special_tokens=False).input_ids) == 1, w
        ids = t("a red 3 left of a blue 7").input_ids
        assert len(ids) == 10 and t.convert_ids_to_tokens(ids)[1:4] == ["a</w>", "red</w>", "3</w>"]
        assert t.convert_ids_to_tokens(t("two red 3s").input_ids)[3:5] == ["3</w>", "s</w>"]
        assert t.model_max_length == MAX_TOKENS
    # any other text still tokenizes (byte characters), without an unknown token
    assert tok.unk_token_id not in tok("a purple cat!").input_ids[1:-1]  # (CLIP's unk is its end token)


def test_composition_sampler_never_draws_held_out_prompts():
    from critic_align.train.train_t2i import CompositionSampler

    s = CompositionSampler(seed=0)
    images, prompts = s.batch(400)
    assert images.shape == (400, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    comps = [parse_prompt(p) for p in prompts]
    assert not any(is_held_out(c) for c in comps)
    relations = np.mean([c.relation is not None for c in comps])
    assert 0.4 < relations < 0.6  # half count prompts, half relation prompts


# ------------------------------------------------------------------------------------------------------
# the shipped pipeline
def _asset():
    from critic_align.tasks.digits import ASSETS

    return ASSETS / "tiny_t2i"


def check_shipped_asset(asset, n_weights: int, max_bytes: float, guidance_scales=("1",)) -> str:
    """What every shipped tiny t2i model must hold: a few MB of safetensors weights (``n_weights`` files), both
    prompt lists as ``prompt_split`` makes them, and a model card whose table is eval.json's numbers (per split
    and guidance scale) and which states the training time.  Returns the card."""
    from critic_align.tasks.composition import prompt_split
    from critic_align.tasks.sd import read_prompts

    files = [f for f in asset.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < max_bytes  # a few MB
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert len(weights) == n_weights and all(f.suffix == ".safetensors" for f in weights)
    train, held = prompt_split()
    assert read_prompts(asset / "train_prompts.txt") == train and read_prompts(asset / "heldout_prompts.txt") == held
    results = json.loads((asset / "eval.json").read_text())
    card = (asset / "MODEL_CARD.md").read_text()
    for split in ("train", "heldout"):
        for gs in guidance_scales:
            r = results[f"{split}_cfg{gs}"]
            cells = " | ".join(f"{r[k]:.3f}" if r[k] is not None else "–"
                               for k in ("count", "digit", "colour", "position", "all_clauses", "score"))
            assert f"| {split} ({r['n']}) | {gs} | {cells} |" in card
    train_log = json.loads((asset / "training_log.json").read_text())
    assert f"{train_log['train_time_s'] / 60:.1f} minutes" in card
    return card


def test_shipped_pipeline_loads_offline_generates_and_has_its_card():
    from diffusers import StableDiffusionPipeline

    asset = _asset()
    check_shipped_asset(asset, n_weights=3, max_bytes=8e6)  # vae, text encoder, unet
    pipe = StableDiffusionPipeline.from_pretrained(asset, local_files_only=True)
    assert pipe.safety_checker is None and pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a red 3 left of a blue 7", "two green 5s"], num_inference_steps=5, guidance_scale=1.0, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


def tiny_train_argv(config: str, out) -> list[str]:
    """`critic-align train` on a t2i config at test size: 2 epochs of 8 samples, 4 steps, a window of 2."""
    sets = dict(num_epochs=2, batch_size=8, group_size=2, num_inference_steps=4, minibatch_size=16,
                value_pretrain_epochs=1, value_pretrain_passes=1, progress=False, log_tensorboard=False, grid_every=0,
                lora_rank=2, critic_lora_rank=2, value_head_hidden=16, value_head_heads=2, clip_range=0.2,
                learning_rate=1e-2, sde_window_size=2, sde_window_range="[0, 2]")
    argv = ["train", "--config", config, "--out", str(out)]
    for k, v in sets.items():
        argv += ["--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
    return argv


def test_workflow_train_export_lora_reload_reproduces_and_steers(tmp_path):
    """critic-align train --config t2i -> export-lora -> StableDiffusionPipeline.from_pretrained(asset)
    .load_lora_weights(dir) reproduces the run's policy samples (same scheduler settings and latents; DDIM with
    eta 0 and 1), and steer_pipeline runs SMC on that pipeline with the run's trained critic."""
    from diffusers import StableDiffusionPipeline

    from critic_align.api import build_trainer, load_run_dir
    from critic_align.checkpoint import latest_checkpoint
    from critic_align.rewards import CompositionScore
    from critic_align.rollout import sample
    from critic_align.steering import critic_value_fn
    from critic_align.steering.diffusers import steer_pipeline
    from critic_align.steps import DDIMStep
    from critic_align.train.cli import main

    run_dir, lora_dir = tmp_path / "run", tmp_path / "lora"
    assert main(tiny_train_argv("t2i", run_dir)) == 0
    assert main(["export-lora", "--run", str(run_dir), "--out", str(lora_dir)]) == 0

    trainer = build_trainer(load_run_dir(run_dir))
    trainer.load(latest_checkpoint(run_dir / "checkpoints"), resume=False)
    pipe = StableDiffusionPipeline.from_pretrained(_asset(), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora_dir)
    prompts = ["a red 3 left of a blue 7", "two green 5s"]
    cond = trainer.task.encode(prompts)
    x_T = torch.randn(2, *trainer.task.latent_shape, generator=torch.Generator().manual_seed(3))
    ts = trainer.timesteps
    with torch.no_grad():
        base = sample(trainer.reference_output, DDIMStep(trainer.schedule, eta=0.0), x_T, ts, cond)
    for eta in (0.0, 1.0):
        with torch.no_grad():
            ours = sample(trainer.policy_output, DDIMStep(trainer.schedule, eta=eta), x_T, ts, cond,
                          generator=torch.Generator().manual_seed(7))
        theirs = pipe(prompts, latents=x_T.clone(), num_inference_steps=len(ts), guidance_scale=1.0, eta=eta,
                      generator=torch.Generator().manual_seed(7), output_type="latent").images
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
        if eta == 0.0:
            assert not torch.allclose(ours, base, atol=1e-3)  # the trained LoRA changed the samples

    # test-time steering of this pipeline with the run's trained critic (SMC, potentials from the critic)
    value_fn = critic_value_fn(trainer.critic)
    res = steer_pipeline(pipe, prompts, num_particles=3, reward_fn=CompositionScore(), value_fn=value_fn,
                         lam=5.0, eta=1.0, num_inference_steps=4, guidance_scale=1.0,
                         generator=torch.Generator().manual_seed(0))
    assert res.samples.shape == (2, 3, 32, 32) and res.log_weights.shape == (2, 3)
    assert torch.isfinite(res.particle_rewards).all()


def test_pretrain_t2i_never_overwrites_a_pipeline(tmp_path):
    import pytest

    from critic_align.train.train_t2i import main

    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(SystemExit, match="already holds a pipeline; pass another --out"):
        main(["--out", str(tmp_path), "--steps", "1", "--vae-steps", "1"])
    assert (tmp_path / "model_index.json").read_text() == "{}"
