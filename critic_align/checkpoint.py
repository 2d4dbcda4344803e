"""Checkpoints: safetensors + JSON only (nothing is ever unpickled), written atomically.

A checkpoint directory ``epoch_XXXXXX/`` holds
    tensors.safetensors  policy LoRA ("policy.*"), critic ("critic.*"), optimiser state ("optim.*"),
                         torch RNG states of every process ("rng.*": rank 0 as "rng.torch" / "rng.generator",
                         rank r > 0 as "rng.rank{r}.torch" / "rng.rank{r}.generator")
    state.json           epoch, reward queries, prompt iterator, stat tracker, optimiser param groups (with
                         the step counts), python / numpy RNG states of every process, the config, the size
                         of metrics.jsonl when it was written, and a fingerprint of the model
    manifest.json        the SHA-256 and size of the two files above, verified on every load (a truncated or
                         bit-flipped file is refused by name; :func:`find_resumable` walks back to the newest
                         checkpoint that verifies)
Only weights that passed the finiteness guard (:mod:`critic_align.guard`) are written, and ``state.json`` records
the run's identity (task, prompts, rewards with their parameters and weights) next to its config, so a resume
under anything else is refused with each difference named (:class:`RunSignature`: what a run is checked against).
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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Reward attributes that say how a reward is reached, not what it computes: they may change on resume.
TRANSPORT_OPTIONS = ("url", "timeout", "retries", "backoff", "max_backoff", "headers", "batch_size", "device",
                     "local_files_only")


class CheckpointError(RuntimeError):
    pass


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss, gradient or weight; nothing non-finite was saved."""


def nonfinite_weights(models, params) -> dict[str, list[str]]:
    """{"policy": [names], "critic": [names]} of trainable tensors holding a NaN or inf (empty: all finite).

    models: the run's :class:`~critic_align.models.Models` (its policy's tensors and critic name the tensors);
    params: every trainable parameter (one device sync checks them all; names are looked up only on a failure).
    Sharded parameters (FSDP2's DTensors) are checked on this process's shard: no collective, so the main process
    alone may call it."""
    with torch.no_grad():
        if not params or bool(torch.stack([_finite(p) for p in params]).all()):  # one device sync
            return {}
        return nonfinite_tensors(model_tensors(models)) or {"trainable": ["(a parameter outside the saved tensors)"]}


def _finite(t: torch.Tensor) -> torch.Tensor:
    """Whether ``t`` is all finite (a 0-d bool tensor); of a DTensor (FSDP2), this process's shard."""
    return torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all()


def nonfinite_tensors(tensors: dict) -> dict[str, list[str]]:
    """{"policy": [names], "critic": [names]} of the "policy.*" / "critic.*" floating-point tensors of a checkpoint's
    ``tensors`` holding a NaN or inf, names without the prefix (empty: all finite)."""
    out: dict[str, list[str]] = {}
    for key, v in tensors.items():
        part, _, name = key.partition(".")
        if part in ("policy", "critic") and v.is_floating_point() and not bool(_finite(v)):
            out.setdefault(part, []).append(name)
    return out


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


def optimizer_tensors(optimizer) -> tuple[dict, dict]:
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


def model_tensors(models) -> dict[str, torch.Tensor]:
    """The trained networks' tensors of a checkpoint: the policy's ("policy.*": its LoRA, or the backbone's state dict
    with ``policy: full``, :meth:`~critic_align.models.Models.policy_tensors`) and the critic's ("critic.*")."""
    tensors = {f"policy.{k}": v for k, v in models.policy_tensors().items()}
    if models.critic is not None:
        tensors.update({f"critic.{k}": v for k, v in models.critic.state_tensors().items()})
    return tensors


def load_model_tensors(models, tensors: dict) -> None:
    """Load a checkpoint's "policy.*" and "critic.*" tensors (:func:`model_tensors`) into ``models``."""
    models.load_policy_tensors({k[7:]: v for k, v in tensors.items() if k.startswith("policy.")})
    if models.critic is not None:
        models.critic.load_state_tensors({k[7:]: v for k, v in tensors.items() if k.startswith("critic.")})


def load_run_tensors(models, optimizer, tensors: dict, optimizer_meta: dict, processes) -> None:
    """Load a checkpoint's tensors into ``models`` (:func:`load_model_tensors`) and ``optimizer``
    (:func:`restore_optimizer`, ``optimizer_meta``: its state's "optimizer").  When ``processes`` holds the parameters
    sharded (FSDP2) the checkpoint's full tensors are cut into the same shards first (every process calls it)."""
    if processes.sharded:
        tensors = processes.local_tensors(tensors, model_tensors(models) | optimizer_tensors(optimizer)[0], optimizer)
    load_model_tensors(models, tensors)
    restore_optimizer(optimizer, tensors, optimizer_meta)


def restore_optimizer(optimizer, tensors: dict, meta: dict) -> None:
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


def model_fingerprint(models, base_digest: str | None = None) -> dict:
    """Names and shapes of every trainable tensor (the policy's, :meth:`~critic_align.models.Models.policy_tensors`;
    ``models.critic``'s) and the base's digest (:func:`base_digest`): a checkpoint must match them to load."""
    critic = models.critic
    policy = {k: list(v.shape) for k, v in models.policy_tensors().items()}
    out = {"policy": policy, "critic": {k: list(v.shape) for k, v in critic.state_tensors().items()} if critic else {},
           "critic_mode": critic.mode if critic else None}
    if base_digest is not None:
        out["base_digest"] = base_digest
    return out


def _plain(v):
    """A JSON-comparable form of a reward attribute (None when it is not a plain value, e.g. a loaded model)."""
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (tuple, list)) and all(isinstance(x, (str, int, float, bool)) or x is None for x in v):
        return list(v)
    if isinstance(v, (torch.device, torch.dtype, Path)):
        return str(v)
    if callable(v) and hasattr(v, "__qualname__"):
        return f"{getattr(v, '__module__', '?')}.{v.__qualname__}"
    return None


def reward_identity(multi) -> list[dict] | None:
    """Each reward of a MultiReward: name, class, plain parameters (transport options excluded) and weight."""
    if multi is None:
        return None
    out = []
    for r, w in zip(multi.rewards, multi.weights.tolist()):
        params = {k: _plain(v) for k, v in sorted(vars(r).items())
                  if not k.startswith("_") and k not in TRANSPORT_OPTIONS and k != "name" and _plain(v) is not None}
        out.append({"name": r._display_name, "class": f"{type(r).__module__}.{type(r).__qualname__}",
                    "params": params, "weight": float(w)})
    return out


def run_identity(task, rewards, eval_rewards=None) -> dict:
    """What defines a run besides its config and model: the task (class, prompts) and the rewards (MultiRewards)."""
    prompts = hashlib.sha256(json.dumps([str(p) for p in task.prompts]).encode()).hexdigest()[:16]
    return {"task": f"{type(task).__module__}.{type(task).__qualname__}", "prompts_digest": prompts,
            "num_prompts": len(task.prompts), "latent_shape": list(task.latent_shape),
            "rewards": reward_identity(rewards), "eval_rewards": reward_identity(eval_rewards)}


@dataclass(frozen=True)
class RunSignature:
    """What a checkpoint records of the run that wrote it, and a resume is checked against: the config
    (a :class:`~critic_align.config.PPOConfig`), the model's :func:`model_fingerprint` and the
    :func:`run_identity`."""

    config: object
    fingerprint: dict
    identity: dict


def _identity_diffs(mine: dict, theirs: dict) -> list[str]:
    """Each difference between two :func:`run_identity` dicts, in words."""
    diffs = []
    for key, what in (("task", "task"), ("num_prompts", "number of prompts"), ("latent_shape", "latent shape")):
        if mine.get(key) != theirs.get(key):
            diffs.append(f"{what} {theirs.get(key)!r} in the checkpoint vs {mine.get(key)!r} now")
    if mine.get("num_prompts") == theirs.get("num_prompts") and mine.get("prompts_digest") != theirs.get("prompts_digest"):
        diffs.append("the prompts differ (same number, other text or order)")
    for key, label in (("rewards", "reward"), ("eval_rewards", "eval reward")):
        a, b = mine.get(key) or [], theirs.get(key) or []
        if [r["name"] for r in a] != [r["name"] for r in b]:
            diffs.append(f"{label}s {[r['name'] for r in b]} in the checkpoint vs {[r['name'] for r in a]} now")
            continue
        for ra, rb in zip(a, b):
            n = ra["name"]
            if ra["class"] != rb["class"]:
                diffs.append(f"{label} {n!r} is a {rb['class']} in the checkpoint vs a {ra['class']} now")
            for k in sorted(set(ra["params"]) | set(rb["params"])):
                if ra["params"].get(k) != rb["params"].get(k):
                    diffs.append(f"{label} {n!r}: {k}={rb['params'].get(k)!r} in the checkpoint vs "
                                 f"{ra['params'].get(k)!r} now")
            if key == "rewards" and ra["weight"] != rb["weight"]:
                diffs.append(f"{label} {n!r}: weight {rb['weight']:g} in the checkpoint vs {ra['weight']:g} now")
    return diffs


# Config fields that may change between a run and its resumption: they do not change what is computed.
RESUMABLE_CONFIG_CHANGES = ("num_epochs", "output_dir", "progress", "log_tensorboard", "log_with", "grid_every",
                            "checkpoint_every", "keep_last", "extra", "best_metric", "collapse_margin",
                            "stop_on_collapse")


def _config_defaults() -> dict:
    """Every config field's default, as ``PPOConfig.to_dict`` writes it."""
    from .config import PPOConfig

    return PPOConfig().to_dict()


def local_rng_state(generator: torch.Generator) -> dict:
    """This process's RNG states: torch (global and the run's ``generator``), python, numpy."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
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


def save_checkpoint(directory, tensors: dict, state: dict, signature: RunSignature, rng_states: list[dict],
                    keep_last: int = 2, metrics_bytes: int | None = None) -> Path:
    """Write ``directory/epoch_XXXXXX`` atomically; keep the newest ``keep_last``.

    tensors, state: the trainer's state (:meth:`Trainer.state_dict <critic_align.trainer.Trainer.state_dict>`: the
    policy, the critic, the optimiser, and ``state["epoch"]``, the counters, ...; full tensors: under FSDP2
    :func:`~critic_align.runio.save` gathers the shards first); signature: the run's config,
    fingerprint and identity, recorded to check a resume against; rng_states: one :func:`local_rng_state` per
    process, in rank order; metrics_bytes: size of the run's metrics.jsonl now (rows logged after it are dropped on
    resume).  A "policy.*" or "critic.*" tensor holding NaN/inf is refused (:class:`DivergenceError`).
    On any failure (disk full, permissions) the temporary directory is removed, nothing already saved is
    touched, and a :class:`CheckpointError` says what happened and what to do.
    """
    from safetensors.torch import save_file

    directory, epoch = Path(directory), int(state["epoch"])
    bad = nonfinite_tensors(tensors)
    if bad:  # the trainer's guard stops a diverging run before this; a direct caller is refused here
        raise DivergenceError(f"refusing to write a checkpoint of epoch {epoch} into {directory}: trainable "
                              f"tensors hold NaN/inf ({bad}); the checkpoints already there are untouched")
    directory.mkdir(parents=True, exist_ok=True)
    _cleanup_stale(directory)
    name = f"epoch_{epoch:06d}"
    final = directory / name
    tmp = directory / f".tmp-{name}-{os.getpid()}"
    try:
        tmp.mkdir()
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        for rank, st in enumerate(rng_states):
            tensors[_rng_prefix(rank) + "torch"] = st["torch"]
            tensors[_rng_prefix(rank) + "generator"] = st["generator"]
        state = {
            "format_version": FORMAT_VERSION,
            **state,  # epoch, reward_queries, pretrained_value, prompt_iterator, stat_tracker, optimizer
            "rng_python": rng_states[0]["python"],
            "rng_numpy": rng_states[0]["numpy"],
            "rng_ranks": [{"python": st["python"], "numpy": st["numpy"]} for st in rng_states[1:]],
            "num_processes": len(rng_states),
            "metrics_bytes": metrics_bytes,
            "config": signature.config.to_dict(),
            "fingerprint": signature.fingerprint,
            "run_identity": signature.identity,
            "guard": "passed",  # every trainable tensor was finite (checked above)
        }
        save_file(tensors, str(tmp / "tensors.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, default=list))
        (tmp / MANIFEST).write_text(json.dumps({"files": {f: _file_digest(tmp / f) for f in CHECKSUMMED}}))
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
            f"{epoch} and the earlier checkpoints in {directory} are untouched — {what} (or choose "
            "another output_dir), then resume from the latest one"
        ) from exc
    _rotate(directory, keep_last)
    return final


CHECKSUMMED = ("tensors.safetensors", "state.json")


def _file_digest(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"sha256": h.hexdigest(), "bytes": path.stat().st_size}


def _passed_guard(path: Path) -> bool:
    try:
        return json.loads((path / "state.json").read_text()).get("guard") == "passed"
    except (OSError, ValueError, AttributeError):
        return False


def _rotate(directory: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints, and never drop the newest one that passed the finiteness guard
    (only guarded weights are written, so that is the newest; the rule also holds for older checkpoints)."""
    existing = sorted(p for p in directory.glob("epoch_*") if p.is_dir())
    old, kept = existing[:-keep_last], existing[-keep_last:]
    if not any(_passed_guard(p) for p in kept):
        good = [p for p in old if _passed_guard(p)]
        if good:
            old.remove(good[-1])
    for p in old:
        _remove_dir(p)


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
    from safetensors.torch import load

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
    _verify_manifest(path)
    try:
        tensors = load(tfile.read_bytes())
    except Exception as exc:  # safetensors raises its own error types for truncated/garbled files
        raise CheckpointError(f"checkpoint file {tfile} is corrupt or truncated ({exc}); resume from an earlier "
                              "checkpoint") from exc
    bad = sorted(k for k, v in tensors.items() if k.startswith(("policy.", "critic.")) and v.is_floating_point()
                 and not bool(torch.isfinite(v).all()))
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite weights ({len(bad)} tensors, e.g. {bad[:3]}): it was "
                              "written after training diverged (by a version without the finiteness guard); use an "
                              "earlier checkpoint")
    return tensors, state


def _verify_manifest(path: Path) -> None:
    """Check every file's SHA-256 against manifest.json (checkpoints written before manifests existed have none)."""
    mfile = path / MANIFEST
    if not mfile.exists():
        return
    try:
        files = json.loads(mfile.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint file {mfile} is corrupt ({exc}); resume from an earlier checkpoint") from exc
    for name, want in files.items():
        got = _file_digest(path / name)
        if got != want:
            why = (f"{got['bytes']} bytes instead of {want['bytes']}: truncated or extended" if got["bytes"] != want["bytes"]
                   else f"same size but SHA-256 {got['sha256'][:12]}… instead of {want['sha256'][:12]}…: its bytes were "
                        "altered (disk or copy corruption)")
            raise CheckpointError(f"checkpoint file {path / name} is corrupt ({why}); resume from an earlier checkpoint "
                                  "(critic-align train --resume picks the newest one that verifies)")


def verify_checkpoint(path) -> str | None:
    """None if the checkpoint at ``path`` reads and verifies (hashes, JSON, tensors, finite weights), else why not."""
    try:
        read_checkpoint(path)
    except (CheckpointError, OSError) as exc:  # OSError: e.g. the directory was renamed while it was read
        return str(exc)
    return None


def find_resumable(directory) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint in ``directory`` that verifies, and the newer ones skipped with the reason."""
    directory = Path(directory)
    done = sorted(p for p in directory.glob("epoch_*") if (p / "state.json").exists()
                  and (p / "tensors.safetensors").exists())
    skipped = []
    for p in reversed(done):
        why = verify_checkpoint(p)
        if why is None:
            return p, skipped
        skipped.append((p, why))
    return None, skipped


def set_aside(path: Path, why: str) -> Path:
    """Rename checkpoint ``path`` to ``<why>-<name>-<time>`` next to it: kept for inspection, never picked up
    (only ``epoch_*`` directories are checkpoints) and never rotated away."""
    dest = path.parent / f"{why}-{path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(path, dest)
    return dest


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


def load_checkpoint(path, signature: RunSignature, check_config: bool = True) -> tuple[dict, dict]:
    """(tensors, state) of the checkpoint at ``path``, verified (:func:`read_checkpoint`) and checked against this
    run's ``signature``: refuses a checkpoint of another model or base model, and (``check_config``) one written
    with another config (fields outside ``RESUMABLE_CONFIG_CHANGES``), task or rewards.  The caller restores them
    (``Trainer.load_state_dict``, then :func:`restore_rng_state` for an exact resume)."""
    path = Path(path)
    tensors, state = read_checkpoint(path)
    diffs = _fingerprint_diffs(signature.fingerprint, state["fingerprint"])
    if diffs:
        raise CheckpointError(f"checkpoint {path / 'state.json'} was saved from another model or config: "
                              + "; ".join(diffs) + ". Load it into the model and config it was trained with, "
                              "or start a new run")
    # a field added after the checkpoint was written (absent from its config) had its default then
    mine, theirs = signature.config.to_dict(), _config_defaults() | state["config"]
    changed = sorted(k for k in set(mine) | set(theirs) if check_config
                     and k not in RESUMABLE_CONFIG_CHANGES and _jsonish(mine.get(k)) != _jsonish(theirs.get(k)))
    diffs = [f"{k}={theirs.get(k)!r} in the checkpoint vs {mine.get(k)!r} now" for k in changed]
    if check_config and "run_identity" in state:  # checkpoints written before identities were recorded have none
        diffs += _identity_diffs(_jsonish(signature.identity), state["run_identity"])
    if diffs:
        raise CheckpointError(
            f"checkpoint {path / 'state.json'} was written with another config: " + ", ".join(diffs)
            + ". Resume with the checkpoint's config, task and rewards (only " + ", ".join(RESUMABLE_CONFIG_CHANGES)
            + " may change) or start a new run"
        )
    return tensors, state


def restore_rng_state(tensors: dict, state: dict, generator: torch.Generator, rank: int = 0) -> None:
    """Set this process's RNG states (torch's, the run's ``generator``, python's, numpy's) to a checkpoint's.
    ``rank``: this process's index; a rank the checkpoint has none for takes rank 0's."""
    saved = int(state.get("num_processes", 1))
    r = rank if rank < saved else 0
    torch.set_rng_state(tensors[_rng_prefix(r) + "torch"])
    generator.set_state(tensors[_rng_prefix(r) + "generator"])
    py, npy = (state["rng_python"], state["rng_numpy"]) if r == 0 else \
        (state["rng_ranks"][r - 1]["python"], state["rng_ranks"][r - 1]["numpy"])
    v, keys, pos = py
    random.setstate((v, tuple(keys), pos))
    name, keys, pos, has_gauss, cached = npy
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _jsonish(x):
    """Compare config values as they are stored in JSON (tuples become lists)."""
    return json.loads(json.dumps(x, default=list))
