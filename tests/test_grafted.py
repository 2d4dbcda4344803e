"""The reward-grafted critic (critic_align/grafted.py) on the shipped digits UNet and digit classifier."""

import pytest
import torch

from critic_align.backbones import UNetAdapter
from critic_align.backbones.lora import LoraAdapters
from critic_align.grafted import build_grafted_critic, digit_graft
from critic_align.rewards import MultiReward
from critic_align.rewards.digits import DigitProb
from critic_align.steps import NoiseSchedule
from critic_align.tasks.digits import DigitsTask, load_base_model, load_digits_dataset


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    model, scheduler = load_base_model()
    adapter = UNetAdapter(model).requires_grad_(False)
    adapters = LoraAdapters(model)
    adapters.add("policy", rank=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    reward = DigitProb(temperature=6.0)
    task = DigitsTask()
    schedule = NoiseSchedule.from_scheduler(scheduler)
    example = (torch.zeros(1, 1, 16, 16), torch.tensor([999]), torch.tensor([3]))
    critic = build_grafted_critic(adapter, adapters, schedule, task.decode, MultiReward([reward]), example,
                                  lora_target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    adapters.activate("policy")
    images, labels = load_digits_dataset()
    return critic, reward, task, images[:64].float(), labels[:64].long(), schedule


def test_graft_split_reproduces_the_classifier():
    reward = DigitProb(temperature=6.0)
    g = digit_graft(reward)
    x = torch.rand(8, 1, 16, 16) * 2 - 1
    labels = torch.arange(8) % 10
    torch.testing.assert_close(g.readout(g.late(g.early(x)), labels), reward(x, [str(int(i)) for i in labels]))
    assert (g.channels, g.size) == (32, (8, 8))


def test_at_t0_reads_the_reward_of_clean_samples(parts):
    critic, reward, task, images, labels, _ = parts
    with torch.no_grad():
        v = critic(images, torch.zeros(len(images), dtype=torch.long), labels)[:, 0]
    r = reward(images, [str(int(i)) for i in labels])
    # stated tolerance: at t = 0 (ᾱ = 1 − β_0) x̂0 differs from x_t by √(1−ᾱ)·ε̂ ≈ 0.01·ε̂
    assert (v - r).abs().max() < 0.02, (v - r).abs().max()
    assert r.std() > 0.05  # the samples' rewards differ: the match is not a constant


def test_gradient_in_x_t_matches_finite_differences(parts):
    critic, _, _, images, labels, schedule = parts
    critic64 = critic.double()
    critic.trunk.model.double()
    try:
        t = torch.full((4,), 400, dtype=torch.long)
        g = torch.Generator().manual_seed(0)
        abar = schedule.alpha_bar(t).double().view(-1, 1, 1, 1)
        x = (abar.sqrt() * images[:4].double() + (1 - abar).sqrt() * torch.randn(4, 1, 16, 16, generator=g,
                                                                                 dtype=torch.float64))
        x.requires_grad_(True)
        v = critic64(x, t, labels[:4])[:, 0]
        (grad,) = torch.autograd.grad(v.sum(), x)
        d = torch.randn(x.shape, generator=g, dtype=torch.float64)
        h = 1e-5
        with torch.no_grad():
            fd = (critic64(x + h * d, t, labels[:4])[:, 0] - critic64(x - h * d, t, labels[:4])[:, 0]) / (2 * h)
        an = (grad * d).flatten(1).sum(1)
        assert an.abs().max() > 1e-4  # a real gradient
        torch.testing.assert_close(an, fd, rtol=1e-4, atol=1e-7)
    finally:
        critic.float()
        critic.trunk.model.float()


def test_starts_as_the_x0_reward_and_trains_only_its_own_parameters(parts):
    critic, reward, task, images, labels, schedule = parts
    params = critic.trainable_parameters()
    names = {id(p) for p in params}
    assert all(id(p) not in names for p in critic.reward_nets.parameters())
    assert all(p.requires_grad is False for p in critic.reward_nets.parameters())
    # zero stitch and zero logit scale: V = r(decode(x̂0)) of the critic's (= base) prediction at any t
    t = torch.full((8,), 600, dtype=torch.long)
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        v = critic(x, t, labels[:8])[:, 0]
        with critic.adapters.using(critic.adapter_name):
            out = critic.trunk.predict(x, t, labels[:8])
        abar = schedule.alpha_bar(t).float().view(-1, 1, 1, 1)
        x0 = task.decode((x - (1 - abar).sqrt() * out) / abar.sqrt())
    torch.testing.assert_close(v, reward(x0, [str(int(i)) for i in labels[:8]]), rtol=1e-4, atol=1e-5)
    loss = critic(x, t, labels[:8]).sum()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.logit_scale.parameters())
    critic.zero_grad(set_to_none=True)


def test_trainer_builds_and_trains_it_from_the_config(tmp_path):
    from critic_align.api import build_trainer
    from critic_align.grafted import GraftedCritic
    from critic_align.train.registry import load_run_config

    run = load_run_config("digits", {"critic_body": "grafted", "batch_size": 16, "group_size": 8,
                                     "value_pretrain_epochs": 1, "value_pretrain_passes": 1, "num_epochs": 1,
                                     "output_dir": str(tmp_path), "progress": False, "grid_every": 0,
                                     "checkpoint_every": 0, "log_tensorboard": False, "eval_every": 0})
    tr = build_trainer(run)
    assert isinstance(tr.critic, GraftedCritic)
    before = [p.detach().clone() for p in tr.critic.stitch.parameters()]
    tr.pretrain_value()
    row = tr.train_epoch().metrics
    assert any(k.startswith("value_loss") for k in row)
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.critic.stitch.parameters()))
    tensors, state = tr.state_dict()
    assert any(k.startswith("critic.graft.stitch") for k in tensors) and any(k.startswith("critic.lora.") for k in tensors)
