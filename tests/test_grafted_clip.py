"""The CLIP-family grafts of the reward-grafted critic (critic_align/grafted_clip.py) on tiny random CLIP models: CLIP
score, PickScore, the LAION aesthetic predictor and HPSv2 (its open_clip layout converted), and the refactor of the
rewards' score into score_embeds (tests/data/clip_reference.pt, written by the code before it)."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch

from critic_align.grafted import PromptTable, graft_for
from critic_align.grafted_clip import clip_graft
from critic_align.rewards import CLIPScore, HPSv2, LaionAesthetic, PickScore

transformers = pytest.importorskip("transformers")

from tests.test_grafted import assert_critic_gradient_matches_fd  # noqa: E402
from tests.test_hpsv2 import open_clip_state_dict  # noqa: E402
from tests.test_hpsv2 import tiny_tokenizer as hps_tokenizer  # noqa: E402
from tests.test_real_rewards import tiny_processor, tiny_tokenizer, write_head  # noqa: E402

REFERENCE = Path(__file__).parent / "data" / "clip_reference.pt"
KINDS = ["clip_score", "clip_score_100_clipped", "pickscore", "aesthetic", "hpsv2"]


@pytest.fixture(scope="module")
def ref():
    return torch.load(REFERENCE)


@pytest.fixture(scope="module")
def model_dirs(ref, tmp_path_factory):
    """The fixture's tiny models saved as the rewards load them (tests/data/make_clip_reference.py made them)."""
    from transformers import CLIPConfig, CLIPModel

    root = tmp_path_factory.mktemp("clip_graft")
    model = CLIPModel(CLIPConfig.from_dict(ref["clip_config"]))
    model.load_state_dict(ref["clip_state"])
    model.save_pretrained(root / "clip")
    tiny_tokenizer().save_pretrained(root / "clip")
    tiny_processor().save_pretrained(root / "clip")
    write_head(root / "head.safetensors")
    htok = hps_tokenizer()
    torch.save(open_clip_state_dict(len(htok)), root / "hps.pt")
    htok.save_pretrained(root / "hps_processor")
    tiny_processor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(
        root / "hps_processor")
    return root


def make_reward(kind, root):
    return {
        "clip_score": lambda: CLIPScore(root / "clip"),
        "clip_score_100_clipped": lambda: CLIPScore(root / "clip", scale=100, clip_at_zero=True),
        "pickscore": lambda: PickScore(root / "clip"),
        "aesthetic": lambda: LaionAesthetic(root / "head.safetensors", model=root / "clip"),
        "hpsv2": lambda: HPSv2(root / "hps.pt", processor=root / "hps_processor", head_width=16),
    }[kind]()


def crc_encode(prompts):
    """A stand-in text encoder: a fixed random (3, 5) embedding per prompt (crc32-seeded)."""
    return torch.stack([torch.randn(3, 5, generator=torch.Generator().manual_seed(zlib.crc32(p.encode())))
                        for p in prompts])


@pytest.mark.parametrize("kind", KINDS)
def test_refactored_rewards_reproduce_the_stored_values(ref, model_dirs, kind):
    """score_embeds factored out of compute: the same values, bit for bit, as the code before (the fixture)."""
    reward = make_reward(kind, model_dirs)
    for name, x in ref["images"].items():
        got = reward(x, ref["prompts"])
        assert torch.equal(got, ref["values"][kind][name]), (kind, name, (got - ref["values"][kind][name]).abs().max())
    assert ref["values"][kind]["rgb24"].std() > 1e-3  # the fixture is not one value


@pytest.mark.parametrize("kind", KINDS)
def test_graft_split_reproduces_the_reward(ref, model_dirs, kind):
    """readout(late(early(x))) with no stitch is the reward itself, at the default split and at both ends, on images
    at the model's size, larger (the resize path) and grayscale; the conditioning rows are resolved to prompts."""
    reward = make_reward(kind, model_dirs)
    prompts = ref["prompts"]
    table = PromptTable(crc_encode, prompts)
    cond = crc_encode(prompts)
    layers = reward.model.config.vision_config.num_hidden_layers
    for split in (None, 0, 1, layers):
        g = clip_graft(reward, table, split=split)
        hidden = reward.model.config.vision_config.hidden_size
        side = reward.model.config.vision_config.image_size // reward.model.config.vision_config.patch_size
        assert (g.channels, g.size) == (2 * hidden, (side, side))
        for x in ref["images"].values():
            with torch.no_grad():
                h = g.early(x)
                v = g.readout(g.late(h), cond, x)
            assert h.shape == (len(x), g.channels, side, side)
            # stated tolerance: float32 rounding of the CLS token's mean over its copies and of the text embeddings
            # computed in another batch (padding)
            r = reward(x, prompts)
            torch.testing.assert_close(v, r, rtol=1e-5, atol=1e-5 * float(r.abs().max()))
    assert graft_for(reward, table).channels == 2 * hidden


def test_graft_of_a_bfloat16_reward_reproduces_it(ref, model_dirs):
    """dtype="bfloat16" (the tower's weights and inputs in bfloat16, embeddings compared in float32): the graft casts
    the map to the tower's dtype and the embedding back to float32 as the reward does; a float32 stitch map added to
    the bfloat16 activations (the grafted critic's) is cast back before the later layers."""
    reward = CLIPScore(model_dirs / "clip", dtype="bfloat16")
    prompts = ref["prompts"]
    g = clip_graft(reward, PromptTable(crc_encode, prompts))
    x = ref["images"]["rgb32"]
    with torch.no_grad():
        h = g.early(x)
        assert h.dtype == torch.bfloat16
        e = g.late(h + torch.zeros(h.shape))  # a float32 stitch of zeros
        v = g.readout(e, crc_encode(prompts), x)
    assert e.dtype == torch.float32
    r = reward(x, prompts)
    torch.testing.assert_close(v, r, rtol=1e-3, atol=1e-3 * float(r.abs().max()))


def test_layout_patches_on_their_grid_and_the_cls_token_in_every_position(ref, model_dirs):
    """At split 0 (embedding + pre-layernorm, both per token) a change of the top-left patch's pixels changes only the
    patch channels at grid position (0, 0) (the map lies over the image); the CLS channels are the same at every
    position; late reads the CLS token as their mean, so a stitch that is constant over positions shifts it by that
    constant, and one of zero mean over positions leaves the CLS token as it is."""
    reward = make_reward("clip_score", model_dirs)
    g = clip_graft(reward, PromptTable(crc_encode, ref["prompts"]), split=0)
    x = ref["images"]["rgb24"][:2]
    patch = reward.model.config.vision_config.patch_size
    d = reward.model.config.vision_config.hidden_size
    bumped = x.clone()
    bumped[:, :, :patch, :patch] = 0.9
    with torch.no_grad():
        h, hb = g.early(x), g.early(bumped)
        diff = (hb - h).abs().amax(dim=0)
        assert diff[:d, 0, 0].amax() > 1e-3 and diff[:d].flatten(1)[:, 1:].amax() == 0 and diff[d:].amax() == 0
        assert torch.equal(h[:, d:], h[:, d:, :1, :1].expand_as(h[:, d:]))
        # only CLS channels perturbed, by a pattern of zero mean over positions: the embedding is unchanged; by the
        # same pattern's absolute value (mean > 0: a shift of the CLS token that no layer norm removes): it changes
        v = torch.randn(d, generator=torch.Generator().manual_seed(0))
        zero_mean = torch.zeros_like(h)
        zero_mean[:, d:, 0, 0], zero_mean[:, d:, 1, 1] = v, -v
        torch.testing.assert_close(g.late(h + zero_mean), g.late(h), rtol=1e-5, atol=1e-6)
        assert (g.late(h + zero_mean.abs()) - g.late(h)).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["pickscore", "aesthetic", "hpsv2"])
def test_graft_gradient_in_the_image_matches_finite_differences(ref, model_dirs, kind):
    """float64: d readout(late(early(x) + s)) / dx against central differences, with a non-zero stitch s (the
    gradient flows through the CLS token's mean as well as the patch tokens), at the model's size and through the
    resize (images in [-0.8, 0.8]: away from the clamps)."""
    reward = make_reward(kind, model_dirs)
    prompts = ref["prompts"][:4]
    table = PromptTable(crc_encode, prompts)
    g = clip_graft(reward, table)
    nets = torch.nn.ModuleList([g.early, g.late])
    nets.double()
    try:
        gen = torch.Generator().manual_seed(0)
        for size in (24, 32):
            x = (torch.rand(4, 3, size, size, generator=gen, dtype=torch.float64) * 1.6 - 0.8).requires_grad_(True)
            with torch.no_grad():
                s = torch.randn(g.early(x).shape, generator=gen, dtype=torch.float64) * 0.05

            def f(x, s=s):
                return g.readout(g.late(g.early(x) + s), crc_encode(prompts), x)

            v = f(x)
            assert v.dtype == torch.float64
            (grad,) = torch.autograd.grad(v.sum(), x)
            d = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            h = 1e-6
            with torch.no_grad():
                fd = (f(x + h * d) - f(x - h * d)) / (2 * h)
            an = (grad * d).flatten(1).sum(1)
            assert an.abs().max() > 1e-4, an  # a real gradient
            torch.testing.assert_close(an, fd, rtol=1e-5, atol=1e-8)
    finally:
        nets.float()


def test_bad_split_and_missing_prompt_table_are_clear_errors(model_dirs):
    reward = make_reward("clip_score", model_dirs)
    with pytest.raises(ValueError, match=r"split=9.*\[0, 4\]"):
        clip_graft(reward, PromptTable(crc_encode, ["cat"]), split=9)
    with pytest.raises(ValueError, match="reads each prompt's text embedding.*task="):
        clip_graft(reward, None)
    clip_graft(make_reward("aesthetic", model_dirs), None)  # reads no prompt: no table needed
    with pytest.raises(TypeError, match="CLIP-family"):
        clip_graft(object(), None)
    from critic_align.rewards import JpegCompressibility

    with pytest.raises(ValueError, match="no grafted critic for reward 'jpeg_compressibility'.*CLIP-family"):
        graft_for(JpegCompressibility())


def test_text_embeddings_are_cached_per_prompt(ref, model_dirs, monkeypatch):
    reward = make_reward("clip_score", model_dirs)
    prompts = ref["prompts"]
    g = clip_graft(reward, PromptTable(crc_encode, prompts))
    calls = []
    original = reward.text_embeds
    monkeypatch.setattr(reward, "text_embeds", lambda p, **kw: calls.append(list(p)) or original(p, **kw))
    x = ref["images"]["rgb24"]
    with torch.no_grad():
        e = g.late(g.early(x))
        first = g.readout(e, crc_encode(prompts), x)
        second = g.readout(e, crc_encode(prompts[::-1]), x)
    assert calls == [list(dict.fromkeys(prompts))]  # once, each distinct prompt once
    torch.testing.assert_close(second, (e * original(prompts[::-1])).sum(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first, (e * original(prompts)).sum(-1), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------
# a GraftedCritic with a CLIP reward on the tiny SD1.5 text-to-image pipeline (the t2i task)
@pytest.fixture(scope="module")
def t2i_clip(model_dirs, tmp_path_factory):
    from critic_align.api import build_trainer
    from critic_align.grafted import GraftedCritic
    from critic_align.rollout import sample_trajectories
    from critic_align.train.registry import load_run_config

    torch.manual_seed(0)
    o = {"critic_body": "grafted", "batch_size": 16, "group_size": 8, "value_pretrain_epochs": 1,
         "value_pretrain_passes": 1, "output_dir": str(tmp_path_factory.mktemp("t2i_clip")), "progress": False,
         "grid_every": 0, "checkpoint_every": 0, "log_tensorboard": False, "eval_every": 0}
    run = load_run_config("t2i", o)
    run["rewards"] = [{"name": "pickscore", "model": str(model_dirs / "clip")}]
    run["eval_rewards"] = []
    tr = build_trainer(run)
    assert isinstance(tr.critic, GraftedCritic)
    prompts = list(tr.task.prompts[:8])
    cond = tr.task.encode(prompts)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn((len(prompts), *tr.task.latent_shape), generator=g)
    with torch.no_grad():
        ro = sample_trajectories(tr.policy_output, tr.step, x_T, tr.timesteps, cond, prompts, generator=g)
    return tr, prompts, cond, ro.latents


def test_sd15_grafted_clip_critic_at_t0_reads_the_reward(t2i_clip):
    tr, prompts, cond, latents = t2i_clip
    x0 = latents[:, -1]
    with torch.no_grad():
        v = tr.critic(x0, torch.zeros(len(prompts)), cond)[:, 0]
    r = tr.rewards(tr.task.decode(x0), prompts)[:, 0]
    # stated tolerance: SD1.5 at t = 0 has x̂0 = (x_t − √(1−ᾱ_0)·ε̂)/√ᾱ_0, off from x_t by about 0.03·ε̂ in the latent;
    # through the decoder and PickScore (37·cos here, the tiny model's logit scale) that moved the value by 2e-4 when
    # written; 1e-2 is a fifth of the spread of the samples' rewards below
    assert (v - r).abs().max() < 1e-2, (v - r).abs().max()
    assert r.std() > 0.05  # the samples' rewards differ: the match is not a constant


def test_sd15_grafted_clip_critic_starts_as_the_reward_of_its_x0_prediction(t2i_clip):
    """At the start (zero stitch, logit scale and shrinkage) the value at a noisy step is the reward of the decoded
    one-step prediction x̂0 of the critic's own (zero) LoRA: the graft adds nothing and loses nothing."""
    from critic_align.steps import predict_x0

    tr, prompts, cond, latents = t2i_clip
    critic = tr.critic
    k = 6
    x, t = latents[:, k], tr.timesteps[k].repeat(len(prompts))
    with torch.no_grad():
        v = critic(x, t, cond)[:, 0]
        tt = critic.trunk._timesteps(t, x)
        with critic.adapters.using(critic.adapter_name):
            out = critic.trunk.predict_and_features(x, tt, cond, which=critic.feature_layers)[0]
        image = critic.decode(predict_x0(critic.schedule, out, x, tt))
    r = tr.rewards(image, prompts)[:, 0]
    torch.testing.assert_close(v, r, rtol=1e-5, atol=1e-4)  # float32 rounding of the CLS token's mean (PickScore ~5)
    assert r.std() > 0.05


def test_sd15_grafted_clip_critic_gradient_in_x_t_matches_finite_differences(t2i_clip):
    tr, prompts, cond, latents = t2i_clip
    assert_critic_gradient_matches_fd(tr, cond[:4].to(torch.float64), latents, h=1e-6, rtol=1e-4)


def test_sd15_grafted_clip_critic_trains_from_the_config(t2i_clip):
    tr, *_ = t2i_clip
    before = [p.detach().clone() for p in tr.critic.stitch.parameters()]
    tr.pretrain_value()
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.critic.stitch.parameters()))
    assert all(p.requires_grad is False for p in tr.critic.reward_nets.parameters())
