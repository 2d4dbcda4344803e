"""The GPU check: the project's CUDA tests, throughput and peak memory at full size, in one script for a lent GPU.

    python benchmarks/gpu_check.py --trl-python python3          # on a CUDA machine (≤ 8 min on one H200)
    python benchmarks/gpu_check.py --tiny --device cpu --out /tmp/gpu_check.json   # the rehearsal on a CPU

Parts, in order (``--parts`` picks some; each runs only while ``--budget-s`` lasts, and the JSON is rewritten after
every part, so a run cut short keeps what it measured):

1. ``tests``: ``pytest -m gpu tests/`` (``tests/test_gpu.py``: the main job on CUDA against the CPU, bf16, gradient
   checkpointing, the 2-process gradient sync with CUDA tensors over gloo on one GPU; and any other ``gpu``-marked
   test).  Counts from pytest's JUnit XML.
2. ``sd15``: ``benchmarks/gpu_throughput.py`` on the SD1.5 shapes at 512² (random weights from the published configs,
   bf16 base, LoRA, gradient checkpointing, CFG 5 as TRL needs): this library's ddpo / grpo / gae against TRL 0.23.1's
   ``DDPOTrainer`` on the same saved pipeline.  ``sd15_vs_trl`` = our ddpo epoch samples/s over TRL's (the same
   algorithm); ``sd15_peak_mem_vs_trl`` its peak memory over TRL's; ``gae_vs_grpo_epoch`` = GAE's epoch seconds
   over GRPO's (the critic's overhead: its values in the rollout, its loss in the update).
   ``sd15_mem``: our ddpo side alone under ``--sd15-memory-mb`` activation budgets per micro-batch (the
   ``micro_batch_memory_mb`` field), against the TRL row of the ``sd15`` part (this run's or a merged one on the same
   kind of device): ``sd15_at_trl_memory`` is the fastest budget whose peak memory is at most TRL's.
3. ``sd3``: the SD3.5-medium transformer (2.24 B, T5 dropped: zeros of its shape) at 512² and 1024², with and
   without gradient checkpointing: GRPO epoch samples/s (``sd35m_img_per_s``) and peak memory.
4. ``flux``: the FLUX.1-dev transformer at full size (12 B, random weights, bf16, LoRA on the attention, gradient
   checkpointing) with text encoders cut to one layer of the real widths and FLUX's VAE: whether one GRPO epoch
   (sampling + one optimiser step) fits, its peak memory and time.

Writes ``benchmarks/results/gpu_check.json`` (``--out`` elsewhere; ``--tiny`` needs ``--out``), beside it
``gpu_throughput.json`` (part 2's whole record), and re-renders its page (benchmarks/results/perf.md) and
BENCHMARKS.md unless ``--no-report``.
Timing: every number comes from the one GPU with nothing else running on it; wall times include model loading.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

from harness import Budget, run_parts, write_result
from report_gpu import GOALS  # noqa: F401  (the goals the section marks; tests read them here)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_OUT = RESULTS / "gpu_check.json"
PARTS = ("tests", "sd15", "sd15_mem", "sd3", "flux")
# the least time each part needs to be worth starting (seconds, on an H200; tiny mode ignores them)
PART_MIN_S = {"tests": 60, "sd15": 90, "sd15_mem": 60, "sd3": 60, "flux": 45}

# FLUX.1-dev's transformer/config.json and vae/config.json (black-forest-labs/FLUX.1-dev)
FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=16, norm_num_groups=32, sample_size=1024, use_quant_conv=False,
                use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
FLUX_LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                     "attn.add_v_proj", "attn.to_add_out")  # Flow-GRPO's FLUX attention targets


# ------------------------------------------------------------------------------------------------------
# part 1: the gpu-marked tests
def run_tests(device: str, tmp: Path, timeout: float) -> dict:
    xml = tmp / "gpu_tests.xml"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if device == "cpu":
        env["CRITIC_ALIGN_GPU_REHEARSAL"] = "1"
    # only the files that hold gpu-marked tests: a module another machine cannot import must not stop the check
    files = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").glob("test_*.py")
                   if "mark.gpu" in f.read_text() or "pytest.mark.gpu" in f.read_text())
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", *files, "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        log, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        log, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
    res = {"command": " ".join(cmd[1:]), "returncode": rc, "seconds": time.time() - t0, "tests": []}
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            status = "passed"
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    status = {"failure": "failed", "error": "failed", "skipped": "skipped"}[tag]
                    res.setdefault("failures", {})[f"{case.get('classname')}::{case.get('name')}"] = (
                        (node.get("message") or "")[:800]) if tag != "skipped" else None
            res["tests"].append({"name": f"{case.get('classname')}::{case.get('name')}", "status": status,
                                 "seconds": float(case.get("time") or 0)})
    res["failures"] = {k: v for k, v in res.get("failures", {}).items() if v is not None}
    for s in ("passed", "failed", "skipped"):
        res[s] = sum(t["status"] == s for t in res["tests"])
    res["log_tail"] = log[-3000:]
    return res


# ------------------------------------------------------------------------------------------------------
# part 2: SD1.5 against TRL (gpu_throughput's machinery)
def run_sd15(a, out_dir: Path) -> dict:
    import gpu_throughput

    argv = ["--models", "sd15", "--modes", "ddpo,grpo,gae", "--epochs", str(a.sd15_epochs), "--warmup", "1",
            "--out", str(out_dir / "gpu_throughput.json"), "--no-report", "--device", a.device]
    argv += ["--skip-trl"] if a.skip_trl else ["--trl-python", a.trl_python or sys.executable]
    if a.tiny:
        argv += ["--tiny"]
    d = gpu_throughput.main(argv)
    sides = d["models"]["sd15"]["sides"]
    ep = {k: v["phases"]["epoch"] for k, v in sides.items()}
    res = {"gpu_throughput": "gpu_throughput.json", "epoch": ep,
           "gae_vs_grpo_epoch": ep["gae"]["seconds"] / ep["grpo"]["seconds"]}
    if "trl" in ep:
        res["vs_trl"] = d["models"]["sd15"]["vs_trl"]
        res["sd15_vs_trl"] = ep["ddpo"]["samples_per_s"] / ep["trl"]["samples_per_s"]
        res["sd15_peak_mem_vs_trl"] = ep["ddpo"]["peak_memory_mb"] / ep["trl"]["peak_memory_mb"]
    else:
        res["trl"] = d["trl"]
    res["settings"] = d["settings"]
    return res


def run_sd15_mem(a, tmp: Path, sd15: dict | None) -> dict:
    """Our ddpo side under each activation budget; TRL's row comes from the sd15 part (``sd15``), not rerun."""
    import gpu_throughput

    trl = (sd15 or {}).get("epoch", {}).get("trl")
    res = {"budgets": {}, "trl": trl, "trl_from": "the sd15 part of this record" if trl else None}
    for mb in a.sd15_memory_mb:
        argv = ["--models", "sd15", "--modes", "ddpo", "--epochs", str(a.sd15_epochs), "--warmup", "1", "--skip-trl",
                "--micro-batch-memory-mb", str(mb), "--out", str(tmp / f"gpu_throughput_mem{mb}.json"), "--no-report",
                "--device", a.device] + (["--tiny"] if a.tiny else [])
        ep = gpu_throughput.main(argv)["models"]["sd15"]["sides"]["ddpo"]["phases"]["epoch"]
        row = {"samples_per_s": ep["samples_per_s"], "peak_memory_mb": ep["peak_memory_mb"], "seconds": ep["seconds"]}
        if trl and trl.get("peak_memory_mb") and ep.get("peak_memory_mb") is not None:
            row["vs_trl"] = ep["samples_per_s"] / trl["samples_per_s"]
            row["peak_mem_vs_trl"] = ep["peak_memory_mb"] / trl["peak_memory_mb"]
        res["budgets"][str(mb)] = row
    fits = [(r["vs_trl"], mb) for mb, r in res["budgets"].items() if r.get("peak_mem_vs_trl", 2.0) <= 1.0]
    if fits:
        best = max(fits)[1]
        res["sd15_at_trl_memory"] = {"micro_batch_memory_mb": float(best), **res["budgets"][best]}
    return res


# ------------------------------------------------------------------------------------------------------
# part 3: SD3.5-medium at 512² and 1024², with and without gradient checkpointing
def run_sd3(a, tmp: Path, deadline: float) -> dict:
    import gpu_throughput as gt

    model_dir = tmp / "pipeline_sd3"
    t0 = time.time()
    components = gt.build_pipeline("sd3", model_dir, a.tiny, a.device, a.seed)
    res = {"components": components, "build_s": time.time() - t0, "runs": {}}
    for resolution in (a.sd3_resolutions if not a.tiny else (16, 32)):
        for gc in (True, False):
            name = f"{resolution}_{'gc' if gc else 'no_gc'}"
            if time.time() > deadline:
                res["runs"][name] = {"skipped": "out of the time budget"}
                continue
            settings = dict(epochs=1, warmup=1, batch=a.sd3_batch, group_size=a.sd3_group, steps=a.sd3_steps,
                            train_batch=a.sd3_batch // 2, grad_accum=1, inner_epochs=1, lora_rank=4,
                            micro_batch_memory_mb=None, dtype="bf16" if a.device == "cuda" else "fp32", lr=3e-4,
                            clip=1e-4, stat_buffer=16, stat_min=16, threads=0, seed=a.seed, device=a.device,
                            tiny=a.tiny, gradient_checkpointing=gc, tmp=str(tmp),
                            models={"sd3": {"resolution": resolution, "guidance": 4.5,
                                            "lora_targets": list(gt.SD3_LORA_TARGETS),
                                            "max_sequence_length": 8 if a.tiny else 256}})
            t1 = time.time()
            try:
                run = gt._run_side(SimpleNamespace(in_process=False), "grpo", "sd3", model_dir, settings, None)
                summ = gt._summary(run, a.sd3_batch)
                res["runs"][name] = {"img_per_s": summ["phases"]["epoch"]["samples_per_s"],
                                     "epoch_s": summ["phases"]["epoch"]["seconds"],
                                     "rollout_s": summ["phases"]["rollout"]["seconds"],
                                     "update_s": summ["phases"]["update"]["seconds"],
                                     "peak_memory_mb": summ["phases"]["epoch"]["peak_memory_mb"],
                                     "memory_after_load_mb": summ["memory_after_load_mb"],
                                     "wall_s": time.time() - t1}
            except RuntimeError as e:  # e.g. out of memory without checkpointing: a result, not a crash
                res["runs"][name] = {"failed": str(e)[-1500:], "wall_s": time.time() - t1}
    res["settings"] = {"batch": a.sd3_batch, "group_size": a.sd3_group, "steps": a.sd3_steps, "guidance": 4.5,
                       "mode": "grpo", "epochs": "1 warm-up + 1 timed", "lora_rank": 4, "t5": "dropped (zeros)"}
    return res


# ------------------------------------------------------------------------------------------------------
# part 4: FLUX.1-dev shape, one training epoch
def _flux_pipeline(tiny: bool, device: str, tmp: Path):
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from test_flux import FLUX_DEV_SCHEDULER, tiny_flux_pipeline, tiny_t5_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from critic_align.tokenizer import byte_clip_tokenizer

    if tiny:
        return tiny_flux_pipeline(tmp)
    tok, tok2 = byte_clip_tokenizer(tmp / "tokenizer", 77), tiny_t5_tokenizer()
    torch.manual_seed(0)
    with torch.device(device):
        # the real widths (CLIP-L's pooled 768, T5-XXL's 4096) at one layer: the transformer sees the real shapes
        te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072,
                                          num_hidden_layers=1, num_attention_heads=12, max_position_embeddings=77,
                                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                          pad_token_id=tok.pad_token_id))
        te2 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=4096, d_kv=64, d_ff=256, num_layers=1,
                                      num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
        vae = AutoencoderKL(**FLUX_VAE)
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # 12 B parameters: built in bf16 (24 GB), never in fp32
        try:
            transformer = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
        finally:
            torch.set_default_dtype(old)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER), vae=vae.to(torch.bfloat16),
                        text_encoder=te.to(torch.bfloat16), tokenizer=tok, text_encoder_2=te2.to(torch.bfloat16),
                        tokenizer_2=tok2, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_worker(s: dict) -> dict:
    import gpu_throughput as gt
    import torch

    from critic_align.config import PPOConfig
    from critic_align.rewards import FunctionReward, MultiReward
    from critic_align.tasks.flux import FluxTask
    from critic_align.trainer import Trainer

    tmp, cuda = Path(s["tmp"]), s["device"] == "cuda"
    meter = gt.Meter(cuda)
    t0 = time.time()
    pipe = _flux_pipeline(s["tiny"], s["device"], tmp)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    task = FluxTask(pipe, gt.PROMPTS, resolution=s["resolution"], max_sequence_length=s["max_sequence_length"])

    def brightness(samples, prompts):
        return ((samples.float() + 1) / 2).mean(dim=(1, 2, 3))

    cfg = PPOConfig(advantage="grpo", seed=0, num_epochs=1, output_dir=str(tmp / f"flux_run_{time.time_ns()}"),
                    micro_batch_size=s["micro_batch_size"],
                    num_inference_steps=s["steps"], eta=1.0, batch_size=s["batch"], group_size=s["batch"],
                    sample_chunk_size=s["batch"], minibatch_size=s["batch"] * s["steps"], learning_rate=1e-4,
                    clip_range=1e-4, lora_rank=8, lora_alpha=8, lora_target_modules=list(FLUX_LORA_TARGETS),
                    value_pretrain_epochs=0, mixed_precision="bf16" if cuda else "no", gradient_checkpointing=True,
                    cudnn_attention=s.get("cudnn_sdpa", True), progress=False, log_tensorboard=False, grid_every=0,
                    checkpoint_every=0, eval_every=0)
    trainer = Trainer(cfg, task, task.backbone(), task.scheduler, MultiReward([FunctionReward(brightness, name="b")]))
    loaded_mb = meter.allocated_mb()
    build_s = time.time() - t0
    clock = gt.EpochClock(meter)
    inner = trainer.update
    trainer.update = lambda ro: clock.around_update(inner, ro)
    res = {"transformer_params": params, "build_s": build_s, "memory_after_load_mb": loaded_mb,
           "settings": {k: s[k] for k in ("resolution", "batch", "steps", "max_sequence_length", "micro_batch_size",
                                          "cudnn_sdpa")}
           | {"lora_rank": 8, "gradient_checkpointing": True, "text_encoders": "1 layer at CLIP-L / T5-XXL widths"}}
    try:
        row = clock.epochs(trainer.train_epoch, 1)[0]
        res.update(fits=True, epoch_s_including_warmup=row["epoch_s"], update_s=row["update_s"],
                   peak_memory_mb=row["epoch_peak_mb"], update_peak_memory_mb=row["update_peak_mb"])
    except torch.cuda.OutOfMemoryError as e:
        res.update(fits=False, error=str(e)[:800], peak_memory_mb=torch.cuda.max_memory_allocated() / 2**20)
    return res


# (name, resolution, micro_batch_size, CUDA_LAUNCH_BLOCKING, cuDNN attention): the first that fits ends the part.
# The H200 run stopped on a CUDA illegal memory access in the 1024² update; the variants after the first narrow it
# down: without cuDNN's SDPA kernels (PyTorch 2.11 has open cuDNN SDPA backward bugs on sm90), one row per
# micro-batch, then 512².
FLUX_VARIANTS = (("1024_auto", 1024, "auto", "1", True), ("1024_auto_no_cudnn_sdpa", 1024, "auto", "0", False),
                 ("1024_mb1", 1024, 1, "0", True), ("512_auto", 512, "auto", "0", True))


def run_flux(a, tmp: Path, timeout: float) -> dict:
    """One GRPO epoch of the FLUX.1-dev shape, each variant in its own process (a CUDA error poisons its process).
    The first variant runs with CUDA_LAUNCH_BLOCKING=1, so a failing kernel is named where it fails."""
    # the tiny FLUX pipeline and the T5 tokenizer are the tests' (tests/ imports its siblings by name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests"),
                                                        os.environ.get("PYTHONPATH", "")])}
    if a.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    deadline = time.time() + timeout
    res = {"variants": {}}
    for name, resolution, micro, blocking, cudnn_sdpa in FLUX_VARIANTS[:1] if a.tiny else FLUX_VARIANTS:
        if time.time() > deadline - 20:
            res["variants"][name] = {"skipped": "out of the time budget"}
            continue
        spec = dict(device=a.device, tiny=a.tiny, tmp=str(tmp), resolution=16 if a.tiny else resolution,
                    batch=2, steps=2 if a.tiny else a.flux_steps, max_sequence_length=8 if a.tiny else 512,
                    micro_batch_size=micro, cudnn_sdpa=cudnn_sdpa)
        spec_file, result = tmp / f"flux_{name}.json", tmp / f"flux_{name}_result.json"
        spec_file.write_text(json.dumps(spec))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--flux-worker", str(spec_file), "--result", str(result)]
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "CUDA_LAUNCH_BLOCKING": blocking},
                                  cwd=tmp, timeout=max(deadline - time.time(), 10))
        except subprocess.TimeoutExpired:
            res["variants"][name] = {"skipped": "did not finish within the time budget"}
            continue
        if proc.returncode != 0:
            r = {"fits": False, "failed": proc.stderr[-3000:]}
        else:
            r = json.loads(result.read_text())
        r.update(wall_s=time.time() - t0, cuda_launch_blocking=blocking)
        res["variants"][name] = r
        if r.get("fits"):
            res.update({k: v for k, v in r.items() if k != "failed"}, variant=name)
            break
    res.setdefault("fits", False)
    return res


# ------------------------------------------------------------------------------------------------------
# the driver
def summarize(data: dict) -> None:
    """The Must-show keys at the top level, from the parts that ran."""
    p = data["parts"]
    if "tests" in p and "passed" in p["tests"]:
        data["cuda_tests_passed"], data["cuda_tests_failed"] = p["tests"]["passed"], p["tests"]["failed"]
    if "sd15" in p and "gae_vs_grpo_epoch" in p["sd15"]:
        data["gae_vs_grpo_epoch"] = p["sd15"]["gae_vs_grpo_epoch"]
        for k in ("sd15_vs_trl", "sd15_peak_mem_vs_trl"):
            if k in p["sd15"]:
                data[k] = p["sd15"][k]
    if "sd15_mem" in p and "budgets" in p["sd15_mem"]:
        data["sd15_at_trl_memory"] = p["sd15_mem"].get("sd15_at_trl_memory")
    if "sd3" in p and "runs" in p["sd3"]:
        out = {}
        for name, r in p["sd3"]["runs"].items():
            res, gc = name.split("_", 1)
            if "img_per_s" in r:
                out.setdefault(res, {})[gc] = r["img_per_s"]
        data["sd35m_img_per_s"] = out
    if "flux" in p:
        data["flux_step_fits"] = p["flux"].get("fits")
        if p["flux"].get("variant"):
            data["flux_step_variant"] = p["flux"]["variant"]
        if "peak_memory_mb" in p["flux"]:
            data["flux_step_peak_memory_mb"] = p["flux"]["peak_memory_mb"]
        failed = p["flux"].get("failed") or next((v.get("failed") for v in p["flux"].get("variants", {}).values()
                                                  if v.get("failed")), None)
        if failed and not p["flux"].get("fits"):  # the error's own line, not "does not fit"
            data["flux_step_error"] = next((ln.strip() for ln in reversed(failed.splitlines())
                                            if re.match(r"[\w.]*(Error|Exception): ", ln)), failed.splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: the rehearsal (with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="tiny models (a rehearsal of the script; needs --out)")
    ap.add_argument("--out", help=f"the JSON to write (default {DEFAULT_OUT.relative_to(ROOT)})")
    ap.add_argument("--parts", type=lambda x: x.split(","), default=list(PARTS), help="comma-separated: " + ",".join(PARTS))
    ap.add_argument("--budget-s", type=float, default=450, help="stop starting parts after this many seconds")
    ap.add_argument("--trl-python", help="the Python with trl==0.23.1 for TRL's side (default: this one)")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--sd15-epochs", type=int, default=2, help="timed epochs per side after one warm-up")
    ap.add_argument("--sd15-memory-mb", type=lambda x: [int(v) for v in x.split(",")], default=[1024, 4096],
                    help="sd15_mem: our activation budgets per micro-batch (MB), comma-separated")
    ap.add_argument("--sd3-resolutions", type=lambda x: [int(v) for v in x.split(",")], default=[512, 1024])
    ap.add_argument("--sd3-batch", type=int, default=8)
    ap.add_argument("--sd3-group", type=int, default=4)
    ap.add_argument("--sd3-steps", type=int, default=6)
    ap.add_argument("--flux-resolution", type=int, default=1024)
    ap.add_argument("--flux-steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--merge", action="append", default=[],
                    help="a gpu_check.json from an earlier run on the same kind of device: its parts that this run "
                         "does not redo are kept (repeatable; an earlier file's part wins unless it was skipped)")
    ap.add_argument("--merge-only", action="store_true",
                    help="run nothing: write the --merge files' parts as one record (the device is theirs)")
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument("--flux-worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.flux_worker:
        res = flux_worker(json.loads(Path(a.flux_worker).read_text()))
        Path(a.result).write_text(json.dumps(res))
        return res

    bad = [x for x in a.parts if x not in PARTS]
    if bad:
        raise SystemExit(f"--parts {','.join(bad)}: choose from {','.join(PARTS)}")
    out = Path(a.out) if a.out else DEFAULT_OUT
    if a.tiny and out.resolve() == DEFAULT_OUT.resolve():
        raise SystemExit(f"--tiny needs --out PATH (anything but {DEFAULT_OUT.relative_to(ROOT)})")
    import torch

    if a.merge_only:  # combine earlier runs (on one kind of device) into one record; nothing runs here
        if not a.merge:
            raise SystemExit("--merge-only needs --merge FILE (at least one)")
        a.parts = []
    elif a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: the GPU check writes nothing without a GPU. Rehearse it on a CPU "
                         "with `--tiny --device cpu --out PATH`.")
    if a.device == "cpu" and not a.tiny:
        raise SystemExit("--device cpu runs only with --tiny (the full-size models take hours on a CPU)")
    t_start = time.time()
    budget = Budget.starting_now(a.budget_s)
    import gpu_throughput as gt

    data = {"command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "tiny": a.tiny, "device": None if a.merge_only else gt._device_info(a.device == "cuda"),
            "versions": gt._versions(), "parts": {}}
    if a.merge_only:
        first = json.loads(Path(a.merge[0]).read_text())
        data.update(device=first["device"], versions=first["versions"], tiny=first["tiny"])
    for path in a.merge:
        old = json.loads(Path(path).read_text())
        if old["device"].get("name") != data["device"].get("name"):
            raise SystemExit(f"--merge {path}: measured on {old['device'].get('name')}, this run on "
                             f"{data['device'].get('name')}; merge only runs on the same kind of device")
        # a part this run redoes is not taken; an earlier file's part wins unless it was skipped for time
        kept = {k: v for k, v in old["parts"].items() if k not in a.parts
                and (k not in data["parts"] or (data["parts"][k].get("skipped") and not v.get("skipped")))}
        data["parts"].update(kept)
        data.setdefault("merged_from", []).append({"command": old["command"], "parts": sorted(kept),
                                                   "wall_time_s": old.get("wall_time_s")})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))

    def write(topic=None):
        data["wall_time_s"] = time.time() - t_start + sum(m.get("wall_time_s") or 0 for m in data.get("merged_from", []))
        summarize(data)
        write_result(out, data, topic=topic)

    def run_part(part: str, left: float) -> dict:
        if part == "tests":
            return run_tests(a.device, tmp, timeout=max(left, 60))
        if part == "sd15":
            return run_sd15(a, out.parent)
        if part == "sd15_mem":
            return run_sd15_mem(a, tmp, data["parts"].get("sd15"))
        if part == "sd3":
            return run_sd3(a, tmp, budget.deadline)
        return run_flux(a, tmp, timeout=max(left, 30))

    def done(part: str, res: dict) -> None:
        data["parts"][part] = res
        write()

    # the tiny rehearsal runs every part whatever the budget; the full check skips a part it cannot finish
    run_parts(a.parts, budget, run_part, min_seconds=None if a.tiny else PART_MIN_S, on_done=done,
              log=lambda msg: print(f"[gpu_check] {msg}", file=sys.stderr, flush=True))
    write(topic="perf" if not a.no_report and out.resolve() == DEFAULT_OUT.resolve() else None)
    print(json.dumps({k: v for k, v in data.items() if k != "parts"}, indent=1))
    return data






if __name__ == "__main__":
    main()
