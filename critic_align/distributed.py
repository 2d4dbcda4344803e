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

FSDP2 (``accelerate launch`` with ``fsdp_version: 2``, train/configs/accelerate/fsdp.yaml): the same
``accelerator.prepare`` shards the module instead (accelerate's ``fully_shard`` of each unit, bottom up, then of the
root).  The units are the engine's choice (:func:`fsdp_units`): the backbone's blocks (its ``_no_split_modules``),
the backbone itself and the critic's value head, so the root holds no parameter of its own and every forward, inside
the loss closure or not (sampling, critic values, the held-out evaluation, the grids), all-gathers what it runs:
FSDP2 unshards a unit in the unit's own forward hook.  Every process therefore runs the same forwards in the same
order (the rank-local shards have equal sizes; under FSDP the grids are sampled on every process).  The parameters
become DTensor shards: :meth:`Processes.full_tensors` gathers them for a checkpoint (every process takes part, the
main process keeps them) and :meth:`Processes.local_tensors` shards a checkpoint's full tensors back.
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
        # no parameter of its own: under FSDP the root's own parameters would be unsharded only by this module's
        # forward, which sampling does not go through
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
    @property
    def sharded(self) -> bool:
        """FSDP2: the prepared module's parameters are DTensor shards (accelerate's ``is_fsdp2``)."""
        return bool(getattr(self.accelerator, "is_fsdp2", False))

    def prepare(self, module: TrainModule, optimizer: torch.optim.Optimizer):
        """``accelerator.prepare`` of the run's trainable module and its optimiser (DDP with several processes: rank
        0's weights are broadcast, gradients are averaged by the engine; FSDP2: sharded, see the module doc).
        Returns the prepared optimiser.  Under FSDP the module's parameters are new objects afterwards (DTensor
        shards; accelerate switches the optimiser to them): read them from the module again."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.FSDP:
            plugin = self.accelerator.state.fsdp_plugin
            if int(plugin.fsdp_version) != 2:  # check_launch refuses it first; a hand-made accelerator lands here
                raise ValueError(f"FSDP version {plugin.fsdp_version} is not supported: the engine shards with FSDP2 "
                                 "(fsdp_version: 2, train/configs/accelerate/fsdp.yaml)")
            from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

            # the units are ours, whatever the launch named: sampling calls the backbone and the critic's head
            # directly, so each must be a unit whose own forward all-gathers it (see fsdp_units)
            plugin.transformer_cls_names_to_wrap = fsdp_units(module, _names(plugin.transformer_cls_names_to_wrap))
            plugin.auto_wrap_policy = transformer_auto_wrap_policy
            # fully_shard takes contiguous parameters only: channels_last 4-D weights (config channels_last) are made
            # contiguous again; the all-gathered weights a forward uses are contiguous under FSDP anyway
            with torch.no_grad():
                for p in module.parameters():
                    if not p.is_contiguous():
                        p.data = p.data.contiguous()
        elif self.num_processes > 1:
            from accelerate.utils import DistributedDataParallelKwargs

            # our setting, whatever the caller's accelerator was built with: unused parameters are normal here (a
            # value fit does not reach the policy; DDP then warns once that an iteration used them all).  No buffer
            # broadcast before each forward (a collective, so a wait for the slower process, per micro-batch): the
            # only buffers are the value head's output scale, set from gathered rewards or a checkpoint on every
            # process alike
            self.accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True,
                                                                         broadcast_buffers=False)
        self.module, prepared = self.accelerator.prepare(module, optimizer)
        if self.sharded:
            # the critic reads its features from inside the backbone's forward (hooks), so a value loss's backward
            # starts inside the backbone's unit, where FSDP's pre-backward hook (on the unit's outputs) does not run
            # to all-gather it again: that unit (its own parameters, outside the blocks) stays unsharded from its
            # forward to the end of the backward
            backbone = type(self.module.backbone)
            for m in self.module.modules():
                if isinstance(m, backbone):
                    m.set_reshard_after_forward(False, recurse=False)
            # FSDP2 makes the first module to run a forward the root (it then refuses a later forward through the
            # real root): one empty forward through the prepared module, before any sampling forward of a unit
            self.module(lambda: None)
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

    def value(self, t: torch.Tensor) -> float:
        """A scalar tensor as a float; a DTensor (a gradient norm of sharded parameters) is gathered first."""
        return float(t.full_tensor() if _is_dtensor(t) else t)

    # ------------------------------------------------------------------------------------------------
    # sharded state (FSDP2)
    def full_tensors(self, tensors: dict) -> dict:
        """``tensors`` with every DTensor shard gathered into its full tensor, on the CPU, on the main process (every
        process must call it, with the same keys: each DTensor is one collective, in key order); the other processes get {}.
        One tensor is gathered at a time, so a process holds one full tensor more than its shards at most."""
        out = {}
        for k in sorted(tensors):  # one order on every process
            v = tensors[k]
            full = v.full_tensor() if _is_dtensor(v) else v
            if self.is_main_process:
                out[k] = full.detach().cpu().contiguous()
            del full
        return out

    def local_tensors(self, tensors: dict, like: dict, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """``tensors`` (full, from a checkpoint) with each one whose counterpart in ``like`` (same key) is a DTensor
        shard cut into the same shard (every process must call it with the same keys: one collective per DTensor, in
        key order).  With
        ``optimizer``, its state tensors ``optim.{i}.{name}`` of parameter i's shape are sharded like parameter i
        (its state is empty before the first step, so the parameters are the template)."""
        from torch.distributed.tensor import distribute_tensor

        params = [p for g in (optimizer.param_groups if optimizer is not None else ()) for p in g["params"]]
        out = {}
        for k in sorted(tensors):  # one order on every process (a safetensors file's dict order is not)
            v, ref = tensors[k], like.get(k)
            if ref is None and k.startswith("optim.") and params:
                idx = int(k.split(".")[1])
                if idx < len(params) and tuple(params[idx].shape) == tuple(v.shape):
                    ref = params[idx]
            if _is_dtensor(ref):
                v = distribute_tensor(v.to(device=ref.device_mesh.device_type, dtype=ref.dtype), ref.device_mesh,
                                      ref.placements)
            out[k] = v
        return out

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


def _is_dtensor(t) -> bool:
    if t is None:
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _names(value) -> list[str]:
    if not value:
        return []
    return [n.strip() for n in value.split(",")] if isinstance(value, str) else [str(n) for n in value]


def fsdp_units(module: TrainModule, extra=()) -> list[str]:
    """The class names FSDP2 shards as units (accelerate's ``transformer_cls_names_to_wrap``): the backbone's blocks
    (the ``_no_split_modules`` that occur in it, and ``extra``), the backbone's own class and the critic's value
    head.  Raises when a parameter would be left to the root: the root's own parameters are unsharded only by the
    root's forward (the loss closure), not by sampling's direct calls."""
    present = {type(m).__name__ for m in module.modules()}
    names = list(extra)
    for m in module.modules():  # a model's _no_split_modules may name classes it does not contain
        names += [n for n in getattr(m, "_no_split_modules", None) or () if n in present]
    names.append(type(module.backbone).__name__)
    if module.critic is not None:
        head = getattr(module.critic, "head", None)
        if not isinstance(head, nn.Module):
            raise ValueError(f"FSDP: the critic {type(module.critic).__name__} has no value head module to shard as a "
                             "unit; use critic_body: backbone, or launch with DDP (multi_gpu_ddp.yaml)")
        names.append(type(head).__name__)
    names = list(dict.fromkeys(names))
    covered = {id(p) for m in module.modules() if type(m).__name__ in names for p in m.parameters()}
    left = [n for n, p in module.named_parameters() if id(p) not in covered]
    if left:
        raise ValueError(f"FSDP: parameters {left[:5]} lie outside the units {names} (they would stay with the root, "
                         "which sampling does not run through); name their module in fsdp_transformer_layer_cls_to_wrap")
    return names
