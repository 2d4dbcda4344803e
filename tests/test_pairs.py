"""The update's (trajectory, step) pairs: every pair exactly once per pass, or with timestep_fraction < 1 the
same number of distinct steps for every trajectory, drawn without a Python loop over trajectories."""

from __future__ import annotations

import torch

import pytest

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


def test_balanced_order_spreads_every_chunk_evenly_over_minibatches():
    """Every block (sampling chunk) holds its share of any run of consecutive positions to within one row, so a
    process holding whole chunks gets its share of every minibatch; one block is exactly randperm's draw."""
    from critic_align.update import balanced_order

    g = torch.Generator().manual_seed(3)
    n, strata = 8 * 20, 8  # 8 chunks of 20 rows
    order = balanced_order(g, n, strata)
    assert sorted(order.tolist()) == list(range(n))  # a permutation
    block = order // (n // strata)
    for mbs in (7, 16, 33, 80):
        for s in range(0, n, mbs):
            mb = block[s:s + mbs]
            counts = torch.bincount(mb, minlength=strata).float()
            expected = len(mb) * (n // strata) / n
            assert float((counts - expected).abs().max()) < 1.0 + 1e-9, (mbs, s, counts.tolist())
    # two processes (4 chunks each) differ by at most a row per chunk in every minibatch of 40
    for s in range(0, n, 40):
        mb = block[s:s + 40]
        assert abs(int((mb < 4).sum()) - int((mb >= 4).sum())) <= 4
    # within a chunk the order is random (not the identity), and a generator state draws one order
    assert not torch.equal(order[block == 0], torch.sort(order[block == 0]).values)
    assert torch.equal(balanced_order(torch.Generator().manual_seed(1), n, strata),
                       balanced_order(torch.Generator().manual_seed(1), n, strata))
    # one block: exactly torch.randperm's draw (runs with a single chunk are unchanged)
    assert torch.equal(balanced_order(torch.Generator().manual_seed(2), n, 1),
                       torch.randperm(n, generator=torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match="equal blocks"):
        balanced_order(g, 10, 3)


def test_a_plain_shuffle_would_leave_a_process_waiting():
    """What the balance buys: process 0 (chunks 0-3 of 8) gets exactly its half of each minibatch of 40, where a
    plain shuffle strays by several rows (and at every step the other process waits for the one with more)."""
    from critic_align.update import balanced_order

    n, strata, mbs = 160, 8, 40

    def worst(order):  # rows process 0 gets beyond its half, the most over the minibatches
        block = order // (n // strata)
        return max(abs(int((block[s:s + mbs] < 4).sum()) - mbs // 2) for s in range(0, n, mbs))

    plain = [worst(torch.randperm(n, generator=torch.Generator().manual_seed(s))) for s in range(50)]
    balanced = [worst(balanced_order(torch.Generator().manual_seed(s), n, strata)) for s in range(50)]
    # a minibatch of 40 holds exactly 5 rows of each 20-row chunk: process 0 gets exactly 20 of every one
    assert max(balanced) == 0
    assert sum(plain) / 50 > 2  # binomial: std sqrt(40 / 4) ≈ 3.2 rows, the worst of 4 minibatches
