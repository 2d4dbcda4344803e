"""Name -> object lookups (the only place they live): tasks, rewards, configs."""

from __future__ import annotations

from pathlib import Path

import yaml

from critic_align.config import PPOConfig

CONFIG_DIR = Path(__file__).parent / "configs"
RUN_KEYS = {"task", "base_model", "rewards", "eval_rewards", "ppo", "model_path", "prompts", "sd"}
# Stable Diffusion tasks: task name -> pipeline kind (critic_align.tasks.sd)
SD_TASKS = {"sd15": "sd15", "sd3": "sd3"}
SD_OPTIONS = {"resolution", "max_sequence_length", "decode_chunk_size", "torch_dtype", "drop_t5"}


def reward_by_name(name: str, **kwargs):
    from critic_align import rewards as R

    table = {
        "digit_prob": R.DigitProb,
        "digit_correct": R.DigitCorrect,
        "jpeg_compressibility": R.JpegCompressibility,
        "jpeg_incompressibility": R.JpegIncompressibility,
        "boldness": R.Boldness,
        "clip_score": R.CLIPScore,  # model, processor, scale, clip_at_zero, device, dtype, batch_size, ...
        "pickscore": R.PickScore,  # model, processor, device, dtype, batch_size, ...
        "aesthetic": R.LaionAesthetic,  # head (safetensors), model, processor, device, dtype, batch_size, ...
        "remote": R.RemoteReward,  # url, encoding, timeout, retries, backoff, batch_size, allows_nan, name
    }
    if name not in table:
        raise ValueError(f"unknown reward {name!r}; available: {sorted(table)}")
    return table[name](**kwargs)


def build_rewards(spec) -> "object":
    """[{name: digit_prob, weight: 1.0, temperature: 6}, "boldness", ...] -> MultiReward.

    Keys other than name and weight are passed to the reward's constructor."""
    from critic_align.rewards import MultiReward

    if not spec:
        raise ValueError("the config lists no rewards: give at least one, e.g. rewards: [{name: digit_prob}]")
    rewards, weights = [], []
    for item in spec:
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or "name" not in item:
            raise ValueError(f"reward entry {item!r}: use a name or {{name: ..., weight: ...}}")
        kwargs = {k: v for k, v in item.items() if k not in ("name", "weight")}
        try:
            rewards.append(reward_by_name(item["name"], **kwargs))
        except TypeError as exc:
            raise ValueError(f"reward entry {item!r}: bad options for {item['name']!r} ({exc})") from exc
        weights.append(float(item.get("weight", 1.0)))
    return MultiReward(rewards, weights)


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
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a run config must be a mapping, got {type(data).__name__}")
    unknown = set(data) - RUN_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}; allowed: {sorted(RUN_KEYS)}")
    ppo = dict(data.get("ppo") or {})
    ppo.update(overrides or {})
    try:
        data["ppo"] = PPOConfig.from_dict(ppo)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    data.setdefault("task", "digits")
    data["_path"] = str(path)
    return data


def build_sd_task(run: dict):
    """The Stable Diffusion task of a run config: ``task: sd15 | sd3``, ``model_path`` (local directory or hub
    name), ``prompts`` (a list, or the path of a text file with one prompt per line) and ``sd:`` options
    (resolution, max_sequence_length, decode_chunk_size -> StableDiffusionTask; torch_dtype, drop_t5 ->
    load_pipeline)."""
    from critic_align.tasks.sd import StableDiffusionTask, load_pipeline, read_prompts

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
    prompts = run.get("prompts")
    if isinstance(prompts, str):
        path = Path(prompts)
        if not path.is_absolute() and not path.exists() and run.get("_path"):
            path = Path(run["_path"]).parent / prompts  # relative to the config file
        prompts = read_prompts(path)
    if not prompts:
        raise ValueError(f"task {task_name!r} needs prompts: a list of strings or a text file with one per line")
    torch_dtype = opts.pop("torch_dtype", "float32")
    if torch_dtype != "float32" and run["ppo"].mixed_precision != "bf16":
        raise ValueError(f"sd.torch_dtype={torch_dtype!r} needs ppo.mixed_precision: bf16 (a half-precision base is run "
                         "under autocast; LoRA weights, optimiser and log-probs stay float32)")
    pipe = load_pipeline(run["model_path"], SD_TASKS[task_name], torch_dtype=torch_dtype,
                         drop_t5=opts.pop("drop_t5", False))
    pipe.set_progress_bar_config(disable=True)
    return StableDiffusionTask(pipe, prompts, **opts)


def build_trainer(run: dict):
    """Instantiate the trainer described by a loaded run config."""
    from critic_align.backbones import DiTAdapter, UNetAdapter
    from critic_align.tasks.digits import DigitsTask, load_base_model, load_dit_model
    from critic_align.trainer import Trainer

    # task -> (task object, base-model loader, adapter): the UNet DDPM or the flow-matching DiT on the digits
    tasks = {"digits": (DigitsTask, load_base_model, UNetAdapter), "digits_dit": (DigitsTask, load_dit_model, DiTAdapter)}
    task_name = run["task"]
    if task_name in SD_TASKS:
        task = build_sd_task(run)
        rewards = build_rewards(run.get("rewards"))
        eval_names = run.get("eval_rewards") or []
        return Trainer(run["ppo"], task, task.backbone(), task.scheduler, rewards,
                       build_rewards(eval_names) if eval_names else None)
    for key in ("model_path", "prompts", "sd"):
        if run.get(key) is not None:
            raise ValueError(f"{key} applies to the Stable Diffusion tasks {sorted(SD_TASKS)}, not task {task_name!r}")
    if task_name not in tasks:
        raise ValueError(f"unknown task {task_name!r}; available: {sorted(tasks) + sorted(SD_TASKS)}")
    task_cls, loader, adapter_cls = tasks[task_name]
    model, scheduler = loader(run.get("base_model"))
    rewards = build_rewards(run.get("rewards") or [{"name": "digit_prob"}])
    eval_names = run.get("eval_rewards") or []
    eval_rewards = build_rewards(eval_names) if eval_names else None
    return Trainer(run["ppo"], task_cls(), adapter_cls(model), scheduler, rewards, eval_rewards)
