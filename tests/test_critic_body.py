"""Issue #13: the critic's body (multi-depth features, conditioning, LoRA where its forward runs), its value
data (forward-perturbed states), the standardised value loss, the core seed's γ = λ = 1 and the diagnostics."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel

from critic_align.advantages import gae, terminal_rewards
from critic_align.backbones import DiTAdapter, LoraAdapters, UNetAdapter
from critic_align.critic import build_critic
from critic_align.diagnostics import value_report, within_prompt_diversity
from critic_align.losses import value_loss_per_head
from critic_align.steps import FlowMatchSchedule, NoiseSchedule
from critic_align.value_data import ForwardProcess, perturbed_states
from tests.test_critic import inputs, tiny_unet
from tests.test_dit import sd3_cond, tiny_dit, tiny_sd3


def tiny_cond_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8).eval()


# ---------------------------------------------------------------------------------------------
# multi-depth features: documented shapes for every adapter


def test_unet2d_multi_levels():
    ad = UNetAdapter(tiny_unet())
    x, t, c = inputs(3)
    assert ad.feature_layers("multi") == ["down_blocks.0", "down_blocks.1", "mid_block"]
    with torch.no_grad():
        f = ad.features(x, t, c, which="multi")
        mid = ad.features(x, t, c)
    # down block i: its full-resolution output (before the downsampler), then the mid block
    assert [tuple(lv.shape) for lv in f.levels] == [(3, 16, 8, 8), (3, 16, 4, 4), (3, 16, 4, 4)]
    assert len(mid.levels) == 1 and mid.tokens.shape == (3, 16, 16)
    torch.testing.assert_close(f.levels[-1], mid.levels[0])
    # the class embedding reaches the head: (B, temb_dim), different per label
    assert f.cemb.shape == (3, ad.temb_dim) and not torch.allclose(f.cemb[0], f.cemb[1])
    # the level is what the down block computed: its first resnet's output at 8x8
    block = ad.model.down_blocks[0]
    grabbed = {}
    h = block.resnets[0].register_forward_hook(lambda m, i, o: grabbed.setdefault("r", o))
    with torch.no_grad():
        ad.features(x, t, c, which="multi")
    h.remove()
    torch.testing.assert_close(f.levels[0], grabbed["r"])


def test_unet2d_condition_multi_levels():
    ad = UNetAdapter(tiny_cond_unet())
    x = torch.randn(2, 4, 8, 8)
    cond = torch.randn(2, 5, 16)
    with torch.no_grad():
        f = ad.features(x, torch.tensor([10, 500]), cond, which="multi")
    assert [tuple(lv.shape) for lv in f.levels] == [(2, 16, 8, 8), (2, 32, 4, 4), (2, 32, 4, 4)]
    torch.testing.assert_close(f.cemb, cond.mean(1))  # mean-pooled text states (SD1.5's UNet has no pooled input)
    assert ad.cond_dim == 16


def test_dit_and_sd3_multi_levels():
    dit = DiTAdapter(tiny_dit())
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        f = dit.features(x, torch.tensor([1, 50, 900]), torch.tensor([0, 3, 9]), which="multi")
    # 2 blocks: depths round(2/3)-1=0, round(4/3)-1=0, 1 -> blocks 0 and 1; tokens (B, (8/2)^2, 16)
    assert dit.feature_layers("multi") == ["transformer_blocks.0", "transformer_blocks.1"]
    assert [tuple(lv.shape) for lv in f.levels] == [(3, 16, 16), (3, 16, 16)]
    assert f.cemb.shape == (3, 16)
    sd3 = DiTAdapter(tiny_sd3())
    with torch.no_grad():
        g = sd3.features(torch.randn(2, 4, 8, 8), torch.tensor([100.0, 900.0]), sd3_cond(2), which="multi")
    assert [tuple(lv.shape) for lv in g.levels] == [(2, 16, 16), (2, 16, 16)]
    assert g.cemb.shape == (2, 16)


def test_dit_24_layers_uses_the_seed_depths():
    from diffusers import DiTTransformer2DModel

    with torch.device("meta"):
        m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, num_layers=24,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    assert DiTAdapter(m).feature_layers("multi") == [f"transformer_blocks.{i}" for i in (7, 15, 23)]


def test_explicit_feature_layers_are_checked():
    ad = UNetAdapter(tiny_unet())
    x, t, c = inputs(2)
    with torch.no_grad():
        f = ad.features(x, t, c, which=["down_blocks.1", "mid_block"])
    assert len(f.levels) == 2
    with pytest.raises(ValueError, match="not modules"):
        ad.features(x, t, c, which=["down_blocks.7"])
    with pytest.raises(ValueError, match="'mid', 'multi'"):
        ad.features(x, t, c, which="deep")


def test_multi_critic_head_patchifies_and_reads_conditioning():
    model = tiny_unet()
    ad = UNetAdapter(model)
    adapters = LoraAdapters(model)
    adapters.add("policy", rank=2, target_modules=["to_q", "to_k", "to_v", "conv1", "conv2"])
    x, t, c = inputs(3)
    critic = build_critic(ad, "lora", num_rewards=2, adapters=adapters, lora_rank=2,
                          lora_target_modules=["to_q", "to_k", "to_v", "conv1", "conv2"], hidden_dim=16,
                          num_heads=2, features="multi", use_cond=True, example=(x[:1], t[:1], c[:1]), grid=2)
    # 8x8 level with grid 2 -> patch 4 -> 2x2 tokens of 16·16 values; 4x4 levels -> patch 2
    assert [(lv.channels, lv.patch) for lv in critic.head.levels] == [(16, 4), (16, 2), (16, 2)]
    with torch.no_grad():
        v = critic(x, t, c)
        toks = critic.head.tokens(critic.features(x, t, c))
    assert v.shape == (3, 2) and toks.shape == (3, 4 + 4 + 4, 16)
    # the conditioning changes the value once the AdaLN is non-zero
    with torch.no_grad():
        critic.head.adaln[1].weight.normal_(0, 0.5)
        v_a = critic(x[:1], t[:1], torch.tensor([1]))
        v_b = critic(x[:1], t[:1], torch.tensor([2]))
    assert not torch.allclose(v_a, v_b)


def test_critic_lora_only_on_modules_its_forward_reaches():
    model = tiny_unet()
    ad = UNetAdapter(model)
    adapters = LoraAdapters(model)
    targets = ["to_q", "to_k", "to_v", "conv1", "conv2"]
    adapters.add("policy", rank=2, target_modules=targets)
    x, t, c = inputs(3)
    critic = build_critic(ad, "lora", num_rewards=1, adapters=adapters, lora_rank=2, lora_target_modules=targets,
                          hidden_dim=16, num_heads=2, features="multi", example=(x[:1], t[:1], c[:1]))
    policy_names = {n.replace(".policy.", ".") for n, _ in adapters.named_parameters("policy")}
    critic_names = {n.replace(".critic.", ".") for n, _ in adapters.named_parameters("critic")}
    assert critic_names < policy_names  # a strict subset: none on the decoder
    assert not any(n.startswith("up_blocks") for n in critic_names)
    # every critic parameter takes part in its forward: after a backward, each has a gradient
    with adapters.using("critic"):
        critic(x, t, c).sum().backward()
    missing = [n for n, p in adapters.named_parameters("critic") if p.grad is None]
    assert not missing, missing


# ---------------------------------------------------------------------------------------------
# value data


def test_forward_process_matches_the_schedulers_own_add_noise():
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    fp = ForwardProcess(sched, 20)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 1, 4, 4, generator=g), torch.randn(5, 1, 4, 4, generator=g)
    t = NoiseSchedule.from_scheduler(sched).timesteps(20)[torch.tensor([0, 3, 7, 12, 19])]
    assert torch.equal(fp(x0, noise, t), sched.add_noise(x0, noise, t.long()))
    # and it is sqrt(ᾱ)·x0 + sqrt(1 − ᾱ)·ε (hand formula)
    abar = sched.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
    torch.testing.assert_close(fp(x0, noise, t), abar.sqrt() * x0 + (1 - abar).sqrt() * noise)


def test_forward_process_flow_matches_scale_noise():
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    fp = ForwardProcess(sched, 10)
    ts = FlowMatchSchedule.from_scheduler(sched).timesteps(10)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 4, 2, 2, generator=g), torch.randn(4, 4, 2, 2, generator=g)
    t = ts[torch.tensor([0, 2, 5, 9])]
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ref.set_timesteps(10)
    assert torch.equal(fp(x0, noise, t), ref.scale_noise(x0, t, noise))
    sigma = (t / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(fp(x0, noise, t), (1 - sigma) * x0 + sigma * noise)


def test_perturbed_states_targets_and_rows():
    sched = DDPMScheduler(num_train_timesteps=100)
    fp = ForwardProcess(sched, 4)
    timesteps = NoiseSchedule.from_scheduler(sched).timesteps(4)
    final = torch.randn(3, 1, 2, 2)
    rewards = torch.tensor([[1.0, float("nan")], [2.0, 5.0], [3.0, 6.0]])
    cond = torch.tensor([7, 8, 9])
    g = torch.Generator().manual_seed(0)
    vb = perturbed_states(fp, final, rewards, cond, timesteps, 2, g, gamma=0.5)
    assert len(vb) == 6 and vb.x.shape == (6, 1, 2, 2)
    assert vb.rows(torch.arange(6))[2].tolist() == [7, 7, 8, 8, 9, 9]
    # the same draws by hand: timestep indices, then the noise
    g2 = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 4, (6,), generator=g2)
    noise = torch.randn(6, 1, 2, 2, generator=g2)
    assert torch.equal(vb.t, timesteps[idx])
    assert torch.equal(vb.x, sched.add_noise(final.repeat_interleave(2, 0), noise, timesteps[idx].long()))
    disc = 0.5 ** (3 - idx).float()
    expected = torch.nan_to_num(rewards).repeat_interleave(2, 0) * disc[:, None]
    torch.testing.assert_close(vb.returns, expected)
    assert vb.mask.tolist() == [[True, False]] * 2 + [[True, True]] * 4


# ---------------------------------------------------------------------------------------------
# losses and advantages


def test_standardised_value_loss_is_raw_over_s_squared():
    g = torch.Generator().manual_seed(0)
    v, old, r = (torch.randn(10, 2, generator=g) for _ in range(3))
    m, s = torch.tensor([0.3, -2.0]), torch.tensor([0.5, 4.0])
    raw = value_loss_per_head(v, old, r)
    std = value_loss_per_head((v - m) / s, (old - m) / s, (r - m) / s)
    torch.testing.assert_close(std, raw / s**2)


def test_trainer_value_loss_uses_standardised_units(tmp_path):
    from tests.test_trainer import make_trainer

    tr = make_trainer(tmp_path, value_loss_standardized=True)
    tr.critic.head.out_mean.fill_(0.5)
    tr.critic.head.out_scale.fill_(0.25)
    g = torch.Generator().manual_seed(0)
    v, r = torch.randn(6, 1, generator=g), torch.randn(6, 1, generator=g)
    mask = torch.ones(6, 1, dtype=torch.bool)
    from critic_align.value_fit import value_loss

    loss, _ = value_loss(tr.critic, tr.config, tr.rewards.names, v, None, r, mask)
    torch.testing.assert_close(loss, (0.5 * (v - r) ** 2).mean() / 0.25**2)
    tr.config.value_loss_standardized = False
    loss_raw, _ = value_loss(tr.critic, tr.config, tr.rewards.names, v, None, r, mask)
    torch.testing.assert_close(loss_raw, (0.5 * (v - r) ** 2).mean())


def test_gamma_lambda_one_gives_return_minus_value():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(4, 6, 2, generator=g)
    R = torch.randn(4, 2, generator=g)
    adv, ret = gae(terminal_rewards(R, 6), values, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, R[:, None, :] - values)
    torch.testing.assert_close(ret, R[:, None, :].expand_as(values))


# ---------------------------------------------------------------------------------------------
# diagnostics


def test_value_report_hand_values():
    # 2 samples, 4 steps (4 buckets of one step), 1 head
    returns = torch.tensor([[1.0] * 4, [3.0] * 4]).unsqueeze(-1)
    values = torch.tensor([[1.0, 1.5, 2.0, 1.0], [3.0, 2.5, 2.0, 3.0]]).unsqueeze(-1)
    rep = value_report(values, returns, torch.ones(2, 1, dtype=torch.bool), ["r"])
    assert rep["value_ev_steps_0-0"] == pytest.approx(1.0)
    assert rep["value_ev_steps_1-1"] == pytest.approx(1 - 0.25 / 1.0)  # residuals ±0.5, Var(R) = 1
    assert rep["value_ev_steps_2-2"] == pytest.approx(0.0)
    assert rep["value_calib_steps_1-1"] == pytest.approx(0.0)
    values2 = values + 0.5
    assert value_report(values2, returns, torch.ones(2, 1, dtype=torch.bool), ["r"])["value_calib_steps_0-0"] == \
        pytest.approx(0.5)


def test_within_prompt_diversity_hand_values():
    s = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 1.0]]).view(4, 1, 1, 2)
    d = within_prompt_diversity(s, ["a", "a", "b", "b"])
    # prompt a: one pair at distance 5; b: identical -> 0.  pixel std: a: (1.5 + 2)/2 = 1.75, b: 0
    assert d["pairwise_l2"] == pytest.approx(2.5)
    assert d["pixel_std"] == pytest.approx(0.875)
    with pytest.raises(ValueError):
        within_prompt_diversity(s[:2], ["a", "b"])


def test_advantage_scale_rewards_divides_by_the_reward_std():
    from critic_align.advantages import combine_advantages

    g = torch.Generator().manual_seed(0)
    adv = torch.randn(6, 3, 1, generator=g)
    mask = torch.ones(6, 1, dtype=torch.bool)
    w = torch.ones(1)
    sigma = torch.tensor([2.0])
    for agg in ("normalize_then_sum", "sum_then_normalize"):
        out = combine_advantages(adv, w, mask, agg, True, reward_std=sigma)
        torch.testing.assert_close(out, (adv[..., 0] - adv.mean()) / 2.0, atol=1e-6, rtol=1e-6)
        # default: whitened by the advantages' own std
        own = combine_advantages(adv, w, mask, agg, True)
        torch.testing.assert_close(own, (adv[..., 0] - adv.mean()) / adv.std(unbiased=False), atol=1e-6, rtol=1e-6)


def test_trajectory_states_rows_and_cat():
    from critic_align.value_data import ValueBatch, trajectory_states

    latents = torch.arange(2 * 4 * 1).float().view(2, 4, 1)  # B=2, T=3 (+1 final)
    returns = torch.tensor([[[1.0], [2.0], [3.0]], [[4.0], [5.0], [6.0]]])
    rewards = torch.tensor([[3.0], [float("nan")]])
    cond = torch.tensor([10, 11])
    vb = trajectory_states(latents, torch.tensor([30, 20, 10]), cond, returns, rewards)
    x, t, c, r, m, x0r = vb.rows(torch.arange(6))
    assert x0r is None  # no x0_rewards given
    assert x[:, 0].tolist() == [0, 1, 2, 4, 5, 6] and t.tolist() == [30, 20, 10] * 2
    assert c.tolist() == [10, 10, 10, 11, 11, 11] and r[:, 0].tolist() == [1, 2, 3, 4, 5, 6]
    assert m[:, 0].tolist() == [True] * 3 + [False] * 3
    both = ValueBatch.cat([vb, vb])
    assert len(both) == 12 and both.rows(torch.tensor([7]))[2].tolist() == [10]
    # with x0 rewards (B, T, K): row b·T + k carries trajectory b's step k, through rows() and cat()
    x0_rewards = torch.tensor([[[0.25], [0.5], [0.75]], [[1.0], [1.25], [1.5]]])  # exact in float32
    vr = trajectory_states(latents, torch.tensor([30, 20, 10]), cond, returns, rewards, x0_rewards)
    assert vr.rows(torch.tensor([1, 5]))[5][:, 0].tolist() == [0.5, 1.5]
    assert ValueBatch.cat([vr, vr]).rows(torch.tensor([10]))[5][:, 0].tolist() == [1.25]
    with pytest.raises(ValueError, match="x0_reward"):
        ValueBatch.cat([vb, vr])


def test_td_lambda_pretraining_targets_are_gae_returns(tmp_path, monkeypatch):
    from critic_align import value_fit
    from critic_align.collect import critic_values
    from tests.test_trainer import make_trainer

    tr = make_trainer(tmp_path, value_pretrain_target="td_lambda", gae_lambda=0.5, value_pretrain_epochs=1)
    seen = {}
    orig = value_fit.fit_values

    def spy(ctx, vb, passes, *a, **k):
        seen["returns"] = vb.returns.clone()
        return orig(ctx, vb, passes, *a, **k)

    monkeypatch.setattr(value_fit, "fit_values", spy)
    # the rollout the pretraining will draw, and its values before fitting
    state = tr.generator.get_state()
    ro = tr.rollout(tr.prompt_iter.batch(tr.config.prompts_per_epoch, tr.config.group_size))
    tr.critic.head.set_output_scale(ro.rewards)
    values = critic_values(tr.models, ro)
    tr.generator.set_state(state)
    tr.prompt_iter.load_state_dict({"seed": tr.config.seed, "pass_index": 0, "position": 0})
    tr.reward_queries = 0
    tr.pretrain_value()
    _, ret = gae(terminal_rewards(ro.rewards.float(), ro.num_steps), values, 1.0, 0.5)
    torch.testing.assert_close(seen["returns"], ret.reshape(-1, 1))


def test_value_pretrain_lr_decay_schedule_and_restore(tmp_path, monkeypatch):
    from critic_align import value_fit
    from tests.test_trainer import make_trainer

    tr = make_trainer(tmp_path, value_pretrain_lr_decay=True, value_pretrain_epochs=4, critic_learning_rate=2e-3)
    seen = []
    orig = value_fit.fit_values

    def spy(*a, **k):
        seen.append(tr.optimizer.param_groups[-1]["lr"])
        return orig(*a, **k)

    monkeypatch.setattr(value_fit, "fit_values", spy)
    tr.pretrain_value()
    assert seen == pytest.approx([2e-3, 1.5e-3, 1e-3, 0.5e-3])
    assert tr.optimizer.param_groups[-1]["lr"] == 2e-3 and tr.optimizer.param_groups[0]["lr"] == tr.config.learning_rate
