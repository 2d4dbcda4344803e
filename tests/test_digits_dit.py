"""The digits DiT end to end at small sizes: pretraining script -> load -> evaluate/model card -> sample CLI,
the named config and build_trainer."""

from __future__ import annotations

import json

import pytest
import torch

from critic_align.api import build_trainer
from critic_align.train.cli import main
from critic_align.train.registry import load_run_config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from critic_align.train.pretrain_digits_dit import main as pretrain

    out = tmp_path_factory.mktemp("dit")
    pretrain(["--steps", "3", "--batch-size", "8", "--warmup", "1", "--out", str(out)])
    return out


def test_pretrain_saves_a_loadable_flow_matching_dit(tiny_run):
    from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler

    from critic_align.tasks.digits import dit_config, load_digits_model, load_dit_model

    model, sched = load_dit_model(tiny_run)
    assert isinstance(model, DiTTransformer2DModel) and isinstance(sched, FlowMatchEulerDiscreteScheduler)
    assert not model.training
    for k, v in dit_config().items():
        assert model.config[k] == v, k
    again, _ = load_digits_model(tiny_run)
    assert type(again) is DiTTransformer2DModel
    log = json.loads((tiny_run / "training_log.json").read_text())
    assert log["args"]["steps"] == 3 and log["log"]


def test_flow_matching_loss_is_the_velocity_regression():
    from critic_align.train.pretrain_digits_dit import build_dit, flow_matching_loss

    model = build_dit().eval()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 1, 16, 16, generator=g), torch.randn(4, 1, 16, 16, generator=g)
    sigma = torch.tensor([0.1, 0.4, 0.8, 1.0])
    y = torch.tensor([0, 3, 10, 9])
    # the adaLN-Zero initialised model outputs exactly 0, so the loss is E||ε − x0||²
    assert model(torch.randn(2, 1, 16, 16), timestep=torch.tensor([5.0, 500.0]), class_labels=y[:2]).sample.abs().max() == 0
    loss = flow_matching_loss(model, x0, y, sigma, noise)
    assert loss.item() == pytest.approx(((noise - x0) ** 2).mean().item(), rel=1e-6)


def test_evaluate_writes_the_dit_model_card(tiny_run):
    from critic_align.train.evaluate_digits import main as evaluate

    res = evaluate(["--model", str(tiny_run), "--per-class", "2", "--steps", "2", "3", "--out", str(tiny_run)])
    assert set(res) == {"euler2", "euler3"} and 0 <= res["euler3"]["accuracy"] <= 1
    card = (tiny_run / "MODEL_CARD.md").read_text()
    assert "DiTTransformer2DModel" in card and "Euler 3 steps" in card and "3 steps, batch\n8" in card
    assert (tiny_run / "samples_euler3.png").exists()


def test_sample_cli_on_a_dit(tiny_run, tmp_path):
    out = tmp_path / "g.png"
    assert main(["sample", "--model", str(tiny_run), "--steps", "3", "--per-class", "2", "--out", str(out)]) == 0
    assert out.exists()


def test_named_config_builds_a_flow_matching_trainer(tiny_run, tmp_path):
    from critic_align.backbones import DiTAdapter
    from critic_align.steps import FlowMatchSDEStep

    run = load_run_config("digits_dit", {"output_dir": str(tmp_path / "r"), "progress": False})
    assert run["task"] == "digits_dit" and run["ppo"].advantage == "gae" and run["ppo"].sde_noise_level == 0.7
    run["base_model"] = str(tiny_run)
    tr = build_trainer(run)
    assert isinstance(tr.adapter, DiTAdapter) and isinstance(tr.step, FlowMatchSDEStep)
    bad = dict(run, task="nope")
    with pytest.raises(ValueError, match="digits_dit"):
        build_trainer(bad)


def test_ema_matches_a_hand_computed_average():
    from critic_align.train.pretrain_digits_dit import EMA

    p = torch.nn.Parameter(torch.tensor([0.0]))
    ema = EMA([p], decay=0.5)
    vals, ref = [1.0, 2.0, 4.0], 0.0
    for k, v in enumerate(vals):
        with torch.no_grad():
            p.fill_(v)
        ema.step([p])
        d = min(0.5, (1 + k) / (10 + k))
        ref = d * ref + (1 - d) * v
    ema.copy_to([p])
    assert p.item() == pytest.approx(ref)


def test_report_renders_the_dit_job_next_to_the_unet_job(tmp_path):
    from report_training import section_dit_job  # benchmarks/ is on sys.path (conftest.py)

    for name, first, last, minutes in (("main_job", 0.6, 0.7, 2.0), ("dit_job", 0.5, 0.8, 3.0)):
        d = tmp_path / name
        d.mkdir()
        (d / "summary.json").write_text(json.dumps({
            "epochs": 2, "reward_queries": 192, "digit_prob_first_epoch": first, "digit_prob_last_epoch": last,
            "digit_correct_first_epoch": 0.9, "digit_correct_last_epoch": 1.0,
            **({"train_seconds": 240.0} if name == "dit_job" else {})}))
        rows = [{"phase": "value_pretrain", "time_s": 60.0 * minutes / 2},
                {"phase": "train", "time_epoch_s": 30.0 * minutes / 2, "value_ev": 0.5},
                {"phase": "train", "time_epoch_s": 30.0 * minutes / 2, "value_ev": 0.7}]
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "dit_job" / "config.json").write_text(json.dumps(
        {"eta": 0.7, "num_inference_steps": 20, "lora_rank": 8, "lora_target_modules": ["to_q", "to_k"]}))
    text = section_dit_job(tmp_path / "dit_job" / "summary.json")
    assert "| UNet DDPM (`digits`) | 2 | 192 | 2.0 | n/a | 0.600 → 0.700 | 0.900 → 1.000 | 0.60 |" in text
    assert "| DiT flow matching (`digits_dit`) | 2 | 192 | 3.0 | 4.0 | 0.500 → 0.800 | 0.900 → 1.000 | 0.60 |" in text
    assert "noise level 0.7" in text


def test_shipped_dit_samples_are_recognisable_digits():
    from critic_align.rollout import sample
    from critic_align.steps import FlowMatchSDEStep, make_step
    from critic_align.tasks.digits import load_digit_classifier, load_dit_model

    model, sched = load_dit_model()
    step = make_step(sched, 0.0)
    assert isinstance(step, FlowMatchSDEStep) and sum(p.numel() for p in model.parameters()) < 1.5e6
    labels = torch.arange(10).repeat_interleave(10)
    x = sample(lambda x, t, c: model(x, t, class_labels=c).sample, step,
               torch.randn(100, 1, 16, 16, generator=torch.Generator().manual_seed(1)), step.schedule.timesteps(20), labels)
    acc = (load_digit_classifier()(x.clamp(-1, 1)).argmax(1) == labels).float().mean().item()
    assert acc >= 0.9
