"""One process of a ``benchmarks/scaleout.py`` run: ``critic-align train`` with a byte-counting shim on
torch.distributed's collectives and a record of the first epoch's rewards and advantages.

    python benchmarks/scaleout_worker.py OUT_DIR train --config digits ...            (one process)
    torchrun --nproc_per_node 2 benchmarks/scaleout_worker.py OUT_DIR train ...       (N processes)

Each process pins itself to its own core (local rank modulo the cores this process may use) and runs one torch
thread.  ``SCALEOUT_GLOO_DEVICE=1`` gives a 1-process run a gloo transport device (its thread wakes every 10 ms,
as on each rank of a 2-process run) and nothing else: the control for whether that thread slows a rank down.
``SCALEOUT_DDP_FIND_UNUSED=0`` runs DDP without ``find_unused_parameters`` (jobs without a critic only, such as
digits_grpo: there every forward reaches every trainable parameter): the control for what DDP's walk costs.

What it writes to OUT_DIR:

* ``bytes_rank{r}.json``: the bytes this rank received through each collective, split by phase: ``epoch`` (inside
  ``Trainer.train_epoch``, less the hand-written gradient all-reduce), ``gradient`` (inside
  ``critic_align.distributed.sum_gradients``, when that function exists) and ``other`` (setup, value pretraining,
  checkpoints); plus the number of training epochs and, per phase, ``seconds_in``: the wall seconds this rank spent
  inside each collective (mostly waiting for the other ranks), inside the engine's forward and backward
  (``engine_forward``, ``engine_backward``: DDP's reducer all-reduces and waits inside the backward) and inside the
  trainer's ``rollout`` and ``update`` stages (``stage_rollout``, ``stage_update``).
* ``first_epoch.pt`` (rank 0): the first training epoch's rows (prompt, rewards (K,), advantages (T,)) of the whole
  global batch, sorted by prompt then rewards, so that a run whose ranks hold only their own rows compares with one
  whose ranks hold everything.

Received bytes per collective, for N processes and a tensor of b bytes per rank: all_gather / all_gather_into_tensor
(N-1)·b; broadcast b on every rank but the source; all_reduce 2(N-1)/N·b (ring); reduce_scatter (N-1)/N·b of the input;
gather (N-1)·b on the destination; scatter b on every rank but the source; all_to_all the input less its own share.
Object collectives (all_gather_object, broadcast_object_list, gather_object) are counted through the tensor
collectives they call.  DDP's gradient buckets are all-reduced in C++ by its reducer and are not seen here.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import threading
import time
from pathlib import Path

PHASE = threading.local()


def _phase() -> str:
    return getattr(PHASE, "name", "other")


@contextlib.contextmanager
def phase(name: str):
    old = _phase()
    PHASE.name = name
    try:
        yield
    finally:
        PHASE.name = old


def _nbytes(t) -> int:
    try:
        return int(t.numel() * t.element_size())
    except AttributeError:
        return 0


def _received(op: str, args, kwargs, world: int, rank: int) -> float:
    """The bytes this rank receives in one call of ``op`` (see the module docstring)."""
    def arg(i, name):
        return kwargs[name] if name in kwargs else (args[i] if len(args) > i else None)

    if op == "all_gather":
        return (world - 1) * _nbytes(arg(1, "tensor"))
    if op == "all_gather_into_tensor":
        return (world - 1) * _nbytes(arg(1, "input_tensor"))
    if op == "broadcast":
        src = arg(1, "src")
        return 0 if src == rank else _nbytes(arg(0, "tensor"))
    if op == "all_reduce":
        return 2 * (world - 1) / world * _nbytes(arg(0, "tensor"))
    if op == "reduce_scatter_tensor":
        return (world - 1) / world * _nbytes(arg(1, "input"))
    if op == "gather":
        dst = arg(3, "dst") or 0
        return (world - 1) * _nbytes(arg(0, "tensor")) if dst == rank else 0
    if op == "scatter":
        src = arg(3, "src") or 0
        return 0 if src == rank else _nbytes(arg(0, "tensor"))
    if op == "all_to_all_single":
        return (world - 1) / world * _nbytes(arg(1, "input"))
    return 0


OPS = ("all_gather", "all_gather_into_tensor", "broadcast", "all_reduce", "reduce_scatter_tensor", "gather", "scatter",
       "all_to_all_single")


def install_counter(counts: dict) -> None:
    """Wrap torch.distributed's tensor collectives (in both ``torch.distributed`` and ``distributed_c10d``, whose
    object collectives call them by module global) to add the received bytes to ``counts[phase][op]``."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    for op in OPS:
        orig = getattr(c10d, op, None)
        if orig is None:
            continue

        @functools.wraps(orig)
        def counted(*args, _op=op, _orig=orig, **kwargs):
            if dist.is_initialized():
                world, rank = dist.get_world_size(), dist.get_rank()
                by_op = counts.setdefault(_phase(), {})
                by_op[_op] = by_op.get(_op, 0.0) + _received(_op, args, kwargs, world, rank)
                calls = counts.setdefault("calls", {})
                calls[_op] = calls.get(_op, 0) + 1
                t0 = time.perf_counter()
                try:
                    return _orig(*args, **kwargs)
                finally:  # the time this rank spends in the collective: mostly waiting for the slower rank
                    waits = counts.setdefault("seconds_in", {}).setdefault(_phase(), {})
                    waits[_op] = waits.get(_op, 0.0) + time.perf_counter() - t0
            return _orig(*args, **kwargs)

        setattr(c10d, op, counted)
        if getattr(dist, op, None) is orig:
            setattr(dist, op, counted)


def _rows(ro):
    """(prompt, rewards, advantages) per trajectory of a rollout with advantages, as python lists."""
    rewards, adv = ro.rewards.float().cpu(), ro.advantages.float().cpu()
    return [(p, rewards[i].tolist(), adv[i].tolist()) for i, p in enumerate(ro.prompts)]


def install_recorders(out: Path, counts: dict) -> None:
    import torch
    import torch.distributed as dist

    from critic_align import trainer as trainer_mod

    Trainer = trainer_mod.Trainer
    state = {"epochs": 0, "recorded": False}
    train_epoch, compute_advantages = Trainer.train_epoch, getattr(Trainer, "compute_advantages", None)

    def counted_epoch(self, *a, **k):
        with phase("epoch"):
            res = train_epoch(self, *a, **k)
        state["epochs"] += 1
        counts["epochs"] = state["epochs"]
        return res

    def recorded_advantages(self, ro, *a, **k):
        res = compute_advantages(self, ro, *a, **k)
        if _phase() == "epoch" and not state["recorded"]:
            state["recorded"] = True
            rows = _rows(res)
            if len(rows) < self.config.batch_size and dist.is_initialized():  # rank-local rows: gather, uncounted
                with phase("uncounted"):
                    parts = [None] * dist.get_world_size()
                    dist.all_gather_object(parts, rows)
                rows = [r for part in parts for r in part]
            if self.is_main_process:
                rows.sort(key=lambda r: (r[0], r[1]))
                torch.save({"prompts": [r[0] for r in rows], "rewards": torch.tensor([r[1] for r in rows]),
                            "advantages": torch.tensor([r[2] for r in rows])}, out / "first_epoch.pt")
        return res

    Trainer.train_epoch = counted_epoch
    from critic_align import distributed

    def timed(name, orig):  # seconds per phase in the engine's forward and backward (DDP's reducer waits inside)
        def wrapper(self, *a, **k):
            t0 = time.perf_counter()
            try:
                return orig(self, *a, **k)
            finally:
                secs = counts.setdefault("seconds_in", {}).setdefault(_phase(), {})
                secs[name] = secs.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    distributed.Processes.backward = timed("engine_backward", distributed.Processes.backward)
    distributed.Processes.forward = timed("engine_forward", distributed.Processes.forward)
    for stage in ("rollout", "update"):
        if hasattr(Trainer, stage):
            setattr(Trainer, stage, timed("stage_" + stage, getattr(Trainer, stage)))
    if compute_advantages is not None:  # the stage whose output is compared (absent: nothing recorded)
        Trainer.compute_advantages = recorded_advantages
    try:
        from critic_align import distributed

        if hasattr(distributed, "sum_gradients"):
            orig = distributed.sum_gradients

            def gradient_phase(*a, **k):
                with phase("gradient"):
                    return orig(*a, **k)

            distributed.sum_gradients = gradient_phase  # Processes.sum_gradients looks it up by module global
    except ImportError:
        pass


def main(argv: list[str]) -> int:
    out, argv = Path(argv[0]), argv[1:]
    out.mkdir(parents=True, exist_ok=True)
    local = int(os.environ.get("SCALEOUT_CORE", os.environ.get("LOCAL_RANK", "0")))  # SCALEOUT_CORE: a 1-process run's
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[local % len(cores)]})
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    counts: dict = {"epochs": 0}
    if os.environ.get("SCALEOUT_DDP_FIND_UNUSED") == "0":  # a control for jobs without a critic (every forward
        # reaches every trainable parameter): DDP without its per-forward walk of the graph for unused parameters
        import accelerate.utils

        plain = accelerate.utils.DistributedDataParallelKwargs
        accelerate.utils.DistributedDataParallelKwargs = lambda **kw: plain(**{**kw, "find_unused_parameters": False})
        counts["find_unused_parameters"] = False
    if os.environ.get("SCALEOUT_GLOO_DEVICE") == "1":  # a control for 1-process runs: gloo's transport thread (it
        # wakes every 10 ms) on the run's core without any collective, as each rank of a 2-process run has it
        import torch.distributed as dist

        counts["gloo_device"] = True
        main.gloo_device = dist.ProcessGroupGloo.create_device(interface="lo")  # kept alive for the whole run
    install_counter(counts)
    install_recorders(out, counts)
    from critic_align.train.cli import cli

    try:
        rc = cli(argv)
    finally:
        rank = int(os.environ.get("RANK", "0"))
        counts["core"] = cores[local % len(cores)]
        counts.pop("uncounted", None)
        (out / f"bytes_rank{rank}.json").write_text(json.dumps(counts, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
