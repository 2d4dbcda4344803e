"""Several named LoRA adapters on one frozen base model (peft), e.g. "policy" and "critic".

peft's ``set_adapter`` silently switches ``requires_grad`` off on every other adapter, so a loss that
spans two adapters (policy + critic in one backward) would drop the first adapter's gradients.
``LoraAdapters`` re-applies the trainable flags after every switch: only the *active* adapter is used
in a forward, but every trainable adapter keeps receiving the gradients of the graphs it took part in.

Fused forward (``fused=True``, the default): peft computes a LoRA layer as ``base(x) + s·B(A(x))``, two
extra small convolutions / matmuls per layer.  On a CPU a rank-8 3×3 convolution costs about twice the
base convolution it adapts (oneDNN is slow with few output channels), so the fused forward computes the
same function as one convolution / matmul with the weight ``W + s·B·A``, built anew in every forward (so
it is never stale and gradients reach A and B through it): several times faster per layer without
gradients and still faster with them (measured in ``benchmarks/results/perf.json``); results agree with
peft's to float32 rounding.  Layers it does not cover fall back to peft's own forward: adapters disabled or merged,
``adapter_names`` batches, DoRA and other variants, LoRA dropout or bias, ``fan_in_fan_out``, grouped,
dilated, string-padded ('same') or non-zero-padded convolutions (peft's lora_A pads with zeros), non-float32
weights and autocast (where adding a small ΔW to a bf16 W would round it away), and any layer of a peft
release that lacks an attribute the fused forward reads.
It calls public torch ops only (``F.linear`` / ``F.conv2d``).

Gradient checkpointing (``enable_gradient_checkpointing``): diffusers' own switch, with a checkpoint function that
recomputes each block under the adapter state of its forward.  One backward can span forwards under several
states (GAE: the policy's forward with 'policy', the critic's with 'critic'; a reference forward with adapters
disabled); the recomputation runs during that backward, when some other state is current, so diffusers' plain
checkpoint function would recompute the critic's blocks with the policy's LoRA and give a wrong critic gradient,
without an error.  The fused forward reads the layer's active adapters and disabled flag at call time, so it
composes: the recomputation restores both before the block runs.
"""

from __future__ import annotations

import types
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device autocast does not know (e.g. 'meta'): take peft's path
        return True


def _fused_lora_forward(self, x, *args, **kwargs):
    """Forward of a peft LoRA ``Linear`` / ``Conv2d`` as one op with ``W + Σ_a s_a·B_a·A_a`` (see module docs).

    Only public torch ops (``F.linear``, ``F.conv2d``).  The peft layer attributes it reads
    (``lora_A`` / ``lora_B`` / ``scaling`` / ``active_adapters`` / ``lora_variant`` / ``lora_bias`` / ``lora_dropout``)
    are read in :func:`_fused_delta`; a peft release without one of them takes peft's own forward."""
    peft_forward = type(self).forward
    if args or kwargs:
        return peft_forward(self, x, *args, **kwargs)
    try:
        base = self.get_base_layer()
        plain = self.disable_adapters or self.merged or _autocast_on(x.device.type)
        delta = _PEFT if plain else _fused_delta(self, base.weight, x)
    except (AttributeError, KeyError, TypeError):  # another peft layout: its own forward is always right
        delta = _PEFT
    if delta is _PEFT:
        return peft_forward(self, x)
    if delta is None:
        return base(x)
    if type(base) is nn.Linear:
        return F.linear(x, base.weight + delta, base.bias)
    if type(base) is nn.Conv2d:
        return F.conv2d(x, base.weight + delta, base.bias, base.stride, base.padding, base.dilation, base.groups)
    return peft_forward(self, x)


_PEFT = object()  # _fused_delta's answer for "this layer needs peft's own forward"


def _fused_delta(layer, weight: torch.Tensor, x: torch.Tensor):
    """``Σ_a s_a·B_a·A_a`` over the layer's active adapters, shaped like ``weight``; None without an active
    adapter; ``_PEFT`` where the fused weight cannot express the layer (variants, bias, dropout, fan_in_fan_out,
    non-float32, grouped / dilated / string-padded / non-zero-padded convolutions)."""
    base = layer.get_base_layer()
    if type(base) is nn.Conv2d and (base.groups != 1 or tuple(base.dilation) != (1, 1) or isinstance(base.padding, str)
                                    or base.padding_mode != "zeros"):
        return _PEFT  # peft's lora_A pads with zeros: a reflect-padded W + ΔW would differ from it at the borders
    delta = None
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if (name in layer.lora_variant or layer.lora_bias.get(name, False)
                or not isinstance(layer.lora_dropout[name], nn.Identity) or getattr(layer, "fan_in_fan_out", False)):
            return _PEFT
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        if weight.dtype != torch.float32 or a.dtype != torch.float32 or x.dtype != torch.float32:
            return _PEFT
        d = (b.flatten(1) @ a.flatten(1)).view(weight.shape) * layer.scaling[name]
        delta = d if delta is None else delta + d
    return delta


def supports_gradient_checkpointing(model: nn.Module) -> bool:
    """Whether ``model`` has diffusers' gradient-checkpointing switch (``enable_gradient_checkpointing``, the class
    flag ``_supports_gradient_checkpointing`` and at least one block that reads a ``gradient_checkpointing`` flag)."""
    return (callable(getattr(model, "enable_gradient_checkpointing", None))
            and bool(getattr(model, "_supports_gradient_checkpointing", False))
            and any(hasattr(m, "gradient_checkpointing") for m in model.modules()))


class LoraAdapters:
    def __init__(self, model: nn.Module, fused: bool = True):
        self.model = model
        self.fused = fused
        self.names: list[str] = []
        self.trainable: set[str] = set()
        self._active: str | None = None
        self._disabled = False
        self._layer_cache: list | None = None
        self._param_cache: dict[str, list] = {}

    def _layers(self):
        if self._layer_cache is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._layer_cache = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        return self._layer_cache

    def add(self, name: str, rank: int, alpha: float | None = None, target_modules=None, dropout: float = 0.0,
            trainable: bool = True, init_lora_weights=True) -> None:
        """Inject a LoRA adapter named ``name`` (B = 0 at init, so it starts equal to the base model)."""
        from peft import LoraConfig, inject_adapter_in_model

        if name in self.names:
            raise ValueError(f"adapter {name!r} already exists (adapters: {self.names})")
        if not target_modules:
            raise ValueError("target_modules must name the layers to adapt, e.g. ['to_q', 'to_k', 'to_v', 'conv1']")
        cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=list(target_modules),
                         lora_dropout=dropout, init_lora_weights=init_lora_weights)
        with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the point
            warnings.simplefilter("ignore", UserWarning)
            inject_adapter_in_model(cfg, self.model, adapter_name=name)
        self._layer_cache, self._param_cache = None, {}
        if self.fused:  # instance-level forward: the model's own modules and peft's classes stay untouched
            for layer in self._layers():
                if type(layer.get_base_layer()) in (nn.Linear, nn.Conv2d) and "forward" not in vars(layer):
                    layer.forward = types.MethodType(_fused_lora_forward, layer)
        self.names.append(name)
        if trainable:
            self.trainable.add(name)
        if not self._layers():
            raise ValueError(f"no layer of the model matched target_modules={list(target_modules)}")
        self.activate(self._active or name, force=True)  # peft's injection may have switched the layers

    def _apply_requires_grad(self) -> None:
        # undo peft's switch (set_adapter / enable_adapters set requires_grad per adapter) on the tensors the layers
        # hold now, walking the same module dicts peft walks: under FSDP2 a unit holds its all-gathered parameters
        # between its forward and its backward, not the sharded ones a cached parameter list would name
        for layer in self._layers():
            for attr in layer.adapter_layer_names:
                for key, sub in getattr(layer, attr).items():
                    if key in self.names:
                        sub.requires_grad_(key in self.trainable)

    def activate(self, name: str, force: bool = False) -> None:
        """Make ``name`` the adapter every LoRA layer uses.  A no-op when it already is (and adapters are
        enabled), unless ``force``: switching walks every layer and parameter, ~1 ms per switch."""
        if name not in self.names:
            raise KeyError(f"unknown adapter {name!r}; adapters: {self.names}")
        if name == self._active and not self._disabled and not force:
            return
        for layer in self._layers():
            layer.set_adapter(name)
            if self._disabled:
                layer.enable_adapters(True)
        self._disabled = False
        self._active = name
        self._apply_requires_grad()

    @property
    def active(self) -> str | None:
        return self._active

    @contextmanager
    def using(self, name: str):
        """Run a block with adapter ``name`` active, then restore the previous one."""
        prev, was_disabled = self._active, self._disabled
        self.activate(name)
        try:
            yield
        finally:
            if prev is not None:
                self.activate(prev)
            if was_disabled:
                self._set_disabled(True)

    def _set_disabled(self, disabled: bool) -> None:
        for layer in self._layers():
            layer.enable_adapters(not disabled)
        self._disabled = disabled
        self._apply_requires_grad()

    @contextmanager
    def disabled(self):
        """Run a block on the frozen base model (the reference policy)."""
        was = self._disabled
        self._set_disabled(True)
        try:
            yield
        finally:
            self._set_disabled(was)

    @property
    def state(self) -> tuple[str | None, bool]:
        """The full adapter state a forward runs under: (active adapter, adapters disabled)."""
        return self._active, self._disabled

    def _set_state(self, state: tuple[str | None, bool]) -> None:
        name, disabled = state
        if name is not None and name != self._active:
            self.activate(name)  # enables the adapters; the flag is set below
        if disabled != self._disabled:
            self._set_disabled(disabled)

    @contextmanager
    def in_state(self, state: tuple[str | None, bool]):
        """Run a block under ``state`` (from :attr:`state`), then restore the current one."""
        prev = self.state
        self._set_state(state)
        try:
            yield
        finally:
            self._set_state(prev)

    def checkpoint(self, block, *args, **kwargs):
        """A ``gradient_checkpointing_func`` for diffusers: torch's non-reentrant checkpoint of ``block`` whose
        recomputation (during the backward) runs under the adapter state of the forward (see the module doc)."""
        state = self.state

        def run(*a, **kw):
            with self.in_state(state):  # a no-op in the forward itself; restores the state in the recomputation
                return block(*a, **kw)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

    def enable_gradient_checkpointing(self) -> None:
        """Switch on diffusers' gradient checkpointing of the model's blocks with :meth:`checkpoint`."""
        if not supports_gradient_checkpointing(self.model):
            raise ValueError(f"{type(self.model).__name__} has no diffusers gradient checkpointing "
                             "(enable_gradient_checkpointing and blocks with a gradient_checkpointing flag)")
        self.model.enable_gradient_checkpointing(self.checkpoint)

    def named_parameters(self, name: str):
        if name not in self._param_cache:
            key = f".{name}."
            self._param_cache[name] = [(n, p) for n, p in self.model.named_parameters() if "lora_" in n and key in n]
        return self._param_cache[name]

    def refresh_parameters(self) -> None:
        """Forget the cached parameter lists: the engine may replace the parameters (FSDP2 shards them into new
        DTensor parameters)."""
        self._param_cache = {}

    def parameters(self, name: str) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named_parameters(name)]

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors, with the adapter name stripped from the keys (peft convention)."""
        from peft import get_peft_model_state_dict

        return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(self.model, adapter_name=name).items()}

    def load_state_dict(self, name: str, state_dict: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        own = self.state_dict(name)
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"adapter {name!r} does not match: {len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); was it saved from another model or rank?"
            )
        for k, v in state_dict.items():
            if own[k].shape != v.shape:
                raise ValueError(f"adapter {name!r}: {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
        set_peft_model_state_dict(self.model, state_dict, adapter_name=name)
        self._apply_requires_grad()
