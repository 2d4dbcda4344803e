"""The library's entry points to a run: build its trainer from a run config, or rebuild a trained run from its directory.

    from critic_align.api import build_trainer, load_critic, load_run

    trainer = build_trainer(run)             # a run dict: task, base_model / model_path, rewards, ppo: PPOConfig
    trainer = load_run("runs/digits")        # a trained run: its trainer with the newest verified checkpoint loaded
    critic = load_critic("runs/digits")      # only its critic (e.g. for critic_align.steering.critic_value_fn)

A run dict is what ``critic_align.train.registry.load_run_config`` reads from a YAML file (the command line's
configs) or what :func:`load_run_dir` reads from a run directory (``run.json`` + ``config.json``, written by
:func:`write_run_dir` when ``critic-align train`` or ``steer`` starts).  With :mod:`critic_align.trainer` and the
command line, this is the only module that handles the trainer itself; the stages take what they need.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from .config import PPOConfig
from .launch import check_launch
from .registry import PIPELINE_TASKS, SD_TASKS, build_rewards, digits_task, resolve

if TYPE_CHECKING:
    from .critic import Critic
    from .trainer import Trainer

# what a run directory's run.json holds: the run config without its ppo: section (that is config.json)
RUN_SPEC_KEYS = ["base_model", "eval_rewards", "model_path", "prompts", "rewards", "sd", "task"]
SD_OPTIONS = {"resolution", "max_sequence_length", "decode_chunk_size", "torch_dtype", "drop_t5", "guidance"}


def build_sd_task(run: dict):
    """The Stable Diffusion task of a run config: ``task: sd15 | sd3 | flux``, ``model_path`` (local directory, also
    relative to the config file, or hub name), ``prompts`` (a list, the path of a text file with one prompt
    per line, or of a ``.jsonl`` file with a ``prompt`` and metadata per line: ``task.prompt_metadata``) and ``sd:`` options
    (resolution, max_sequence_length, decode_chunk_size -> StableDiffusionTask / FluxTask; guidance -> FluxTask,
    FLUX's embedded guidance; torch_dtype, drop_t5 -> load_pipeline)."""
    from .prompts import read_prompt_file
    from .tasks.sd import load_pipeline

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
                         "classifier-free guidance is sampling: guidance_scale")
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


def build_trainer(run: dict) -> Trainer:
    """The trainer a run dict describes (task, model, rewards, eval rewards, ``ppo``: the :class:`PPOConfig`)."""
    from .trainer import Trainer

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
    from .registry import DIGITS_TASKS

    if task_name not in DIGITS_TASKS:
        raise ValueError(f"unknown task {task_name!r}; available: {sorted(DIGITS_TASKS) + sorted(SD_TASKS)}")
    task_cls, loader, adapter_cls = digits_task(task_name)
    model, scheduler = loader(run.get("base_model"))
    rewards = build_rewards(run.get("rewards"))  # refuses an empty list: no silent default reward
    eval_names = run.get("eval_rewards") or []
    eval_rewards = build_rewards(eval_names) if eval_names else None
    return Trainer(run["ppo"], task_cls(), adapter_cls(model), scheduler, rewards, eval_rewards)


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
    if "rewards" not in info:  # run.json of an older version: only task / model; the rest is in the YAML it names
        info = _spec_from_yaml(info.get("config_file"), info_file) | info
    ppo = json.loads(cfg_file.read_text()) | dict(overrides or {})
    try:
        config = PPOConfig.from_dict(ppo)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{cfg_file}: {exc}") from exc
    return {k: info.get(k) for k in RUN_SPEC_KEYS} | {"ppo": config, "_path": info.get("config_file")}


def _spec_from_yaml(config_file, info_file: Path) -> dict:
    """The run keys of the YAML config an older run.json names (its rewards and the rest were not copied then)."""
    import yaml

    if not config_file or not Path(config_file).exists():
        raise FileNotFoundError(f"{info_file} (written by an older version) names no rewards and its config file "
                                f"{config_file!r} is gone: restore that YAML or start a new run")
    data = yaml.safe_load(Path(config_file).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{config_file}: a run config must be a mapping, got {type(data).__name__}")
    return {k: data.get(k) for k in RUN_SPEC_KEYS} | {"task": data.get("task", "digits")}


def load_run(run_dir, overrides: dict | None = None, checkpoint=None) -> Trainer:
    """A trained run's trainer: rebuilt from its directory (:func:`load_run_dir`, ``overrides`` applied to the
    config, e.g. another sampler) with the policy and critic of ``checkpoint`` loaded for reuse (sampling,
    steering, evaluation; continuing the training is ``critic-align train --resume``).  ``checkpoint`` defaults to
    the run's newest checkpoint that verifies; ``run_dir`` may also be a checkpoint directory (``RUN/checkpoints/
    epoch_*`` or ``RUN/best/epoch_*``).  The trainer writes nothing unless asked (its output_dir stays the run's)."""
    from .checkpoint import find_resumable

    run_dir = Path(run_dir)
    if checkpoint is None and (run_dir / "state.json").exists():  # a checkpoint directory itself
        checkpoint, run_dir = run_dir, run_dir.parent.parent
    if checkpoint is None:
        checkpoint, skipped = find_resumable(run_dir / "checkpoints")
        if checkpoint is None:
            why = "".join(f"; {p.name}: {reason}" for p, reason in skipped)
            raise FileNotFoundError(f"no checkpoint under {run_dir / 'checkpoints'} verifies{why}: pass a run directory "
                                    "written by `critic-align train` (or one of its checkpoints)")
    trainer = build_trainer(load_run_dir(run_dir, overrides))
    trainer.load(checkpoint, resume=False)  # the model must match; the config may differ (e.g. the sampler)
    return trainer


def load_critic(run_dir, overrides: dict | None = None, checkpoint=None) -> Critic:
    """The trained critic of a run (:func:`load_run`; it shares the run's backbone, loaded with it): e.g. for
    :func:`critic_align.steering.critic_value_fn`.  A run trained without a critic (advantage grpo or ddpo) is
    refused before any model loads."""
    from .estimators import estimator_class

    run_dir = Path(run_dir)
    directory = run_dir.parent.parent if checkpoint is None and (run_dir / "state.json").exists() else run_dir
    advantage = load_run_dir(directory, overrides)["ppo"].advantage
    if not estimator_class(advantage).needs_values:
        raise ValueError(f"{directory} trained with advantage={advantage!r}, which fits no critic: load_critic needs a "
                         "run whose estimator uses one (e.g. advantage gae)")
    return load_run(run_dir, overrides, checkpoint).critic
