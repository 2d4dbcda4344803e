"""benchmarks/gpu_throughput.py without a GPU: its --tiny --device cpu path end to end (structure, finite positive
numbers, consistent arithmetic), its refusals (no CUDA, tiny without --out), the full-size configs' parameter counts
on the meta device, and its section of benchmarks/results/perf.md (table, or 'not run on a GPU yet')."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import gpu_throughput as gt
from benchmarks.report_gpu import section_gpu_throughput


def test_tiny_cpu_end_to_end(tmp_path):
    out = tmp_path / "tiny.json"
    default_before = gt.DEFAULT_OUT.read_bytes() if gt.DEFAULT_OUT.exists() else None
    gt.main(["--tiny", "--device", "cpu", "--in-process", "--skip-trl", "--out", str(out), "--epochs", "2",
             "--warmup", "0", "--batch", "4", "--group-size", "2", "--train-batch", "2", "--steps", "2",
             "--threads", "1", "--no-report"])
    # never the real results file
    assert (gt.DEFAULT_OUT.read_bytes() if gt.DEFAULT_OUT.exists() else None) == default_before
    d = json.loads(out.read_text())
    assert d["tiny"] is True and d["device"]["type"] == "cpu" and "peak RSS" in d["memory_measure"]
    assert d["trl"] == {"skipped": "--skip-trl"}
    assert set(d["versions"]["ours"]) == {"torch", "diffusers", "transformers", "peft", "accelerate"}
    assert set(d["models"]) == {"sd15", "sd3"}
    for kind, entry in d["models"].items():
        assert set(entry["sides"]) == set(gt.MODES) and "vs_trl" not in entry
        assert all(v > 0 for v in entry["components"].values())
        for mode, res in entry["sides"].items():
            assert len(res["epochs"]) == 2
            for phase in gt.PHASES:
                vals = res["phases"][phase]
                assert set(vals) == {"seconds", "samples_per_s", "peak_memory_mb"}
                assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in vals.values()), (kind, mode)
                assert vals["samples_per_s"] == pytest.approx(4 / vals["seconds"])
            for row in res["epochs"]:  # rollout is the epoch minus the update, so the phases add up
                assert row["rollout_s"] + row["update_s"] == pytest.approx(row["epoch_s"])
                assert 0 < row["update_s"] < row["epoch_s"]
                assert row["epoch_peak_mb"] == max(row["rollout_peak_mb"], row["update_peak_mb"])
            # 4 samples x 2 steps = 8 pairs per epoch, 2 x 1 x 2 = 4 pairs per optimiser step: 2 steps per epoch
            assert res["optimizer_steps"] == 4
        # the critic's LoRA and head are trained in gae mode only
        assert entry["sides"]["gae"]["trainable_params"] > entry["sides"]["grpo"]["trainable_params"] == \
            entry["sides"]["ddpo"]["trainable_params"] > 0
    text = section_gpu_throughput(out)
    assert "critic_align gae" in text and "TRL not run: --skip-trl" in text

    bad = json.loads(out.read_text())
    bad["models"]["sd3"]["sides"]["gae"]["phases"]["update"]["samples_per_s"] = float("nan")
    with pytest.raises(RuntimeError, match="sd3 gae update samples_per_s"):
        gt.check_numbers(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_refusals_without_cuda(tmp_path, capsys):
    out = tmp_path / "x.json"
    with pytest.raises(SystemExit, match="CUDA is not available"):
        gt.main(["--out", str(out), "--skip-trl"])
    with pytest.raises(SystemExit, match="--tiny needs --out"):
        gt.main(["--tiny", "--device", "cpu"])
    with pytest.raises(SystemExit, match="--tiny needs --out"):
        gt.main(["--tiny", "--device", "cpu", "--out", str(gt.DEFAULT_OUT)])
    with pytest.raises(SystemExit, match="only with --tiny"):
        gt.main(["--device", "cpu", "--out", str(out)])
    with pytest.raises(SystemExit, match="choose from"):
        gt.main(["--tiny", "--device", "cpu", "--out", str(out), "--modes", "ppo"])
    assert not out.exists()


def test_full_size_configs_on_meta():
    """The written-out configs build the published architectures (known parameter counts), without weights."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.device("meta"):
        assert count(UNet2DConditionModel(**gt.SD15_UNET)) == 859_520_964  # SD1.5's UNet
        sd3 = SD3Transformer2DModel(**gt.SD35M_TRANSFORMER)
        assert count(sd3) == 2_243_171_520  # + the 384² x 1536 positional-embedding buffer = SD3.5-medium's 2.5 B
        assert sd3.pos_embed.pos_embed.numel() == 384 * 384 * 1536
        assert len(sd3.transformer_blocks) == 24 and sum(b.attn2 is not None for b in sd3.transformer_blocks) == 13
        assert AutoencoderKL(**gt.SD3_VAE).config.latent_channels == 16
    # every LoRA target of the SD3 side names a module of the full-size transformer
    names = {n.split(".", 2)[-1] for n, _ in sd3.named_modules() if n.startswith("transformer_blocks.0.")}
    assert set(gt.SD3_LORA_TARGETS) <= names


def test_section_without_results(tmp_path):
    text = section_gpu_throughput(tmp_path / "missing.json")
    assert "not been run on a GPU yet" in text and "gpu_throughput.py" in text


def _gae_gradients(pipe_dir, tmp_path, checkpointing: str):
    """Policy and critic LoRA gradients of one GAE loss on 12 pairs of a 4-sample rollout of the tiny SD1.5 pipeline."""
    from critic_align.config import PPOConfig
    from critic_align.rewards import FunctionReward, MultiReward
    from critic_align.tasks.sd import StableDiffusionTask, load_pipeline
    from critic_align.trainer import Trainer
    from tests.test_trainer import pair_loss

    pipe = load_pipeline(pipe_dir, kind="sd15")
    pipe.set_progress_bar_config(disable=True)
    task = StableDiffusionTask(pipe, gt.PROMPTS)
    cfg = PPOConfig(advantage="gae", batch_size=4, group_size=2, num_inference_steps=3, minibatch_size=12,
                    value_pretrain_epochs=0, output_dir=str(tmp_path / f"run_{checkpointing}"), progress=False,
                    log_tensorboard=False, grid_every=0, checkpoint_every=0, eval_every=0, lora_rank=2,
                    critic_lora_rank=2, lora_target_modules=gt.SD15_LORA_TARGETS,
                    gradient_checkpointing=checkpointing == "aware")  # the library's switch, as run_ours sets it
    tr = Trainer(cfg, task, task.backbone(), task.scheduler,
                 MultiReward([FunctionReward(lambda s, p: s.mean(dim=(1, 2, 3)), name="b")]))
    torch.manual_seed(1)
    for p in tr.adapters.parameters("policy") + tr.adapters.parameters("critic"):
        p.data.normal_(0, 0.05)  # both adapters away from the identity, so using the wrong one shows
    if checkpointing == "plain":
        task.denoiser.enable_gradient_checkpointing()
    ro = tr.rollout(tr.prompt_iter.batch(2, 2), generator=torch.Generator().manual_seed(0))
    tr.critic.head.set_output_scale(ro.rewards)
    ro = tr.compute_advantages(ro)
    loss, _ = pair_loss(tr, ro, torch.tensor([[b, k] for b in range(4) for k in range(3)]))
    loss.backward()
    return {n: torch.cat([p.grad.flatten() for p in tr.adapters.parameters(n)]) for n in ("policy", "critic")}


def test_adapter_aware_checkpointing_keeps_gae_gradients(tmp_path):
    """GAE's one backward spans the policy's and the critic's forwards: with plain gradient checkpointing the
    critic's blocks are recomputed under the policy's adapter (a wrong critic gradient, silently); the library's
    ``gradient_checkpointing: true`` (what the script sets) gives the gradients of the run without checkpointing."""
    pipe_dir = tmp_path / "pipe"
    gt.build_pipeline("sd15", pipe_dir, tiny=True, device="cpu")
    ref = _gae_gradients(pipe_dir, tmp_path, "none")
    aware = _gae_gradients(pipe_dir, tmp_path, "aware")
    plain = _gae_gradients(pipe_dir, tmp_path, "plain")
    for name in ("policy", "critic"):
        assert ref[name].abs().max() > 0
        torch.testing.assert_close(aware[name], ref[name], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(plain["policy"], ref["policy"], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(plain["critic"], ref["critic"], rtol=1e-2, atol=0)  # why the switch is adapter-aware
