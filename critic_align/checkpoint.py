"""Checkpoints: safetensors + JSON only (nothing is ever unpickled), written atomically.

A checkpoint directory ``epoch_XXXXXX/`` holds
    tensors.safetensors  policy LoRA ("policy.*"), critic ("critic.*"), optimiser state ("optim.*"),
                         torch RNG states of every process ("rng.*": rank 0 as "rng.torch" / "rng.generator",
                         rank r > 0 as "rng.rank{r}.torch" / "rng.rank{r}.generator")
    state.json           epoch, reward queries, prompt iterator, stat tracker, optimiser param groups (with
                         the step counts), python / numpy RNG states of every process, the config, the size
                         of metrics.jsonl when it was written, and a fingerprint of the model
It is written to a temporary directory, fsync'ed and renamed, so a half-written checkpoint is never
picked up (``latest_checkpoint`` only matches complete ``epoch_*`` directories; temporary ``.tmp-*`` and
``.trash-*`` directories left by a killed run are removed at the next save); the last ``keep_last``
checkpoints are kept (older ones are renamed away before they are deleted, so a half-deleted one is never
matched either).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _optimizer_tensors(optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state_keys": {}}
    for idx, st in sd["state"].items():
        meta["state_keys"][str(idx)] = {}
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = value.detach().cpu().contiguous()
                meta["state_keys"][str(idx)][name] = "tensor"
            else:
                meta["state_keys"][str(idx)][name] = value
    return tensors, meta


def _restore_optimizer(optimizer, tensors: dict, meta: dict) -> None:
    state = {}
    for idx, names in meta["state_keys"].items():
        state[int(idx)] = {n: (tensors[f"optim.{idx}.{n}"] if v == "tensor" else v) for n, v in names.items()}
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def base_digest(model) -> str:
    """A digest of the frozen base model: names, shapes, dtypes and a strided sample of every non-LoRA tensor.

    Exact values are read (no float sums), so it is the same on any device; it tells a checkpoint of another
    base model with the same architecture (e.g. another pretrained UNet) from one of this model.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                continue
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 256)][:256].float().cpu().numpy()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(sample.tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(trainer) -> dict:
    """Names and shapes of every trainable tensor and a digest of the base: a checkpoint must match them to load."""
    policy = {k: list(v.shape) for k, v in trainer.adapters.state_dict("policy").items()}
    critic = {k: list(v.shape) for k, v in trainer.critic.state_tensors().items()} if trainer.critic else {}
    out = {"policy": policy, "critic": critic, "critic_mode": trainer.critic.mode if trainer.critic else None}
    digest = getattr(trainer, "base_digest", None)
    if digest is not None:
        out["base_digest"] = digest
    return out


# Config fields that may change between a run and its resumption: they do not change what is computed.
RESUMABLE_CONFIG_CHANGES = ("num_epochs", "output_dir", "progress", "log_tensorboard", "grid_every",
                            "checkpoint_every", "keep_last", "extra")


def local_rng_state(trainer) -> dict:
    """This process's RNG states: torch (global and the trainer's generator), python, numpy."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "generator": trainer.generator.get_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def _rng_prefix(rank: int) -> str:
    return "rng." if rank == 0 else f"rng.rank{rank}."


def _cleanup_stale(directory: Path) -> None:
    """Remove temporary / half-deleted directories a killed run left behind (only one run writes here)."""
    for p in list(directory.glob(".tmp-*")) + list(directory.glob(".trash-*")):
        shutil.rmtree(p, ignore_errors=True)


def _remove_dir(path: Path) -> None:
    """Rename away first, then delete: a half-deleted directory never looks like a checkpoint."""
    trash = path.parent / f".trash-{path.name}-{os.getpid()}"
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(trainer, directory, keep_last: int = 2, rng_states: list[dict] | None = None,
                    metrics_bytes: int | None = None) -> Path:
    """Write ``directory/epoch_XXXXXX`` atomically; keep the newest ``keep_last``.

    rng_states: one :func:`local_rng_state` per process, in rank order (default: this process only).
    metrics_bytes: size of the run's metrics.jsonl now (rows logged after it are dropped on resume).
    On any failure (disk full, permissions) the temporary directory is removed, nothing already saved is
    touched, and a :class:`CheckpointError` says what happened and what to do.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _cleanup_stale(directory)
    name = f"epoch_{trainer.epoch:06d}"
    final = directory / name
    tmp = directory / f".tmp-{name}-{os.getpid()}"
    rng_states = rng_states if rng_states is not None else [local_rng_state(trainer)]
    try:
        tmp.mkdir()
        tensors = {f"policy.{k}": v.cpu() for k, v in trainer.adapters.state_dict("policy").items()}
        if trainer.critic is not None:
            tensors.update({f"critic.{k}": v.cpu() for k, v in trainer.critic.state_tensors().items()})
        opt_tensors, opt_meta = _optimizer_tensors(trainer.optimizer)
        tensors.update(opt_tensors)
        for rank, st in enumerate(rng_states):
            tensors[_rng_prefix(rank) + "torch"] = st["torch"]
            tensors[_rng_prefix(rank) + "generator"] = st["generator"]
        state = {
            "format_version": FORMAT_VERSION,
            "epoch": trainer.epoch,
            "reward_queries": trainer.reward_queries,
            "pretrained_value": trainer.pretrained_value,
            "prompt_iterator": trainer.prompt_iter.state_dict(),
            "stat_tracker": trainer.stat_tracker.state_dict(),
            "optimizer": opt_meta,
            "rng_python": rng_states[0]["python"],
            "rng_numpy": rng_states[0]["numpy"],
            "rng_ranks": [{"python": st["python"], "numpy": st["numpy"]} for st in rng_states[1:]],
            "num_processes": len(rng_states),
            "metrics_bytes": metrics_bytes,
            "config": trainer.config.to_dict(),
            "fingerprint": model_fingerprint(trainer),
        }
        save_file(tensors, str(tmp / "tensors.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, default=list))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():
            _remove_dir(final)
        os.replace(tmp, final)
        _fsync_dir(directory)
    except Exception as exc:  # OSError, or safetensors' own error wrapping one
        shutil.rmtree(tmp, ignore_errors=True)
        full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "No space left" in str(exc)
        what = "the disk is full: free disk space" if full else "fix the cause"
        raise CheckpointError(
            f"could not write checkpoint {final} ({type(exc).__name__}: {exc}); nothing was saved for epoch "
            f"{trainer.epoch} and the earlier checkpoints in {directory} are untouched — {what} (or choose "
            "another output_dir), then resume from the latest one"
        ) from exc
    existing = sorted(p for p in directory.glob("epoch_*") if p.is_dir())
    for old in existing[:-keep_last]:
        _remove_dir(old)
    return final


def latest_checkpoint(directory) -> Path | None:
    """The newest complete checkpoint in ``directory`` (temporary ones are ignored), or None."""
    directory = Path(directory)
    done = sorted(p for p in directory.glob("epoch_*") if (p / "state.json").exists()
                  and (p / "tensors.safetensors").exists())
    return done[-1] if done else None


REQUIRED_STATE_KEYS = ("format_version", "epoch", "reward_queries", "pretrained_value", "prompt_iterator",
                       "stat_tracker", "optimizer", "rng_python", "rng_numpy", "config", "fingerprint")


def read_checkpoint(path) -> tuple[dict, dict]:
    """(tensors, state) with clear errors for a missing, corrupt or foreign checkpoint."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory (a checkpoint is a directory "
                              "epoch_XXXXXX/ with tensors.safetensors and state.json)")
    tfile, sfile = path / "tensors.safetensors", path / "state.json"
    for f in (tfile, sfile):
        if not f.exists():
            raise CheckpointError(f"checkpoint {path} is incomplete: {f.name} is missing; resume from another "
                                  "checkpoint (latest_checkpoint skips incomplete ones)")
    try:
        state = json.loads(sfile.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {sfile} is corrupt (not valid JSON: {exc}); resume from an "
                              "earlier checkpoint") from exc
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint file {sfile} has format version {found}, expected {FORMAT_VERSION}: "
                              "it was not written by this version of critic_align")
    missing = [k for k in REQUIRED_STATE_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint file {sfile} is corrupt: it lacks {missing}; resume from an earlier "
                              "checkpoint")
    try:
        tensors = load_file(str(tfile))
    except Exception as exc:  # safetensors raises its own error types for truncated/garbled files
        raise CheckpointError(f"checkpoint file {tfile} is corrupt or truncated ({exc}); resume from an earlier "
                              "checkpoint") from exc
    return tensors, state


def _fingerprint_diffs(mine: dict, theirs: dict) -> list[str]:
    diffs = []
    if mine["critic_mode"] != theirs["critic_mode"]:
        diffs.append(f"critic_mode {theirs['critic_mode']!r} in the checkpoint vs {mine['critic_mode']!r} now")
    for part in ("policy", "critic"):
        a, b = mine[part], theirs[part]
        only_ckpt, only_model = sorted(set(b) - set(a)), sorted(set(a) - set(b))
        shape = sorted(k for k in set(a) & set(b) if a[k] != b[k])
        if only_ckpt or only_model or shape:
            eg = [f"{k}: {b[k]} in the checkpoint vs {a[k]} now" for k in shape[:2]] or (only_ckpt or only_model)[:2]
            diffs.append(f"{part}: {len(only_ckpt)} tensors only in the checkpoint, {len(only_model)} only in "
                         f"the model, {len(shape)} of another shape (e.g. {eg})")
    if "base_digest" in mine and "base_digest" in theirs and mine["base_digest"] != theirs["base_digest"]:
        diffs.append(f"the base model's weights differ (digest {theirs['base_digest']} in the checkpoint vs "
                     f"{mine['base_digest']} now): it was trained on another base model")
    return diffs


def load_checkpoint(trainer, path, rank: int = 0, check_config: bool = True) -> dict:
    """Restore everything needed for an exact resume; refuses a checkpoint of another model or base model, and
    (``check_config``) one written with another config (fields outside ``RESUMABLE_CONFIG_CHANGES``).

    ``rank``: this process's index; it restores its own RNG states (a rank the checkpoint has none for
    takes rank 0's).  Returns the checkpoint's state dict.
    """
    path = Path(path)
    tensors, state = read_checkpoint(path)
    diffs = _fingerprint_diffs(model_fingerprint(trainer), state["fingerprint"])
    if diffs:
        raise CheckpointError(f"checkpoint {path / 'state.json'} was saved from another model or config: "
                              + "; ".join(diffs) + ". Load it into the model and config it was trained with, "
                              "or start a new run")
    mine, theirs = trainer.config.to_dict(), state["config"]
    changed = sorted(k for k in set(mine) | set(theirs) if check_config
                     and k not in RESUMABLE_CONFIG_CHANGES and _jsonish(mine.get(k)) != _jsonish(theirs.get(k)))
    if changed:
        raise CheckpointError(
            f"checkpoint {path / 'state.json'} was written with another config: "
            + ", ".join(f"{k}={theirs.get(k)!r} in the checkpoint vs {mine.get(k)!r} now" for k in changed)
            + ". Resume with the checkpoint's config (only " + ", ".join(RESUMABLE_CONFIG_CHANGES)
            + " may change) or start a new run"
        )
    trainer.adapters.load_state_dict("policy", {k[7:]: v for k, v in tensors.items() if k.startswith("policy.")})
    if trainer.critic is not None:
        trainer.critic.load_state_tensors({k[7:]: v for k, v in tensors.items() if k.startswith("critic.")})
    _restore_optimizer(trainer.optimizer, tensors, state["optimizer"])
    trainer.epoch = int(state["epoch"])
    trainer.reward_queries = int(state["reward_queries"])
    trainer.pretrained_value = bool(state["pretrained_value"])
    trainer.prompt_iter.load_state_dict(state["prompt_iterator"])
    trainer.stat_tracker.load_state_dict(state["stat_tracker"])
    saved = int(state.get("num_processes", 1))
    r = rank if rank < saved else 0
    torch.set_rng_state(tensors[_rng_prefix(r) + "torch"])
    trainer.generator.set_state(tensors[_rng_prefix(r) + "generator"])
    py, npy = (state["rng_python"], state["rng_numpy"]) if r == 0 else \
        (state["rng_ranks"][r - 1]["python"], state["rng_ranks"][r - 1]["numpy"])
    v, keys, pos = py
    random.setstate((v, tuple(keys), pos))
    name, keys, pos, has_gauss, cached = npy
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return state


def _jsonish(x):
    """Compare config values as they are stored in JSON (tuples become lists)."""
    return json.loads(json.dumps(x, default=list))
