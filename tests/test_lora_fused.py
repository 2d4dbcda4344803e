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
    from critic_align.api import build_trainer
    from critic_align.config import PPOConfig
    from critic_align.train.registry import load_run_config

    with pytest.raises(ValueError, match="fused_lora"):
        PPOConfig(fused_lora="yes")
    run = load_run_config("digits", {"fused_lora": False, "output_dir": str(tmp_path), "progress": False})
    trainer = build_trainer(run)
    assert not trainer.adapters.fused and not any("forward" in vars(m) for m in trainer.adapters._layers())


def _one_conv_layer(**conv_kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, **conv_kwargs))
    adapters = LoraAdapters(model, fused=True)
    adapters.add("policy", rank=2, target_modules=["0"])
    with torch.no_grad():
        for _n, p in adapters.named_parameters("policy"):
            p.copy_(torch.randn(p.shape) * 0.3)
    return model[0]


@pytest.mark.parametrize("kwargs", [dict(padding=1), dict(padding=1, stride=2), dict(padding=(2, 1)),
                                    dict(padding=1, padding_mode="reflect"), dict(padding=1, padding_mode="circular"),
                                    dict(padding="same")])
def test_fused_conv_uses_public_ops_only_and_matches_peft(kwargs, monkeypatch):
    """No call to torch's private nn.Conv2d._conv_forward on the fused path (it may vanish in a torch release); padding,
    stride and the layouts it does not fuse (reflect / circular padding: peft's lora_A pads with zeros) equal peft."""
    layer = _one_conv_layer(**kwargs)
    x = torch.randn(2, 3, 9, 9)
    expected = type(layer).forward(layer, x)  # peft's own forward
    fusable = kwargs.get("padding_mode", "zeros") == "zeros" and kwargs["padding"] != "same"

    def private(*a, **k):
        raise AssertionError("the fused path called nn.Conv2d._conv_forward")

    if fusable:
        monkeypatch.setattr(torch.nn.Conv2d, "_conv_forward", private)
    got = layer(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fused_falls_back_to_peft_when_a_peft_attribute_is_missing():
    """A peft release that renamed an attribute the fused forward reads: peft's own forward runs (and is right)."""
    layer = _one_conv_layer(padding=1)
    x = torch.randn(2, 3, 9, 9)
    expected = type(layer).forward(layer, x)
    calls = []
    original = type(layer).forward

    class Renamed(type(layer)):  # the same layer, its lora_bias attribute gone (as if renamed upstream)
        def forward(self, *a, **k):
            calls.append(1)
            return original(self, *a, **k)

        def __getattribute__(self, name):
            if name == "lora_bias":
                raise AttributeError(name)
            return super().__getattribute__(name)

    layer.__class__ = Renamed
    got = layer(x)
    assert calls == [1]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
