"""Run configs: YAML (a named config of train/configs or a path) + ``--set`` overrides -> a run dict.

The library builds the trainer from a run dict and reads run directories (:mod:`critic_align.api`: build_trainer,
load_run_dir, write_run_dir, re-exported here for the command line); the name -> object tables live in
:mod:`critic_align.registry`.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from critic_align.api import RUN_SPEC_KEYS, SD_OPTIONS, build_sd_task, build_trainer, load_run_dir, write_run_dir  # noqa: F401
from critic_align.config import PPOConfig
from critic_align.config_sections import ORDER, flat_fields, old_layout_error
from critic_align.registry import PIPELINE_TASKS, SD_TASKS, build_rewards, digits_task, resolve, reward_by_name  # noqa: F401 (re-exported)

CONFIG_DIR = Path(__file__).parent / "configs"
RUN_KEYS = set(RUN_SPEC_KEYS) | set(ORDER)  # a run YAML's top-level keys: the run spec and the config's sections


def parse_overrides(items) -> dict:
    """``--set field=value`` items -> {field: value}, values parsed as YAML (numbers, booleans, lists)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--set expects field=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def resolve_config_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.exists():
        return p
    named = CONFIG_DIR / f"{name_or_path}.yaml"
    if named.exists():
        return named
    available = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"no config file {name_or_path!r} and no named config; named configs: {available}")


def load_run_config(name_or_path: str, overrides: dict | None = None) -> dict:
    """Read a run YAML: {task, base_model, rewards, eval_rewards, the config's sections (run, sampling,
    optimization, critic, algorithm, advanced: :mod:`critic_align.config_sections`)}; strict keys.  The returned run
    dict holds the config as one flat :class:`PPOConfig` under ``"ppo"``."""
    path = resolve_config_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from exc
    if data is None:
        raise ValueError(f"{path} is empty: a run config needs at least its rewards, e.g. rewards: [{{name: digit_prob, "
                         "temperature: 6.0}] (see train/configs/digits.yaml)")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a run config must be a mapping, got {type(data).__name__}")
    if "ppo" in data:
        raise ValueError(old_layout_error(data["ppo"], str(path)))
    unknown = set(data) - RUN_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}; allowed: {sorted(RUN_KEYS)}")
    fields = flat_fields({s: data.pop(s) for s in ORDER if s in data}, str(path))
    fields.update(overrides or {})
    try:
        data["ppo"] = PPOConfig.from_dict(fields)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    if not data.get("rewards"):
        raise ValueError(f"{path} lists no rewards: give at least one, e.g. rewards: [{{name: digit_prob, temperature: "
                         "6.0}] (nothing is trained on a default reward)")
    data.setdefault("task", "digits")
    data["_path"] = str(path)
    return data
