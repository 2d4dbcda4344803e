"""Around the engine (issue 31): `sample --run` on any task, export-lora's model card and hub push, trackers,
HPSv2.1, prompt metadata.  One tiny t2i run (the shipped tiny SD1.5 pipeline, 2 epochs) serves the CLI tests."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_t2i import tiny_train_argv


@pytest.fixture(scope="module")
def t2i_run(tmp_path_factory):
    from train.cli import main

    run_dir = tmp_path_factory.mktemp("eco") / "run"
    assert main(tiny_train_argv("t2i", run_dir)) == 0
    return run_dir


def test_sample_run_draws_the_prompts_of_the_command_line_with_the_runs_sampler(t2i_run, tmp_path):
    """`critic-align sample --run RUN --prompt ... --n 3 --seed 5`: one labelled row per prompt, the pixels the run's
    trainer (rebuilt from the run directory, its checkpoint loaded) draws from that seed with its policy."""
    from critic_align.checkpoint import latest_checkpoint
    from critic_align.viz import make_grid
    from train.cli import main
    from train.registry import build_trainer, load_run_dir

    prompts = ["a red 3 left of a blue 7", "two green 5s"]
    argv = ["sample", "--run", str(t2i_run), "--n", "3", "--seed", "5"]
    for p in prompts:
        argv += ["--prompt", p]
    assert main(argv) == 0
    grid = np.asarray(Image.open(t2i_run / "samples.png").convert("RGB"))

    trainer = build_trainer(load_run_dir(t2i_run))
    trainer.load(latest_checkpoint(t2i_run / "checkpoints"), resume=False)
    rows = [p for p in prompts for _ in range(3)]
    policy = make_grid(trainer.sample(rows, seed=5), nrow=3, scale=trainer.task.grid_scale)
    base = make_grid(trainer.sample(rows, seed=5, use_policy=False), nrow=3, scale=trainer.task.grid_scale)
    assert grid.shape[0] == policy.shape[0] and grid.shape[1] > policy.shape[1] + 60  # room for the prompts' labels
    cells = grid[:, -policy.shape[1]:]
    np.testing.assert_array_equal(cells, policy)
    assert np.abs(cells.astype(int) - base.astype(int)).max() > 0  # the trained policy, not the base model
    label = grid[:, : grid.shape[1] - policy.shape[1]]
    assert (label < 128).any(axis=-1).sum() > 50  # the prompts are written there (dark text on white)

    other = tmp_path / "other.png"  # another seed, another grid; --out puts it elsewhere
    assert main(["sample", "--run", str(t2i_run), "--prompt", prompts[0], "--n", "2", "--seed", "6",
                 "--out", str(other)]) == 0
    assert 0 < np.asarray(Image.open(other)).shape[0] < grid.shape[0]  # one row


def test_sample_run_refuses_bad_prompts_before_loading(t2i_run, tmp_path, capsys):
    from train.cli import cli

    assert cli(["sample", "--run", str(t2i_run), "--prompt", "  "]) == 2
    assert "--prompt is empty" in capsys.readouterr().err
    assert cli(["sample", "--prompt", "a cat"]) == 2
    assert "--prompt needs --run" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------
# export-lora: the model card and the hub push
def test_export_lora_writes_a_model_card_whose_metrics_are_the_runs(t2i_run, tmp_path):
    """README.md beside the LoRA: base model, rewards and weights, algorithm, steps, reward queries, the run's
    before/after metrics (= summary.json) and its grids; the LoRA loads with load_lora_weights and changes the UNet."""
    from diffusers import StableDiffusionPipeline

    from critic_align.publish import read_card_metrics
    from tests.test_t2i import _asset
    from train.cli import main

    out = tmp_path / "lora"
    assert main(["export-lora", "--run", str(t2i_run), "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    summary = json.loads((t2i_run / "summary.json").read_text())
    metrics = read_card_metrics(out / "README.md")
    for k in ("eval/reward/composition", "eval/reward/composition_correct"):
        before, after = metrics[k]
        assert before == pytest.approx(summary[f"{k}_base"], abs=5e-5)
        assert after == pytest.approx(summary[f"{k}_final"], abs=5e-5)
    assert metrics["train/composition"] == pytest.approx((summary["composition_first_epoch"],
                                                          summary["composition_last_epoch"]), abs=5e-5)
    assert "| composition | 1.0 |" in card and "`composition_correct`" in card  # rewards, weights, eval rewards
    assert "advantage `gae`" in card and "2 epochs, 24 reward queries" in card
    assert "tiny_t2i" in card and "task `sd15`" in card and card.startswith("---\nlibrary_name: diffusers")
    assert "![policy (after training)](grid_after.png)" in card and (out / "grid_after.png").exists()

    pipe = StableDiffusionPipeline.from_pretrained(_asset(), local_files_only=True)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    text = pipe.encode_prompt("two green 5s", "cpu", 1, False)[0]
    with torch.no_grad():
        before = pipe.unet(x, 500, text).sample
        pipe.load_lora_weights(out)
        after = pipe.unet(x, 500, text).sample
    assert (after - before).abs().max() > 1e-4  # the LoRA reached the UNet


def test_export_lora_push_to_hub_with_the_client_mocked(t2i_run, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from train.cli import cli

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw["repo_id"], sorted(p.name for p in __import__("pathlib").Path(
                kw["folder_path"]).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = tmp_path / "lora"
    # no token: one clear line, before anything is written
    assert cli(["export-lora", "--run", str(t2i_run), "--out", str(out), "--push-to-hub", "me/lora"]) == 2
    err = capsys.readouterr().err
    assert "no Hugging Face token" in err and "huggingface-cli login" in err and not out.exists() and not calls
    assert cli(["export-lora", "--run", str(t2i_run), "--out", str(out), "--push-to-hub", "not a repo"]) == 2
    assert "owner/name" in capsys.readouterr().err and not out.exists()

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert cli(["export-lora", "--run", str(t2i_run), "--out", str(out), "--push-to-hub", "me/lora", "--private"]) == 0
    assert calls[0] == ("init", "hf_test")
    assert calls[1] == ("create_repo", "me/lora", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls[2][:2] == ("upload_folder", "me/lora")
    assert {"README.md", "pytorch_lora_weights.safetensors", "grid_after.png"} <= set(calls[2][2])


def test_export_lora_accepts_task_flux():
    from train.cli import build_parser

    args = build_parser().parse_args(["export-lora", "--run", "r", "--out", "o", "--task", "flux"])
    assert args.task == "flux"
