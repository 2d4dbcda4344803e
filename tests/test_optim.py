"""optimizer: adamw_8bit (bitsandbytes, the bnb extra): the 8-bit optimiser's state survives a checkpoint exactly and a
run checkpoints with it (bitsandbytes' own state_dict nests tensors a checkpoint cannot store)."""

from __future__ import annotations

import json

import pytest
import torch

from critic_align.checkpoint import optimizer_tensors, restore_optimizer
from critic_align.config import PPOConfig
from critic_align.optim import build_optimizer
from critic_align.train.cli import main


def test_adamw_8bit_state_round_trips_through_a_checkpoint_exactly():
    pytest.importorskip("bitsandbytes")

    def params():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(64, 80)), torch.nn.Parameter(torch.randn(8))]

    def step(opt, ps, seed):
        g = torch.Generator().manual_seed(seed)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()

    cfg = PPOConfig(optimizer="adamw_8bit")
    a = params()
    opt = build_optimizer([{"params": a[:1], "lr": 1e-2}, {"params": a[1:], "lr": 1e-3}], cfg)
    for s in range(3):
        step(opt, a, s)
    tensors, meta = optimizer_tensors(opt)
    assert tensors["optim.0.state1"].dtype == torch.uint8  # the large tensor's moments in 8 bits
    assert tensors["optim.1.state1"].dtype == torch.float32  # a small one keeps 32-bit moments
    b = params()
    with torch.no_grad():
        for x, y in zip(b, a):
            x.copy_(y)
    opt2 = build_optimizer([{"params": b[:1], "lr": 1e-2}, {"params": b[1:], "lr": 1e-3}], cfg)
    restore_optimizer(opt2, {k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(meta)))
    step(opt, a, 7)
    step(opt2, b, 7)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_a_run_checkpoints_adamw_8bit(tmp_path):
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--epochs", "1", "--set", "batch_size=16", "--set", "group_size=8",
                 "--set", "num_inference_steps=5", "--set", "value_pretrain_epochs=1", "--set", "progress=false",
                 "--set", "minibatch_size=40", "--set", "eval_every=0", "--set", "optimizer=adamw_8bit"]) == 0
    tensors = load_file(out / "checkpoints" / "epoch_000001" / "tensors.safetensors")
    assert any(k.endswith(".state1") and v.dtype == torch.uint8 for k, v in tensors.items())
