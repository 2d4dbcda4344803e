"""``critic_x0_reward``: the value head also reads r(decode(x̂0(x_t))).

Checked: the head's gate starts at zero (the same values as a head without it) and adds a(e)·(r̂0 − m) by hand;
the recorded x0 rewards equal a slow per-state reference loop (full trajectories and an SDE window); batched values
equal per-row calls; value pretraining and PPO train the gate; the rows are counted and survive a checkpoint; bad
configurations fail with errors that name the fix; steering SMC with such a critic equals a slow per-row reference,
and every path that cannot supply r̂0 (guidance, soft values, the diffusers callbacks) refuses it by name."""

from __future__ import annotations

import pytest
import torch
from test_trainer import make_trainer, perturb_lora

from critic_align.backbones.base import Features
from critic_align.checkpoint import latest_checkpoint
from critic_align.collect import critic_values
from critic_align.config import PPOConfig
from critic_align.critic import ValueHead


def _features(b=5, d=8, temb=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Features(levels=(torch.randn(b, d, 2, 2, generator=g),), temb=torch.randn(b, temb, generator=g))


def test_head_gate_starts_at_zero_and_adds_gated_standardised_x0_reward():
    torch.manual_seed(0)
    plain = ValueHead(8, 6, num_rewards=2, hidden_dim=16, num_heads=2)
    torch.manual_seed(0)
    gated = ValueHead(8, 6, num_rewards=2, hidden_dim=16, num_heads=2, reads_x0_reward=True)
    with torch.no_grad():
        for head in (plain, gated):
            head.out_mean.copy_(torch.tensor([0.5, -1.0]))
            head.out_scale.copy_(torch.tensor([2.0, 0.25]))
    feats = _features()
    r0 = torch.tensor([[1.0, 0.0], [0.5, -1.0], [2.0, 3.0], [0.0, 0.0], [-1.0, float("nan")]])
    base = plain(feats)
    torch.testing.assert_close(gated(feats, r0), base)  # zero gate: the same values as a head without it
    with torch.no_grad():
        gated.x0_gate[1].bias.copy_(torch.tensor([0.3, 0.7]))  # a(e) = (0.3, 0.7) for every state
    # V = m + s·(raw + a·(r0 − m)/s) = V_plain + a·(r0 − m); a NaN r0 (reward not applicable) adds nothing
    expect = base + torch.tensor([0.3, 0.7]) * (r0 - torch.tensor([0.5, -1.0]))
    expect[4, 1] = base[4, 1]
    torch.testing.assert_close(gated(feats, r0), expect)


def test_head_x0_reward_argument_errors():
    gated = ValueHead(8, 6, num_rewards=1, hidden_dim=16, num_heads=2, reads_x0_reward=True)
    plain = ValueHead(8, 6, num_rewards=1, hidden_dim=16, num_heads=2)
    feats = _features()
    with pytest.raises(ValueError, match="pass x0_reward"):
        gated(feats)
    with pytest.raises(ValueError, match="without critic_x0_reward"):
        plain(feats, torch.zeros(5, 1))
    with pytest.raises(ValueError, match=r"x0_reward must be \(B, K\)"):
        gated(feats, torch.zeros(5, 2))


def reference_x0_rewards(tr, ro):
    """Slow reference: per trajectory and step, the policy's x0 prediction at the recorded state, decoded and
    scored alone."""
    out = torch.empty(ro.batch_size, ro.num_steps, 1)
    for b in range(ro.batch_size):
        for k in range(ro.num_steps):
            x = ro.latents[b:b + 1, k]
            t = ro.timesteps[k].expand(1)
            cond = ro.cond[b:b + 1]
            with torch.no_grad():
                x0 = tr.step(tr.policy_output(x, t, cond), x, t, ro.prev_timesteps[k].expand(1),
                             prev_sample=ro.latents[b:b + 1, k + 1]).x0_pred
                out[b, k] = tr.rewards(tr.task.decode(x0), [ro.prompts[b]])[0]
    return out


@pytest.mark.parametrize("window", [None, (1, 3)], ids=["full", "window"])
def test_recorded_x0_rewards_match_slow_reference(tmp_path, window):
    tr = make_trainer(tmp_path, critic_x0_reward=True)
    perturb_lora(tr)
    ro = tr.rollout(tr.prompt_iter.batch(2, 4), window=window)
    assert ro.x0_preds is None  # scored, then dropped
    assert ro.x0_rewards.shape == (8, ro.num_steps, 1)
    torch.testing.assert_close(ro.x0_rewards, reference_x0_rewards(tr, ro), rtol=1e-5, atol=1e-5)
    assert tr.x0_reward_rows == 8 * ro.num_steps and tr.reward_queries == 8  # counted apart from the samples'
    # batched values over the rollout == one critic call per state with its own x0 reward
    values = critic_values(tr.models, ro)
    for b in (0, 5):
        for k in range(ro.num_steps):
            v = tr.critic(ro.latents[b:b + 1, k], ro.timesteps[k].expand(1), ro.cond[b:b + 1],
                          ro.x0_rewards[b:b + 1, k])
            torch.testing.assert_close(values[b, k], v[0].float(), rtol=1e-5, atol=1e-6)


def test_without_the_option_nothing_is_recorded(tmp_path):
    tr = make_trainer(tmp_path)
    ro = tr.rollout(tr.prompt_iter.batch(2, 4))
    assert ro.x0_rewards is None and tr.x0_reward_rows == 0 and not tr.critic.head.reads_x0_reward


def test_training_moves_the_gate_counts_rows_and_checkpoints_them(tmp_path):
    tr = make_trainer(tmp_path, critic_x0_reward=True, num_inference_steps=4)
    gate = tr.critic.head.x0_gate[1]
    assert gate.weight.abs().sum() == 0 and gate.bias.abs().sum() == 0
    tr.pretrain_value()
    after_pretrain = gate.bias.detach().clone()
    assert after_pretrain.abs().sum() > 0  # value pretraining fits the gate
    res = tr.train_epoch()
    assert not torch.equal(gate.bias.detach(), after_pretrain)  # and PPO's value loss keeps fitting it
    # one pretraining batch and one epoch of 8 trajectories x 4 states
    assert res.metrics["x0_reward_rows"] == tr.x0_reward_rows == 2 * 8 * 4
    tr.save(tmp_path / "ck")
    fresh = make_trainer(tmp_path / "b", critic_x0_reward=True, num_inference_steps=4)
    fresh.load(latest_checkpoint(tmp_path / "ck"))
    assert fresh.x0_reward_rows == tr.x0_reward_rows
    torch.testing.assert_close(fresh.critic.head.x0_gate[1].bias, gate.bias)


@pytest.mark.parametrize("over, needle", [
    ({"advantage": "grpo"}, "needs advantage: gae"),
    ({"advantage": "gae", "value_perturbed_per_sample": 2}, "value_perturbed_per_sample: 0"),
    ({"advantage": "grpo", "algorithm": "nft"}, "algorithm: ppo"),
    ({"advantage": "gae", "critic_x0_reward": "yes"}, "true or false"),
])
def test_config_errors(over, needle):
    with pytest.raises(ValueError, match=needle):
        PPOConfig(**{"critic_x0_reward": True, **over})


def _x0_trainer(tmp_path):
    tr = make_trainer(tmp_path, critic_x0_reward=True, num_inference_steps=4, eta=1.0)
    perturb_lora(tr, "policy")
    with torch.no_grad():
        tr.critic.head.out_scale.fill_(0.5)
        tr.critic.head.x0_gate[1].bias.fill_(0.8)  # r̂0 moves the value: a wrong or missing r̂0 would show
    return tr


def test_smc_with_an_x0_critic_equals_a_slow_reference(tmp_path):
    """smc's potential for an x0-reading critic == λ·V(x_t, r(decode(x̂0(x_t)))) computed by hand per row,
    with the denoiser called again at each state (the engine reuses the step's own output)."""
    from critic_align.steering import Resampling, SteerOptions, smc
    from critic_align.steering.values import X0CriticValueFn, critic_value_fn

    tr = _x0_trainer(tmp_path)
    prompts = tr.prompt_iter.batch(3, 1)
    cond = tr.task.encode(prompts)
    n, lam = 3, 4.0
    value_fn = critic_value_fn(tr.critic, x0_rewards=tr.rewards)
    assert isinstance(value_fn, X0CriticValueFn)

    def reference(x, t, c):  # one row at a time, nothing shared with the engine's x0 path
        vals = []
        for i in range(x.shape[0]):
            xi, ti, ci = x[i:i + 1], t[i:i + 1], None if c is None else c[i:i + 1]
            out = tr.policy_output(xi, ti, ci)
            t_prev = tr.step.schedule.prev_timesteps(ti)
            x0 = tr.step(out, xi, ti, t_prev, prev_sample=xi).x0_pred
            r0 = tr.rewards(tr.task.decode(x0), [prompts[i // n]])
            vals.append(tr.critic(xi, ti, ci, x0_reward=r0.float())[:, 0])
        return torch.cat(vals)

    def run(fn):
        x_T = torch.randn((3 * n, *tr.task.latent_shape), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return smc(tr.policy_output, tr.step, x_T, tr.timesteps, cond, prompts, num_particles=n,
                       reward_fn=lambda s, ps: tr.rewards.weighted_sum(tr.rewards(s, ps)),
                       options=SteerOptions(decode=tr.task.decode), value_fn=fn, potential="value", lam=lam,
                       resampling=Resampling(ess_threshold=1.0), generator=torch.Generator().manual_seed(1))

    got, ref = run(value_fn), run(reference)
    assert got.resampled.any()  # the potentials did act
    torch.testing.assert_close(got.log_weights, ref.log_weights, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.particles, ref.particles, rtol=1e-4, atol=1e-5)
    steps = len(tr.timesteps)
    # x0 decodes + reward calls at every state, plus the final samples
    assert got.cost.decode_rows == got.cost.reward_rows == 3 * n * (steps + 1)
    assert got.cost.critic_forward_rows == 3 * n * steps


def test_an_x0_critic_is_refused_where_it_cannot_get_its_x0_reward(tmp_path):
    from critic_align.steering import SteerOptions, steer
    from critic_align.steering.diffusers import ScoreGuidedScheduler, SMCCallback
    from critic_align.steering.values import critic_value_fn
    from critic_align.train.steer import SteeringRun, steer_run

    tr = _x0_trainer(tmp_path)
    with pytest.raises(ValueError, match="needs x0_rewards"):
        critic_value_fn(tr.critic)
    with pytest.raises(ValueError, match="only for a critic trained with critic_x0_reward"):
        critic_value_fn(make_trainer(tmp_path / "plain").critic, x0_rewards=tr.rewards)
    value_fn = critic_value_fn(tr.critic, x0_rewards=tr.rewards)
    x = torch.randn(2, *tr.task.latent_shape)
    with pytest.raises(ValueError, match="only steering.smc"):
        value_fn(x, tr.timesteps[:1].repeat(2), None)
    x_T = torch.randn(4, *tr.task.latent_shape)
    prompts = tr.prompt_iter.batch(2, 1)
    common = dict(num_particles=2, reward_fn=lambda s, ps: s.mean((1, 2, 3)),
                  options=SteerOptions(decode=tr.task.decode), value_fn=value_fn)
    for method, kw in (("guidance+bon", {"scale": 1.0}), ("smc", {"potential": "soft_value", "lam": 1.0}),
                       ("smc", {"potential": "value", "guidance_scale": 1.0})):
        with pytest.raises(ValueError, match="only as an SMC potential"):
            steer(method, tr.policy_output, tr.step, x_T, tr.timesteps, tr.task.encode(prompts), prompts, **common,
                  **kw)
    with pytest.raises(ValueError, match="SMCCallback: this critic reads"):
        SMCCallback(value_fn, num_particles=2)
    with pytest.raises(ValueError, match="ScoreGuidedScheduler: this critic reads"):
        ScoreGuidedScheduler(object(), value_fn, 1.0)
    run = SteeringRun(tr.models, tr.task, tr.timesteps, tr.rewards, tr.eval_rewards)
    with pytest.raises(ValueError, match="--method guidance"):
        steer_run(run, "guidance", prompts, scale=1.0)
    res, evals = steer_run(run, "smc", prompts, particles=2, lam=2.0, ess_threshold=0.9)  # supplies r̂0
    assert res.cost.decode_rows == 2 * 2 * (len(tr.timesteps) + 1) and set(evals) >= {"bright"}


def test_the_readout_record(tmp_path):
    """X0Readout: from the config and from a built critic; what it scores, counts and reports; the head's inputs."""
    from critic_align.x0_reward import LATENT_ONLY, WITH_X0_REWARD, X0Readout, head_input_at, head_input_rows, reads_x0_reward

    assert X0Readout.from_config(PPOConfig()) is LATENT_ONLY
    assert X0Readout.from_config(PPOConfig(critic_x0_reward=True)) is WITH_X0_REWARD
    tr = make_trainer(tmp_path, critic_x0_reward=True)
    assert X0Readout.of_critic(tr.critic) is WITH_X0_REWARD and reads_x0_reward(tr.critic)
    assert X0Readout.of_critic(None) is LATENT_ONLY and not reads_x0_reward(object())
    assert WITH_X0_REWARD.rows(8, 4) == 32 and LATENT_ONLY.rows(8, 4) == 0
    assert WITH_X0_REWARD.metrics(32) == {"x0_reward_rows": 32} and LATENT_ONLY.metrics(32) == {}
    preds = torch.randn(2, 3, *tr.task.latent_shape)
    prompts = tr.prompt_iter.batch(2, 1)
    assert LATENT_ONLY.score(tr.task, tr.rewards, preds, prompts, "cpu") is None
    with pytest.raises(ValueError, match="record_x0=True"):
        WITH_X0_REWARD.score(tr.task, tr.rewards, None, prompts, "cpu")
    got = WITH_X0_REWARD.score(tr.task, tr.rewards, preds, prompts, "cpu")
    for b in range(2):  # each trajectory's prompt, every step's prediction scored alone
        for k in range(3):
            torch.testing.assert_close(got[b, k], tr.rewards(tr.task.decode(preds[b, k:k + 1]), [prompts[b]])[0].float())
    x0r = torch.arange(12.0).view(2, 3, 2)
    assert head_input_rows(None, "cpu") is None and head_input_at(None, torch.tensor([0]), torch.tensor([1]), "cpu") is None
    assert torch.equal(head_input_rows(x0r, "cpu")[4], x0r[1, 1])  # row b·T + k is trajectory b's state k
    assert torch.equal(head_input_at(x0r, torch.tensor([1, 0]), torch.tensor([2, 0]), "cpu"), x0r[[1, 0], [2, 0]])
