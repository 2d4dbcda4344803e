"""A run's outputs: its log (``metrics.jsonl`` + TensorBoard), sample grids and checkpoints (main process writes).

Checkpoints hold :meth:`Trainer.state_dict` plus every process's RNG states (:mod:`critic_align.checkpoint`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .checkpoint import CheckpointError, load_checkpoint, local_rng_state, save_checkpoint
from .guard import check_weights
from .runlock import lock_for


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


def save_grid(trainer, path, per_prompt: int = 8, use_policy: bool = True) -> Path | None:
    """A PNG grid of samples per prompt (main process only; the others return None)."""
    from .viz import save_grid as write_grid

    if not trainer.is_main_process and not trainer.processes.sharded:
        return None
    rows = list(trainer.task.grid_prompts)  # a task may show only some prompts, unscaled (e.g. 512-pixel images)
    # under FSDP every process samples the grid too: each forward all-gathers the sharded weights with the others
    images = trainer.sample([p for p in rows for _ in range(per_prompt)], use_policy=use_policy)
    if not trainer.is_main_process:
        return None
    path = write_grid(images, path, nrow=per_prompt, labels=rows, scale=trainer.task.grid_scale)
    trainer.log.image(f"grids/{Path(path).stem}", path, trainer.reward_queries)  # TensorBoard and the trackers
    return path


def save(trainer, directory=None, keep_last: int | None = None) -> Path | None:
    """Checkpoint into ``output_dir/checkpoints`` (or ``directory``, keeping ``keep_last`` there; call it on every
    process: RNG states are gathered; the main process writes and returns the path, the others return None).  A
    failed write raises a :class:`CheckpointError` on every process, so none waits forever for the others."""
    check_weights(trainer, "before writing a checkpoint")  # never checkpoint non-finite weights
    states = trainer.processes.gather_objects(local_rng_state(trainer))
    snapshot = None
    if trainer.processes.sharded:  # FSDP2: every process gathers the shards with the others, the main one keeps them
        tensors, state = trainer.state_dict()
        snapshot = (trainer.processes.full_tensors(tensors), state)
    path, error = None, None
    if trainer.is_main_process:
        metrics = trainer.out / "metrics.jsonl"
        directory = trainer.out / "checkpoints" if directory is None else Path(directory)
        keep_last = trainer.config.keep_last if keep_last is None else keep_last
        try:
            path = save_checkpoint(trainer, directory, keep_last=keep_last,
                                   rng_states=states, metrics_bytes=metrics.stat().st_size if metrics.exists() else 0,
                                   snapshot=snapshot)
        except CheckpointError as exc:
            error = exc
    message = trainer.processes.share_from_main(str(error) if error else None)
    if message and error is None:
        raise CheckpointError(f"the main process could not write the checkpoint: {message}")
    if error is not None:
        raise error
    return path


def load(trainer, path, resume: bool = True) -> None:
    """Restore a checkpoint (call it on every process).

    resume=True (continue the run, exactly): the config must equal the checkpoint's except num_epochs,
    output_dir and the logging / checkpoint cadence; rows of metrics.jsonl logged after the checkpoint was
    written (by a run killed later) are cut off and tensorboard hides their events, so the resumed run's logs
    equal an uninterrupted run's.  resume=False (reuse the trained policy and critic elsewhere, e.g. for
    steering under another sampling config): only the model must match; the logs are left alone.
    """
    if resume:  # a resume truncates the logs: refused while another live process writes this run
        lock_for(trainer, "resume")
    state = load_checkpoint(trainer, path, rank=trainer.rank, check_config=resume)
    if not resume:
        return
    trainer.log.purge_step = trainer.reward_queries + 1
    metrics, size = trainer.out / "metrics.jsonl", state.get("metrics_bytes")
    if trainer.is_main_process and size is not None and metrics.exists() and metrics.stat().st_size > size:
        keep_log_before_cut(metrics, size, Path(path).name)
        with open(metrics, "r+b") as f:
            f.truncate(size)


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
