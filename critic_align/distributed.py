"""Process plumbing, all of it: accelerate's own collectives behind the few operations the trainer needs.

The same code runs on one process, on N CPU processes (gloo) and on N GPUs (NCCL, or gloo with CUDA tensors):
every buffer handed to a collective is built on the device of the tensors it carries.

* :meth:`Processes.gather` / :meth:`gather_objects`: every process gets the concatenation in rank order
  (``accelerate.utils.gather`` / ``gather_object``);
* :meth:`Processes.broadcast_` and :meth:`share_from_main`: rank 0's tensors / a picklable value everywhere
  (``accelerate.utils.broadcast`` / ``broadcast_object_list``);
* :func:`sum_gradients`: one flat all-reduce (``accelerate.utils.reduce``, sum) of every trainable gradient;
* :func:`seed_everything`: ``accelerate.utils.set_seed`` (python, numpy, torch on every device).
"""

from __future__ import annotations

import torch
from accelerate.utils import broadcast, broadcast_object_list, gather, gather_object, reduce, set_seed


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every accelerator) with ``seed`` (< 2**32, numpy's limit)."""
    set_seed(seed)


def _all_reduce_sum(flat: torch.Tensor) -> torch.Tensor:
    return reduce(flat, reduction="sum")


def sum_gradients(params: list[torch.nn.Parameter], num_processes: int) -> None:
    """Replace every parameter's gradient by its sum over processes, in one flat all-reduce.

    A parameter no process computed a gradient for keeps ``grad = None``, as with one process: the optimiser then
    skips it (a zero gradient would still decay its weights and advance its Adam moments).  So the buffer carries
    one "has a gradient" flag per parameter in front of the gradients, on the gradients' device (NCCL needs CUDA
    tensors, and ``torch.cat`` refuses to mix devices).
    """
    if num_processes == 1 or not params:
        return
    device = params[0].device
    has = torch.tensor([float(p.grad is not None) for p in params], device=device)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _all_reduce_sum(torch.cat([has] + [g.reshape(-1) for g in grads]))
    present = flat[:len(params)].tolist()  # one device -> host copy, not one per parameter
    offset = len(params)
    for p, flag in zip(params, present):
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone() if flag > 0 else None
        offset += p.numel()


class Processes:
    """The processes of a run, as the ``Accelerator`` sees them (1 without a launcher)."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

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

    def shard(self, n: int) -> slice:
        """This process's contiguous share of ``n`` rows (``n`` divisible by the number of processes)."""
        per = n // self.num_processes
        return slice(self.rank * per, (self.rank + 1) * per)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every process's ``t`` concatenated along dim 0, in rank order (identical shapes)."""
        return t if self.num_processes == 1 else gather(t.contiguous())

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

    def sum_gradients(self, params) -> None:
        sum_gradients(params, self.num_processes)
