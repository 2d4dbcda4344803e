"""The update's (trajectory, step) pairs: every pair exactly once per pass, or with timestep_fraction < 1 the
same number of distinct steps for every trajectory, drawn without a Python loop over trajectories."""

from __future__ import annotations

import torch

from critic_align.rollout import Rollout
from critic_align.train.registry import build_trainer, load_run_config


def _trainer(tmp_path, **over):
    run = load_run_config("digits", {"output_dir": str(tmp_path), "progress": False, "batch_size": 16,
                                     "group_size": 4, "num_inference_steps": 10, **over})
    return build_trainer(run)


def _rollout(b, t):
    return Rollout(latents=torch.zeros(b, t + 1, 1, 2, 2), timesteps=torch.arange(t, 0, -1),
                   prev_timesteps=torch.arange(t - 1, -1, -1), log_probs=torch.zeros(b, t), cond=None, prompts=["0"] * b)


def test_pairs_full_and_fractional(tmp_path):
    tr = _trainer(tmp_path)
    pairs = tr._pairs(_rollout(16, 10))
    assert pairs.shape == (160, 2)
    assert len({tuple(p) for p in pairs.tolist()}) == 160  # every (trajectory, step) once

    tr = _trainer(tmp_path, timestep_fraction=0.3)
    pairs = tr._pairs(_rollout(16, 10))
    assert pairs.shape == (16 * 3, 2)
    for b in range(16):
        steps = pairs[pairs[:, 0] == b, 1]
        assert len(steps) == 3 and len(set(steps.tolist())) == 3 and steps.min() >= 0 and steps.max() < 10
    # the steps differ between trajectories (a fresh permutation each), and between calls
    per_traj = [tuple(sorted(pairs[pairs[:, 0] == b, 1].tolist())) for b in range(16)]
    assert len(set(per_traj)) > 1
    again = tr._pairs(_rollout(16, 10))
    assert not torch.equal(pairs, again)
