"""Run configs and run directories: YAML -> run dict -> Trainer, and back from a run directory.

The name -> object tables themselves live in the library (:mod:`critic_align.registry`).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from critic_align.config import PPOConfig
from critic_align.launch import check_launch
from critic_align.registry import PIPELINE_TASKS, SD_TASKS, build_rewards, digits_task, resolve, reward_by_name  # noqa: F401 (re-exported)

CONFIG_DIR = Path(__file__).parent / "configs"
RUN_KEYS = {"task", "base_model", "rewards", "eval_rewards", "ppo", "model_path", "prompts", "sd"}
# what a run directory's run.json holds: the run config without its ppo: section (that is config.json)
RUN_SPEC_KEYS = sorted(RUN_KEYS - {"ppo"})
SD_OPTIONS = {"resolution", "max_sequence_length", "decode_chunk_size", "torch_dtype", "drop_t5", "guidance"}


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
    """Read a run YAML: {task, base_model, rewards, eval_rewards, ppo: {PPOConfig fields}}; strict keys."""
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
    unknown = set(data) - RUN_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}; allowed: {sorted(RUN_KEYS)}")
    if data.get("ppo") is not None and not isinstance(data["ppo"], dict):
        raise ValueError(f"{path}: ppo: must be a mapping of PPOConfig fields, e.g. ppo: {{num_epochs: 10, "
                         f"learning_rate: 3.0e-4}}, got {type(data['ppo']).__name__} {data['ppo']!r}")
    ppo = dict(data.get("ppo") or {})
    ppo.update(overrides or {})
    try:
        data["ppo"] = PPOConfig.from_dict(ppo)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    if not data.get("rewards"):
        raise ValueError(f"{path} lists no rewards: give at least one, e.g. rewards: [{{name: digit_prob, temperature: "
                         "6.0}] (nothing is trained on a default reward)")
    data.setdefault("task", "digits")
    data["_path"] = str(path)
    return data


def write_run_dir(out, run: dict) -> None:
    """Record a run in its directory: ``run.json`` (task, model, rewards, ...: the run config without ``ppo:``,
    plus the YAML it came from) and ``config.json`` (the PPOConfig, ``--set`` overrides included), so that
    :func:`load_run_dir` rebuilds the same trainer without the YAML."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = {k: run.get(k) for k in RUN_SPEC_KEYS} | {"config_file": run.get("_path")}
    (out / "run.json").write_text(json.dumps(spec, indent=2))
    (out / "config.json").write_text(json.dumps(run["ppo"].to_dict(), indent=2, default=list))


def load_run_dir(run_dir, overrides: dict | None = None) -> dict:
    """The run config of a directory written by ``critic-align train`` or ``steer`` (its ``run.json`` and
    ``config.json``), with ``overrides`` applied to the PPOConfig."""
    run_dir = Path(run_dir)
    info_file, cfg_file = run_dir / "run.json", run_dir / "config.json"
    for f in (info_file, cfg_file):
        if not f.exists():
            raise FileNotFoundError(f"{run_dir} has no {f.name}: pass a run directory written by `critic-align train` "
                                    "or `critic-align steer`")
    info = json.loads(info_file.read_text())
    if "rewards" not in info:  # run.json of an older version: only task / model; the rest is in the YAML
        yaml_run = load_run_config(info["config_file"])
        info = {k: yaml_run.get(k) for k in RUN_SPEC_KEYS} | info
    ppo = json.loads(cfg_file.read_text()) | dict(overrides or {})
    try:
        config = PPOConfig.from_dict(ppo)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{cfg_file}: {exc}") from exc
    return {k: info.get(k) for k in RUN_SPEC_KEYS} | {"ppo": config, "_path": info.get("config_file")}


def build_sd_task(run: dict):
    """The Stable Diffusion task of a run config: ``task: sd15 | sd3 | flux``, ``model_path`` (local directory, also
    relative to the config file, or hub name), ``prompts`` (a list, the path of a text file with one prompt
    per line, or of a ``.jsonl`` file with a ``prompt`` and metadata per line: ``task.prompt_metadata``) and ``sd:`` options
    (resolution, max_sequence_length, decode_chunk_size -> StableDiffusionTask / FluxTask; guidance -> FluxTask,
    FLUX's embedded guidance; torch_dtype, drop_t5 -> load_pipeline)."""
    from critic_align.prompts import read_prompt_file
    from critic_align.tasks.sd import load_pipeline

    task_name = run["task"]
    if not run.get("model_path"):
        raise ValueError(f"task {task_name!r} needs model_path: a local diffusers pipeline directory (or a hub name "
                         "such as stable-diffusion-v1-5/stable-diffusion-v1-5 on a machine with hub access)")
    if run.get("base_model") is not None:
        raise ValueError(f"task {task_name!r} takes model_path, not base_model (that is the digits tasks' key)")
    opts = dict(run.get("sd") or {})
    unknown = sorted(set(opts) - SD_OPTIONS)
    if unknown:
        raise ValueError(f"unknown sd: option(s) {unknown}; allowed: {sorted(SD_OPTIONS)}")
    if "guidance" in opts and SD_TASKS[task_name] != "flux":
        raise ValueError(f"sd: guidance is FLUX's embedded guidance (task: flux), not an option of task {task_name!r}; "
                         "classifier-free guidance is ppo: guidance_scale")
    prompts, metadata = run.get("prompts"), None
    if isinstance(prompts, str):
        path = Path(prompts)
        if not path.is_absolute() and not path.exists() and run.get("_path"):
            path = Path(run["_path"]).parent / prompts  # relative to the config file
        prompts, metadata = read_prompt_file(path)  # text, or JSONL with per-prompt metadata (checked line by line)
    if not prompts:
        raise ValueError(f"task {task_name!r} needs prompts: a list of strings or a text file with one per line")
    torch_dtype = opts.pop("torch_dtype", "float32")
    launch = check_launch(run["ppo"])  # the launch settings and process counts, before loading weights
    run["ppo"].check_run(build_rewards(run.get("rewards")).names, launch.num_processes, base_dtype=torch_dtype)
    model_path = run["model_path"]
    beside = Path(run["_path"]).parent / model_path if run.get("_path") else None
    if not Path(model_path).is_absolute() and not Path(model_path).exists() and beside is not None and beside.exists():
        model_path = beside  # relative to the config file, like prompts (the shipped tiny_t2i configs)
    pipe = load_pipeline(model_path, SD_TASKS[task_name], torch_dtype=torch_dtype,
                         drop_t5=opts.pop("drop_t5", False))
    pipe.set_progress_bar_config(disable=True)
    task = resolve(PIPELINE_TASKS[SD_TASKS[task_name]])(pipe, prompts, text_embedding_cache=run["ppo"].text_embedding_cache,
                                                        **opts)
    task.prompt_metadata = metadata  # build_trainer hands it to the rewards
    return task


def build_trainer(run: dict):
    """Instantiate the trainer described by a loaded run config."""
    from critic_align.trainer import Trainer

    task_name = run["task"]
    check_launch(run["ppo"])  # unsupported launch settings and process counts: refused before any model loads
    if task_name in SD_TASKS:
        task = build_sd_task(run)
        rewards = build_rewards(run.get("rewards"))
        eval_names = run.get("eval_rewards") or []
        eval_rewards = build_rewards(eval_names) if eval_names else None
        for r in (rewards, eval_rewards):  # the JSONL prompt file's metadata, per prompt (None for a text file)
            if r is not None:
                r.set_prompt_metadata(task.prompt_metadata)
        return Trainer(run["ppo"], task, task.backbone(), task.scheduler, rewards, eval_rewards)
    for key in ("model_path", "prompts", "sd"):
        if run.get(key) is not None:
            raise ValueError(f"{key} applies to the Stable Diffusion tasks {sorted(SD_TASKS)}, not task {task_name!r}")
    from critic_align.registry import DIGITS_TASKS

    if task_name not in DIGITS_TASKS:
        raise ValueError(f"unknown task {task_name!r}; available: {sorted(DIGITS_TASKS) + sorted(SD_TASKS)}")
    task_cls, loader, adapter_cls = digits_task(task_name)
    model, scheduler = loader(run.get("base_model"))
    rewards = build_rewards(run.get("rewards"))  # refuses an empty list: no silent default reward
    eval_names = run.get("eval_rewards") or []
    eval_rewards = build_rewards(eval_names) if eval_names else None
    return Trainer(run["ppo"], task_cls(), adapter_cls(model), scheduler, rewards, eval_rewards)
