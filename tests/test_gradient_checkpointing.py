"""``gradient_checkpointing: true``: diffusers' gradient checkpointing made adapter-aware (``LoraAdapters.checkpoint``).

Invariant: one GAE update's gradients (policy LoRA, critic LoRA / copy / head; with a KL-to-reference term) are
those without checkpointing, on tiny UNet2DModel, UNet2DConditionModel, DiT, SD3 and FLUX transformers, for the three
critic modes, the fused and peft LoRA forwards and bf16 autocast.  The bug it prevents: diffusers' plain
``enable_gradient_checkpointing()`` recomputes the critic's blocks (and a reference forward's) under the adapter
active during the backward, a wrong gradient without an error.  Bad input: a model without diffusers' switch,
a non-boolean field, and plain checkpointing switched on behind the config's back are refused, naming the field.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from critic_align.backbones import DiTAdapter, FluxAdapter, LoraAdapters, UNetAdapter
from critic_align.config import PPOConfig
from critic_align.rewards import FunctionReward, MultiReward
from critic_align.tasks.base import BaseTask
from critic_align.trainer import Trainer
from tests.test_critic_body import tiny_cond_unet
from tests.test_dit import sd3_cond, tiny_dit, tiny_sd3
from tests.test_flux import text_cond as flux_text_cond
from tests.test_flux import tiny_flux_transformer
from tests.test_trainer import TinyTask, pair_loss, tiny_unet

ATTN = ("to_q", "to_k", "to_v", "to_out.0")


class _TextTask(BaseTask):
    """Prompts "0".."3" -> fixed (B, 5, 16) text states (UNet2DConditionModel) or TextCond (SD3)."""
    name = "tiny_text"
    prompts = ("0", "1", "2", "3")
    latent_shape = (4, 8, 8)

    def __init__(self, kind: str):
        g = torch.Generator().manual_seed(3)
        self.table = {"sd3": lambda: sd3_cond(4), "flux": lambda: flux_text_cond(4),
                      "unet": lambda: torch.randn(4, 5, 16, generator=g)}[kind]()

    def encode(self, prompts):
        return self.table[torch.tensor([int(p) for p in prompts])]

    def null_cond(self, n):
        return self.table[torch.zeros(n, dtype=torch.long)] * 0

    def decode(self, latents):
        return latents.clamp(-1, 1)


def _reward(samples, prompts):
    target = torch.tensor([int(p) / 3 * 2 - 1 for p in prompts], device=samples.device)
    return -(samples.mean(dim=(1, 2, 3)) - target).abs()


def _build(kind):
    """(backbone adapter, task, scheduler, LoRA targets) of a tiny model built from its config."""
    ddpm = DDPMScheduler(num_train_timesteps=100, timestep_spacing="trailing")
    if kind == "unet2d":
        return UNetAdapter(tiny_unet()), TinyTask(), ddpm, None
    if kind == "unet2d_cond":
        return UNetAdapter(tiny_cond_unet()), _TextTask("unet"), ddpm, None
    if kind == "dit":
        return DiTAdapter(tiny_dit()), TinyTask(), FlowMatchEulerDiscreteScheduler(shift=3.0), ATTN
    if kind == "sd3":
        return DiTAdapter(tiny_sd3()), _TextTask("sd3"), FlowMatchEulerDiscreteScheduler(shift=3.0), ATTN
    if kind == "flux":
        return (FluxAdapter(tiny_flux_transformer().eval(), guidance=3.5), _TextTask("flux"),
                FlowMatchEulerDiscreteScheduler(shift=3.0), ("to_q", "to_k", "to_v", "add_q_proj"))
    raise ValueError(kind)


def _trainer(tmp_path, kind, **overrides):
    adapter, task, sched, targets = _build(kind)
    cfg = dict(batch_size=4, group_size=2, num_inference_steps=3, minibatch_size=12, value_pretrain_epochs=0,
               output_dir=str(tmp_path), progress=False, log_tensorboard=False, grid_every=0, checkpoint_every=0,
               eval_every=0, lora_rank=2, critic_lora_rank=2, value_head_hidden=16, value_head_heads=2,
               clip_range=0.2, kl_coef=0.1)
    if targets:
        cfg["lora_target_modules"] = targets
    cfg.update(overrides)
    return Trainer(PPOConfig(**cfg), task, adapter, sched, MultiReward([FunctionReward(_reward, name="r")]))


def _perturb(params, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.05)  # away from the identity, so the wrong adapter shows


def _gae_gradients(tmp_path, kind, checkpointing, monkeypatch, **overrides):
    """Policy and critic gradients of one GAE loss (policy + value + KL to the reference) over every pair of a
    4-sample, 3-step rollout; ``checkpointing``: 'none', 'aware' (the config field) or 'plain' (diffusers' own
    switch, turned on after the Trainer is built)."""
    tr = _trainer(tmp_path / checkpointing, kind, gradient_checkpointing=checkpointing == "aware", **overrides)
    _perturb(tr.policy_params, 1)
    if tr.critic.mode == "lora":
        _perturb(tr.adapters.parameters("critic"), 2)
    if checkpointing == "plain":
        tr.adapter.model.enable_gradient_checkpointing()
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    ro = tr.rollout(tr.prompt_iter.batch(2, 2), generator=torch.Generator().manual_seed(0))
    tr.critic.head.set_output_scale(ro.rewards)
    ro = tr.compute_advantages(ro)
    assert not calls  # rollouts run without gradients: nothing is checkpointed there
    loss, stats = pair_loss(tr, ro, torch.tensor([[b, k] for b in range(4) for k in range(3)]))
    assert stats["kl_to_ref"] > 0
    loss.backward()
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", real)
    assert bool(calls) == (checkpointing != "none")  # the switch is on (or off) where the test says
    grad = lambda ps: torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in ps])  # noqa: E731
    out = {"policy": grad(tr.policy_params), "critic": grad(tr.critic_params), "trainer": tr}
    if tr.critic.mode == "lora":
        out["critic_lora"] = grad(tr.adapters.parameters("critic"))
    return out


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind,overrides", [
    ("unet2d", {}),
    ("unet2d", {"fused_lora": False}),
    ("unet2d", {"mixed_precision": "bf16"}),
    ("unet2d", {"critic_mode": "full"}),
    ("unet2d", {"critic_mode": "shared"}),
    ("unet2d_cond", {}),
    ("dit", {}),
    ("sd3", {}),
    ("flux", {}),
], ids=["unet2d", "unet2d-peft-forward", "unet2d-bf16", "unet2d-full-critic", "unet2d-shared-critic", "unet2d-cond",
        "dit", "sd3", "flux"])
def test_checkpointing_keeps_the_gae_gradients(tmp_path, monkeypatch, kind, overrides):
    ref = _gae_gradients(tmp_path, kind, "none", monkeypatch, **overrides)
    ckpt = _gae_gradients(tmp_path, kind, "aware", monkeypatch, **overrides)
    for name in ("policy", "critic", "critic_lora")[:3 if "critic_lora" in ref else 2]:
        assert ref[name].abs().max() > 0, name
        torch.testing.assert_close(ckpt[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)
    tr = ckpt["trainer"]
    assert tr.adapter.model.is_gradient_checkpointing
    if tr.critic.mode == "full":  # its own copy: switched on too (plain diffusers: the copy has no adapters)
        assert tr.critic.backbone.model.is_gradient_checkpointing


@pytest.mark.parametrize("kind", ["unet2d_cond", "dit", "sd3", "flux"])
def test_plain_diffusers_checkpointing_gets_the_critic_gradient_wrong(tmp_path, monkeypatch, kind):
    """Why the switch is adapter-aware: with diffusers' plain checkpoint function the critic's blocks are recomputed
    under the policy's LoRA (active during the backward), silently.  The policy's gradient is right either way."""
    ref = _gae_gradients(tmp_path, kind, "none", monkeypatch)
    plain = _gae_gradients(tmp_path, kind, "plain", monkeypatch)
    torch.testing.assert_close(plain["policy"], ref["policy"], rtol=1e-5, atol=1e-7)
    assert _rel(plain["critic_lora"], ref["critic_lora"]) > 0.05


@pytest.mark.parametrize("fused", [True, False])
def test_recomputation_restores_the_active_adapter_and_the_disabled_state(fused):
    """One backward through three forwards, each recomputed: adapters disabled (the reference) with a gradient to
    the input, the critic's LoRA, the policy's.  With ``LoraAdapters.checkpoint`` every gradient is the one without
    checkpointing.  diffusers' plain function recomputes all of them under the policy's adapter: the reference's
    recomputation has other ops than its forward (torch notices: CheckpointError); without the reference the
    critic's gradient is wrong and nothing is raised."""
    def grads(mode, reference=True):
        model = tiny_unet()
        adapters = LoraAdapters(model, fused=fused)
        adapters.add("policy", rank=2, target_modules=("to_q", "to_k", "to_v", "conv1", "conv2"))
        adapters.add("critic", rank=2, target_modules=("to_q", "to_k", "to_v", "conv1", "conv2"))
        _perturb(adapters.parameters("policy"), 1)
        _perturb(adapters.parameters("critic"), 2)
        if mode == "aware":
            adapters.enable_gradient_checkpointing()
        elif mode == "plain":
            model.enable_gradient_checkpointing()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(3, 1, 8, 8, generator=g).requires_grad_(True)
        t, c = torch.tensor([5, 50, 95]), torch.tensor([0, 3, 7])
        w = torch.randn(3, 3, 1, 8, 8, generator=g)
        adapters.activate("policy")
        loss = (model(x, t, class_labels=c).sample * w[0]).sum()
        with adapters.using("critic"):
            loss = loss + (model(x, t, class_labels=c).sample * w[1]).sum()
        if reference:
            with adapters.disabled():
                loss = loss + (model(x, t, class_labels=c).sample * w[2]).sum()
        loss.backward()
        assert adapters.state == ("policy", False)  # the recomputations restored the state they found
        cat = lambda n: torch.cat([p.grad.flatten() for p in adapters.parameters(n)])  # noqa: E731
        return {"x": x.grad, "policy": cat("policy"), "critic": cat("critic")}

    for reference in (True, False):
        ref, aware = grads("none", reference), grads("aware", reference)
        for k in ref:
            torch.testing.assert_close(aware[k], ref[k], rtol=1e-5, atol=1e-7, msg=f"{k} reference={reference}")
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        grads("plain")
    plain = grads("plain", reference=False)
    assert _rel(plain["critic"], ref["critic"]) > 0.05 and _rel(plain["x"], ref["x"]) > 0.01
    torch.testing.assert_close(plain["policy"], ref["policy"], rtol=1e-5, atol=1e-7)


def test_in_state_switches_and_restores_exactly():
    adapters = LoraAdapters(tiny_unet())
    adapters.add("policy", rank=2, target_modules=("conv1",))
    adapters.add("critic", rank=2, target_modules=("conv1",))
    layer = next(iter(adapters._layers()))
    with adapters.disabled():
        with adapters.in_state(("critic", False)):
            assert adapters.state == ("critic", False) and layer.active_adapters == ["critic"]
            assert not layer.disable_adapters
        assert adapters.state == ("policy", True) and layer.disable_adapters and layer.active_adapters == ["policy"]
    with adapters.in_state(("critic", True)):
        assert adapters.state == ("critic", True) and layer.disable_adapters
    assert adapters.state == ("policy", False) and not layer.disable_adapters
    # trainable flags survive every switch (peft's set_adapter would switch the other adapter's off)
    assert all(p.requires_grad for n in ("policy", "critic") for p in adapters.parameters(n))


def test_a_model_without_diffusers_checkpointing_is_refused(tmp_path):
    from critic_align.backbones import MLP_LORA_TARGETS, MLPAdapter, MLPDenoiser, ResidualMLP
    from critic_align.tasks.gmm import GaussianMixture, GMMTask

    task = GMMTask(GaussianMixture(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), torch.tensor([0.5, 0.5]), 0.2))
    cfg = PPOConfig(gradient_checkpointing=True, num_inference_steps=3, batch_size=4, group_size=4, minibatch_size=4,
                    lora_target_modules=MLP_LORA_TARGETS, output_dir=str(tmp_path), progress=False,
                    log_tensorboard=False)
    model = MLPDenoiser(ResidualMLP(hidden=8, num_layers=1))
    with pytest.raises(ValueError, match="gradient_checkpointing=True: MLPDenoiser has no diffusers gradient "
                                         "checkpointing.*set gradient_checkpointing: false"):
        Trainer(cfg, task, MLPAdapter(model), task.scheduler,
                MultiReward([FunctionReward(lambda s, p: s[:, 0], name="x")]))
    with pytest.raises(ValueError, match="no diffusers gradient checkpointing"):
        LoraAdapters(model).enable_gradient_checkpointing()


def test_bad_values_and_plain_checkpointing_behind_the_config_are_refused(tmp_path):
    with pytest.raises(ValueError, match="gradient_checkpointing='yes': must be true or false"):
        PPOConfig(gradient_checkpointing="yes")
    adapter, task, sched, _ = _build("unet2d")
    adapter.model.enable_gradient_checkpointing()  # diffusers' own, not adapter-aware
    cfg = PPOConfig(batch_size=4, group_size=2, num_inference_steps=3, minibatch_size=12, value_pretrain_epochs=0,
                    output_dir=str(tmp_path), progress=False, log_tensorboard=False, lora_rank=2, critic_lora_rank=2)
    with pytest.raises(ValueError, match="gradient checkpointing switched on already.*set gradient_checkpointing: true"):
        Trainer(cfg, task, adapter, sched, MultiReward([FunctionReward(_reward, name="r")]))
