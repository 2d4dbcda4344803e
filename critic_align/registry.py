"""Name -> object tables of the library: rewards and tasks (the run configs' ``name:`` / ``task:`` keys).

The tables hold classes or loaders, not instances, and import their modules lazily: looking a name up must not
load transformers or a model.  ``train/`` reads YAML and calls these; nothing here imports ``train/``.
"""

from __future__ import annotations

import importlib
import math

# reward name -> "module:Class"; keys other than name / weight in a run config go to the constructor
REWARDS = {
    "digit_prob": "critic_align.rewards.digits:DigitProb",
    "digit_correct": "critic_align.rewards.digits:DigitCorrect",
    "jpeg_compressibility": "critic_align.rewards.image:JpegCompressibility",
    "jpeg_incompressibility": "critic_align.rewards.image:JpegIncompressibility",
    "boldness": "critic_align.rewards.image:Boldness",
    "composition": "critic_align.rewards.composition:CompositionScore",  # temperature, ink_threshold, ... (tiny t2i)
    "composition_correct": "critic_align.rewards.composition:CompositionCorrect",
    "clip_score": "critic_align.rewards.clip:CLIPScore",  # model, processor, scale, clip_at_zero, device, dtype, ...
    "pickscore": "critic_align.rewards.clip:PickScore",  # model, processor, device, dtype, batch_size, ...
    "aesthetic": "critic_align.rewards.clip:LaionAesthetic",  # head (safetensors), model, processor, device, ...
    "hpsv2": "critic_align.rewards.hpsv2:HPSv2",  # checkpoint (HPS_v2.1 .pt / .safetensors), processor, device, ...
    "remote": "critic_align.rewards.remote:RemoteReward",  # url, encoding, timeout, retries, backoff, ...
}

# digits task name -> (task class, base-model loader, backbone adapter class), each "module:attr"
DIGITS_TASKS = {
    "digits": ("critic_align.tasks.digits:DigitsTask", "critic_align.tasks.digits:load_base_model",
               "critic_align.backbones:UNetAdapter"),
    "digits_dit": ("critic_align.tasks.digits:DigitsTask", "critic_align.tasks.digits:load_dit_model",
                   "critic_align.backbones:DiTAdapter"),
}
# advantage estimator name (PPOConfig.advantage) -> "module:Class" (critic_align/estimators/, one file each)
ESTIMATORS = {
    "gae": "critic_align.estimators.gae:GAEEstimator",
    "grpo": "critic_align.estimators.grpo:GRPOEstimator",
    "ddpo": "critic_align.estimators.ddpo:DDPOEstimator",
}
# training algorithm name (PPOConfig.algorithm) -> "module:Class" (critic_align/algorithms/, one file each)
ALGORITHMS = {
    "ppo": "critic_align.algorithms.ppo:PPO",
    "nft": "critic_align.algorithms.nft:NFT",
    "awm": "critic_align.algorithms.awm:AWM",
}
# Stable Diffusion (and FLUX) task name -> pipeline kind of critic_align.tasks.sd.load_pipeline
SD_TASKS = {"sd15": "sd15", "sd3": "sd3", "flux": "flux"}
# pipeline kind -> the task class that trains it
PIPELINE_TASKS = {"sd15": "critic_align.tasks.sd:StableDiffusionTask", "sd3": "critic_align.tasks.sd:StableDiffusionTask",
                  "flux": "critic_align.tasks.flux:FluxTask"}


def resolve(target: str):
    """``"package.module:attr"`` -> the attribute (imported on demand)."""
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def lookup(table: dict, name: str, what: str):
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; available: {sorted(table)}")
    return table[name]


def reward_by_name(name: str, **kwargs):
    """An instance of the reward registered as ``name``, built with ``kwargs``."""
    return resolve(lookup(REWARDS, name, "reward"))(**kwargs)


def build_rewards(spec):
    """[{name: digit_prob, weight: 1.0, temperature: 6}, "boldness", ...] -> MultiReward.

    Keys other than name and weight are passed to the reward's constructor."""
    from .rewards import MultiReward

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
        w = item.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"reward entry {item!r}: weight must be a finite number, got {w!r}"
                             + (" (a quoted string: write the number without quotes)" if isinstance(w, str) else ""))
        weights.append(float(w))
    return MultiReward(rewards, weights)


def digits_task(name: str):
    """(task class, base-model loader, adapter class) of a digits task name."""
    return tuple(resolve(t) for t in lookup(DIGITS_TASKS, name, "digits task"))
