"""The update's (trajectory, step) pairs: every pair exactly once per pass, or with timestep_fraction < 1 the
same number of distinct steps for every trajectory, drawn without a Python loop over trajectories."""

from __future__ import annotations

import torch

from critic_align.update import pairs as draw_pairs


def test_pairs_full_and_fractional():
    g = torch.Generator().manual_seed(0)
    pairs = draw_pairs(g, 16, 10, 1.0)
    assert pairs.shape == (160, 2)
    assert len({tuple(p) for p in pairs.tolist()}) == 160  # every (trajectory, step) once

    pairs = draw_pairs(g, 16, 10, 0.3)
    assert pairs.shape == (16 * 3, 2)
    for b in range(16):
        steps = pairs[pairs[:, 0] == b, 1]
        assert len(steps) == 3 and len(set(steps.tolist())) == 3 and steps.min() >= 0 and steps.max() < 10
    # the steps differ between trajectories (a fresh permutation each), and between calls
    per_traj = [tuple(sorted(pairs[pairs[:, 0] == b, 1].tolist())) for b in range(16)]
    assert len(set(per_traj)) > 1
    again = draw_pairs(g, 16, 10, 0.3)
    assert not torch.equal(pairs, again)
    # the same generator state draws the same pairs (every process draws the whole batch's pairs alike)
    assert torch.equal(draw_pairs(torch.Generator().manual_seed(5), 16, 10, 0.3),
                       draw_pairs(torch.Generator().manual_seed(5), 16, 10, 0.3))
