"""FLOP counts of known layers equal the hand count (critic_align/flops.py)."""

import torch
from torch import nn

from critic_align.flops import conv2d_flops, count_flops, count_flops_meta, flops_by_module, linear_flops, matched_particles


def test_linear_and_conv_equal_the_hand_count():
    lin = nn.Linear(64, 32)
    x = torch.randn(8, 64)
    assert count_flops(lin, x) == linear_flops(8, 64, 32) == 2 * 8 * 64 * 32
    conv = nn.Conv2d(3, 16, 3, padding=1, stride=2)
    y = torch.randn(2, 3, 32, 32)
    assert count_flops(conv, y) == conv2d_flops(2, 3, 16, 16, 16, 3) == 2 * 2 * 16 * 16 * 16 * 3 * 9


def test_meta_device_and_per_module():
    net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    x = torch.randn(4, 10)
    total = linear_flops(4, 10, 20) + linear_flops(4, 20, 5)
    assert count_flops(net, x) == total
    per = flops_by_module(net, x)
    assert per["Global"] == total and per["Sequential.0"] == linear_flops(4, 10, 20)
    big = nn.Linear(4096, 4096)  # counted without allocating its activations or doing its arithmetic
    assert count_flops_meta(big, torch.empty(1024, 4096)) == linear_flops(1024, 4096, 4096)


def test_matched_particles_hand_counts():
    # 4 particles at 10 GFLOPs = 40: at 6 each, floor 6 (36) or nearest 7 (42); at 3 each, 13 (39) or 13 (39)
    assert matched_particles(4, 10.0, 6.0) == 6 and matched_particles(4, 10.0, 6.0, "nearest") == 7
    assert matched_particles(4, 10.0, 3.0) == 13 == matched_particles(4, 10.0, 3.0, "nearest")
    assert matched_particles(3, 0.7, 0.1) == 21  # 3·0.7/0.1 is 20.999999999999996 in floating point
    assert matched_particles(2, 10.0, 25.0) == 0  # one particle costs more than the whole budget
    assert matched_particles(2, 10.0, 25.0, "nearest") == 1
    for bad in (dict(n_ref=0, cost_ref=1.0, cost=1.0), dict(n_ref=2, cost_ref=1.0, cost=0.0),
                dict(n_ref=2, cost_ref=1.0, cost=1.0, rounding="ceil")):
        try:
            matched_particles(**bad)
        except ValueError as exc:
            assert next(iter(k for k in bad if k in str(exc)), None) or "rounding" in str(exc)
        else:
            raise AssertionError(f"accepted {bad}")
