"""Tests of critic_align.rewards: known inputs, combination, and every error path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from critic_align.rewards import (
    Boldness,
    DigitCorrect,
    DigitProb,
    FunctionReward,
    JpegCompressibility,
    JpegIncompressibility,
    MultiReward,
    Reward,
    RewardError,
    check_reward_output,
    jpeg_size_kb,
)
from critic_align.tasks.digits import load_digits_dataset, train_val_split

# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def heldout():
    images, labels = load_digits_dataset()
    _, held = train_val_split(len(labels), 0.2, seed=0)
    held = torch.from_numpy(held)
    return images[held], labels[held]


@pytest.fixture(scope="module")
def digit_prob():
    return DigitProb()


@pytest.fixture(scope="module")
def digit_correct():
    return DigitCorrect()


def prompts_of(labels) -> list[str]:
    return [str(int(v)) for v in labels]


def const(name, values, *, differentiable=False, allows_nan=False):
    """A FunctionReward returning fixed values (ignores the samples)."""
    return FunctionReward(
        lambda x, p: torch.tensor(values, dtype=torch.float32), name=name,
        differentiable=differentiable, allows_nan=allows_nan,
    )


# ---------------------------------------------------------------------------------------------
# image rewards


def test_jpeg_blank_more_compressible_than_noise():
    gen = torch.Generator().manual_seed(0)
    blank = torch.full((2, 1, 32, 32), -1.0)
    noise = torch.rand(2, 1, 32, 32, generator=gen) * 2 - 1
    x = torch.cat([blank, noise])
    prompts = [""] * 4

    comp = JpegCompressibility()(x, prompts)
    incomp = JpegIncompressibility()(x, prompts)
    assert comp.shape == (4,) and comp.dtype == torch.float32
    assert torch.all(comp < 0) and torch.all(incomp > 0)
    torch.testing.assert_close(comp, -incomp)
    assert comp[0] == comp[1]  # identical images, identical sizes
    assert comp[:2].min() > comp[2:].max()  # blank scores higher on compressibility
    assert incomp[2:].min() > incomp[:2].max()  # noise scores higher on incompressibility
    assert not comp.requires_grad


def test_jpeg_size_matches_pil_and_handles_rgb():
    import io

    from PIL import Image

    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 16, 16, generator=gen) * 2 - 1
    arr = ((x[0] + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=95)
    assert jpeg_size_kb(x).item() == pytest.approx(len(buf.getvalue()) / 1000)
    assert JpegCompressibility()(x, ["a"]).item() == pytest.approx(-len(buf.getvalue()) / 1000)


def test_jpeg_rejects_bad_channels():
    with pytest.raises(RewardError, match=r"jpeg_compressibility.*C = 2"):
        JpegCompressibility()(torch.zeros(1, 2, 8, 8), ["x"])
    with pytest.raises(ValueError, match="quality"):
        JpegCompressibility(quality=0)


def test_boldness_values_and_gradient():
    b = Boldness()
    x = torch.stack([torch.full((1, 4, 4), -1.0), torch.full((1, 4, 4), 1.0), torch.zeros(1, 4, 4)])
    torch.testing.assert_close(b(x, ["", "", ""]), torch.tensor([0.0, 1.0, 0.5]))

    x = torch.zeros(2, 3, 4, 4, requires_grad=True)
    out = b(x, ["", ""])
    assert out.requires_grad
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 0.5 / (3 * 4 * 4)))


# ---------------------------------------------------------------------------------------------
# digit rewards


def test_digit_prob_on_heldout(heldout, digit_prob):
    images, labels = heldout
    p_true = digit_prob(images, prompts_of(labels))
    assert p_true.shape == (len(labels),) and p_true.dtype == torch.float32
    assert p_true.min() >= 0 and p_true.max() <= 1
    assert p_true.mean() > 0.9
    p_wrong = digit_prob(images, prompts_of((labels + 1) % 10))
    assert p_wrong.mean() < 0.05
    assert torch.all(p_wrong < p_true)


def test_digit_correct_accuracy(heldout, digit_correct):
    images, labels = heldout
    correct = digit_correct(images, prompts_of(labels))
    assert set(correct.unique().tolist()) <= {0.0, 1.0}
    assert correct.mean() >= 0.97
    assert digit_correct(images, prompts_of((labels + 1) % 10)).mean() <= 0.03


def test_digit_prompts_accept_ints_too(heldout, digit_prob):
    images, labels = heldout
    torch.testing.assert_close(digit_prob(images[:4], labels[:4].tolist()),
                               digit_prob(images[:4], prompts_of(labels[:4])))


def test_digit_prob_gradient_and_correct_no_grad(heldout, digit_prob, digit_correct):
    images, labels = heldout
    x = images[:8].clone().requires_grad_(True)
    prompts = prompts_of(labels[:8])
    p = digit_prob(x, prompts)
    assert p.requires_grad
    p.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0

    c = digit_correct(x, prompts)
    assert not c.requires_grad and c.grad_fn is None


def test_digit_reward_with_given_classifier(heldout):
    class Always3(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.tensor([0.0] * 3 + [10.0] + [0.0] * 6), requires_grad=False)

        def forward(self, x):
            return self.bias.expand(x.shape[0], 10)

    images, _ = heldout
    correct = DigitCorrect(classifier=Always3())(images[:3], ["3", "4", "3"])
    torch.testing.assert_close(correct, torch.tensor([1.0, 0.0, 1.0]))
    prob = DigitProb(classifier=Always3())(images[:1].double(), ["3"])  # classifier follows the dtype
    assert prob.dtype == torch.float32 and prob.item() == pytest.approx(math.exp(10) / (math.exp(10) + 9))


@pytest.mark.parametrize("cls", [DigitProb, DigitCorrect])
def test_digit_rewards_reject_wrong_sample_shape(cls, digit_prob):
    reward = cls(classifier=digit_prob.classifier)
    with pytest.raises(RewardError, match=rf"{reward.name}.*\(B, 1, 16, 16\).*\(2, 3, 16, 16\)") as info:
        reward(torch.zeros(2, 3, 16, 16), ["1", "2"])
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(RewardError, match=r"\(B, 1, 16, 16\).*\(2, 1, 8, 8\)"):
        reward(torch.zeros(2, 1, 8, 8), ["1", "2"])


@pytest.mark.parametrize("cls", [DigitProb, DigitCorrect])
def test_digit_rewards_reject_bad_prompts(cls, digit_prob):
    reward = cls(classifier=digit_prob.classifier)
    x = torch.zeros(2, 1, 16, 16)
    with pytest.raises(RewardError, match=rf"{reward.name}.*'cat' is not a digit") as info:
        reward(x, ["1", "cat"])
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(RewardError, match=r"0\.\.9"):
        reward(x, ["1", "12"])
    with pytest.raises(RewardError, match=r"3 prompts for 2 samples"):
        reward(x, ["1", "2", "3"])
    with pytest.raises(RewardError, match=r"single str"):
        reward(x, "12")


# ---------------------------------------------------------------------------------------------
# Reward base class and output validation


def test_function_reward_and_dtype_conversion():
    x = torch.zeros(3, 1, 4, 4)
    r = FunctionReward(lambda s, p: torch.tensor([True, False, True]), name="flag")
    out = r(x, ["a", "b", "c"])
    assert out.dtype == torch.float32 and out.tolist() == [1.0, 0.0, 1.0]
    assert FunctionReward(lambda s, p: np.arange(3), name="np")(x, ["", "", ""]).tolist() == [0, 1, 2]
    assert FunctionReward(lambda s, p: [1, 2, 3], name="lst")(x, ["", "", ""]).tolist() == [1.0, 2.0, 3.0]
    assert FunctionReward(lambda s, p: torch.ones(3, dtype=torch.float64), name="f64")(x, ["", "", ""]).dtype \
        == torch.float32

    def my_reward(s, p):
        return s.mean(dim=(1, 2, 3))

    assert FunctionReward(my_reward).name == "my_reward"


def test_non_differentiable_reward_is_detached_and_differentiable_is_not():
    x = torch.ones(2, 1, 2, 2, requires_grad=True)
    seen_grad = []

    def fn(s, p):
        seen_grad.append(torch.is_grad_enabled())
        return s.sum(dim=(1, 2, 3))

    out = FunctionReward(fn, name="nd")(x, ["", ""])
    assert seen_grad == [False] and not out.requires_grad
    out = FunctionReward(fn, name="d", differentiable=True)(x, ["", ""])
    assert seen_grad[-1] is True and out.requires_grad


def test_nan_is_error_unless_allowed():
    x = torch.zeros(4, 1, 2, 2)
    with pytest.raises(RewardError) as info:
        const("flaky", [1.0, math.nan, 2.0, math.nan])(x, [""] * 4)
    msg = str(info.value)
    assert "reward 'flaky' returned NaN for samples [1, 3]" in msg and "allows_nan=True" in msg
    out = const("flaky", [1.0, math.nan, 2.0, math.nan], allows_nan=True)(x, [""] * 4)
    assert torch.isnan(out).tolist() == [False, True, False, True]


def test_inf_is_always_an_error():
    x = torch.zeros(3, 1, 2, 2)
    for allows_nan in (False, True):
        with pytest.raises(RewardError, match=r"reward 'big' returned inf for samples \[0, 2\]"):
            const("big", [math.inf, 0.0, -math.inf], allows_nan=allows_nan)(x, [""] * 3)


@pytest.mark.parametrize(
    "value, pattern",
    [
        (torch.zeros(3, 1), r"shape \(3, 1\), expected \(B,\) = \(3,\)"),
        (torch.zeros(2), r"shape \(2,\), expected \(B,\) = \(3,\)"),
        (torch.tensor(1.0), r"shape \(\), expected \(B,\) = \(3,\)"),
        (1.5, r"scalar"),
        ("good", r"str"),
        ({"a": 1}, r"dict"),
        (torch.zeros(3, dtype=torch.complex64), r"complex64"),
    ],
)
def test_bad_outputs(value, pattern):
    with pytest.raises(RewardError, match=rf"reward 'bad'.*{pattern}"):
        FunctionReward(lambda s, p: value, name="bad")(torch.zeros(3, 1, 2, 2), ["", "", ""])
    with pytest.raises(RewardError, match=pattern):
        check_reward_output("bad", value, 3)


def test_exception_in_compute_is_wrapped_and_chained():
    def boom(s, p):
        raise KeyError("missing-model")

    with pytest.raises(RewardError, match=r"reward 'boom' failed: KeyError: 'missing-model'") as info:
        FunctionReward(boom)(torch.zeros(1, 1, 2, 2), ["x"])
    assert isinstance(info.value, RuntimeError)
    assert isinstance(info.value.__cause__, KeyError)


def test_reward_is_abstract_and_subclassable():
    with pytest.raises(TypeError):
        Reward()

    class Ones(Reward):
        name = "ones"

        def compute(self, samples, prompts):
            return torch.ones(samples.shape[0], dtype=torch.int64)

    out = Ones()(torch.zeros(2, 1, 2, 2), ["", ""])
    assert out.dtype == torch.float32 and out.tolist() == [1.0, 1.0]


# ---------------------------------------------------------------------------------------------
# MultiReward


def test_multi_reward_matrix_matches_individual_rewards(heldout, digit_prob, digit_correct):
    images, labels = heldout
    x, prompts = images[:6], prompts_of(labels[:6])
    rewards = [digit_prob, digit_correct, Boldness(), JpegCompressibility()]
    multi = MultiReward(rewards, weights=[1.0, 0.5, 2.0, 0.1])
    m = multi(x, prompts)
    assert m.shape == (6, 4) and m.dtype == torch.float32
    assert multi.names == ("digit_prob", "digit_correct", "boldness", "jpeg_compressibility")
    assert not multi.differentiable
    assert len(multi) == 4
    for k, r in enumerate(rewards):
        torch.testing.assert_close(m[:, k], r(x, prompts))
    expected = sum(w * r(x, prompts) for w, r in zip([1.0, 0.5, 2.0, 0.1], rewards))
    torch.testing.assert_close(multi.weighted_sum(m), expected)


def test_multi_reward_differentiable_flag_and_gradient():
    multi = MultiReward([Boldness(), FunctionReward(lambda s, p: s.sum(dim=(1, 2, 3)), name="sum",
                                                    differentiable=True)], weights=[2.0, 1.0])
    assert multi.differentiable
    x = torch.zeros(2, 1, 2, 2, requires_grad=True)
    multi.weighted_sum(multi(x, ["", ""])).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0 * 0.5 / 4 + 1.0))


def test_weighted_sum_by_hand_with_nan():
    x = torch.zeros(4, 1, 2, 2)
    a = const("a", [1.0, 2.0, math.nan, 4.0], allows_nan=True)
    b = const("b", [10.0, math.nan, math.nan, 0.0], allows_nan=True)
    c = const("c", [100.0, 200.0, math.nan, -5.0])
    with pytest.raises(RewardError, match="reward 'c' returned NaN for samples \\[2\\]"):
        MultiReward([a, b, c])(x, [""] * 4)

    c = const("c", [100.0, 200.0, 300.0, -5.0])
    multi = MultiReward([a, b, c], weights=[1.0, 2.0, 3.0])
    m = multi(x, [""] * 4)
    assert torch.isnan(m).tolist() == [[False, False, False], [False, True, False],
                                        [True, True, False], [False, False, False]]
    out = multi.weighted_sum(m)
    W = 6.0
    expected = [
        1 * 1 + 2 * 10 + 3 * 100,  # all present: plain weighted sum
        (1 * 2 + 3 * 200) * W / (1 + 3),  # b missing: rescaled by W / W_avail
        (3 * 300) * W / 3,  # only c present
        1 * 4 + 2 * 0 + 3 * -5,
    ]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float32))

    all_missing = torch.tensor([[math.nan, math.nan, math.nan], [1.0, 1.0, 1.0]])
    out = multi.weighted_sum(all_missing)
    assert math.isnan(out[0].item()) and out[1].item() == pytest.approx(6.0)


def test_weighted_sum_zero_weight_counts_as_missing():
    multi = MultiReward([const("a", [0.0]), const("b", [0.0])], weights=[0.0, 2.0])
    out = multi.weighted_sum(torch.tensor([[5.0, 1.0], [5.0, math.nan]]))
    assert out[0].item() == pytest.approx(2.0) and math.isnan(out[1].item())


def test_weighted_sum_validates_shape():
    multi = MultiReward([Boldness(), JpegCompressibility()])
    torch.testing.assert_close(multi.weights, torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match=r"\(B, 2\) matrix.*got shape \(3, 3\)"):
        multi.weighted_sum(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"got shape \(3,\)"):
        multi.weighted_sum(torch.zeros(3))


def test_multi_reward_construction_errors():
    with pytest.raises(ValueError, match="at least one"):
        MultiReward([])
    with pytest.raises(ValueError, match="2 weights for 1 rewards"):
        MultiReward([Boldness()], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        MultiReward([Boldness(), JpegCompressibility()], weights=[1.0, math.nan])
    with pytest.raises(ValueError, match="finite"):
        MultiReward([Boldness(), JpegCompressibility()], weights=[math.inf, 1.0])
    with pytest.raises(ValueError, match=r"distinct.*\['boldness'\]"):
        MultiReward([Boldness(), Boldness()])
    with pytest.raises(ValueError, match="all zero"):
        MultiReward([Boldness()], weights=[0.0])
    with pytest.raises(TypeError, match="FunctionReward"):
        MultiReward([lambda s, p: s])
