"""FSDP2 through accelerate's engine, on two CPU processes (gloo), against one process at the same global batch.

accelerate turns FSDP on only for GPU launch types (``AcceleratorState`` makes a multi-CPU launch MULTI_CPU, i.e.
DDP, whatever the FSDP plugin says), so the workers build ``Accelerator(cpu=True)`` and switch its state to FSDP with
an FSDP2 plugin (:func:`fsdp_accelerator`): from there on everything is accelerate's own FSDP2 path,
``accelerator.prepare`` -> ``fsdp2_prepare_model`` -> torch's ``fully_shard`` on gloo, ``no_sync`` ->
``set_requires_gradient_sync``.  A real GPU launch (``accelerate launch --config_file
train/configs/accelerate/fsdp.yaml``) is the ``gpu``-marked test at the end.

What is checked:
* the frozen base is sharded: a base weight is a DTensor whose local shard holds half of its rows on each rank, the
  LoRA adapters and the critic's head train (DTensor shards too);
* the rollouts (sampled outside the training forward, through the units' own all-gathers) equal one process's:
  latents, rewards and advantages within 1e-6;
* the weights after 2 epochs equal one process's within the DDP test's tolerance (rtol 1e-3, atol 2e-5: float
  summation order differs, a reduce-scatter of two partial gradients instead of one sum);
* the checkpoint: the main process writes full tensors (no DTensor, the same keys and shapes as a 1-process run's),
  a 1-process trainer loads it and holds the FSDP run's weights exactly, and the FSDP trainers load it back into
  their shards exactly (after the weights were moved away);
* the grid is sampled on both processes (each forward all-gathers) and written by the main one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_multiprocess import spawn_two
from test_trainer import make_trainer

CFG = dict(num_epochs=2, sample_chunk_size=4, batch_size=8, group_size=4, minibatch_size=16)
# policy: full (every backbone weight trains) with a 'full' critic (its own copy of the base): both sharded
FULL = dict(CFG, num_epochs=1, policy="full", critic_mode="full")


def fsdp_accelerator():
    """An ``Accelerator`` on CPU whose state runs accelerate's FSDP2 (see the module doc)."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    acc = Accelerator(cpu=True)
    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                           state_dict_type="FULL_STATE_DICT")
    # what AcceleratorState does on a GPU launch with an FSDP plugin (both shared states: a later AcceleratorState()
    # copies PartialState's over its own)
    acc.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return acc


def _weights(tr) -> dict:
    out = {f"policy.{k}": v for k, v in tr.models.policy_tensors().items()}
    if tr.critic is not None:
        out.update({f"critic.{k}": v for k, v in tr.critic.state_tensors().items()})
    return tr.processes.full_tensors(out) if tr.processes.sharded else {k: v.clone() for k, v in out.items()}


def _run(tr, tmp: Path, tag: str) -> None:
    ro = tr.compute_advantages(tr.rollout(tr.prompt_iter.batch(2, 4)))
    gather = tr.processes.gather
    first = {"latents": gather(ro.latents), "rewards": gather(ro.rewards), "advantages": gather(ro.advantages)}
    tr.train()
    weights = _weights(tr)
    if tr.is_main_process:
        save_file({k: v.contiguous() for k, v in {**first, **weights}.items()}, str(tmp / f"{tag}.safetensors"))


def _worker(rank: int, tmp: str, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), ACCELERATE_USE_CPU="1")
    torch.set_num_threads(1)
    from torch.distributed.tensor import DTensor

    tmp = Path(tmp)
    tr = make_trainer(tmp / f"dir{rank}", accelerator=fsdp_accelerator(), **CFG)
    assert tr.processes.sharded and tr.num_processes == 2
    # the frozen base is sharded: each rank holds half the rows of a base weight; the adapters are shards too
    base = tr.adapter.model.conv_in.base_layer.weight if hasattr(tr.adapter.model.conv_in, "base_layer") \
        else tr.adapter.model.conv_in.weight
    facts = {"base_is_dtensor": isinstance(base, DTensor), "base_requires_grad": base.requires_grad,
             "base_shape": list(base.shape), "base_local_shape": list(base.to_local().shape),
             "policy_params_dtensor": all(isinstance(p, DTensor) for p in tr.policy_params),
             "critic_params_dtensor": all(isinstance(p, DTensor) for p in tr.critic_params),
             "optimizer_params": [id(p) for g in tr.optimizer.param_groups for p in g["params"]]
             == [id(p) for p in tr.policy_params + tr.critic_params]}
    _run(tr, tmp, "fsdp")
    # grids: both ranks sample, the main one writes
    grid = tr.save_grid(tmp / f"grid_rank{rank}.png", per_prompt=2)
    facts["grid_written"] = grid is not None
    # checkpoint round trip into the shards: move the weights away, load the last checkpoint back
    ckpt = sorted((tmp / "dir0" / "run" / "checkpoints").glob("epoch_*"))[-1]
    before = _weights(tr)
    with torch.no_grad():
        for p in tr.policy_params + tr.critic_params:
            p.add_(1.0)
    tr.load(ckpt, resume=False)
    after = _weights(tr)
    if rank == 0:
        facts["reload_exact"] = all(torch.equal(before[k], after[k]) for k in before)
        facts["checkpoint"] = str(ckpt)
    # policy: full under FSDP: the whole backbone is the policy, sharded and trained; the critic's copy too
    full = make_trainer(tmp / f"full{rank}", accelerator=tr.accelerator, **FULL)
    w = full.adapter.model.conv_in.weight
    facts["full_base_sharded_and_trained"] = (isinstance(w, DTensor) and w.requires_grad
                                              and w.to_local().shape[0] * 2 == w.shape[0])
    facts["full_critic_copy_sharded"] = isinstance(full.critic.backbone.model.conv_in.weight, DTensor)
    _run(full, tmp, "fsdp_full")
    (tmp / f"facts_rank{rank}.json").write_text(json.dumps(facts))
    tr.processes.close()
    # FSDP on gloo is this test's hand-made setup (a CPU FSDP launch is refused to users): its sharded modules keep
    # the process group's gloo threads referenced until interpreter teardown, where a rank was seen to abort
    # ('terminate called without an active exception') after everything above had been written; end here instead
    os._exit(0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    one = make_trainer(tmp / "one", **CFG)
    _run(one, tmp, "one")
    _run(make_trainer(tmp / "one_full", **FULL), tmp, "one_full")
    spawn_two(_worker, str(tmp))
    return tmp


def test_the_frozen_base_is_sharded_and_the_adapters_train_as_shards(runs):
    for rank in (0, 1):
        f = json.loads((runs / f"facts_rank{rank}.json").read_text())
        assert f["base_is_dtensor"] and not f["base_requires_grad"]
        assert f["base_local_shape"][0] * 2 == f["base_shape"][0]  # this rank's half of the rows
        assert f["base_local_shape"][1:] == f["base_shape"][1:]
        assert f["policy_params_dtensor"] and f["critic_params_dtensor"]
        assert f["optimizer_params"]  # the optimiser steps the shards the trainer clips and checks


@pytest.mark.parametrize("tag", ["", "_full"])
def test_fsdp_equals_one_process(runs, tag):
    one, two = load_file(str(runs / f"one{tag}.safetensors")), load_file(str(runs / f"fsdp{tag}.safetensors"))
    assert one.keys() == two.keys()
    for k in ("latents", "rewards", "advantages"):
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-6, msg=k)
    if tag:  # policy: full: the base weights themselves trained
        base = load_file(str(sorted((runs / "one_full" / "run" / "checkpoints").glob("epoch_000000"))[0]
                             / "tensors.safetensors"))
        assert any(not torch.equal(base[k], one[k]) for k in one if k.startswith("policy."))
        f = json.loads((runs / "facts_rank1.json").read_text())
        assert f["full_base_sharded_and_trained"] and f["full_critic_copy_sharded"]
    else:
        moved = [k for k in one if k.startswith("policy.") and "lora_B" in k and one[k].abs().max() > 0]
        assert moved, "training did not move the policy: the comparison would be vacuous"
    for k in one:
        if k in ("latents", "rewards", "advantages"):
            continue
        a, b = one[k], two[k]
        if k == "critic.head.attn.in_proj_bias":  # the key bias's gradient is exactly 0: noise (see test_multiprocess)
            c = a.numel() // 3
            a, b = torch.cat([a[:c], a[2 * c:]]), torch.cat([b[:c], b[2 * c:]])
        if tag and k.endswith("to_k.bias"):
            # the same for an attention's key bias when the whole base trains: an exactly zero gradient, whose float
            # noise Adam turns into small steps in either run; both stay at noise level, far below the trained moves
            assert (a - base[k]).abs().max() < 1e-4 and (b - base[k]).abs().max() < 1e-4, k
            continue
        torch.testing.assert_close(b, a, rtol=1e-3, atol=2e-5, msg=k)


def test_the_checkpoint_is_full_and_loads_on_one_process(runs, tmp_path):
    f = json.loads((runs / "facts_rank0.json").read_text())
    assert f["reload_exact"]  # loaded back into the shards exactly
    ckpt = Path(f["checkpoint"])
    tensors = load_file(str(ckpt / "tensors.safetensors"))
    state = json.loads((ckpt / "state.json").read_text())
    assert state["num_processes"] == 2
    one_ckpt = sorted((runs / "one" / "run" / "checkpoints").glob("epoch_*"))[-1]
    ref = load_file(str(one_ckpt / "tensors.safetensors"))
    # the same keys, shapes and dtypes as a 1-process checkpoint (rank 1's RNG states besides)
    assert {k: (v.shape, v.dtype) for k, v in tensors.items() if not k.startswith("rng.rank1.")} == \
        {k: (v.shape, v.dtype) for k, v in ref.items()}
    # a 1-process trainer loads it (resume: same config) and holds the FSDP run's final weights
    tr = make_trainer(tmp_path, **CFG)
    tr.load(ckpt, resume=False)
    fsdp = load_file(str(runs / "fsdp.safetensors"))
    mine = _weights(tr)
    for k, v in mine.items():
        assert torch.equal(v, fsdp[k]), k
    assert tr.epoch == 2


def test_the_grid_is_written_by_the_main_process_only(runs):
    assert json.loads((runs / "facts_rank0.json").read_text())["grid_written"]
    assert not json.loads((runs / "facts_rank1.json").read_text())["grid_written"]
    assert (runs / "grid_rank0.png").exists() and not (runs / "grid_rank1.png").exists()


@pytest.mark.gpu
def test_accelerate_launch_with_the_fsdp_recipe_trains_on_gpus(tmp_path):
    """The README's line on GPUs: `accelerate launch --config_file train/configs/accelerate/fsdp.yaml -m
    critic_align.train.cli train ...` (as many processes as GPUs, at most 2): every rank trains, the main process
    writes a checkpoint of full tensors with the same keys and shapes a 1-process run writes, and the launcher exits
    0.  (On CPU accelerate would run DDP: the launch checks refuse that, see test_launch.)"""
    import subprocess
    import sys

    from critic_align.checkpoint import read_checkpoint

    n = min(2, torch.cuda.device_count())
    out = tmp_path / "run"
    sets = ["sample_chunk_size=8", "num_epochs=1", "batch_size=16", "group_size=4", "num_inference_steps=4",
            "minibatch_size=32", "value_pretrain_epochs=1", "eval_every=0", "grid_every=1", "log_tensorboard=false",
            "progress=false"]
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(root / "train" / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", str(n), "-m",
           "critic_align.train.cli", "train", "--config", "digits", "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=root,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             [str(root), os.environ.get("PYTHONPATH", "")])})
    assert res.returncode == 0, res.stderr[-4000:]
    ckpt = sorted((out / "checkpoints").glob("epoch_*"))[-1]
    tensors, state = read_checkpoint(ckpt)
    assert state["num_processes"] == n
    fp = state["fingerprint"]
    assert {k: list(v.shape) for k, v in tensors.items() if k.startswith("policy.")} == \
        {f"policy.{k}": v for k, v in fp["policy"].items()}
    assert (out / "grids").exists()
