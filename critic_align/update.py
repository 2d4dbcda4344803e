"""What every update shares: the (trajectory, step) pairs, micro-batched minibatch steps through the engine, the
optimiser step with its guards, and the statistics.  The losses are the algorithms' (:mod:`critic_align.algorithms`)
and the value fit's (:mod:`critic_align.value_fit`).

An :class:`UpdateContext` is what an update reads: the networks (:class:`~critic_align.models.Models`), the
optimisation (:class:`Optimization`: the optimiser, the parameter groups, the engine, the micro-batcher, the guards),
the config, the run's generator and this process's shard of the batch.

Micro-batches: a minibatch's loss is the mean over its rows; it is forwarded and back-propagated in micro-batches (at
most ``micro_batch_size`` rows, 'auto': sized from ``micro_batch_memory_mb`` and the activation bytes per row measured
on the run's first micro-batch, :class:`MicroBatcher`; and at most this process's rows / ``gradient_accumulation_steps``),
each loss weighted by its share of the minibatch, so the summed gradient is the minibatch mean's whatever the split.

Multi-process (rank-local rollouts): every process draws the same shuffled minibatches of the whole batch's rows (the
generator is shared) and forwards the rows of its own trajectories.  The shuffle is balanced (:func:`balanced_order`):
every sampling chunk's rows are spread evenly over the minibatches, so each process (it holds whole chunks) gets its
share of every minibatch to within a row per chunk, instead of a binomial share that the others wait for.  The engine
averages the gradients (each process's loss is scaled so the average is the global minibatch mean), the micro-batches
before the last backward under ``no_sync``; a process with no row in a minibatch forwards one row weighted 0, so every process takes part in the
engine's gradient sync.  Statistics are per minibatch (row-weighted means over every process's parts; the extremes for
``*_max`` / ``*_min``), then averaged over minibatches.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .distributed import Processes
from .models import Models


class MicroBatcher:
    """How many rows the update forwards at a time (``micro_batch_size``; 'auto': from a memory budget).

    'auto' measures, per kind of loss (the PPO loss, a value-only fit, an algorithm's own loss), the bytes of the
    tensors autograd saves for the backward pass (activations and rebuilt fused-LoRA weights, not the parameters)
    on the first micro-batch of that kind (at most ``PROBE_ROWS`` rows), and from then on forwards
    ``floor(budget / bytes per row)`` rows at a time (at least 1; the budget: :meth:`budget_bytes`).  The per-row
    figure includes the micro-batch's fixed costs (fused weights) divided among its rows, so it errs on the lean
    side."""

    PROBE_ROWS = 4
    CPU_BUDGET_MB = 128.0

    def __init__(self, size: int | str, memory_mb: float | None, device: torch.device | str = "cpu"):
        self.fixed = None if size == "auto" else int(size)
        self.memory_mb, self.device = memory_mb, torch.device(device)
        self.budget: float | None = None if memory_mb is None else memory_mb * 2**20
        self.bytes_per_row: dict[str, float] = {}

    def budget_bytes(self) -> float:
        """The budget: ``micro_batch_memory_mb``, or per device (None): CPU_BUDGET_MB on a CPU, half the GPU's free
        memory (taken once, at the first measurement) on CUDA."""
        if self.budget is None:
            if self.device.type == "cuda":
                self.budget = torch.cuda.mem_get_info(self.device)[0] / 2
            else:
                self.budget = self.CPU_BUDGET_MB * 2**20
        return self.budget

    def size(self, kind: str) -> int | None:
        """Rows per micro-batch for ``kind``; None: not measured yet (forward a probe under :meth:`measure`)."""
        if self.fixed is not None:
            return self.fixed
        per_row = self.bytes_per_row.get(kind)
        return None if per_row is None else max(1, int(self.budget_bytes() // max(per_row, 1.0)))

    @contextlib.contextmanager
    def measure(self, kind: str, rows: int):
        """Count the bytes autograd saves inside the block (each storage once) and record them per row."""
        seen: dict[int, int] = {}

        def pack(t):
            if not isinstance(t, torch.nn.Parameter):
                try:
                    st = t.untyped_storage()
                    seen[st.data_ptr()] = st.nbytes()
                except (RuntimeError, NotImplementedError):  # a tensor without a plain storage (a subclass)
                    seen[id(t)] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        if seen and rows > 0:
            self.bytes_per_row[kind] = sum(seen.values()) / rows


@dataclass(frozen=True)
class Optimization:
    """The optimiser side of a run.

    optimizer: the prepared optimiser over ``policy_params`` (group 0) and ``critic_params`` (group 1, when any);
    processes: the engine (:class:`~critic_align.distributed.Processes`); batcher: the micro-batch sizes;
    max_grad_norm: each group's gradient clip; accumulation_steps: micro-batches per process and minibatch at least;
    check_update(losses, grad_norms) / check_weights(): the finiteness guards (:mod:`critic_align.guard`)."""

    optimizer: torch.optim.Optimizer
    policy_params: list
    critic_params: list
    processes: Processes
    batcher: MicroBatcher
    max_grad_norm: float
    accumulation_steps: int
    check_update: Callable[[list, dict], None]
    check_weights: Callable[[], None]


@dataclass(frozen=True)
class UpdateContext:
    """What an update reads (see the module doc).  shard: this process's rows of the batch's B trajectories
    (``slice(0, B)`` with one process); reward_names / reward_weights: the K trained rewards;
    forward_process: the scheduler's q(x_t | x_0) for forward-perturbed value data, or None."""

    models: Models
    opt: Optimization
    config: object
    generator: torch.Generator
    shard: slice
    batch_size: int
    reward_names: tuple
    reward_weights: torch.Tensor
    forward_process: object = None

    @property
    def device(self) -> torch.device:
        return self.models.device

    @property
    def strata(self) -> int:
        """The batch's sampling chunks (a process holds whole ones), which the minibatch shuffle balances over; 1
        when the chunks are ragged (then only one process can run the batch)."""
        chunk = self.config.sample_chunk_size
        return self.batch_size // chunk if self.batch_size % chunk == 0 else 1


def balanced_order(generator: torch.Generator, n: int, strata: int = 1) -> torch.Tensor:
    """A random order of ``n`` rows made of ``strata`` equal contiguous blocks (the batch's sampling chunks), in which
    each block's rows are spread evenly: any run of consecutive positions (a minibatch) holds every block's share of
    it to within one row.  Each block's rows are shuffled and placed at (i + u) / m, i = 0 … m − 1, with one uniform
    offset u per block (systematic sampling), and the blocks interleaved by those keys.  One block: ``randperm``.

    Why: a process holds whole chunks; with a plain shuffle its share of a minibatch is binomial, and at every
    optimiser step the others wait for the process with the most rows.  The order depends only on ``strata`` and
    the generator, never on the number of processes, so N processes still step as one."""
    if strata <= 1:
        return torch.randperm(n, generator=generator)
    if n % strata:
        raise ValueError(f"{n} rows do not split into {strata} equal blocks")
    m = n // strata
    within = torch.rand(strata, m, generator=generator).argsort(dim=1) + (torch.arange(strata) * m)[:, None]
    offset = torch.rand(strata, 1, generator=generator, dtype=torch.float64)
    keys = (torch.arange(m, dtype=torch.float64)[None, :] + offset) / m
    return within.reshape(-1)[keys.reshape(-1).argsort(stable=True)]


def pairs(generator: torch.Generator, batch_size: int, num_steps: int, timestep_fraction: float,
          strata: int = 1) -> torch.Tensor:
    """(N, 2) (trajectory, step) index pairs of the whole batch to train on, shuffled (``timestep_fraction`` of each
    trajectory's steps), drawn from ``generator`` (the same on every process); ``strata``: the batch's sampling
    chunks, whose rows the shuffle spreads evenly over the minibatches (:func:`balanced_order`)."""
    b, t = batch_size, num_steps
    n_steps = max(1, int(round(timestep_fraction * t)))
    if n_steps == t:
        steps = torch.arange(t).repeat(b, 1)
    else:
        # a random permutation per trajectory, all at once: argsort of i.i.d. uniforms
        steps = torch.rand(b, t, generator=generator).argsort(dim=1)[:, :n_steps]
    traj = torch.arange(b)[:, None].expand(-1, n_steps)
    out = torch.stack([traj.reshape(-1), steps.reshape(-1)], dim=1)
    return out[balanced_order(generator, len(out), strata)]  # out is trajectory-major: chunks are contiguous blocks


def local_pairs(pairs_: torch.Tensor, shard: slice) -> torch.Tensor:
    """The pairs whose trajectory is in ``shard``, re-indexed into the shard."""
    keep = (pairs_[:, 0] >= shard.start) & (pairs_[:, 0] < shard.stop)
    out = pairs_[keep].clone()
    out[:, 0] -= shard.start
    return out


def local_rows(owner: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``select(global rows) -> this process's rows`` from ``owner`` (G,): each global row's local index, −1 where the
    row belongs to another process."""
    def select(mb: torch.Tensor) -> torch.Tensor:
        local = owner[mb]
        return local[local >= 0]

    return select


def optimizer_step(opt: Optimization, losses: list[dict] = ()) -> dict:
    """Clip the policy's and the critic's gradients separately, check them, step, check the weights."""
    value = opt.processes.value  # a DTensor norm (FSDP2) is gathered; every process gets the same global norm
    norms = {"grad_norm_policy": value(torch.nn.utils.clip_grad_norm_(opt.policy_params, opt.max_grad_norm))}
    if opt.critic_params:
        norms["grad_norm_critic"] = value(torch.nn.utils.clip_grad_norm_(opt.critic_params, opt.max_grad_norm))
    opt.check_update(losses, norms)  # a non-finite loss or gradient stops the run before the step
    opt.optimizer.step()
    opt.optimizer.zero_grad(set_to_none=True)
    opt.check_weights()
    return norms


def minibatch_steps(opt: Optimization, minibatches: list[torch.Tensor], loss_fn, select, fallback: torch.Tensor,
                    kind: str = "default", left_out: list[bool] | None = None) -> dict:
    """One optimiser step per minibatch of the whole batch's rows; ``select(minibatch)`` gives this process's rows of
    it and ``loss_fn(rows) -> (loss, stats)`` the mean loss over those rows, forwarded through the engine in
    micro-batches (at most the rows / ``accumulation_steps``, and at most the :class:`MicroBatcher`'s size for
    ``kind``).  fallback: one local row a process forwards with weight 0 when a minibatch has none of its rows.

    Each minibatch's mean is over all its rows.  ``select`` may leave out rows whose loss and gradient are exactly 0
    (``left_out[i]``: minibatch i lost some, on any process); the policy's parameters then still get a zero gradient,
    as they would have had, so the optimiser steps them the same way."""
    procs, batcher = opt.processes, opt.batcher
    parts_per_mb: list[list] = []
    norms: dict[str, list] = {}
    opt.optimizer.zero_grad(set_to_none=True)
    for i, mb in enumerate(minibatches):
        size = len(mb)
        share = select(mb)
        weight = 1.0
        if len(share) == 0 and procs.num_processes > 1:  # take part in the engine's gradient sync: one row, weight 0
            share, weight = fallback, 0.0
        cap = max(1, math.ceil(len(share) / opt.accumulation_steps))
        parts = []
        j = 0
        while j < len(share):
            micro = batcher.size(kind)
            probe = micro is None
            n = min(cap, batcher.PROBE_ROWS if probe else micro)
            part = share[j:j + n]
            with batcher.measure(kind, len(part)) if probe else contextlib.nullcontext(), procs.sync(j + n >= len(share)):
                loss, stats = procs.forward(loss_fn, part)
                # weight by the micro-batch's share so the summed gradient equals the minibatch mean
                procs.backward(loss * (weight * len(part) / size))
            if weight:
                parts.append((len(part), stats))
            j += n
        if left_out is not None and left_out[i]:  # rows left out had gradient 0: every policy parameter gets one
            for p in opt.policy_params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        parts_per_mb.append(parts)
        for k, v in optimizer_step(opt, [st for _, st in parts]).items():
            norms.setdefault(k, []).append(v)
    per_mb = [[p for rank_parts in all_parts for p in rank_parts]
              for all_parts in zip(*procs.gather_objects(parts_per_mb))]
    collected: dict[str, list] = {}
    for parts in per_mb:
        for k, v in combine_stats(parts).items():
            collected.setdefault(k, []).append(v)
    collected.update(norms)
    return {k: float(np.mean(v)) for k, v in collected.items()}


def combine_stats(parts: list[tuple[int, dict]]) -> dict:
    """One minibatch's statistics from its parts' (rows, stats): row-weighted means; extremes of max / min."""
    out: dict = {}
    total = sum(n for n, _ in parts)
    for k in dict.fromkeys(k for _, st in parts for k in st):
        vals = [(n, st[k]) for n, st in parts if k in st]
        if k.endswith("_max"):
            out[k] = max(v for _, v in vals)
        elif k.endswith("_min"):
            out[k] = min(v for _, v in vals)
        else:
            out[k] = sum(n * v for n, v in vals) / sum(n for n, _ in vals) if total else float("nan")
    return out


def build_optimization(config, models: Models, processes: Processes, check_update: Callable[[list, dict], None],
                       check_weights: Callable[[], None]) -> tuple[torch.optim.Optimizer, Optimization]:
    """The run's optimiser (``config.optimizer``: :func:`~critic_align.optim.build_optimizer`) over the policy's
    trainable tensors (group 0: :meth:`Models.policy_parameters`, its LoRA or the whole backbone) and the critic's
    (group 1, when any), and the :class:`Optimization` around it: the engine's module of every trainable tensor and
    the optimiser prepared (:meth:`Processes.prepare`: DDP with several processes, FSDP2 shards), the micro-batcher,
    the guards.  Returns (the optimiser as built: a checkpoint holds its state; the Optimization)."""
    from .backbones.base import BackboneAdapter
    from .distributed import TrainModule
    from .optim import build_optimizer

    policy_params = models.policy_parameters()
    critic_params = models.critic.trainable_parameters() if models.critic else []
    groups = [{"params": policy_params, "lr": config.learning_rate}]
    if critic_params:
        groups.append({"params": critic_params, "lr": config.critic_learning_rate})
    optimizer = build_optimizer(groups, config)
    prepared = processes.prepare(TrainModule(models.adapter.model, models.critic), optimizer)
    if processes.sharded:  # FSDP2 replaced the parameters by DTensor shards (the optimiser holds those): read them again
        models.adapters.refresh_parameters()
        policy_params = models.policy_parameters()
        critic_params = models.critic.trainable_parameters() if models.critic else []
        for a in (models.adapter, getattr(models.critic, "backbone", None)):  # see BackboneAdapter.stop_early
            if isinstance(a, BackboneAdapter):
                a.stop_early = False
    return optimizer, Optimization(prepared, policy_params, critic_params, processes,
                                   MicroBatcher(config.micro_batch_size, config.micro_batch_memory_mb, models.device),
                                   config.max_grad_norm, config.gradient_accumulation_steps, check_update,
                                   check_weights)
