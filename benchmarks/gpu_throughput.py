"""Throughput and peak GPU memory of full-size SD1.5 / SD3.5-medium shapes: ddpo / grpo / gae vs TRL's DDPOTrainer.

    python benchmarks/gpu_throughput.py                            # on a CUDA machine (not yet timed on one)
    python benchmarks/gpu_throughput.py --models sd15 --skip-trl   # one model, this library only
    python benchmarks/gpu_throughput.py --tiny --device cuda --out /tmp/smoke.json   # a 1-minute smoke test on the GPU
    python benchmarks/gpu_throughput.py --tiny --device cpu --out /tmp/tiny.json     # proves the script on a CPU

Without CUDA the script stops with a message and writes nothing, unless ``--tiny --device cpu`` is given: that
runs the whole pipeline end to end with tiny configs on the CPU (numbers meaningless, structure identical) and
writes where ``--out`` says, never to ``benchmarks/results/gpu_throughput.json``.

What it builds (offline, random weights, ``save_pretrained`` once into a temporary directory; both sides load that
directory, this library through its own :func:`critic_align.tasks.sd.load_pipeline`):

* ``sd15``: SD1.5's ``UNet2DConditionModel`` (the config of ``stable-diffusion-v1-5/unet``, written out below:
  860 M parameters), SD1.5's VAE (``AutoencoderKL``, 84 M) and CLIP ViT-L/14's text encoder shape (12 layers, width
  768, 77 tokens), SD1.5's DDIM schedule.  Every component is full size, so rollouts pay the real VAE decode.
* ``sd3``: SD3.5-medium's ``SD3Transformer2DModel`` (the config of ``stabilityai/stable-diffusion-3.5-medium/
  transformer``: 24 MMDiT-X layers, width 1536, dual attention in layers 0-12, RMS q/k norm; 2.24 B parameters and
  a 226 M-entry positional-embedding buffer), LoRA on the joint attention's projections (Flow-GRPO's targets),
  SD3's 16-channel VAE, the two CLIP text encoders at full size (ViT-L 768 and bigG 1280, 32 layers), SD3.5's
  flow-matching schedule (shift 3).  T5-XXL is dropped (``load_pipeline(drop_t5=True)``, the library's own
  option): the pipeline then feeds zeros of T5's shape (``max_sequence_length`` × 4096), so the transformer's
  sequence and cost are unchanged; T5 would only add ~9.5 GB of frozen bf16 weights and one encode per batch.
* The tokenizer is the byte-level CLIP tokenizer the tests use (514 tokens instead of 49 408): it changes only the
  text encoders' embedding tables.
* Tiny mode (``--tiny``): the tests' tiny pipelines (a 2-block UNet, a 2-layer SD3 transformer, 1-layer text
  encoders, 2-block VAEs) at 16-pixel images.

What it runs, per model, each side in its own subprocess (``--in-process`` runs this library's sides in this
process, for the test; TRL always runs in its own venv): this library's ``Trainer`` in ``ddpo``, ``grpo`` and
``gae`` mode (LoRA rank 4, ``mixed_precision: bf16`` on a bf16 base, the denoiser's own
``enable_gradient_checkpointing()`` through the library's ``gradient_checkpointing: true``, which makes it
adapter-aware: the plain one gets GAE's critic gradient wrong) — and the
library's other defaults, ``micro_batch_size: auto`` included) and, on ``sd15`` only (TRL's DDPO has no SD3
pipeline), TRL 0.23.1's ``DDPOTrainer`` on the same directory (``mixed_precision="bf16"``, the UNet's gradient
checkpointing switched on the same way, LoRA rank 4 on to_q/k/v/out).  Settings are those of
``benchmarks/trl_ddpo_compare.py``: same samples per epoch, steps, eta 1, CFG in rollout and update (TRL 0.23.1
crashes without CFG, see that script), per-prompt stat tracking, pairs per optimiser step
(``minibatch_size = train_batch × grad_accum × steps``).  The reward is the mean brightness of the image, the same
function on both sides; GAE skips value pretraining (a one-off cost).

Timing: one warm-up epoch, then ``--epochs`` timed; ``torch.cuda.synchronize()`` at every phase boundary.  ``update``
= the PPO update (GAE: policy + value loss), ``rollout`` = the rest of the epoch (sampling, VAE decode, reward,
advantages; GAE: the critic's values), ``epoch`` = both.  Samples/s = samples per epoch / median seconds.  Peak
memory per phase = ``torch.cuda.max_memory_allocated()`` with the peak reset at the start of each phase (max over
the timed epochs); on a CPU (tiny mode only) it is the process's peak RSS instead, which cannot be reset per phase.

TRL on a GPU machine: ``benchmarks/.venv-trl`` is made as in ``trl_ddpo_compare.py`` (``pip install
torch==<ours>``, then ``trl==0.23.1`` with this environment's diffusers / transformers / peft / accelerate).  On
a CUDA machine this environment's torch must be a CUDA build and pip must resolve ``torch==<version>`` to a CUDA
wheel (PyPI's Linux default) — or pass ``--trl-python`` pointing at a Python that has trl 0.23.1 and a CUDA torch.
Without network access, or if TRL cannot be installed, run with ``--skip-trl`` (the JSON records why TRL is absent).

Writes ``benchmarks/results/gpu_throughput.json`` (device name, versions, settings, per-model per-side numbers,
ratios vs TRL) and re-renders benchmarks/results/perf.md and BENCHMARKS.md (the section is
``report_gpu.section_gpu_throughput``).  Each run
writes the whole file (the models it ran): where one command may run only minutes, start it detached
(``setsid nohup ... &``) or lower ``--epochs`` rather than splitting it by model.  Not yet run on a GPU: try
``--tiny --device cuda --out /tmp/smoke.json`` first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import write_result

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_OUT = RESULTS / "gpu_throughput.json"
MODELS = ("sd15", "sd3")
MODES = ("ddpo", "grpo", "gae")
PHASES = ("rollout", "update", "epoch")
SD3_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "attn.to_add_out")

# ------------------------------------------------------------------------------------------------------
# the configs, written out (full size: the published models' config.json values; random weights)
SD15_UNET = dict(  # stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8)
SD_VAE = dict(  # SD1.5's vae/config.json; SD3.5's differs in the keys of SD3_VAE
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
SD3_VAE = dict(SD_VAE, latent_channels=16, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
               use_quant_conv=False, use_post_quant_conv=False)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768, max_position_embeddings=77)  # SD1.5's and SD3's text_encoder
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              hidden_act="gelu", projection_dim=1280, max_position_embeddings=77)  # SD3's text_encoder_2
SD35M_TRANSFORMER = dict(  # stabilityai/stable-diffusion-3.5-medium, transformer/config.json
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD15_DDIM = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
SD3_FLOW = dict(num_train_timesteps=1000, shift=3.0)

# tiny: the shapes of tests/test_sd_pipelines.py's pipelines
TINY_SD15_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=8,
                      norm_num_groups=8)
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                norm_num_groups=8, layers_per_block=1, sample_size=16)
TINY_SD3_VAE = dict(TINY_VAE, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                    scaling_factor=1.5035)
TINY_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, projection_dim=16)
TINY_SD3_TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                            caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=8)


# ------------------------------------------------------------------------------------------------------
# building the pipelines (in this library's environment; saved once, loaded by every side)


def _clip(tok, spec: dict, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = dict(spec)
    spec["max_position_embeddings"] = tok.model_max_length
    if not with_projection:
        spec.pop("projection_dim", None)
    cfg = CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **spec)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def build_pipeline(kind: str, out_dir: Path, tiny: bool, device: str, seed: int = 0) -> dict:
    """Build the ``kind`` ('sd15' / 'sd3') pipeline from the configs above, save it to ``out_dir`` in bf16 (tiny:
    float32) and return its parameter counts.  The modules are created on ``device`` (a 2.5 B-parameter random
    init is minutes on a CPU, seconds on a GPU)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    from critic_align.tokenizer import byte_clip_tokenizer

    tok = byte_clip_tokenizer(out_dir.parent / f"tokenizer_src_{kind}", 16 if tiny else 77)
    torch.manual_seed(seed)
    with torch.device(device):
        if kind == "sd15":
            parts = dict(unet=UNet2DConditionModel(**(TINY_SD15_UNET if tiny else SD15_UNET)),
                         vae=AutoencoderKL(**(TINY_VAE if tiny else SD_VAE)),
                         text_encoder=_clip(tok, TINY_CLIP if tiny else CLIP_L, with_projection=False))
            pipe = StableDiffusionPipeline(**parts, tokenizer=tok, scheduler=DDIMScheduler(**SD15_DDIM),
                                           safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        elif kind == "sd3":
            parts = dict(transformer=SD3Transformer2DModel(**(TINY_SD3_TRANSFORMER if tiny else SD35M_TRANSFORMER)),
                         vae=AutoencoderKL(**(TINY_SD3_VAE if tiny else SD3_VAE)),
                         text_encoder=_clip(tok, TINY_CLIP if tiny else CLIP_L, with_projection=True),
                         text_encoder_2=_clip(tok, TINY_CLIP if tiny else CLIP_G, with_projection=True))
            pipe = StableDiffusion3Pipeline(**parts, tokenizer=tok, tokenizer_2=tok, text_encoder_3=None,
                                            tokenizer_3=None, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_FLOW))
        else:
            raise ValueError(f"unknown model {kind!r}; use one of {MODELS}")
    if not tiny:
        pipe.to(torch.bfloat16)  # halves the file; every side loads the base in bf16 anyway
    pipe.save_pretrained(out_dir)
    info = {f"{name}_params": sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
    del pipe, parts
    if device == "cuda":
        torch.cuda.empty_cache()
    return info


# ------------------------------------------------------------------------------------------------------
# measuring (used by both sides' workers: stdlib + torch only)
class Meter:
    """Phase timer and peak-memory meter: CUDA's allocator peak (reset per phase) or, on a CPU, the process's peak
    RSS (a high-water mark since the process started)."""

    def __init__(self, cuda: bool):
        import torch

        self.torch, self.cuda = torch, cuda

    def start(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        return time.perf_counter()

    def stop(self, t0: float) -> tuple[float, float]:
        """(seconds since ``t0``, peak MB since the last ``start``)."""
        if self.cuda:
            self.torch.cuda.synchronize()
            return time.perf_counter() - t0, self.torch.cuda.max_memory_allocated() / 2**20
        return time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    def allocated_mb(self) -> float:
        if self.cuda:
            return self.torch.cuda.memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class EpochClock:
    """Per-epoch seconds and peak memory of the update phase and of the rest (the rollout side).  Install
    :meth:`around_update` once around the side's update function; :meth:`epochs` then runs and measures epochs."""

    def __init__(self, meter: Meter):
        self.meter, self.state = meter, {}

    def around_update(self, inner, *args, **kwargs):
        st, meter = self.state, self.meter
        _, mb = meter.stop(st["t0"])
        st["rollout_mb"] = max(st.get("rollout_mb", 0.0), mb)
        t = meter.start()
        try:
            return inner(*args, **kwargs)
        finally:
            dt, mb = meter.stop(t)
            st["update_s"] = st.get("update_s", 0.0) + dt
            st["update_mb"] = max(st.get("update_mb", 0.0), mb)
            st["t0"] = meter.start()  # whatever follows the update counts as rollout-side work

    def epochs(self, run_epoch, n: int) -> list[dict]:
        rows = []
        for _ in range(n):
            st = self.state
            st.clear()
            t_epoch = st["t0"] = self.meter.start()
            run_epoch()
            _, tail_mb = self.meter.stop(st["t0"])
            epoch_s = time.perf_counter() - t_epoch
            if "update_s" not in st:
                raise RuntimeError("the update was not called during an epoch: around_update is not installed")
            rollout_mb = max(st["rollout_mb"], tail_mb)
            rows.append({"epoch_s": epoch_s, "update_s": st["update_s"], "rollout_s": epoch_s - st["update_s"],
                         "rollout_peak_mb": rollout_mb, "update_peak_mb": st["update_mb"],
                         "epoch_peak_mb": max(rollout_mb, st["update_mb"])})
        return rows


def _versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "diffusers", "transformers", "peft", "accelerate")}


def _device_info(cuda: bool) -> dict:
    import torch

    if cuda:
        props = torch.cuda.get_device_properties(0)
        return {"type": "cuda", "name": torch.cuda.get_device_name(0), "total_memory_mb": props.total_memory / 2**20,
                "cuda": torch.version.cuda, "capability": list(torch.cuda.get_device_capability(0))}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}


PROMPTS = ("a cat", "a dog", "red fox", "an owl", "a horse", "a fish", "a bird", "a frog")
SD15_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # TRL's fixed choice (trl_ddpo_compare.LORA_TARGETS)


# ------------------------------------------------------------------------------------------------------
# the workers
def run_ours(model_dir: str, kind: str, mode: str, s: dict) -> dict:
    """This library's Trainer (``advantage=mode``) on the saved ``kind`` pipeline; settings ``s`` (see ``main``)."""
    import torch

    from critic_align.config import PPOConfig
    from critic_align.rewards import FunctionReward, MultiReward
    from critic_align.tasks.sd import StableDiffusionTask, load_pipeline
    from critic_align.trainer import Trainer

    cuda = s["device"] == "cuda"
    meter = Meter(cuda)
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    bf16 = s["dtype"] == "bf16"
    pipe = load_pipeline(model_dir, kind=kind, torch_dtype="bfloat16" if bf16 else "float32", drop_t5=kind == "sd3")
    pipe.set_progress_bar_config(disable=True)
    m = s["models"][kind]
    task = StableDiffusionTask(pipe, PROMPTS, resolution=m["resolution"],
                               max_sequence_length=m.get("max_sequence_length", 256))  # SD3 only

    def brightness(samples, prompts):  # samples in [-1, 1] -> the [0, 1] image mean, as on TRL's side
        return ((samples.float() + 1) / 2).mean(dim=(1, 2, 3))

    extra = {} if s["micro_batch_memory_mb"] is None else {"micro_batch_memory_mb": s["micro_batch_memory_mb"]}
    cfg = PPOConfig(
        advantage=mode, seed=s["seed"], num_epochs=s["warmup"] + s["epochs"],
        output_dir=str(Path(s["tmp"]) / f"run_{kind}_{mode}"), num_inference_steps=s["steps"], eta=1.0,
        guidance_scale=m["guidance"], batch_size=s["batch"], group_size=s["group_size"], sample_chunk_size=s["batch"],
        ppo_epochs=s["inner_epochs"], minibatch_size=s["train_batch"] * s["grad_accum"] * s["steps"],
        learning_rate=s["lr"], clip_range=s["clip"], adv_clip_max=5.0, max_grad_norm=1.0, lora_rank=s["lora_rank"],
        lora_alpha=s["lora_rank"], lora_target_modules=m["lora_targets"], critic_lora_rank=s["lora_rank"],
        **({"stat_buffer_size": s["stat_buffer"], "stat_min_count": s["stat_min"]} if mode == "ddpo" else {}),
        value_pretrain_epochs=0,
        mixed_precision="bf16" if bf16 else "no", gradient_checkpointing=s["gradient_checkpointing"], progress=False,
        log_tensorboard=False, grid_every=0, checkpoint_every=0, eval_every=0, **extra)
    # Workaround: with a critic, Trainer.__init__ probes the backbone with a float32 example outside autocast
    # (critic.reached_modules), which a bf16 base refuses (dtype mismatch); under autocast the probe runs.
    probe = torch.autocast(device_type=s["device"], dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with probe:
        trainer = Trainer(cfg, task, task.backbone(), task.scheduler,
                          MultiReward([FunctionReward(brightness, name="brightness")]))
    loaded_mb = meter.allocated_mb()

    clock = EpochClock(meter)
    inner = trainer.update  # the bound method; train_epoch looks ``update`` up on the instance first
    trainer.update = lambda ro: clock.around_update(inner, ro)
    clock.epochs(trainer.train_epoch, s["warmup"])
    rows = clock.epochs(trainer.train_epoch, s["epochs"])
    n_opt = trainer.optimizer.state[trainer.policy_params[0]]["step"]
    return {"epochs": rows, "loaded_mb": loaded_mb, "optimizer_steps": int(n_opt),
            "trainable_params": sum(p.numel() for p in {id(p): p for p in trainer.policy_params
                                                        + trainer.critic_params}.values()),
            "versions": _versions()}


def run_trl(model_dir: str, s: dict) -> dict:
    """TRL 0.23.1's DDPOTrainer on the saved SD1.5 pipeline (runs in TRL's venv)."""
    import accelerate

    cuda = s["device"] == "cuda"
    # before the pipeline, on every device: DefaultDDPOStableDiffusionPipeline logs a warning through accelerate's
    # logger when the model folder has no LoRA file, and that logger raises without a state (seen on CUDA)
    accelerate.PartialState()
    import torch

    if s["threads"]:
        torch.set_num_threads(s["threads"])
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    meter = Meter(cuda)
    m = s["models"]["sd15"]
    counter = {"i": 0}

    def prompt_fn():  # group_size consecutive samples share a prompt, as this library's PromptIterator does
        i = counter["i"]
        counter["i"] += 1
        return PROMPTS[(i // s["group_size"]) % len(PROMPTS)], {}

    def reward_fn(images, prompts, metadata):  # images in [0, 1]
        return images.float().mean(dim=(1, 2, 3)), {}

    tmp = Path(s["tmp"])
    cfg = DDPOConfig(
        num_epochs=s["warmup"] + s["epochs"], seed=s["seed"], mixed_precision="bf16" if s["dtype"] == "bf16" else "no",
        log_with=None, save_freq=10**9, sample_num_steps=s["steps"], sample_eta=1.0, sample_guidance_scale=m["guidance"],
        sample_batch_size=s["batch"], sample_num_batches_per_epoch=1, train_batch_size=s["train_batch"],
        train_gradient_accumulation_steps=s["grad_accum"], train_num_inner_epochs=s["inner_epochs"],
        train_cfg=m["guidance"] != 1.0, train_learning_rate=s["lr"], train_clip_range=s["clip"],
        train_adv_clip_max=5.0, train_max_grad_norm=1.0, train_timestep_fraction=1.0, per_prompt_stat_tracking=True,
        per_prompt_stat_tracking_buffer_size=s["stat_buffer"], per_prompt_stat_tracking_min_count=s["stat_min"],
        async_reward_computation=False,
        project_kwargs={"project_dir": str(tmp / "trl_run"), "logging_dir": str(tmp / "trl_run" / "logs")})
    pipe = DefaultDDPOStableDiffusionPipeline(model_dir, use_lora=True)
    pipe.set_progress_bar_config(disable=True)
    trainer = DDPOTrainer(cfg, reward_fn, prompt_fn, pipe)
    trainer.sd_pipeline.set_progress_bar_config(disable=True)
    if s["gradient_checkpointing"]:
        trainer.sd_pipeline.unet.enable_gradient_checkpointing()
    loaded_mb = meter.allocated_mb()
    step = {"epoch": 0, "global": 0}

    def run_epoch():
        step["global"] = trainer.step(step["epoch"], step["global"])
        step["epoch"] += 1

    clock = EpochClock(meter)
    inner = trainer._train_batched_samples  # called once per inner epoch, after sampling and rewards
    trainer._train_batched_samples = lambda *a, **k: clock.around_update(inner, *a, **k)
    clock.epochs(run_epoch, s["warmup"])
    rows = clock.epochs(run_epoch, s["epochs"])
    lora = [p for p in trainer.sd_pipeline.unet.parameters() if p.requires_grad]
    return {"epochs": rows, "loaded_mb": loaded_mb, "optimizer_steps": step["global"],
            "trainable_params": sum(p.numel() for p in lora),
            "versions": {**_versions(), "trl": __import__("trl").__version__}}


# ------------------------------------------------------------------------------------------------------
# the driver
def _summary(run: dict, batch: int) -> dict:
    rows = run["epochs"]
    phases = {}
    for k in PHASES:
        sec = statistics.median(r[f"{k}_s"] for r in rows)
        phases[k] = {"seconds": sec, "samples_per_s": batch / sec, "peak_memory_mb": max(r[f"{k}_peak_mb"] for r in rows)}
    return {"phases": phases, "memory_after_load_mb": run["loaded_mb"], "trainable_params": run["trainable_params"],
            "optimizer_steps": run["optimizer_steps"], "epochs": rows}


def _trl_python(a) -> tuple[Path | None, dict]:
    """The Python that runs TRL's side: --trl-python, or benchmarks/.venv-trl (made by trl_ddpo_compare's
    ``ensure_trl_venv`` when missing)."""
    if a.trl_python:
        py = Path(a.trl_python)
        if not py.exists():
            raise SystemExit(f"--trl-python {py} does not exist; give a Python with trl==0.23.1 installed, or --skip-trl")
        return py, {"python": str(py), "created": False}
    from trl_ddpo_compare import TRL_VENV, ensure_trl_venv

    info = ensure_trl_venv(RESULTS / "gpu_throughput_trl_venv.log")
    return TRL_VENV / "bin" / "python", {"python": str(TRL_VENV / "bin" / "python"), **info}


def _run_side(a, side: str, kind: str, model_dir: Path, settings: dict, trl_py: Path | None) -> dict:
    if side != "trl" and a.in_process:
        return run_ours(str(model_dir), kind, side, settings)
    result = Path(settings["tmp"]) / f"{kind}_{side}.json"
    spec = Path(settings["tmp"]) / "settings.json"
    spec.write_text(json.dumps(settings))
    py = trl_py if side == "trl" else Path(sys.executable)
    cmd = [str(py), str(Path(__file__).resolve()), "--worker", side, "--worker-model", kind, "--model-dir",
           str(model_dir), "--settings", str(spec), "--result", str(result)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    if settings["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the Trainer's accelerate (and TRL's) must not find a GPU
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=settings["tmp"])
    if proc.returncode != 0:
        raise RuntimeError(f"the {kind} {side} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


def _check_args(a) -> None:
    if a.device == "cpu" and not a.tiny:
        raise SystemExit("--device cpu runs only with --tiny (the full-size models take hours per epoch on a CPU)")
    out = Path(a.out).resolve() if a.out else None
    if a.tiny and (out is None or out == DEFAULT_OUT.resolve()):
        raise SystemExit(f"--tiny needs --out PATH (anything but {DEFAULT_OUT.relative_to(ROOT)}: that file holds "
                         "full-size GPU numbers only)")
    if a.in_process and a.device == "cuda" and not a.tiny:
        raise SystemExit("--in-process is for tiny runs; full-size sides each need their own process (memory peaks)")
    for name, allowed in (("models", MODELS), ("modes", MODES)):
        bad = [x for x in getattr(a, name) if x not in allowed]
        if bad or not getattr(a, name):
            raise SystemExit(f"--{name} {','.join(getattr(a, name))}: choose from {','.join(allowed)}")
    for name in ("epochs", "batch", "group_size", "steps", "train_batch", "grad_accum", "inner_epochs", "lora_rank"):
        if getattr(a, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if a.batch % a.group_size or a.batch % a.train_batch:
        raise SystemExit(f"--batch {a.batch} must be a multiple of --group-size {a.group_size} and of --train-batch "
                         f"{a.train_batch}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu only with --tiny")
    p.add_argument("--tiny", action="store_true", help="tiny configs (a check that the script works; needs --out)")
    p.add_argument("--out", help=f"the JSON to write (default {DEFAULT_OUT.relative_to(ROOT)}; required with --tiny)")
    p.add_argument("--models", type=lambda x: x.split(","), default=list(MODELS), help="comma-separated: sd15,sd3")
    p.add_argument("--modes", type=lambda x: x.split(","), default=list(MODES), help="comma-separated: ddpo,grpo,gae")
    p.add_argument("--skip-trl", action="store_true", help="no TRL side (e.g. TRL cannot be installed here)")
    p.add_argument("--trl-python", help="a Python with trl==0.23.1 (and, on a GPU, a CUDA torch); default: "
                                        "benchmarks/.venv-trl, created if missing")
    p.add_argument("--in-process", action="store_true", help="run this library's sides in this process (tiny only)")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per side (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=16, help="samples (trajectories) per epoch")
    p.add_argument("--group-size", type=int, default=4, help="samples per prompt")
    p.add_argument("--steps", type=int, default=10, help="denoising steps")
    p.add_argument("--train-batch", type=int, default=4, help="TRL's train_batch_size")
    p.add_argument("--grad-accum", type=int, default=1, help="TRL's train_gradient_accumulation_steps")
    p.add_argument("--inner-epochs", type=int, default=1)
    p.add_argument("--sd15-guidance", type=float, default=5.0, help="CFG scale, rollouts and update (DDPO's default)")
    p.add_argument("--sd3-guidance", type=float, default=4.5, help="CFG scale for SD3.5 (Flow-GRPO's)")
    p.add_argument("--sd15-resolution", type=int, default=512)
    p.add_argument("--sd3-resolution", type=int, default=512, help="pixels (Flow-GRPO trains SD3.5-M at 512)")
    p.add_argument("--max-sequence-length", type=int, default=256, help="SD3's T5 tokens (zeros: T5 is dropped)")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--micro-batch-memory-mb", type=float, default=None,
                   help="this library's activation budget per micro-batch (default: its per-device default)")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--clip", type=float, default=1e-4)
    p.add_argument("--stat-buffer", type=int, default=16)
    p.add_argument("--stat-min", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-report", action="store_true", help="do not re-render the benchmark pages")
    p.add_argument("--worker", choices=("trl",) + MODES, help=argparse.SUPPRESS)
    p.add_argument("--worker-model", choices=MODELS, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:  # inside a subprocess
        s = json.loads(Path(a.settings).read_text())
        if a.worker == "trl":
            res = run_trl(a.model_dir, s)
        else:
            res = run_ours(a.model_dir, a.worker_model, a.worker, s)
        Path(a.result).write_text(json.dumps(res))
        return res

    _check_args(a)
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: this benchmark measures GPU throughput and memory and writes nothing "
                         "without a GPU.  Run it on a CUDA machine, or check the script end to end on a CPU with "
                         "`--tiny --device cpu --out PATH`.")
    if a.device == "cpu" and torch.cuda.is_available() and a.in_process:
        raise SystemExit("--device cpu --in-process on a CUDA machine: torch already sees the GPU in this process; "
                         "drop --in-process")
    tiny, cuda = a.tiny, a.device == "cuda"
    out = Path(a.out) if a.out else DEFAULT_OUT
    tmp = Path(tempfile.mkdtemp(prefix="gpu_throughput_"))
    models = {
        "sd15": {"resolution": 16 if tiny else a.sd15_resolution, "guidance": a.sd15_guidance,
                 "lora_targets": list(SD15_LORA_TARGETS)},
        "sd3": {"resolution": 16 if tiny else a.sd3_resolution, "guidance": a.sd3_guidance,
                "lora_targets": list(SD3_LORA_TARGETS), "max_sequence_length": 8 if tiny else a.max_sequence_length},
    }
    settings = {k: getattr(a, k) for k in ("epochs", "warmup", "batch", "group_size", "steps", "train_batch",
                                           "grad_accum", "inner_epochs", "lora_rank", "micro_batch_memory_mb",
                                           "dtype", "lr", "clip", "stat_buffer", "stat_min", "threads", "seed",
                                           "device")}
    settings.update(tiny=tiny, gradient_checkpointing=not a.no_gradient_checkpointing, tmp=str(tmp),
                    models={k: models[k] for k in a.models})
    t_start = time.time()
    data = {
        "command": "python benchmarks/gpu_throughput.py" + "".join(
            f" {x}" for x in (argv if argv is not None else sys.argv[1:])),
        "tiny": tiny,
        "device": _device_info(cuda),
        "memory_measure": ("torch.cuda.max_memory_allocated, reset at the start of each phase (max over timed epochs)"
                           if cuda else "process peak RSS (CPU tiny mode: a high-water mark, not reset per phase)"),
        "versions": {"ours": _versions()},
        "settings": {k: v for k, v in settings.items() if k != "tmp"}
        | {"eta": 1.0, "reward": "mean brightness of the [0, 1] image",
           "ours_minibatch_pairs": a.train_batch * a.grad_accum * a.steps,
           "sd3_text_encoder_3": "dropped (zeros of T5's shape, load_pipeline(drop_t5=True))"},
        "models": {},
        "trl": None,
    }
    trl_py = None
    if a.skip_trl or "sd15" not in a.models:
        data["trl"] = {"skipped": "--skip-trl" if a.skip_trl else "sd15 not among --models (TRL's DDPO is SD1.5 only)"}
    else:
        trl_py, data["trl"] = _trl_python(a)
    try:
        for kind in a.models:
            model_dir = tmp / f"pipeline_{kind}"
            t0 = time.time()
            entry = {"components": build_pipeline(kind, model_dir, tiny, a.device, a.seed), "sides": {}}
            entry["build_s"] = time.time() - t0
            sides = (["trl"] if kind == "sd15" and trl_py is not None else []) + list(a.modes)
            for side in sides:
                print(f"[gpu_throughput] {kind} {side} ...", file=sys.stderr, flush=True)
                run = _run_side(a, side, kind, model_dir, settings, trl_py)
                if side == "trl":
                    data["versions"]["trl_env"] = run["versions"]
                entry["sides"][side] = _summary(run, a.batch)
            if "trl" in entry["sides"]:
                trl = entry["sides"]["trl"]["phases"]
                entry["vs_trl"] = {
                    mode: {"epoch_samples_per_s": entry["sides"][mode]["phases"]["epoch"]["samples_per_s"]
                           / trl["epoch"]["samples_per_s"],
                           "peak_memory": entry["sides"][mode]["phases"]["epoch"]["peak_memory_mb"]
                           / trl["epoch"]["peak_memory_mb"]}
                    for mode in a.modes}
            data["models"][kind] = entry
            shutil.rmtree(model_dir, ignore_errors=True)  # a full-size SD3.5 directory is 5 GB
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    data["time_s"] = time.time() - t_start
    check_numbers(data)
    write_result(out, data, topic="perf" if not a.no_report and out.resolve() == DEFAULT_OUT.resolve() else None)
    print(json.dumps({k: {s: v["phases"]["epoch"] for s, v in e["sides"].items()} for k, e in data["models"].items()},
                     indent=1))
    return data


def check_numbers(data: dict) -> None:
    """Every phase's seconds, samples/s and peak memory must be finite and > 0 (a broken measurement is an error,
    not a number in the JSON)."""
    for kind, entry in data["models"].items():
        for side, res in entry["sides"].items():
            for phase, vals in res["phases"].items():
                for key, v in vals.items():
                    if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                        raise RuntimeError(f"{kind} {side} {phase} {key} = {v!r}: not a finite positive number")


if __name__ == "__main__":
    main()
