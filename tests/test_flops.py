"""FLOP counts of known layers equal the hand count (critic_align/flops.py)."""

import torch
from torch import nn

from critic_align.flops import conv2d_flops, count_flops, count_flops_meta, flops_by_module, linear_flops


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
