"""The optimiser of a run, by name (``PPOConfig.optimizer``).

* ``adamw``: ``torch.optim.AdamW``.
* ``adamw_8bit``: bitsandbytes' ``AdamW8bit``, the two Adam moments stored in 8 bits (block-wise quantised), about a
  quarter of AdamW's optimiser-state memory; an optional extra (``pip install critic-align[bnb]``).  Its absence is
  refused before any model loads (:func:`critic_align.launch.dependency_errors`); :func:`build_optimizer` raises
  the same one-line error if it is called without the launch checks.

Both take the config's ``adam_betas``, ``adam_eps`` and ``weight_decay``; the learning rates come with the parameter
groups (the policy's ``learning_rate``, the critic's ``critic_learning_rate``).
"""

from __future__ import annotations

import importlib
import types

import torch

BNB_MISSING = ("config field optimizer='adamw_8bit' needs bitsandbytes: pip install critic-align[bnb] (or pip install "
               "bitsandbytes), or set optimizer: adamw")


def _bitsandbytes():
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as exc:
        raise ValueError(f"{BNB_MISSING} ({type(exc).__name__}: {exc})") from None


def build_optimizer(param_groups, config) -> torch.optim.Optimizer:
    """The optimiser ``config.optimizer`` names over ``param_groups`` (a list of dicts with ``params`` and ``lr``, as
    ``torch.optim`` takes them), with the config's betas, eps and weight decay."""
    name = getattr(config, "optimizer", "adamw")
    kwargs = dict(betas=tuple(config.adam_betas), eps=config.adam_eps, weight_decay=config.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, **kwargs)
    if name == "adamw_8bit":
        opt = _bitsandbytes().optim.AdamW8bit(param_groups, **kwargs)
        opt.state_dict = types.MethodType(_flat_state_dict, opt)  # what checkpoints can store (see below)
        return opt
    raise ValueError(f"config field optimizer={name!r}: use 'adamw' or 'adamw_8bit'")


def _flat_state_dict(self) -> dict:
    """torch's flat ``Optimizer.state_dict`` for bitsandbytes' 8-bit optimisers, whose own wraps the quantisation
    state (state1/2, qmap1/2, absmax1/2) in a nested dict of tensors that a checkpoint's JSON cannot hold; their
    ``load_state_dict`` takes either form.  The quantisation maps (256 values) are one tensor shared by every
    parameter: each gets a copy, since safetensors refuses tensors that share memory."""
    sd = torch.optim.Optimizer.state_dict(self)
    sd["state"] = {i: {k: v.clone() if k.startswith("qmap") and isinstance(v, torch.Tensor) else v
                       for k, v in st.items()} for i, st in sd["state"].items()}
    return sd
