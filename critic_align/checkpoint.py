"""Checkpoints: safetensors + JSON only (nothing is ever unpickled), written atomically.

A checkpoint directory ``epoch_XXXXXX/`` holds
    tensors.safetensors  policy LoRA ("policy.*"), critic ("critic.*"), optimiser state ("optim.*"),
                         RNG states ("rng.*")
    state.json           epoch, reward queries, prompt iterator, stat tracker, optimiser param groups,
                         python / numpy RNG states, the config, and a fingerprint of the model
It is written to a temporary directory, fsync'ed and renamed, so a half-written checkpoint is never
picked up; the last ``keep_last`` checkpoints are kept.
"""

from __future__ import annotations

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


def model_fingerprint(trainer) -> dict:
    """Names and shapes of every trainable tensor: a checkpoint must match them to load."""
    policy = {k: list(v.shape) for k, v in trainer.adapters.state_dict("policy").items()}
    critic = {k: list(v.shape) for k, v in trainer.critic.state_tensors().items()} if trainer.critic else {}
    return {"policy": policy, "critic": critic, "critic_mode": trainer.critic.mode if trainer.critic else None}


def save_checkpoint(trainer, directory, keep_last: int = 2) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"epoch_{trainer.epoch:06d}"
    final = directory / name
    tmp = directory / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = {f"policy.{k}": v.cpu() for k, v in trainer.adapters.state_dict("policy").items()}
    if trainer.critic is not None:
        tensors.update({f"critic.{k}": v.cpu() for k, v in trainer.critic.state_tensors().items()})
    opt_tensors, opt_meta = _optimizer_tensors(trainer.optimizer)
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.generator"] = trainer.generator.get_state()
    np_state = np.random.get_state()
    state = {
        "format_version": FORMAT_VERSION,
        "epoch": trainer.epoch,
        "reward_queries": trainer.reward_queries,
        "pretrained_value": trainer.pretrained_value,
        "prompt_iterator": trainer.prompt_iter.state_dict(),
        "stat_tracker": trainer.stat_tracker.state_dict(),
        "optimizer": opt_meta,
        "rng_python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "rng_numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "config": trainer.config.to_dict(),
        "fingerprint": model_fingerprint(trainer),
    }
    try:
        save_file(tensors, str(tmp / "tensors.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, default=list))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(directory)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint {final} ({exc.strerror or exc}); earlier checkpoints in {directory} are "
            "untouched — free disk space or choose another output_dir, then resume from the latest one"
        ) from exc
    existing = sorted(p for p in directory.glob("epoch_*") if p.is_dir())
    for old in existing[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory) -> Path | None:
    """The newest complete checkpoint in ``directory`` (temporary ones are ignored), or None."""
    directory = Path(directory)
    done = sorted(p for p in directory.glob("epoch_*") if (p / "state.json").exists()
                  and (p / "tensors.safetensors").exists())
    return done[-1] if done else None


def read_checkpoint(path) -> tuple[dict, dict]:
    """(tensors, state) with clear errors for a missing, corrupt or foreign checkpoint."""
    from safetensors.torch import load_file

    path = Path(path)
    tfile, sfile = path / "tensors.safetensors", path / "state.json"
    for f in (tfile, sfile):
        if not f.exists():
            raise CheckpointError(f"checkpoint {path} is incomplete: {f.name} is missing")
    try:
        state = json.loads(sfile.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {sfile} is corrupt (not valid JSON: {exc})") from exc
    try:
        tensors = load_file(str(tfile))
    except Exception as exc:  # safetensors raises its own error types for truncated/garbled files
        raise CheckpointError(f"checkpoint file {tfile} is corrupt or truncated ({exc})") from exc
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {state.get('format_version')}, expected "
                              f"{FORMAT_VERSION}")
    return tensors, state


def load_checkpoint(trainer, path) -> None:
    """Restore everything needed for an exact resume; refuses a checkpoint of another model or shape."""
    tensors, state = read_checkpoint(path)
    mine, theirs = model_fingerprint(trainer), state["fingerprint"]
    if mine != theirs:
        diffs = []
        if mine["critic_mode"] != theirs["critic_mode"]:
            diffs.append(f"critic_mode {theirs['critic_mode']} vs {mine['critic_mode']}")
        for part in ("policy", "critic"):
            a, b = mine[part], theirs[part]
            only_ckpt, only_model = sorted(set(b) - set(a)), sorted(set(a) - set(b))
            shape = sorted(k for k in set(a) & set(b) if a[k] != b[k])
            if only_ckpt or only_model or shape:
                diffs.append(f"{part}: {len(only_ckpt)} tensors only in the checkpoint, {len(only_model)} only in "
                             f"the model, {len(shape)} of other shape (e.g. {(shape or only_ckpt or only_model)[:2]})")
        raise CheckpointError(f"checkpoint {path} was saved from another model or config: " + "; ".join(diffs))
    trainer.adapters.load_state_dict("policy", {k[7:]: v for k, v in tensors.items() if k.startswith("policy.")})
    if trainer.critic is not None:
        trainer.critic.load_state_tensors({k[7:]: v for k, v in tensors.items() if k.startswith("critic.")})
    _restore_optimizer(trainer.optimizer, tensors, state["optimizer"])
    trainer.epoch = int(state["epoch"])
    trainer.reward_queries = int(state["reward_queries"])
    trainer.pretrained_value = bool(state["pretrained_value"])
    trainer.prompt_iter.load_state_dict(state["prompt_iterator"])
    trainer.stat_tracker.load_state_dict(state["stat_tracker"])
    torch.set_rng_state(tensors["rng.torch"])
    trainer.generator.set_state(tensors["rng.generator"])
    v, keys, pos = state["rng_python"]
    random.setstate((v, tuple(keys), pos))
    name, keys, pos, has_gauss, cached = state["rng_numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
