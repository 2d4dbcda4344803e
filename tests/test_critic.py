"""Tests of the critic: UNet features, the value head, critic modes, LoRA adapter handling, checkpoints."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

from critic_align.backbones import Features, LoraAdapters, UNetAdapter
from critic_align.critic import Critic, ValueHead, build_critic

TARGETS = ["to_q", "to_k", "to_v", "conv1"]




def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, num_class_embeds=11, attention_head_dim=8).eval()


def inputs(b: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, 8, 8, generator=g)
    t = torch.tensor([999, 500, 3, 250, 10, 700][:b])
    c = torch.tensor([0, 5, 10, 3, 7, 1][:b])
    return x, t, c


def perturb_lora_b(adapters: LoraAdapters, name: str, seed: int, scale: float = 0.2) -> None:
    """Fresh LoRA has B = 0 (identity); give the adapter's B matrices random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in adapters.named_parameters(name):
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def with_adapters(seed: int = 0, names=("policy",), rank: int = 4):
    model = tiny_unet(seed)
    adapter = UNetAdapter(model)
    adapters = LoraAdapters(model)
    for name in names:
        adapters.add(name, rank=rank, target_modules=TARGETS)
    return model, adapter, adapters


# ---------------------------------------------------------------------------------------------
# UNetAdapter features


def test_unet_features_shapes_and_values():
    model = tiny_unet()
    adapter = UNetAdapter(model)
    x, t, c = inputs()
    assert adapter.feature_dim == 16 and adapter.temb_dim == 64
    with torch.no_grad():
        feats = adapter.features(x, t, c)
        assert isinstance(feats, Features)
        assert feats.tokens.shape == (3, 4 * 4, 16)  # one downsample: 8x8 -> 4x4 mid block, 16 channels
        assert feats.temb.shape == (3, 64)
        # independent reference: a hook of our own on the mid block, and the time embedding by hand
        grabbed = {}
        h = model.mid_block.register_forward_hook(lambda m, i, o: grabbed.setdefault("mid", o))
        direct = model(x, t, class_labels=c).sample
        h.remove()
        ref_tokens = grabbed["mid"].flatten(2).transpose(1, 2)
        assert torch.equal(feats.tokens, ref_tokens)
        ref_temb = model.time_embedding(model.time_proj(t).to(x.dtype))
        torch.testing.assert_close(feats.temb, ref_temb)
        # predict == the UNet called directly; predict_and_features gives the same output and tokens
        assert torch.equal(adapter.predict(x, t, c), direct)
        out, feats2 = adapter.predict_and_features(x, t, c)
        assert torch.equal(out, direct)
        assert torch.equal(feats2.tokens, feats.tokens) and torch.equal(feats2.temb, feats.temb)
        # a scalar t is broadcast over the batch
        f_scalar = adapter.features(x, 250, c)
        f_vec = adapter.features(x, torch.full((3,), 250), c)
        assert torch.equal(f_scalar.tokens, f_vec.tokens) and f_scalar.temb.shape == (3, 64)
    with pytest.raises(ValueError, match="timesteps"):
        adapter.features(x, torch.tensor([1, 2]), c)
    # the hooks are removed afterwards
    assert not model.mid_block._forward_hooks and not model.time_embedding._forward_hooks


def test_unet_adapter_rejects_other_models():
    with pytest.raises(TypeError):
        UNetAdapter(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------
# ValueHead


def test_value_head_shape_and_time_dependence():
    torch.manual_seed(0)
    head = ValueHead(feature_dim=16, temb_dim=64, num_rewards=3, hidden_dim=32, num_heads=4)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 10, 16, generator=g)
    temb_a, temb_b = torch.randn(2, 64, generator=g), torch.randn(2, 64, generator=g)
    with torch.no_grad():
        va = head(Features((tokens,), temb_a))
        assert va.shape == (2, 3)
        # zero-initialised AdaLN: identity modulation, the time embedding has no effect yet
        assert torch.equal(va, head(Features((tokens,), temb_b)))
        head.adaln[1].weight.normal_(0, 0.5)
        va2, vb2 = head(Features((tokens,), temb_a)), head(Features((tokens,), temb_b))
    assert not torch.allclose(va2, vb2, atol=1e-4)
    # reference: LN(tokens)·(1 + scale) + shift, attention pooling with a residual, per-reward MLP
    with torch.no_grad():
        scale, shift = head.adaln(temb_a).unsqueeze(1).chunk(2, -1)
        h = torch.nn.functional.layer_norm(tokens, (16,)) * (1 + scale) + shift
        q = head.queries.unsqueeze(0).expand(2, -1, -1)
        pooled = head.attn(q, h, h, need_weights=False)[0] + q
        ref = torch.stack([head.heads[k](pooled[:, k])[:, 0] for k in range(3)], -1)
    torch.testing.assert_close(va2, ref)
    with pytest.raises(ValueError):
        ValueHead(feature_dim=10, temb_dim=8, num_heads=4)
    with pytest.raises(ValueError):
        ValueHead(feature_dim=16, temb_dim=8, num_rewards=0)


def test_critic_values_depend_on_t():
    model, adapter, adapters = with_adapters()
    critic = build_critic(adapter, "lora", num_rewards=2, adapters=adapters, lora_target_modules=TARGETS,
                          hidden_dim=32)
    with torch.no_grad():
        critic.head.adaln[1].weight.normal_(0, 0.5)
        x, _, c = inputs(2)
        v1 = critic(x, torch.tensor([10, 10]), c)
        v2 = critic(x, torch.tensor([900, 900]), c)
    assert v1.shape == (2, 2)
    assert not torch.allclose(v1, v2, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# critic modes and gradient routing


def _grads_nonzero(params) -> bool:
    return all(p.grad is not None for p in params) and any(p.grad.abs().sum() > 0 for p in params)


def test_lora_mode_gradients_only_on_critic_adapter_and_head():
    model, adapter, adapters = with_adapters()
    perturb_lora_b(adapters, "policy", seed=1)
    critic = build_critic(adapter, "lora", num_rewards=2, adapters=adapters, lora_target_modules=TARGETS,
                          hidden_dim=32)
    assert adapters.names == ["policy", "critic"] and adapters.active == "policy"
    x, t, c = inputs()
    v = critic(x, t, c)
    assert v.shape == (3, 2)
    assert adapters.active == "policy"  # restored after the critic's forward
    v.square().sum().backward()
    assert all(p.grad is not None for p in critic.head.parameters())
    critic_lora = dict(adapters.named_parameters("critic"))
    # only adapters before/at the mid block take part in the features; their B gets gradient (A's is 0: B = 0)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in critic_lora.items() if "lora_B" in n)
    assert all(p.grad is None for p in adapters.parameters("policy"))
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert base and all(p.grad is None for p in base)
    # trainable_parameters: head + critic adapter, not the policy adapter
    ids = {id(p) for p in critic.trainable_parameters()}
    assert {id(p) for p in critic.head.parameters()} <= ids
    assert {id(p) for p in adapters.parameters("critic")} <= ids
    assert not ids & {id(p) for p in adapters.parameters("policy")}
    # the critic module does not register the policy's backbone as its own parameters
    assert {id(p) for p in critic.parameters()} == {id(p) for p in critic.head.parameters()}


def test_full_mode_trains_a_copy_only():
    model, adapter, adapters = with_adapters()
    perturb_lora_b(adapters, "policy", seed=1)
    critic = build_critic(adapter, "full", num_rewards=1, adapters=adapters, hidden_dim=32)
    assert critic.backbone is not adapter
    # the copy is a plain base model: no LoRA layers, and its features are the base model's (adapters disabled)
    assert not any("lora_" in n for n, _ in critic.backbone.named_parameters())
    x, t, c = inputs()
    with torch.no_grad(), adapters.disabled():
        base_tokens = adapter.features(x, t, c).tokens
    with torch.no_grad():
        assert torch.equal(critic.features(x, t, c).tokens, base_tokens)
    v = critic(x, t, c)
    assert v.shape == (3, 1)
    v.sum().backward()
    copy_params = list(critic.backbone.parameters())
    assert copy_params and all(p.requires_grad for p in copy_params)
    assert critic.backbone.model.conv_in.weight.grad is not None
    assert critic.backbone.model.conv_in.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    assert {id(p) for p in critic.trainable_parameters()} >= {id(p) for p in copy_params}


def test_full_mode_without_adapters():
    model = tiny_unet()
    adapter = UNetAdapter(model)
    critic = build_critic(adapter, "full", num_rewards=2, hidden_dim=32)
    x, t, c = inputs()
    critic(x, t, c).sum().backward()
    assert _grads_nonzero([critic.backbone.model.conv_in.weight])
    assert all(p.grad is None for p in model.parameters())


def test_shared_mode_uses_policy_adapter():
    model, adapter, adapters = with_adapters()
    perturb_lora_b(adapters, "policy", seed=1)
    critic = build_critic(adapter, "shared", num_rewards=2, adapters=adapters, hidden_dim=32)
    x, t, c = inputs()
    with torch.no_grad(), adapters.using("policy"):
        ref = critic.head(adapter.features(x, t, c))
    v = critic(x, t, c)
    assert v.shape == (3, 2)
    assert torch.equal(v.detach(), ref)
    v.sum().backward()
    pol = [p for n, p in adapters.named_parameters("policy") if "lora_B" in n]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pol)
    assert all(p.grad is not None for p in critic.head.parameters())


def test_build_critic_errors():
    model, adapter, adapters = with_adapters()
    with pytest.raises(ValueError):
        build_critic(adapter, "lora", adapters=None, lora_target_modules=TARGETS)
    with pytest.raises(ValueError):
        build_critic(adapter, "shared", adapters=None)
    with pytest.raises(ValueError):
        build_critic(adapter, "separate", adapters=adapters)


# ---------------------------------------------------------------------------------------------
# LoraAdapters


def test_two_adapters_one_backward_both_get_gradients():
    model = tiny_unet()
    adapter = UNetAdapter(model)
    x, t, c = inputs()
    adapters = LoraAdapters(model)
    adapters.add("policy", rank=4, target_modules=TARGETS)
    adapters.add("critic", rank=4, target_modules=TARGETS)
    perturb_lora_b(adapters, "policy", seed=1)
    perturb_lora_b(adapters, "critic", seed=2)

    def f(out):
        return out.square().mean()

    def g(out):
        return (out * 3).sin().sum()

    # the policy term alone, for reference
    with adapters.using("policy"):
        f(adapter.predict(x, t, c)).backward()
    ref_policy = {n: p.grad.clone() for n, p in adapters.named_parameters("policy")}
    model.zero_grad(set_to_none=True)
    with adapters.using("critic"):
        g(adapter.predict(x, t, c)).backward()
    ref_critic = {n: p.grad.clone() for n, p in adapters.named_parameters("critic")}
    model.zero_grad(set_to_none=True)

    # both in one graph, switching adapters between the forwards
    with adapters.using("policy"):
        out_p = adapter.predict(x, t, c)
    with adapters.using("critic"):
        out_c = adapter.predict(x, t, c)
    assert not torch.allclose(out_p, out_c)
    (f(out_p) + g(out_c)).backward()
    for name, ref in (("policy", ref_policy), ("critic", ref_critic)):
        params = adapters.named_parameters(name)
        assert params and all(p.grad is not None for _, p in params), name
        assert any(p.grad.abs().sum() > 0 for n, p in params if "lora_A" in n), name
        for n, p in params:
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6)


def test_disabled_gives_base_output_and_using_restores():
    model = tiny_unet()
    adapter = UNetAdapter(model)
    x, t, c = inputs()
    with torch.no_grad():
        base = adapter.predict(x, t, c)
    adapters = LoraAdapters(model)
    adapters.add("policy", rank=4, target_modules=TARGETS)
    adapters.add("critic", rank=4, target_modules=TARGETS)
    perturb_lora_b(adapters, "policy", seed=1)
    perturb_lora_b(adapters, "critic", seed=2)
    with torch.no_grad():
        out_policy = adapter.predict(x, t, c)
        assert not torch.allclose(out_policy, base)
        with adapters.disabled():
            assert torch.equal(adapter.predict(x, t, c), base)
        assert torch.equal(adapter.predict(x, t, c), out_policy)
        with adapters.using("critic"):
            out_critic = adapter.predict(x, t, c)
            with adapters.disabled():
                assert torch.equal(adapter.predict(x, t, c), base)
            assert torch.equal(adapter.predict(x, t, c), out_critic)
        assert adapters.active == "policy"
        assert torch.equal(adapter.predict(x, t, c), out_policy)
    # trainable flags survive the switches (peft's set_adapter would turn the inactive one off)
    assert all(p.requires_grad for p in adapters.parameters("policy") + adapters.parameters("critic"))
    with pytest.raises(KeyError):
        adapters.activate("nope")
    with pytest.raises(ValueError):
        adapters.add("policy", rank=4, target_modules=TARGETS)
    with pytest.raises(ValueError):
        adapters.add("other", rank=4, target_modules=None)


def test_using_inside_disabled_restores_previous_adapter():
    model, adapter, adapters = with_adapters(names=("policy", "critic"))
    perturb_lora_b(adapters, "policy", seed=1)
    perturb_lora_b(adapters, "critic", seed=2)
    x, t, c = inputs()
    with torch.no_grad():
        out_policy = adapter.predict(x, t, c)
        with adapters.disabled():
            with adapters.using("critic"):
                pass
        assert adapters.active == "policy"
        assert torch.equal(adapter.predict(x, t, c), out_policy)


def test_adapter_state_dict_round_trip_and_rank_mismatch():
    model, adapter, adapters = with_adapters(names=("policy",), rank=4)
    perturb_lora_b(adapters, "policy", seed=1)
    x, t, c = inputs()
    with torch.no_grad():
        out1 = adapter.predict(x, t, c)
    # state_dict() aliases the live parameters (like nn.Module.state_dict): clone to keep a snapshot
    sd = {k: v.clone() for k, v in adapters.state_dict("policy").items()}
    assert sd and all(".policy." not in k for k in sd)  # adapter name stripped
    perturb_lora_b(adapters, "policy", seed=5)
    with torch.no_grad():
        assert not torch.allclose(adapter.predict(x, t, c), out1)
    adapters.load_state_dict("policy", sd)
    with torch.no_grad():
        assert torch.equal(adapter.predict(x, t, c), out1)
    assert all(p.requires_grad for p in adapters.parameters("policy"))
    # a state dict of another rank (same keys, other shapes) is refused
    _, _, other = with_adapters(names=("policy",), rank=8)
    with pytest.raises(ValueError, match="shape"):
        adapters.load_state_dict("policy", other.state_dict("policy"))
    # missing keys are refused too
    partial = dict(list(sd.items())[1:])
    with pytest.raises(ValueError, match="missing"):
        adapters.load_state_dict("policy", partial)
    # the model is unchanged by the refused loads
    with torch.no_grad():
        assert torch.equal(adapter.predict(x, t, c), out1)


# ---------------------------------------------------------------------------------------------
# Critic checkpoints


@pytest.mark.parametrize("mode", ["lora", "full", "shared"])
def test_critic_state_tensors_round_trip(mode):
    def make(seed_head):
        model, adapter, adapters = with_adapters(seed=0)
        torch.manual_seed(seed_head)
        critic = build_critic(adapter, mode, num_rewards=2, adapters=adapters, lora_target_modules=TARGETS,
                              hidden_dim=32)
        return critic, adapters

    src, src_adapters = make(1)
    with torch.no_grad():
        src.head.adaln[1].weight.normal_(0, 0.3)
        if mode == "lora":
            perturb_lora_b(src_adapters, "critic", seed=3)
        if mode == "full":
            src.backbone.model.conv_in.weight.add_(0.1)
    x, t, c = inputs()
    with torch.no_grad():
        v_src = src(x, t, c)
    tensors = src.state_tensors()
    assert any(k.startswith("head.") for k in tensors)
    assert any(k.startswith("lora.") for k in tensors) == (mode == "lora")
    assert any(k.startswith("backbone.") for k in tensors) == (mode == "full")
    dst, _ = make(2)
    with torch.no_grad():
        assert not torch.allclose(dst(x, t, c), v_src)
    dst.load_state_tensors(tensors)
    with torch.no_grad():
        assert torch.equal(dst(x, t, c), v_src)
    assert all(not v.requires_grad for v in tensors.values())


def test_critic_rejects_unknown_mode():
    model = tiny_unet()
    with pytest.raises(ValueError):
        Critic(ValueHead(16, 64, hidden_dim=8), "bogus", UNetAdapter(model))
