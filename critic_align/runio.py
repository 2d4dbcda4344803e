"""A run's outputs: its log (``metrics.jsonl`` + TensorBoard), sample grids and checkpoints (main process writes).

Checkpoints hold :meth:`Trainer.state_dict` plus every process's RNG states (:mod:`critic_align.checkpoint`); the
trainer calls these functions with what each needs (the networks, the log, the engine, the run's state).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import checkpoint
from .checkpoint import CheckpointError, RunSignature
from .runlock import RunLock


class RunLog:
    """Appends rows to ``out/metrics.jsonl`` and, with ``tensorboard``, each finite number as a scalar
    ``<phase>/<key>`` at step ``reward_queries``.  ``purge_step`` (set on resume) hides events a killed run logged
    after its checkpoint.  Disabled on every process but the main one.

    ``log_with`` (the config's tracker names, :mod:`critic_align.trackers`): None keeps TensorBoard as
    ``tensorboard`` says; a list decides which trackers run (TensorBoard only if it is listed and ``tensorboard`` is
    true), the others through accelerate's tracker classes with ``config`` as their hyper-parameters.
    :meth:`image` sends a sample grid to TensorBoard and the trackers; :meth:`close` finishes the trackers."""

    def __init__(self, out, tensorboard: bool, enabled: bool = True, log_with=None, config: dict | None = None):
        from .trackers import Trackers

        self.out, self.enabled = Path(out), enabled
        self.tensorboard = tensorboard and (log_with is None or "tensorboard" in log_with)
        self.trackers = Trackers(log_with, self.out, config)
        self.purge_step = None
        self._writer = None

    def _tensorboard(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.purge_step)
        return self._writer

    def __call__(self, row: dict) -> None:
        if not self.enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tensorboard:
            writer = self._tensorboard()
            step = row.get("reward_queries", 0)
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    writer.add_scalar(f"{row.get('phase', 'train')}/{k}", v, step)
            writer.flush()
        self.trackers.log(row)

    def image(self, name: str, path, step: int) -> None:
        """A written PNG (a sample grid) as image ``name`` at ``step`` in TensorBoard and the trackers."""
        if not self.enabled or not (self.tensorboard or self.trackers):
            return
        if self.tensorboard:
            import numpy as np
            from PIL import Image

            with Image.open(path) as img:
                arr = np.asarray(img.convert("RGB"))
            self._tensorboard().add_image(name, arr, step, dataformats="HWC")
            self._tensorboard().flush()
        self.trackers.log_image(name, path, step)

    def close(self) -> None:
        """Finish the trackers (W&B uploads or, offline, closes its run files) and TensorBoard's writer."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.enabled:
            self.trackers.finish()


@dataclass(frozen=True)
class RunFiles:
    """Where a run's files go and who writes them: the run directory ``out``, its ``log`` and its ``lock``, the
    engine (``processes``: every process takes part, the main one writes) and the run's ``generator`` (its state is
    checkpointed, with every process's global RNG states)."""

    out: Path
    log: RunLog
    lock: RunLock
    processes: object
    generator: torch.Generator


def save_grid(models, task, timesteps, path, log: RunLog, step: int, processes, per_prompt: int = 8,
              use_policy: bool = True) -> Path | None:
    """A PNG grid of ``per_prompt`` samples of each of the task's grid prompts (the policy's, or the base model's
    with ``use_policy=False``), sent to ``log`` as an image at ``step`` (the run's reward queries).  Call it on every
    process (``processes``, the engine): the main process writes it and returns the path, the others return None;
    under FSDP2 every process samples it too, since each forward all-gathers the sharded weights with the others."""
    from .collect import sample_images
    from .viz import save_grid as write_grid

    if not processes.is_main_process and not processes.sharded:
        return None
    rows = list(task.grid_prompts)  # a task may show only some prompts, unscaled (e.g. 512-pixel images)
    images = sample_images(models, task, timesteps, [p for p in rows for _ in range(per_prompt)], use_policy=use_policy)
    if not processes.is_main_process:
        return None
    path = write_grid(images, path, nrow=per_prompt, labels=rows, scale=task.grid_scale)
    log.image(f"grids/{Path(path).stem}", path, step)  # TensorBoard and the trackers
    return path


def save(run: RunFiles, tensors: dict, state: dict, signature: RunSignature, directory=None,
         keep_last: int | None = None) -> Path | None:
    """Checkpoint a run's state (``tensors``, ``state``: :meth:`Trainer.state_dict`) and ``signature`` (what a
    resume is checked against) into ``out/checkpoints`` (or ``directory``, keeping ``keep_last`` there; default: the
    config's).  Called on every process: each one's RNG states are gathered; the main process writes and returns the
    path, the others return None; sharded tensors (FSDP2) are gathered into full ones here, every process taking
    part.  A failed write raises a :class:`CheckpointError` on every process, so none waits forever for the others."""
    processes, metrics = run.processes, run.out / "metrics.jsonl"
    states = processes.gather_objects(checkpoint.local_rng_state(run.generator))
    if processes.sharded:  # FSDP2: every process gathers the shards with the others, the main one keeps them
        tensors = processes.full_tensors(tensors)
    path, error = None, None
    if processes.is_main_process:
        directory = run.out / "checkpoints" if directory is None else Path(directory)
        keep_last = signature.config.keep_last if keep_last is None else keep_last
        try:
            path = checkpoint.save_checkpoint(directory, tensors, state, signature, states, keep_last=keep_last,
                                              metrics_bytes=metrics.stat().st_size if metrics.exists() else 0)
        except CheckpointError as exc:
            error = exc
    message = processes.share_from_main(str(error) if error else None)
    if message and error is None:
        raise CheckpointError(f"the main process could not write the checkpoint: {message}")
    if error is not None:
        raise error
    return path


def load(run: RunFiles, path, signature: RunSignature, restore: Callable[[dict, dict], None], resume: bool = True) -> None:
    """Restore a checkpoint (call it on every process): verified against the run's ``signature``
    (:func:`~critic_align.checkpoint.load_checkpoint`), handed to ``restore(tensors, state)`` (the trainer's
    ``load_state_dict``), then this process's RNG states.

    resume=True (continue the run, exactly): the config must equal the checkpoint's except num_epochs,
    output_dir and the logging / checkpoint cadence; rows of metrics.jsonl logged after the checkpoint was
    written (by a run killed later) are cut off and tensorboard hides their events, so the resumed run's logs
    equal an uninterrupted run's; refused while another live process writes the run (its lock).  resume=False
    (reuse the trained policy and critic elsewhere, e.g. for steering under another sampling config): only the
    model must match; the logs are left alone.
    """
    if resume:  # a resume truncates the logs: refused while another live process writes this run
        run.lock.take("resume")
    tensors, state = checkpoint.load_checkpoint(path, signature, check_config=resume)
    restore(tensors, state)  # policy, critic, optimiser, counters, prompt iterator, estimator
    checkpoint.restore_rng_state(tensors, state, run.generator, run.processes.rank)
    if not resume:
        return
    run.log.purge_step = int(state["reward_queries"]) + 1
    metrics, size = run.out / "metrics.jsonl", state.get("metrics_bytes")
    if run.processes.is_main_process and size is not None and metrics.exists() and metrics.stat().st_size > size:
        keep_log_before_cut(metrics, size, Path(path).name)
        with open(metrics, "r+b") as f:
            f.truncate(size)


def progress(epochs: range, config, is_main_process: bool):
    """``epochs`` as a tqdm progress bar when ``config.progress`` (shown by the main process), else as they are."""
    if not config.progress:
        return epochs
    from tqdm import tqdm

    return tqdm(epochs, desc=f"{config.algorithm.upper()} ({config.advantage})", initial=epochs.start,
                total=epochs.stop, disable=not is_main_process)


def show_progress(bar, row: dict, eval_row: dict | None, reward_name: str) -> None:
    """The progress bar's postfix after an epoch (a bar of :func:`progress`, shown): the first trained reward's mean
    and the held-out explained variance (when the last evaluation measured one)."""
    if isinstance(bar, range) or bar.disable:  # no progress bar (progress: false), or not shown on this process
        return
    post = {"reward": f"{row[f'reward/{reward_name}/mean']:.3f}"}
    if eval_row is not None and "eval/value_ev" in eval_row:
        post["heldout_ev"] = f"{eval_row['eval/value_ev']:.2f}"
    bar.set_postfix(post)


def begin(run: RunFiles, config) -> None:
    """Before a run trains: its directory's lock (one writer per run directory), then its ``config.json`` (written
    by the main process)."""
    run.lock.take()
    if run.processes.is_main_process:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=list))


def keep_log_before_cut(metrics: Path, size: int, ckpt_name: str = "the checkpoint") -> Path:
    """Before ``metrics`` is cut to ``size`` bytes (a resume drops the rows logged after its checkpoint), keep the
    whole log as ``metrics.before-resume-<time>.jsonl`` next to it, unless the newest such copy already holds
    exactly these bytes (the command line's copy when it set newer checkpoints aside).  Whatever made the resume
    fall back (a kill, a corrupt checkpoint set aside, ``--resume-from`` an older or the best checkpoint), no
    logged row is lost.  Returns the copy."""
    import sys
    import time

    data = metrics.read_bytes()
    copies = sorted(metrics.parent.glob("metrics.before-resume-*.jsonl"), key=lambda p: p.stat().st_mtime)
    if copies and copies[-1].read_bytes() == data:
        return copies[-1]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    copy, n = metrics.parent / f"metrics.before-resume-{stamp}.jsonl", 1
    while copy.exists():  # never overwrite an earlier copy
        n += 1
        copy = metrics.parent / f"metrics.before-resume-{stamp}-{n}.jsonl"
    tmp = copy.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, copy)
    cut = data[size:].count(b"\n")
    print(f"the {cut} row(s) of metrics.jsonl logged after {ckpt_name} are cut from it; the full log is kept as "
          f"{copy.name}", file=sys.stderr, flush=True)
    return copy
