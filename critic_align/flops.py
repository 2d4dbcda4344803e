"""FLOP counting with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions; one multiply-add = 2 FLOPs).

``count_flops(fn, *args)`` runs ``fn`` once under the counter and returns the total; ``flops_by_module`` the per-module
totals.  Shapes are all the counter needs, so real-scale models can be measured on the meta device or with a batch
of one (:func:`count_flops_meta` moves a module and its inputs to ``meta`` first: no memory, no arithmetic).
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "flops_by_module", "count_flops_meta", "linear_flops", "conv2d_flops", "matched_particles"]


def count_flops(fn, *args, **kwargs) -> int:
    """Total FLOPs of one call ``fn(*args, **kwargs)`` (forward only; run it under torch.no_grad for inference)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def flops_by_module(fn, *args, **kwargs) -> dict[str, int]:
    """{module name: FLOPs} of one call, as FlopCounterMode attributes them ("Global" = the total)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}


def _to_meta(x):
    if isinstance(x, torch.Tensor):
        return x.to("meta")
    if isinstance(x, (list, tuple)):
        return type(x)(_to_meta(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_meta(v) for k, v in x.items()}
    return x


def count_flops_meta(module: torch.nn.Module, *args, **kwargs) -> int:
    """FLOPs of ``module(*args, **kwargs)`` with the module and every tensor argument on the meta device."""
    module = module.to("meta")
    with torch.no_grad():
        return count_flops(module, *_to_meta(args), **_to_meta(kwargs))


def linear_flops(batch: int, in_features: int, out_features: int) -> int:
    """The hand count of a Linear layer's matmul: 2·B·in·out (the bias add is not counted by FlopCounterMode)."""
    return 2 * batch * in_features * out_features


def conv2d_flops(batch: int, c_in: int, c_out: int, h_out: int, w_out: int, kernel: int, groups: int = 1) -> int:
    """The hand count of a Conv2d: 2·B·C_out·H_out·W_out·(C_in/groups)·k²."""
    return 2 * batch * c_out * h_out * w_out * (c_in // groups) * kernel * kernel


def matched_particles(n_ref: int, cost_ref: float, cost: float, rounding: str = "floor") -> int:
    """The particle count whose FLOPs equal ``n_ref`` particles at ``cost_ref`` each when one particle costs ``cost``:
    n_ref·cost_ref/cost rounded down (``floor``: never more FLOPs than the reference; 0 when one particle already
    costs more than the whole reference budget) or to the nearest integer (``nearest``, halves up)."""
    if isinstance(n_ref, bool) or not isinstance(n_ref, int) or n_ref < 1:
        raise ValueError(f"n_ref must be an integer >= 1, got {n_ref!r}")
    if not (cost_ref > 0 and cost > 0):
        raise ValueError(f"cost_ref and cost must be positive FLOP counts, got {cost_ref!r} and {cost!r}")
    exact = n_ref * cost_ref / cost
    if rounding == "floor":
        return math.floor(exact + 1e-9)  # an exact multiple computed as 3.9999999 is still 4
    if rounding == "nearest":
        return math.floor(exact + 0.5)
    raise ValueError(f"rounding must be 'floor' or 'nearest', got {rounding!r}")
