"""Timesteps and sigmas come from diffusers' own ``set_timesteps``; they equal, bit for bit, the values our earlier
re-derivation produced (``tests/data/schedule_reference.json``, written by that code before it was replaced), so
trajectories sampled for a fixed seed are unchanged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from critic_align.steps import FlowMatchSchedule, NoiseSchedule

REF = json.loads((Path(__file__).parent / "data" / "schedule_reference.json").read_text())


@pytest.mark.parametrize("case", REF["vp"], ids=lambda c: f"{c['num_train_timesteps']}-{c['timestep_spacing']}-"
                                                        f"off{c['steps_offset']}-n{c['n']}")
def test_vp_timesteps_equal_the_old_values(case):
    schedule = NoiseSchedule.from_scheduler({"num_train_timesteps": case["num_train_timesteps"],
                                             "timestep_spacing": case["timestep_spacing"],
                                             "steps_offset": case["steps_offset"], "beta_schedule": "linear"})
    assert schedule.timesteps(case["n"]).tolist() == case["timesteps"]


@pytest.mark.parametrize("case", REF["flow"], ids=lambda c: f"shift{c['shift']}-term{c['shift_terminal']}-n{c['n']}")
def test_flow_timesteps_and_sigmas_equal_the_old_values(case):
    if case["n"] == 1 and case["shift_terminal"]:
        pytest.skip("one step with shift_terminal: the old code divided 0 by 0")
    schedule = FlowMatchSchedule(num_train_timesteps=case["num_train_timesteps"], shift=case["shift"],
                                 shift_terminal=case["shift_terminal"])
    n = case["n"]
    assert schedule.timesteps(n).tolist() == case["timesteps"]
    torch.testing.assert_close(schedule.sigmas(n), torch.tensor(case["sigmas"]), rtol=0, atol=0)
    assert not any(math.isnan(x) for x in case["timesteps"])


def test_the_diffusers_grid_is_read_not_rederived():
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    ddim = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="leading", steps_offset=1)
    ddim.set_timesteps(13)
    schedule = NoiseSchedule.from_scheduler(dict(ddim.config))
    assert torch.equal(schedule.timesteps(13), ddim.timesteps)
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow.set_timesteps(9)
    assert torch.equal(FlowMatchSchedule.from_scheduler(flow).timesteps(9), flow.timesteps.float())
