"""The fused LoRA forward (one conv / matmul with W + s·B·A) computes what peft computes: outputs and gradients
on a UNet with linear and conv LoRA layers and two adapters, the disabled (reference) path, the fallbacks."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

from critic_align.backbones import LoraAdapters
from critic_align.backbones.lora import _fused_lora_forward

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, num_class_embeds=11, attention_head_dim=8).eval()


def pair(alpha=None):
    """The same model twice, with identical perturbed 'policy' and 'critic' adapters: fused and peft's forward."""
    out = []
    for fused in (True, False):
        model = tiny_unet()
        adapters = LoraAdapters(model, fused=fused)
        for i, name in enumerate(("policy", "critic")):
            adapters.add(name, rank=4, alpha=alpha, target_modules=TARGETS)
            g = torch.Generator().manual_seed(10 + i)
            with torch.no_grad():
                for _n, p in adapters.named_parameters(name):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        adapters.activate("policy")
        out.append((model, adapters))
    return out


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 1, 8, 8, generator=g), torch.tensor([999, 500, 3]), torch.tensor([0, 5, 10])


def test_fused_forward_is_installed_only_when_asked():
    (fm, fa), (pm, pa) = pair()
    n_fused = sum("forward" in vars(m) for m in fa._layers())
    assert n_fused == len(fa._layers()) > 0
    assert not any("forward" in vars(m) for m in pa._layers())
    # the unet's Linear and Conv2d LoRA layers are all covered
    kinds = {type(m.get_base_layer()).__name__ for m in fa._layers()}
    assert kinds == {"Linear", "Conv2d"}


@pytest.mark.parametrize("alpha", [None, 2.0])
def test_fused_matches_peft_outputs_and_gradients(alpha):
    (fm, fa), (pm, pa) = pair(alpha)
    x, t, c = inputs()
    for name in ("policy", "critic"):
        grads = []
        for model, adapters in ((fm, fa), (pm, pa)):
            with adapters.using(name):
                xi = x.clone().requires_grad_(True)
                out = model(xi, t, class_labels=c).sample
                out.square().mean().backward()
                params = adapters.parameters(name)
                grads.append((out.detach(), xi.grad, [p.grad.clone() for p in params]))
                for p in params:
                    p.grad = None
        (o1, gx1, gp1), (o2, gx2, gp2) = grads
        assert not torch.allclose(o1, tiny_unet()(x, t, class_labels=c).sample, atol=1e-3)  # the LoRA matters
        torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx1, gx2, rtol=1e-4, atol=1e-6)
        for a, b in zip(gp1, gp2):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # disabled adapters = the base model, exactly
    with fa.disabled(), torch.no_grad():
        torch.testing.assert_close(fm(x, t, class_labels=c).sample, tiny_unet()(x, t, class_labels=c).sample,
                                   rtol=0, atol=0)


def test_fused_falls_back_to_peft_under_autocast_and_for_dropout():
    (fm, fa), (pm, pa) = pair()
    x, t, c = inputs()
    layer = fa._layers()[0]
    calls = []
    original = type(layer).forward

    def spy(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    type(layer).forward = spy
    try:
        with torch.no_grad():
            fm(x, t, class_labels=c)
            assert not calls  # fused: peft's forward is not called
            with torch.autocast("cpu", dtype=torch.bfloat16):
                fm(x, t, class_labels=c)
            assert calls  # under autocast: peft's forward
    finally:
        type(layer).forward = original
    # a layer with LoRA dropout takes peft's path (the fused weight has no place for dropout)
    lin = next(m for m in fa._layers() if isinstance(m.get_base_layer(), torch.nn.Linear))
    lin.lora_dropout["policy"] = torch.nn.Dropout(0.5)
    lin.train()
    xin = torch.randn(4, lin.get_base_layer().in_features)
    torch.manual_seed(0)
    a = _fused_lora_forward(lin, xin)
    torch.manual_seed(0)
    b = type(lin).forward(lin, xin)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_trainer_config_switch(tmp_path):
    from critic_align.config import PPOConfig
    from train.registry import build_trainer, load_run_config

    with pytest.raises(ValueError, match="fused_lora"):
        PPOConfig(fused_lora="yes")
    run = load_run_config("digits", {"fused_lora": False, "output_dir": str(tmp_path), "progress": False})
    trainer = build_trainer(run)
    assert not trainer.adapters.fused and not any("forward" in vars(m) for m in trainer.adapters._layers())
