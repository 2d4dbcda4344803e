"""The tiny text-to-image task's prompt grammar, renderer and GenEval-like rewards (composition,
composition_correct), checked on hand-made images for every clause kind, right and wrong."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from critic_align.registry import build_rewards
from critic_align.rewards import CompositionCorrect, CompositionScore, RewardError
from critic_align.rewards.composition import ATTRIBUTES, cell_features, exactly_k_prob, judge_compositions
from critic_align.tasks.composition import (
    CELLS,
    COLOURS,
    Composition,
    Renderer,
    all_compositions,
    cell_views,
    is_held_out,
    layout,
    load_digit_glyphs,
    parse_prompt,
    prompt_split,
    vocabulary_words,
)
from critic_align.tasks.digits import load_digit_classifier


# ------------------------------------------------------------------------------------------------------
# grammar
def test_every_composition_roundtrips_through_its_prompt():
    comps = all_compositions()
    assert len(comps) == 120 + 4 * 40 * 40
    for comp in comps:
        assert parse_prompt(comp.prompt()) == comp
    assert parse_prompt("a red 3 left of a blue 7") == Composition(((3, "red"), (7, "blue")), 2, "left of")
    assert parse_prompt("two blue 7s") == Composition(((7, "blue"),), 2)
    words = set(vocabulary_words())
    for comp in comps[::37]:
        assert set(comp.prompt().replace("s", " s").split()) - {"left", "right"} <= words | {"s"}


@pytest.mark.parametrize("bad, match", [
    ("two red 3", "two red 3s"), ("a red 3s", "two red 3s"), ("a purple 3", "not a composition prompt"),
    ("a red 3 near a blue 7", "not a composition prompt"), ("four red 3s", "not a composition prompt"),
    ("a red 12", "not a composition prompt"), ("", "grammar")])
def test_bad_prompts_name_the_grammar(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_prompt(bad)
    with pytest.raises(TypeError):
        parse_prompt(3)


def test_held_out_split():
    train, held = prompt_split()
    assert not set(train) & set(held) and len(train) + len(held) == len(all_compositions())
    assert 0.10 < len(held) / (len(train) + len(held)) < 0.16
    assert not any(parse_prompt(p).count == 1 and parse_prompt(p).relation is None for p in held)
    # what is held out is a primary triple: every prompt sharing it is held out, and every word still trains
    triples = {parse_prompt(p).primary for p in held}
    assert all(parse_prompt(p).primary not in triples for p in train)
    assert {w for p in held for w in p.split()} <= {w for p in train for w in p.split()}
    assert is_held_out(parse_prompt(held[0])) and not is_held_out(parse_prompt(train[0]))


def test_layout_respects_the_relation_and_count():
    rng = np.random.default_rng(0)
    for _ in range(20):
        for rel, (dr, dc) in {"left of": (0, 1), "right of": (0, -1), "above": (1, 0), "below": (-1, 0)}.items():
            (_, _, a), (_, _, b) = layout(Composition(((1, "red"), (2, "blue")), 2, rel), rng)
            assert (CELLS[b][0] - CELLS[a][0], CELLS[b][1] - CELLS[a][1]) == (dr, dc)
        for n in (1, 2, 3):
            placed = layout(Composition(((4, "green"),), n), rng)
            assert len({k for _, _, k in placed}) == n and all(d == 4 and c == "green" for d, c, _ in placed)


def test_render_and_cell_views():
    glyphs, labels = load_digit_glyphs()
    r = Renderer(glyphs, labels)
    img = r.draw([(3, "blue", 1)], np.random.default_rng(0))
    assert img.shape == (3, 32, 32) and img.min() >= -1 and img.max() <= 1
    cells = cell_views(img[None])[0]
    assert torch.all(cells[[0, 2, 3]] == -1)  # only cell 1 (top right) has ink
    ink = (cells[1] + 1) / 2
    tint = torch.tensor(COLOURS["blue"]).view(3, 1, 1)
    assert torch.allclose(ink, ink.amax(0, keepdim=True) * tint, atol=1e-6)
    assert any(torch.equal(ink.amax(0), g) for g in glyphs[labels == 3])  # the glyph itself, unscaled
    with pytest.raises(ValueError, match="3, 32, 32"):
        cell_views(torch.zeros(1, 1, 32, 32))


# ------------------------------------------------------------------------------------------------------
# rewards: hand-computed pieces
def test_exactly_k_prob_matches_enumeration():
    p = torch.tensor([[0.9, 0.2, 0.5, 0.01], [0.3, 0.3, 0.7, 0.99]], dtype=torch.float64)
    for k in range(5):
        ref = torch.zeros(2, dtype=torch.float64)
        for bits in itertools.product((0, 1), repeat=4):
            if sum(bits) == k:
                b = torch.tensor(bits, dtype=torch.float64)
                ref += (p * b + (1 - p) * (1 - b)).prod(dim=1)
        torch.testing.assert_close(exactly_k_prob(p, k), ref)


class _Constant(torch.nn.Module):
    """A stand-in classifier: the same logits for every cell."""

    def __init__(self, digit: int):
        super().__init__()
        self.digit = digit
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        out = torch.zeros(x.shape[0], 10) + self.w
        out[:, self.digit] = 10.0
        return out


def test_cell_features_by_hand():
    img = -torch.ones(1, 3, 32, 32)
    # one pixel of yellow ink at full intensity, row 20, column 5 (cell 2: bottom left), one pixel of half-blue
    img[0, :, 20, 5] = torch.tensor(COLOURS["yellow"]) * 2 - 1
    img[0, :, 3, 30] = torch.tensor(COLOURS["blue"]) - 1  # intensity 0.5 in cell 1
    f = cell_features(img, _Constant(4))
    torch.testing.assert_close(f.ink[0], torch.tensor([0.0, 0.5 / 256, 1 / 256, 0.0]))
    torch.testing.assert_close(f.centroid[0, 2], torch.tensor([5.5, 20.5]))
    torch.testing.assert_close(f.centroid[0, 1], torch.tensor([30.5, 3.5]))
    assert int(f.colour_prob[0, 2].argmax()) == list(COLOURS).index("yellow")
    assert int(f.colour_prob[0, 1].argmax()) == list(COLOURS).index("blue")
    torch.testing.assert_close(f.occ[0, 2], torch.sigmoid(torch.tensor((1 / 256 - 0.09) / 0.02)))
    assert torch.allclose(f.digit_prob[0, :, 4], torch.softmax(torch.tensor([10.0] + [0.0] * 9), 0)[0].expand(4))


# ------------------------------------------------------------------------------------------------------
# rewards on hand-made images
@pytest.fixture(scope="module")
def clear_renderer():
    """A renderer over the glyphs the shipped classifier gets right with probability > 0.9 (so that a wrong
    verdict can only come from the clause, not from a hard glyph)."""
    glyphs, labels = load_digit_glyphs()
    clf = load_digit_classifier()
    with torch.no_grad():
        p = clf(glyphs[:, None] * 2 - 1).softmax(-1)
    keep = p[torch.arange(len(labels)), labels] > 0.9
    return Renderer(glyphs[keep], labels[keep])


def _judge(images, prompts):
    return judge_compositions(torch.stack(images), prompts, load_digit_classifier())


def _expect(j, i, **wanted):
    got = {a: j.correct[a][i].item() for a in ATTRIBUTES}
    for a in ATTRIBUTES:
        w = wanted.get(a, 1.0)
        if w != w:
            assert got[a] != got[a], (a, got)
        else:
            assert got[a] == w, (i, a, got)
    assert j.all_correct[i].item() == float(all(v == 1.0 for v in wanted.values() if v == v))


def test_right_images_pass_every_clause(clear_renderer):
    rng = np.random.default_rng(1)
    prompts = ["a red 3", "two blue 7s", "three green 0s", "a yellow 1", "a red 3 left of a blue 7",
               "a yellow 5 right of a green 2", "a blue 8 above a blue 6", "a green 4 below a red 9"]
    images = [clear_renderer.render(parse_prompt(p), rng) for p in prompts]
    j = _judge(images, prompts)
    nan = float("nan")
    for i, p in enumerate(prompts):
        _expect(j, i, position=nan if parse_prompt(p).relation is None else 1.0)
    assert bool((j.score > 0.9).all()), j.score
    # the dense score is the mean of the applicable clause probabilities
    probs = torch.stack([j.prob[a] for a in ATTRIBUTES], 1)
    torch.testing.assert_close(j.score, probs.nanmean(1))
    assert torch.isnan(j.prob["position"][:4]).all() and not torch.isnan(j.prob["position"][4:]).any()


def test_wrong_images_fail_exactly_the_wrong_clause(clear_renderer):
    rng = np.random.default_rng(2)
    r = clear_renderer
    nan = float("nan")
    cases = [  # (prompt, what is drawn, the clauses that must fail)
        ("a red 3", [(5, "red", 0)], {"digit": 0.0}),
        ("a red 3", [(3, "blue", 3)], {"colour": 0.0}),
        ("a red 3", [(3, "red", 0), (3, "red", 3)], {"count": 0.0}),
        ("two red 3s", [(3, "red", 0), (3, "red", 1), (3, "red", 2)], {"count": 0.0}),
        ("three green 0s", [(0, "green", 0), (0, "green", 1)], {"count": 0.0, "digit": 0.0, "colour": 0.0}),
        ("two blue 7s", [(7, "blue", 0), (1, "blue", 3)], {"digit": 0.0}),
        ("two blue 7s", [(7, "blue", 0), (7, "yellow", 3)], {"colour": 0.0}),
        ("a red 3 left of a blue 7", [(3, "red", 1), (7, "blue", 0)], {"position": 0.0}),
        ("a red 3 left of a blue 7", [(3, "blue", 0), (7, "red", 1)], {"colour": 0.0}),
        ("a red 3 above a blue 7", [(3, "red", 2), (7, "blue", 0)], {"position": 0.0}),
        ("a red 3 above a blue 7", [(3, "red", 0), (7, "blue", 1)], {"position": 0.0}),  # beside, not above
        ("a red 3 below a blue 7", [(3, "red", 2), (7, "blue", 0)], {}),
        ("a red 3 right of a blue 7", [(3, "red", 1), (4, "blue", 0)], {"digit": 0.0}),
        ("a red 3 right of a blue 7", [(3, "red", 1)], {"count": 0.0, "digit": 0.0, "colour": 0.0}),
        ("a red 3 right of a blue 7", [(3, "red", 1), (7, "blue", 0), (2, "green", 3)], {"count": 0.0}),
    ]
    prompts = [c[0] for c in cases]
    j = _judge([r.draw(placed, rng) for _, placed, _ in cases], prompts)
    right = _judge([r.render(parse_prompt(p), rng) for p in prompts], prompts)
    for i, (prompt, _, fails) in enumerate(cases):
        want = {"position": nan if parse_prompt(prompt).relation is None else 1.0} | fails
        _expect(j, i, **want)
        for a in fails:  # a failed clause has a clearly lower probability than on a right image
            assert j.prob[a][i] < right.prob[a][i] - 0.2, (prompt, a, j.prob[a][i], right.prob[a][i])
    assert bool((j.score < right.score).all())
    # 'three green 0s' with two 0s: the third judged cell is empty, so the digit probability is about 2/3
    assert abs(j.prob["digit"][4].item() - 2 / 3) < 0.02


def test_empty_image_fails_and_reward_wrappers(clear_renderer):
    rng = np.random.default_rng(3)
    prompts = ["a red 3", "a red 3 left of a blue 7", "two green 5s"]
    images = torch.stack([-torch.ones(3, 32, 32)] + [clear_renderer.render(parse_prompt(p), rng) for p in prompts[1:]])
    score, correct = CompositionScore(), CompositionCorrect()
    s, c = score(images, prompts), correct(images, prompts)
    assert s.shape == (3,) and s.dtype == torch.float32 and c.tolist() == [0.0, 1.0, 1.0]
    assert s[0] < 0.1 and (s[1:] > 0.9).all()
    j = judge_compositions(images, prompts, load_digit_classifier())
    torch.testing.assert_close(s, j.score)
    multi = build_rewards([{"name": "composition", "temperature": 2.0}, "composition_correct"])
    assert multi.names == ("composition", "composition_correct") and multi(images, prompts).shape == (3, 2)
    with pytest.raises(RewardError, match="not a composition prompt"):
        score(images, ["a red 3", "a cat", "two green 5s"])
    with pytest.raises(RewardError, match=r"\(B, 3, 32, 32\)"):
        score(torch.zeros(3, 1, 16, 16), prompts)
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        CompositionScore(temperature=0)
