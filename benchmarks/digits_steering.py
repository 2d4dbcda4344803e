"""Reward vs NFE for test-time steering on digits (issue #5): base / best-of-N / guidance / SMC / guidance + best-of-N.

    .venv/bin/python benchmarks/digits_steering.py        # ≈ 10-15 min on 2 CPU cores

The policy is the shipped digits UNet (T = 20 stochastic DDIM steps, eta = 1).  The critic is the digits
config's LoRA critic, value-pretrained on rollouts of that policy (``--critic-epochs`` batches of 64; it is
saved under benchmarks/results/tmp/digits_steering and reused on the next run unless ``--fresh-critic``), or
a trained run's critic with ``--run``.  The reward is the trained one (digit_prob, classifier confidence at
temperature 6); digit_correct is reported too.  The methods and the cost accounting are those of
benchmarks/steering_table.py (best-of-N, guidance at N = 1 and with best-of-N, critic SMC, FK-style x0-reward
SMC at N ∈ {2, 4, 8}).  Writes benchmarks/results/digits_steering.{json,png} and a grid per method at N = 4.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from steering_table import TableSpec, add_table_args, run_table  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-digit", type=int, default=10, help="prompts per digit (groups)")
    add_table_args(p, particles=[2, 4, 8], scales=[5.0, 20.0, 50.0, 100.0], bon_only=[16], lam=[10.0, 30.0],
                   critic_epochs=20, threads=2, out=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    prompts = [str(d) for d in range(10) for _ in range(args.per_digit)]
    spec = TableSpec(name="digits_steering", config="digits", reward_key="digit_prob", eval_keys=("digit_correct",),
                     prompts=prompts, grid_nrow=args.per_digit, grid_labels=[str(d) for d in range(10)],
                     title=f"Steering the digits UNet with its critic ({len(prompts)} prompts, T = 20)")
    run_table(spec, args)


if __name__ == "__main__":
    main()
