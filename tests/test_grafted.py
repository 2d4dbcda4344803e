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


# ------------------------------------------------------------------------------------------------------
# the composition graft (the tiny text-to-image tasks' dense reward through the digit classifier per cell)
def _crc_encode(prompts):
    """A stand-in text encoder: a fixed random (3, 5) embedding per prompt (crc32-seeded, stable across processes)."""
    import zlib

    return torch.stack([torch.randn(3, 5, generator=torch.Generator().manual_seed(zlib.crc32(p.encode())))
                        for p in prompts])


def test_composition_refactor_reproduces_the_stored_values():
    """tests/data/composition_reference.pt holds the reward's values computed by the code before judge_cells and
    pixel_features were factored out of judge_compositions (tests/data/make_composition_reference.py)."""
    from pathlib import Path

    from critic_align.rewards.composition import ATTRIBUTES, CompositionScore, judge_compositions
    from critic_align.rewards.digits import load_digit_classifier

    ref = torch.load(Path(__file__).parent / "data" / "composition_reference.pt")
    j = judge_compositions(ref["images"], ref["prompts"], load_digit_classifier())
    assert torch.equal(j.score, ref["score"]) and torch.equal(j.all_correct, ref["all_correct"])
    for a in ATTRIBUTES:
        assert torch.equal(j.prob[a].nan_to_num(-1.0), ref["prob"][a].nan_to_num(-1.0)), a
        assert torch.equal(j.correct[a].nan_to_num(-1.0), ref["correct"][a].nan_to_num(-1.0)), a
    assert torch.equal(CompositionScore()(ref["images"], ref["prompts"]), ref["score"])
    assert ref["score"].std() > 0.1 and 0 < ref["all_correct"].mean() < 1  # the fixture is not one value


def test_composition_graft_split_reproduces_the_reward():
    """early → late → read-out with no stitch is the reward itself (the same classifier, the same judge_cells), on
    rendered and noisy images and on prompts of every kind."""
    from pathlib import Path

    from critic_align.grafted import PromptTable, composition_graft
    from critic_align.rewards.composition import CompositionScore

    ref = torch.load(Path(__file__).parent / "data" / "composition_reference.pt")
    reward = CompositionScore()
    table = PromptTable(_crc_encode, ref["prompts"])
    g = composition_graft(reward, table)
    images, cond = ref["images"], _crc_encode(ref["prompts"])
    with torch.no_grad():
        h = g.early(images)
        v = g.readout(g.late(h), cond, images)
    assert (g.channels, g.size) == (32, (16, 16)) and h.shape == (len(images), 32, 16, 16)
    torch.testing.assert_close(v, reward(images, ref["prompts"]), rtol=0, atol=1e-6)
    # the tiling puts cell k's activations over cell k: a cell's map depends on that cell's pixels only
    bumped = images.clone()
    bumped[:, :, :16, 16:] = 1.0  # cell 1 (top right) fully inked
    with torch.no_grad():
        d = (g.early(bumped) - h).abs().amax(dim=(0, 1))
    assert d[:8, 8:].amax() > 0 and d[:8, :8].amax() == 0 and d[8:, :].amax() == 0


def test_prompt_table_resolves_rows_and_refuses_unknown_ones():
    from critic_align.grafted import PromptTable

    prompts = ["a red 3", "two blue 7s", "a green 1 left of a red 2", "a red 3"]
    table = PromptTable(_crc_encode, prompts[:3])
    order = [2, 0, 0, 1, 2]
    assert table(_crc_encode([prompts[i] for i in order])) == [prompts[i] for i in order]
    assert table(_crc_encode(prompts[:3]) * (1 + 1e-6)) == prompts[:3]  # rounding of the encoder's output
    with pytest.raises(ValueError, match="none of the 3 prompts.*prompt_table.add"):
        table(_crc_encode(["a yellow 5"]))
    table.add(["a yellow 5"])
    assert table(_crc_encode(["a yellow 5", "a red 3"])) == ["a yellow 5", "a red 3"]


def _t2i_trainer(task, tmp_path, **over):
    from critic_align.api import build_trainer
    from critic_align.train.registry import load_run_config

    o = {"critic_body": "grafted", "batch_size": 16, "group_size": 8, "value_pretrain_epochs": 1,
         "value_pretrain_passes": 1, "output_dir": str(tmp_path), "progress": False, "grid_every": 0,
         "checkpoint_every": 0, "log_tensorboard": False, "eval_every": 0}
    return build_trainer(load_run_config(task, o | over))


@pytest.fixture(scope="module", params=["t2i", "t2i_sd3"])
def t2i(request, tmp_path_factory):
    from critic_align.rollout import sample_trajectories

    torch.manual_seed(0)
    tr = _t2i_trainer(request.param, tmp_path_factory.mktemp(request.param))
    prompts = list(tr.task.prompts[:24])
    cond = tr.task.encode(prompts)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn((len(prompts), *tr.task.latent_shape), generator=g)
    with torch.no_grad():
        ro = sample_trajectories(tr.policy_output, tr.step, x_T, tr.timesteps, cond, prompts, generator=g)
    return request.param, tr, prompts, cond, ro.latents


def test_composition_graft_at_t0_reads_the_reward_of_clean_samples(t2i):
    task, tr, prompts, cond, latents = t2i
    x0 = latents[:, -1]
    with torch.no_grad():
        v = tr.critic(x0, torch.zeros(len(prompts)), cond)[:, 0]
    r = tr.rewards(tr.task.decode(x0), prompts)[:, 0]
    # stated tolerance: SD3 at σ = 0 has x̂0 = x_t exactly; SD1.5 at t = 0 has x̂0 = (x_t − √(1−ᾱ_0)·ε̂)/√ᾱ_0, off by
    # about 0.03·ε̂ in the latent (ᾱ_0 = 1 − β_0 of its scaled-linear schedule)
    tol = 1e-5 if task == "t2i_sd3" else 1e-2
    assert (v - r).abs().max() < tol, (v - r).abs().max()
    assert r.std() > 0.05  # the samples' rewards differ: the match is not a constant


def assert_critic_gradient_matches_fd(tr, c, latents, h: float, rtol: float) -> None:
    """The grafted critic's gradient in x_t (float64, stitch and logit scale perturbed off zero so the gradient flows
    through them as well as x̂0) against central finite differences along a random direction; ``c``: the first 4
    rows' conditioning in float64.  The critic is put back (zero stitch, float32) afterwards."""
    critic, vae = tr.critic, tr.task.pipe.vae
    nets = [critic, critic.trunk.model, vae]
    for m in nets:
        m.double()
    with torch.no_grad():
        for p in list(critic.stitch.parameters()) + list(critic.logit_scale.parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype) * 0.05)
    try:
        k = 8
        x = latents[:4, k].double().clone().requires_grad_(True)
        t = tr.timesteps[k].repeat(4)
        v = critic(x, t, c)[:, 0]
        assert v.dtype == torch.float64
        (grad,) = torch.autograd.grad(v.sum(), x)
        d = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        with torch.no_grad():
            fd = (critic(x + h * d, t, c)[:, 0] - critic(x - h * d, t, c)[:, 0]) / (2 * h)
        an = (grad * d).flatten(1).sum(1)
        assert an.abs().max() > 1e-4, an  # a real gradient
        torch.testing.assert_close(an, fd, rtol=rtol, atol=1e-7)
    finally:
        with torch.no_grad():
            for p in list(critic.stitch.parameters()) + list(critic.logit_scale.parameters()):
                p.zero_()
        for m in nets:
            m.float()


def test_composition_graft_gradient_in_x_t_matches_finite_differences(t2i):
    task, tr, prompts, cond, latents = t2i
    c = cond[:4].to(torch.float64) if isinstance(cond, torch.Tensor) else type(cond)(
        cond.embeds[:4].double(), cond.pooled[:4].double())
    # float64 finite differences: SD1.5's UNet runs in float64 throughout; SD3's transformer normalises q and k with
    # diffusers' RMSNorm, whose variance is computed in float32, so its outputs carry float32 rounding (~1e-7
    # relative) and the difference quotient needs a larger step
    h, rtol = (1e-3, 2e-3) if task == "t2i_sd3" else (1e-6, 1e-4)
    assert_critic_gradient_matches_fd(tr, c, latents, h, rtol)


def test_composition_graft_trains_from_the_config(t2i):
    task, tr, prompts, cond, latents = t2i
    before = [p.detach().clone() for p in tr.critic.stitch.parameters()]
    tr.pretrain_value()
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.critic.stitch.parameters()))
    assert all(p.requires_grad is False for p in tr.critic.reward_nets.parameters())
