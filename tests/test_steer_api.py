"""The steering API: one method table (steering.METHODS) behind the entry point steer(), the CLI's --method choices
and its errors; every method through the entry equals its function called directly; the results equal, bit for bit,
what the samplers returned before the table existed (``tests/data/steer_reference.json``, written by that code)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from critic_align.steering import (
    METHODS,
    Resampling,
    SteerOptions,
    SteerResult,
    binary_soft_value,
    method_named,
    steer,
)
from critic_align.steps import DDIMStep
from critic_align.tasks.gmm import BoxReward, GMMTask, LinearReward

REF = json.loads((Path(__file__).parent / "data" / "steer_reference.json").read_text())


def _gmm():
    task = GMMTask()
    model = task.analytic_eps()
    return task, (lambda x, t, cond: model(x, t)), DDIMStep(task.schedule, eta=1.0)


def _x_T(rows: int) -> torch.Tensor:
    return torch.randn(rows, 2, generator=torch.Generator().manual_seed(0))


def _seed(s: int) -> torch.Generator:
    return torch.Generator().manual_seed(s)


def _reference_calls():
    """(case, method, x_T rows, keyword arguments) of every case in the reference file."""
    task, _, _ = _gmm()
    lin = LinearReward([1.0, 0.5])
    box = BoxReward([0.5, -1.0], [3.0, 1.0])
    value = lambda x, t, c: task.value(lin, x.double(), t).float()  # noqa: E731
    prob = lambda x, t, c: task.value(box, x.double(), t).float()  # noqa: E731
    reward = lambda s, p: lin(s)  # noqa: E731
    return [
        ("base", "base", 3, dict(reward_fn=reward, generator=_seed(1))),
        ("bon", "bon", 12, dict(num_particles=4, reward_fn=reward, generator=_seed(1))),
        ("guidance", "guidance", 3, dict(value_fn=value, scale=0.7, reward_fn=reward, generator=_seed(1))),
        ("guidance+bon", "guidance+bon", 12, dict(num_particles=4, value_fn=value, scale=3.0, max_kl=0.5,
                                                  reward_fn=reward, generator=_seed(1))),
        ("smc", "smc", 12, dict(num_particles=4, reward_fn=reward, value_fn=value, lam=2.0, guidance_scale=2.0,
                                resampling=Resampling(ess_threshold=0.9), generator=_seed(2))),
        ("smc/soft_value", "smc", 12, dict(num_particles=4, reward_fn=lambda s, p: box(s),
                                           value_fn=binary_soft_value(prob, 5.0), potential="soft_value", lam=5.0,
                                           output="argmax",
                                           resampling=Resampling(ess_threshold=1.0, every=2, scheme="residual"),
                                           generator=_seed(3))),
        ("smc_x0", "smc_x0", 12, dict(num_particles=4, reward_fn=reward, lam=1.0,
                                      resampling=Resampling(ess_threshold=0.9, window=(0.3, 1.0)),
                                      options=SteerOptions(reward_price=0.25, backbone_rows_per_call=2),
                                      generator=_seed(5))),
    ]


def _assert_identical(a: SteerResult, b: SteerResult) -> None:
    for name in ("samples", "decoded", "rewards", "particles", "particle_rewards", "log_weights", "ess", "resampled",
                 "guidance_factor", "chosen"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(0.0), y.nan_to_num(0.0)), name
    ca, cb = a.cost.to_dict(), b.cost.to_dict()
    ca.pop("wall_time_s"), cb.pop("wall_time_s")
    assert ca == cb


def test_every_reference_case_and_every_method_is_covered():
    assert {method for _, method, _, _ in _reference_calls()} == set(METHODS)
    assert {case for case, _, _, _ in _reference_calls()} == set(REF["cases"])


@pytest.mark.parametrize("case", _reference_calls(), ids=lambda c: c[0])
def test_results_equal_the_samplers_before_the_method_table(case):
    name, method, rows, kwargs = case
    _, den, step = _gmm()
    task_ts = GMMTask().schedule.timesteps(6)
    res = steer(method, den, step, _x_T(rows), task_ts, **kwargs)
    ref = REF["cases"][name]
    for field in ("samples", "rewards", "particles", "particle_rewards", "guidance_factor"):
        want = torch.tensor(ref[field], dtype=torch.float32)
        got = getattr(res, field)
        assert got.dtype == torch.float32 and torch.equal(got.isnan(), want.isnan()), field
        assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0)), field
    assert torch.equal(res.log_weights, torch.tensor(ref["log_weights"], dtype=torch.float64))
    ess = torch.tensor(ref["ess"], dtype=torch.float32)
    assert torch.equal(res.ess.isnan(), ess.isnan()) and torch.equal(res.ess.nan_to_num(0.0), ess.nan_to_num(0.0))
    assert res.resampled.tolist() == ref["resampled"]
    assert {k: getattr(res.cost, k) for k in ref["cost"]} == ref["cost"]
    assert res.cost.equivalent_nfe == ref["equivalent_nfe"]
    # the output is the chosen particle of each group (decoded: the identity decode)
    assert torch.equal(res.samples, res.particles[res.chosen]) and torch.equal(res.decoded, res.samples)


@pytest.mark.parametrize("case", _reference_calls(), ids=lambda c: c[0])
def test_the_entry_equals_each_methods_function(case):
    _, method, rows, kwargs = case
    _, den, step = _gmm()
    ts = GMMTask().schedule.timesteps(6)
    # a fresh generator per call, same seed: the two runs draw the same noise
    seed = kwargs["generator"].initial_seed()
    via_entry = steer(method, den, step, _x_T(rows), ts, **{**kwargs, "generator": _seed(seed)})
    direct = METHODS[method].fn(den, step, _x_T(rows), ts, **{**kwargs, "generator": _seed(seed)})
    assert isinstance(via_entry, SteerResult)
    _assert_identical(via_entry, direct)


def test_an_unknown_method_or_argument_is_refused_with_the_choices():
    _, den, step = _gmm()
    ts = GMMTask().schedule.timesteps(2)
    choices = "base, bon, guidance, guidance+bon, smc, smc_x0"
    assert ", ".join(METHODS) == choices
    with pytest.raises(ValueError, match=f"^unknown steering method 'beam'; choose one of {choices}$".replace("+", r"\+")):
        steer("beam", den, step, _x_T(2), ts, reward_fn=lambda s, p: s[:, 0])
    with pytest.raises(ValueError, match="unknown steering method None"):
        method_named(None)
    # an argument the method does not take: named, with the ones it takes
    with pytest.raises(TypeError, match=r"'bon' \(best_of_n\) takes no argument\(s\) \['lam'\]; it takes \['generator', "
                                        r"'num_particles', 'options', 'reward_fn'\]"):
        steer("bon", den, step, _x_T(2), ts, num_particles=2, reward_fn=lambda s, p: s[:, 0], lam=2.0)


def test_the_command_line_offers_the_method_table():
    """critic-align steer --method: its choices are METHODS' keys in order, its help quotes each summary, and the
    training-side module uses the same table object (no second list of names)."""
    import critic_align.train.steer as cli_steer
    from critic_align.train.cli import cli

    parser = argparse.ArgumentParser()
    cli_steer.add_parser(parser.add_subparsers())
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["steer"]
    method = next(a for a in sub._actions if a.dest == "method")
    assert list(method.choices) == list(METHODS)
    assert all(f"{name} ({m.summary})" in method.help for name, m in METHODS.items())
    assert cli_steer.METHODS is METHODS
    with pytest.raises(SystemExit):
        cli(["steer", "--config", "digits", "--method", "beam"])


def test_the_command_lines_runner_runs_every_method_of_the_table(tmp_path):
    """steer_run (what `critic-align steer` and the steering benchmarks call) runs each METHODS entry with
    the settings it takes: one sample per prompt for the methods without num_particles, N for the others."""
    from critic_align.api import build_trainer
    from critic_align.train.registry import load_run_config
    from critic_align.train.steer import SteeringRun, steer_run

    over = {"output_dir": str(tmp_path), "batch_size": 8, "group_size": 8, "num_inference_steps": 3,
            "sample_chunk_size": 8, "minibatch_size": 16, "sde_window_size": 0, "sde_window_range": None,
            "critic_x0_reward": False}
    trainer = build_trainer(load_run_config("digits", over))
    run = SteeringRun(trainer.models, trainer.task, trainer.timesteps, trainer.rewards, trainer.eval_rewards)
    prompts = ["3", "7"]
    for name, spec in METHODS.items():
        res, evals = steer_run(run, name, prompts, particles=3, scale=2.0, lam=2.0, seed=1,
                               ess_threshold=0.9, output="sample", guidance_max_kl=1.0)
        n = 3 if "num_particles" in spec.parameters else 1
        assert res.particles.shape[0] == 2 * n and res.samples.shape[0] == 2, name
        assert res.cost.backbone_rows == 2 * n * 3, name
        # --scale 2: the guidance methods and SMC's proposal are guided (a critic backward per row and step)
        assert (res.cost.critic_backward_rows > 0) == bool({"scale", "guidance_scale"} & spec.parameters), name
        assert 0.0 <= evals["digit_prob"] <= 1.0
    with pytest.raises(ValueError, match="unknown steering method 'beam'; choose one of base, bon"):
        steer_run(run, "beam", prompts)
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['resample_window'\]"):
        steer_run(run, "smc", prompts, resample_window=(0.0, 1.0))
