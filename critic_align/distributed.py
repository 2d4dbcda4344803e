"""Process plumbing: accelerate's engine for the gradients, accelerate's collectives for the few scalars that cross.

The same code runs on one process, on N CPU processes (gloo) and on N GPUs (NCCL).

* The trainable modules (the backbone with its policy and critic LoRA adapters, the critic's head; a 'full'
  critic's own copy) are ONE :class:`TrainModule`, handed to ``accelerator.prepare`` with the optimiser: DDP under a
  multi-process launch, so the engine all-reduces the gradients, overlapped with the backward.  Every forward that
  carries gradients runs through it (:meth:`Processes.forward`), one per backward, as DDP's reducer expects; the
  loss closure is its forward (the policy and the critic share one backward in PPO).  ``find_unused_parameters``:
  a policy forward does not reach the critic's adapter and head, a value fit does not reach the policy's.
* Gradient accumulation: the micro-batches of one minibatch backward under ``accelerator.no_sync`` except the last.
* Rank-local rollouts: each process samples and scores its own contiguous shard of every batch
  (:meth:`Processes.shard`); only rewards, critic values (B, T, K) and statistics cross processes
  (:meth:`gather`, :meth:`gather_objects`).
* :func:`seed_everything`: ``accelerate.utils.set_seed`` (python, numpy, torch on every device).
"""

from __future__ import annotations

import contextlib

import torch
from accelerate.utils import broadcast, broadcast_object_list, gather, gather_object, set_seed
from torch import nn


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every accelerator) with ``seed`` (< 2**32, numpy's limit)."""
    set_seed(seed)


class TrainModule(nn.Module):
    """Every trainable tensor of a run under one module, for the engine: ``backbone`` (the shared base with the
    policy's and the critic's LoRA adapters) and ``critic`` (its head; a 'full' critic's own backbone copy).

    ``forward(fn, *args)`` returns ``fn(*args)``: the loss closure runs inside the engine's forward, so DDP sees the
    one forward each backward belongs to, whatever mix of policy and critic forwards the loss needs."""

    def __init__(self, backbone: nn.Module, critic: nn.Module | None):
        super().__init__()
        self.backbone = backbone
        self.critic = critic

    def forward(self, fn, *args):
        return fn(*args)


class Processes:
    """The processes of a run, as the ``Accelerator`` sees them (1 without a launcher), and the engine's module."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.module: nn.Module | None = None  # the prepared TrainModule (DDP-wrapped with several processes)

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    # ------------------------------------------------------------------------------------------------
    # the engine
    def prepare(self, module: TrainModule, optimizer: torch.optim.Optimizer):
        """``accelerator.prepare`` of the run's trainable module and its optimiser (DDP with several processes: rank
        0's weights are broadcast, gradients are averaged by the engine).  Returns the prepared optimiser."""
        if self.num_processes > 1:
            from accelerate.utils import DistributedDataParallelKwargs

            # our setting, whatever the caller's accelerator was built with: unused parameters are normal here (a
            # value fit does not reach the policy; DDP then warns once that an iteration used them all)
            self.accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
        self.module, prepared = self.accelerator.prepare(module, optimizer)
        return prepared

    def forward(self, fn, *args):
        """``fn(*args)`` through the prepared module (the engine's forward), or directly before :meth:`prepare`."""
        return fn(*args) if self.module is None else self.module(fn, *args)

    def sync(self, last: bool):
        """The context for one micro-batch's backward: the engine's gradient sync only on the minibatch's ``last``."""
        if last or self.module is None or self.num_processes == 1:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.module)

    def backward(self, loss: torch.Tensor) -> None:
        # the engine averages gradients over processes; each process's loss is its part of the global mean, so
        # scaling by the number of processes makes the average the global sum of parts
        self.accelerator.backward(loss * self.num_processes)

    def close(self) -> None:
        """End the process group, on every process after its last collective: a process that exits while the
        backend's threads still run can abort at exit ("terminate called without an active exception")."""
        import torch.distributed as dist

        if self.num_processes > 1 and dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    # ------------------------------------------------------------------------------------------------
    # what crosses processes
    def shard(self, n: int) -> slice:
        """This process's contiguous share of ``n`` rows (``n`` divisible by the number of processes)."""
        per = n // self.num_processes
        return slice(self.rank * per, (self.rank + 1) * per)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every process's ``t`` concatenated along dim 0, in rank order (identical shapes)."""
        return t if self.num_processes == 1 else gather(t.contiguous())

    def gather_uneven(self, t: torch.Tensor) -> torch.Tensor:
        """Every process's ``t`` concatenated along dim 0, in rank order, when the lengths differ (small tensors:
        row statistics)."""
        if self.num_processes == 1:
            return t
        parts = gather_object([t.detach().cpu()])
        return torch.cat(parts).to(t.device)

    def gather_objects(self, obj) -> list:
        """[process 0's obj, process 1's obj, ...] on every process."""
        return [obj] if self.num_processes == 1 else gather_object([obj])

    def broadcast_(self, tensors) -> None:
        """Overwrite ``tensors`` (a list) in place with rank 0's."""
        if self.num_processes > 1:
            with torch.no_grad():
                broadcast([t.data for t in tensors], from_process=0)

    def share_from_main(self, value):
        """Rank 0's ``value`` (picklable) on every process."""
        return value if self.num_processes == 1 else broadcast_object_list([value], from_process=0)[0]
