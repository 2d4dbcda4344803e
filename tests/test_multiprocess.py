"""Two processes (spawned like torchrun: gloo on CPU, accelerate's MULTI_CPU; the engine is accelerate's DDP) against
one process at the same global batch.  (Spawned, not forked as accelerate.debug_launcher does: a forked child of a
process that already ran torch ops runs its OpenMP kernels ~20x slower here.)

What is equal, and how exactly:
* the sampled trajectories: every process draws the same initial noise and per-chunk noise seeds and samples
  only its own shard (rank-local rollouts), so the two shards together are the 1-process rollout (bit for bit on
  CPU here; compared within 1e-6 since batch composition may change float kernels elsewhere), and the shards are
  disjoint;
* rewards and advantages of the first batch (group statistics and whitening on the whole batch's rewards and
  values, which are all that crosses processes): within 1e-6;
* the metrics and the weights after training: within float tolerance (the 1-process minibatch gradient is one
  sum; with 2 processes it is two partial sums averaged by the engine);
* the weights of the two processes after every update: bit for bit (the engine syncs the gradients, then both
  take the same optimiser step); with the engine's sync switched off (``no_sync``) they differ, so the check has
  teeth.  Both adapters train: the policy's and the critic's weights move.
Only the main process writes logs and checkpoints; the checkpoint holds both processes' RNG states.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_trainer import make_trainer

# two fresh interpreters import torch + diffusers: ~10 s per algorithm on 2 idle cores, more on a busy machine.
# In the default suite: it guards the multi-process path users launch.

CFG = dict(num_epochs=2, sample_chunk_size=4, batch_size=8, group_size=4, minibatch_size=16)
# the algorithms share the multi-process code (critic_align/algorithms/): each must match one process too
ALGORITHMS = {"ppo": {}, "grpo": dict(advantage="grpo"), "nft": dict(algorithm="nft", advantage="grpo"),
              "awm_critic": dict(algorithm="awm", advantage="gae", awm_advantage="critic")}


def _weights(tr) -> dict:
    out = {f"policy.{k}": v.detach().clone() for k, v in tr.adapters.state_dict("policy").items()}
    if tr.critic is not None:
        out.update({f"critic.{k}": v.detach().clone() for k, v in tr.critic.state_tensors().items()})
    return out


def _run(tr, tmp: Path, tag: str) -> None:
    """First rollout (kept, with its advantages), then train; write what the test compares (by the test, not by the
    trainer): the whole batch, gathered here from the processes' shards."""
    ro = tr.compute_advantages(tr.rollout(tr.prompt_iter.batch(2, 4)))
    gather = tr.processes.gather
    first = {"latents": gather(ro.latents), "rewards": gather(ro.rewards), "advantages": gather(ro.advantages)}
    (tmp / f"{tag}_prompts.json").write_text(json.dumps(list(ro.prompts)))
    before = _weights(tr)
    hist = tr.train()
    moved = sorted({k.split(".")[0] for k, v in _weights(tr).items() if not torch.equal(v, before[k])})
    save_file({**{k: v.contiguous() for k, v in first.items()}, **_weights(tr)}, str(tmp / f"{tag}.safetensors"))
    (tmp / f"{tag}_moved.json").write_text(json.dumps(moved))
    (tmp / f"{tag}.json").write_text(json.dumps({"history": hist, "reward_queries": tr.reward_queries}))


def _two_process_worker(rank: int, tmp: str, port: int, algo: str = "ppo") -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), ACCELERATE_USE_CPU="1")
    torch.set_num_threads(1)
    tmp = Path(tmp)
    # rank 1 gets its own output_dir (it does not change what is computed): it must stay empty
    tr = make_trainer(tmp / f"dir{rank}", **CFG, **ALGORITHMS[algo])
    assert tr.num_processes == 2
    assert isinstance(tr.processes.module, torch.nn.parallel.DistributedDataParallel)  # the engine's DDP
    _run(tr, tmp, f"rank{rank}")

    # negative control: one update without the engine's gradient sync leaves the ranks' weights different
    import torch.distributed as dist

    ro = tr.compute_advantages(tr.rollout(tr.prompt_iter.batch(2, 4)))
    with tr.processes.module.no_sync():
        tr.update(ro)
    flat = torch.cat([p.detach().reshape(-1) for p in tr.trainable])
    both = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(both, flat)
    (tmp / f"nosync_rank{rank}.json").write_text(json.dumps({"equal": bool(torch.equal(both[0], both[1]))}))
    tr.processes.close()  # the process group ends on both ranks before the interpreters exit
    # a rank was seen to abort at interpreter teardown ('terminate called without an active exception': gloo's
    # threads) in a CI rehearsal, after everything above had been written, as tests/test_fsdp.py's ranks did: end here
    os._exit(0)


@pytest.fixture(scope="module", params=sorted(ALGORITHMS))
def runs(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp(f"mp_{request.param}")
    one = make_trainer(tmp / "one", **CFG, **ALGORITHMS[request.param])
    assert one.num_processes == 1
    _run(one, tmp, "one")
    spawn_two(_two_process_worker, str(tmp), request.param)
    return tmp


def spawn_two(worker, tmp: str, *args) -> None:
    """Run ``worker(rank, tmp, port, *args)`` in two spawned interpreters (rank 0 and 1, one torch thread each) on a
    free local port, and wait for both."""
    import os
    import socket

    import torch.multiprocessing as tmp_mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the spawned interpreters read it at start-up
    try:
        tmp_mp.start_processes(worker, args=(tmp, port, *args), nprocs=2, start_method="spawn")
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old


def test_two_process_weights_identical_across_ranks(runs):
    r0, r1 = load_file(str(runs / "rank0.safetensors")), load_file(str(runs / "rank1.safetensors"))
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{k} differs between the two processes"
    # without the all-reduce the processes drift apart: the check above can fail
    assert json.loads((runs / "nosync_rank0.json").read_text())["equal"] is False


def test_rollouts_are_rank_local(runs):
    """Each process sampled only its own prompts: disjoint shards whose union is the 1-process batch."""
    one, p0, p1 = (json.loads((runs / f"{t}_prompts.json").read_text()) for t in ("one", "rank0", "rank1"))
    assert len(p0) == len(p1) == len(one) // 2 and p0 + p1 == one


def assert_weights_match(one: dict, two: dict, rtol: float, atol: float) -> None:
    """The trained weights of two runs (``_weights`` plus the first batch, as ``_run`` saves them) agree."""
    for k in one:
        if k in ("latents", "rewards", "advantages"):
            continue
        a, b = one[k], two[k]
        if k == "critic.head.attn.in_proj_bias":
            # the attention's key bias has an exactly zero gradient (softmax ignores a shift shared by all
            # keys): its values are float rounding noise that Adam scales up to lr-sized steps in either run;
            # both stay at noise level, and the query and value biases are compared
            c = a.numel() // 3
            assert a[c:2 * c].abs().max() < 1e-4 and b[c:2 * c].abs().max() < 1e-4
            a, b = torch.cat([a[:c], a[2 * c:]]), torch.cat([b[:c], b[2 * c:]])
        # float summation order differs (one sum vs two half-sums); Adam's normalised steps turn ~1e-7 gradient
        # differences into ~1e-6 weight differences after a few steps; the weights moved by ~1e-2
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=k)


def test_two_processes_equal_one_process(runs):
    one, two = load_file(str(runs / "one.safetensors")), load_file(str(runs / "rank0.safetensors"))
    torch.testing.assert_close(two["latents"], one["latents"], rtol=0, atol=1e-6)  # same trajectories
    torch.testing.assert_close(two["rewards"], one["rewards"], rtol=0, atol=1e-6)  # gathered in order
    torch.testing.assert_close(two["advantages"], one["advantages"], rtol=0, atol=1e-6)  # whole-batch statistics
    # both adapters trained in both runs (the critic's LoRA and head too, where there is a critic)
    moved_one, moved_two = (json.loads((runs / f"{t}_moved.json").read_text()) for t in ("one", "rank0"))
    assert moved_one == moved_two and "policy" in moved_two
    assert ("critic" in moved_two) == any(k.startswith("critic.") for k in one)
    moved = [k for k in one if k.startswith("policy.") and "lora_B" in k and one[k].abs().max() > 0]
    assert moved, "training did not move the policy: the comparison would be vacuous"
    assert_weights_match(one, two, rtol=1e-3, atol=2e-5)
    h1, h2 = (json.loads((runs / f"{t}.json").read_text()) for t in ("one", "rank0"))
    pretraining = 8 if "critic.head.attn.in_proj_bias" in one else 0
    assert h1["reward_queries"] == h2["reward_queries"] == 8 + pretraining + 2 * 8  # first rollout + pretrain + 2 epochs
    for a, b in zip(h1["history"], h2["history"], strict=True):
        for k, v in a.items():
            if k.startswith("time_") or not isinstance(v, float) or v != v:
                continue
            assert b[k] == pytest.approx(v, rel=1e-3, abs=1e-5), k


def test_only_the_main_process_writes(runs):
    assert not (runs / "dir1").exists(), "rank 1 wrote into its output_dir"
    main = runs / "dir0" / "run"
    assert (main / "metrics.jsonl").exists()
    ckpts = sorted((main / "checkpoints").glob("epoch_*"))
    assert ckpts
    state = json.loads((ckpts[-1] / "state.json").read_text())
    assert state["num_processes"] == 2 and len(state["rng_ranks"]) == 1  # both processes' RNG states
    tensors = load_file(str(ckpts[-1] / "tensors.safetensors"))
    assert "rng.rank1.generator" in tensors and "rng.generator" in tensors


def test_the_cli_trains_on_two_processes_and_exits_cleanly(tmp_path):
    """`torchrun --nproc_per_node 2 -m critic_align.train.cli train ...` (the README's CPU line): both ranks train, the
    main process writes the run, and the launcher exits 0 (every rank ends the process group before exiting)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    sets = ["sample_chunk_size=8", "num_epochs=1", "batch_size=16", "group_size=4", "num_inference_steps=4",
            "minibatch_size=32", "value_pretrain_epochs=1", "eval_every=0", "grid_every=0", "log_tensorboard=false",
            "progress=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "critic_align.train.cli", "train", "--config", "digits", "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "terminate called" not in res.stderr
    ckpt = sorted((out / "checkpoints").glob("epoch_*"))[-1]
    assert json.loads((ckpt / "state.json").read_text())["num_processes"] == 2
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1
