"""The CUDA paths (``pytest -m gpu``; skipped without CUDA, so the default suite on a CPU skips them all).

What runs on the GPU, and against what:
* the main job (``critic-align train --config digits``) for two epochs on CUDA against the same command on the CPU
  (``CUDA_VISIBLE_DEVICES=""``): per-epoch training rewards and the evaluation rewards agree within
  ``MAIN_JOB_ATOL`` (the two devices' float kernels differ: cuDNN's convolutions may use TF32, which PyTorch enables
  for them by default; every sample starts from the same CPU-drawn noise);
* the same job under ``mixed_precision: bf16`` on CUDA: every logged number finite, the first epoch's rewards
  within ``BF16_ATOL`` of the fp32 CUDA run's, the checkpoint written;
* gradient checkpointing (the adapter-aware switch): one GAE update's policy and critic gradients with and without
  it, on the tiny UNet (fp32 and bf16), SD3 and FLUX transformers, on CUDA, within ``CKPT_RTOL`` (relative norm);
* the engine's gradient sync with CUDA tensors: two processes on the one GPU over gloo (NCCL refuses two ranks on
  one device) against one process on the same global batch: the first batch's rewards and advantages agree, the
  ranks' weights are bit-identical after training and agree with one process within ``MP_RTOL``.

``CRITIC_ALIGN_GPU_REHEARSAL=1`` runs the same tests with the CPU as the device under test (a rehearsal of the
GPU check's logic on a machine without CUDA; both sides of each comparison are then the CPU).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("CRITIC_ALIGN_GPU_REHEARSAL") == "1":
    DEVICE = "cpu"
else:
    DEVICE = None
pytestmark = [pytest.mark.gpu(rehearse=True),
              pytest.mark.skipif(DEVICE is None, reason="needs CUDA (CRITIC_ALIGN_GPU_REHEARSAL=1 rehearses on the CPU)")]

MAIN_JOB_ATOL = 0.02  # digit_prob / digit_correct means over 64 samples, CUDA vs CPU
BF16_ATOL = 0.05  # the first epoch's reward means, bf16 autocast vs fp32, both on CUDA
CKPT_RTOL = {"fp32": 1e-3, "bf16": 2e-2}  # ||g_ckpt - g|| / ||g||: recomputation under the device's kernels
MP_RTOL, MP_ATOL = 1e-2, 1e-4  # weights after 2 epochs, 2 processes vs 1 (the CPU test's 1e-3 / 2e-5, widened for
# the device's batch-shape-dependent kernels: Adam turns ~1e-6 gradient differences into weight differences)
MP_REWARD_ATOL = 1e-4  # the first batch's rewards and advantages: different batch shapes pick different kernels


# ----------------------------------------------------------------------------------------------------------------
# the main job, CPU vs CUDA, and bf16
def _main_job(out: Path, device: str, *sets: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "TQDM_DISABLE": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "critic_align.train.cli", "train", "--config", "digits", "--set", "num_epochs=2",
           "--set", f"output_dir={out}", *[x for s in sets for x in ("--set", s)]]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=out.parent)


def _finish(proc: subprocess.Popen, out: Path) -> list[dict]:
    log, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, log[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r["phase"] == "train" for r in rows), "no training epoch logged"
    return rows


def _numbers(rows: list[dict], phase: str) -> dict[tuple, float]:
    keys = ("reward/digit_prob/mean", "reward/digit_correct/mean", "eval/reward/digit_prob", "eval/reward/digit_correct")
    return {(r["epoch"], k): r[k] for r in rows if r["phase"] == phase for k in keys if k in r}


@pytest.fixture(scope="module")
def main_jobs(tmp_path_factory):
    """The main job on the CPU and on the device under test (run side by side), and in bf16 on the device."""
    tmp = tmp_path_factory.mktemp("main_job")
    runs = {"cpu": (tmp / "cpu", "cpu", ()), "device": (tmp / "device", DEVICE, ()),
            "bf16": (tmp / "bf16", DEVICE, ("mixed_precision=bf16",))}
    procs = {name: _main_job(out, dev, *sets) for name, (out, dev, sets) in runs.items()}
    return {name: (_finish(procs[name], runs[name][0]), runs[name][0]) for name in runs}


def test_main_job_on_the_device_matches_the_cpu(main_jobs):
    cpu, dev = main_jobs["cpu"][0], main_jobs["device"][0]
    for name, want in (("cpu", "cpu"), ("device", DEVICE), ("bf16", DEVICE)):
        summary = json.loads((main_jobs[name][1] / "summary.json").read_text())
        assert summary["device"].split(":")[0] == want, f"the {name} run ran on {summary['device']}, not {want}"
    for phase in ("train", "eval"):
        a, b = _numbers(cpu, phase), _numbers(dev, phase)
        assert a and a.keys() == b.keys()
        for k in a:
            assert abs(a[k] - b[k]) <= MAIN_JOB_ATOL, f"{phase} {k}: cpu {a[k]:.4f} vs {DEVICE} {b[k]:.4f}"


def test_main_job_in_bf16_on_the_device(main_jobs):
    rows, out = main_jobs["bf16"]
    for r in rows:
        for k, v in r.items():
            if isinstance(v, float):
                assert math.isfinite(v), f"{r['phase']} epoch {r.get('epoch')} {k} = {v}"
    assert json.loads((out / "config.json").read_text())["mixed_precision"] == "bf16"
    first_fp32 = {k: v for k, v in _numbers(main_jobs["device"][0], "train").items() if k[0] == 1}
    first_bf16 = {k: v for k, v in _numbers(rows, "train").items() if k[0] == 1}
    assert first_fp32 and first_fp32.keys() == first_bf16.keys()
    for k in first_fp32:
        assert abs(first_fp32[k] - first_bf16[k]) <= BF16_ATOL, f"{k}: fp32 {first_fp32[k]:.4f} vs bf16 {first_bf16[k]:.4f}"
    assert any((out / "checkpoints").iterdir()), "no checkpoint written"


# ----------------------------------------------------------------------------------------------------------------
# gradient checkpointing on the device
@pytest.mark.parametrize("kind,overrides", [("unet2d", {}), ("unet2d", {"mixed_precision": "bf16"}), ("sd3", {}),
                                            ("flux", {})], ids=["unet2d", "unet2d-bf16", "sd3", "flux"])
def test_gradient_checkpointing_on_the_device(tmp_path, monkeypatch, kind, overrides):
    from tests.test_gradient_checkpointing import _gae_gradients

    ref = _gae_gradients(tmp_path, kind, "none", monkeypatch, **overrides)
    ckpt = _gae_gradients(tmp_path, kind, "aware", monkeypatch, **overrides)
    assert ckpt["trainer"].device.type == DEVICE
    tol = CKPT_RTOL["bf16" if overrides.get("mixed_precision") == "bf16" else "fp32"]
    for name in ("policy", "critic"):
        g, r = ckpt[name].float().cpu(), ref[name].float().cpu()
        assert r.abs().max() > 0, name
        rel = ((g - r).norm() / r.norm()).item()
        assert rel <= tol, f"{kind} {name}: relative gradient error {rel:.2e} > {tol}"


# ----------------------------------------------------------------------------------------------------------------
# two processes on one GPU over gloo
def _no_tf32() -> None:
    """fp32 convolutions and matmuls without TF32 (PyTorch's default lets cuDNN's convolutions use it): with TF32 the
    2-process weights drifted past ``MP_RTOL`` from the 1-process run's on the H200 (one per-rank batch of half the
    rows rounds differently), so the comparison runs both sides at full fp32 precision."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def _gloo_worker(rank: int, tmp: str, port: int) -> None:
    import torch.distributed as dist
    from accelerate import PartialState

    from tests.test_multiprocess import ALGORITHMS, CFG, _run
    from tests.test_trainer import make_trainer

    # LOCAL_RANK 0 on both: accelerate puts a process on cuda:LOCAL_RANK and DDP on device_ids=[LOCAL_RANK], and this
    # machine has one GPU for the two ranks (on N GPUs each rank has its own, as `accelerate launch` sets it)
    os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if DEVICE == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"
    torch.set_num_threads(1)
    _no_tf32()
    # gloo, not accelerate's default NCCL: both ranks share cuda:0 (NCCL refuses two ranks on one device).  The
    # group is made through accelerate's state, not dist.init_process_group: accelerate picks its gather collective
    # by the backend it knows (a group it did not make reads as NCCL, and gloo has no all_gather_into_tensor for
    # 2-D CUDA tensors)
    PartialState(cpu=DEVICE == "cpu", backend="gloo")
    assert dist.get_backend() == "gloo"
    tmp = Path(tmp)
    tr = make_trainer(tmp / f"dir{rank}", **CFG, **ALGORITHMS["ppo"])
    assert tr.num_processes == 2 and tr.device.type == DEVICE
    assert isinstance(tr.processes.module, torch.nn.parallel.DistributedDataParallel)
    _run(tr, tmp, f"rank{rank}")
    tr.processes.close()


def test_two_processes_on_one_device_over_gloo(tmp_path):
    from safetensors.torch import load_file

    from tests.test_multiprocess import ALGORITHMS, CFG, _run, assert_weights_match, spawn_two
    from tests.test_trainer import make_trainer

    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    _no_tf32()
    try:
        one = make_trainer(tmp_path / "one", **CFG, **ALGORITHMS["ppo"])
        assert one.num_processes == 1 and one.device.type == DEVICE
        _run(one, tmp_path, "one")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    spawn_two(_gloo_worker, str(tmp_path))
    r0, r1, ref = (load_file(str(tmp_path / f"{t}.safetensors")) for t in ("rank0", "rank1", "one"))
    assert r0.keys() == r1.keys() == ref.keys()
    for k in ("rewards", "advantages"):
        torch.testing.assert_close(r0[k], ref[k], rtol=0, atol=MP_REWARD_ATOL, msg=k)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{k} differs between the two processes"
    assert_weights_match(ref, r0, rtol=MP_RTOL, atol=MP_ATOL)
    moved = json.loads((tmp_path / "rank0_moved.json").read_text())
    assert moved == ["critic", "policy"]
