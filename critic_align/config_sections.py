"""The run config's sections: where each :class:`~critic_align.config.PPOConfig` field lives in a run YAML.

A run YAML holds the task, the model, the rewards and these sections (each a mapping of the fields listed below):

* ``run``: the run directory, length, seed, checkpoints, evaluation and trackers;
* ``sampling``: the policy's sampler (steps, noise, guidance) and the batch it draws per epoch;
* ``optimization``: the update's learning rate, minibatches, epochs, LoRA rank, precision and memory options;
* ``critic``: the value function (its kind, pretraining, learning rate);
* ``algorithm``: the algorithm and the advantage estimator, with the arguments they take;
* ``advanced``: every other field (research knobs, ablation switches, engineering limits), each documented in
  :mod:`critic_align.config`; the ablations behind them are in BENCHMARKS.md.

The fields outside ``advanced`` are the ones a user sets (``USER_FACING``, at most 30; a test holds that).  Inside
the library the config stays one flat record: a section is where a field is written, not a second name for it
(``--set field=value`` names a field alone; field names are unique).  A flat ``ppo:`` block (the old layout) is
refused with each field's new place.
"""

from __future__ import annotations

import dataclasses

SECTIONS: dict[str, tuple[str, ...]] = {
    "run": ("output_dir", "seed", "num_epochs", "checkpoint_every", "eval_every", "log_with"),
    "sampling": ("num_inference_steps", "eta", "sde_noise_level", "guidance_scale", "batch_size", "group_size",
                 "sde_window_size"),
    "optimization": ("learning_rate", "minibatch_size", "ppo_epochs", "lora_rank", "mixed_precision",
                     "gradient_checkpointing", "policy"),
    "critic": ("critic_mode", "value_pretrain_epochs", "critic_learning_rate"),
    "algorithm": ("algorithm", "advantage", "clip_range", "kl_coef", "gae_lambda", "nft_beta", "awm_advantage"),
}
ADVANCED = "advanced"
ORDER = (*SECTIONS, ADVANCED)
USER_FACING = tuple(f for fields in SECTIONS.values() for f in fields)


def field_names() -> tuple[str, ...]:
    from .config import PPOConfig

    return tuple(f.name for f in dataclasses.fields(PPOConfig))


def section_of(name: str) -> str:
    """The section a field is written in (``advanced`` for every field outside the five user-facing ones)."""
    for section, fields in SECTIONS.items():
        if name in fields:
            return section
    return ADVANCED


def flat_fields(sections: dict, where: str = "the run config") -> dict:
    """The flat field mapping of a run YAML's sections (``{section: {field: value}}``), each field checked to be in
    its own section; unknown sections, unknown fields (with a "did you mean") and misplaced fields are errors."""
    import difflib

    known = set(field_names())
    flat: dict = {}
    for section, fields in sections.items():
        if section not in ORDER:
            raise ValueError(f"{where}: unknown section {section!r}; the sections are {', '.join(ORDER)}")
        if fields is None:
            continue
        if not isinstance(fields, dict):
            raise ValueError(f"{where}: {section}: must be a mapping of fields, e.g. {section}: "
                             f"{{{_example(section)}}}, got {type(fields).__name__} {fields!r}")
        for name, value in fields.items():
            if name not in known:
                hint = difflib.get_close_matches(str(name), known, n=1)
                raise ValueError(f"{where}: {section}.{name}: unknown field"
                                 + (f" (did you mean {hint[0]!r}, under {section_of(hint[0])}:?)" if hint else ""))
            home = section_of(name)
            if home != section:
                raise ValueError(f"{where}: {name} is written under {home}:, not {section}: (move it there)")
            flat[name] = value
    return flat


def _example(section: str) -> str:
    name = SECTIONS.get(section, ("keep_last",))[0]
    return f"{name}: ..."


def old_layout_error(ppo: dict, where: str) -> str:
    """The message for a flat ``ppo:`` block: where each of its fields goes now."""
    moves: dict[str, list[str]] = {}
    for name in ppo if isinstance(ppo, dict) else ():
        moves.setdefault(section_of(name) if name in set(field_names()) else "unknown", []).append(str(name))
    lines = [f"  {s}: {', '.join(names)}" for s, names in moves.items()]
    return (f"{where}: the flat ppo: block is the old layout; a run config now writes its fields in sections "
            f"({', '.join(ORDER)}; see critic_align/config_sections.py and train/configs/digits.yaml)"
            + (":\n" + "\n".join(lines) if lines else ""))


def sectioned(flat: dict) -> dict:
    """``{section: {field: value}}`` of a flat field mapping (e.g. a config's ``to_dict()``), sections in order,
    empty sections left out."""
    out: dict = {s: {} for s in ORDER}
    for name, value in flat.items():
        out[section_of(name)][name] = value
    return {s: v for s, v in out.items() if v}
