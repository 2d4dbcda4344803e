"""Reward vs NFE for test-time steering on the tiny text-to-image task (issue #17): best-of-N, critic guidance,
critic SMC, guidance + best-of-N and FK-style x0-reward SMC at equal backbone NFE, with the trained critic.

    python benchmarks/t2i_steering.py       # ≈ 16 min on one CPU core (3.3 of them pretraining the critic)
    python benchmarks/t2i_steering.py --critic-x0-reward   # a critic that also reads r(decode(x̂0)): SMC rows only
    python benchmarks/t2i_steering.py --flops-matched benchmarks/results/flops_real_scale.json --prompts-per-split 50
        # FLOP-matched rows against FK's x0-reward SMC at real-scale prices: t2i_steering_flops.json

The policy is the shipped pipeline ``critic_align/assets/tiny_t2i`` sampled through the Stable Diffusion path
of ``train/configs/t2i.yaml`` (20 stochastic DDIM steps, eta = 1, CFG-free).  The critic is that config's LoRA
critic, value-pretrained on rollouts of the frozen base policy (``--critic-epochs`` batches of 64; cached under
``<out>/tmp/t2i_steering`` and reused unless ``--fresh-critic``), or a trained run's critic with ``--run``.
The reward steered on is the trained dense ``composition`` (mean clause probability); ``composition_correct``
(all clauses right, GenEval's metric) is reported too.  Prompts: a fixed draw of ``--prompts-per-split``
training prompts and as many held-out prompts (never trained on), each split also scored on its own.  The
methods and the cost accounting are those of benchmarks/steering_table.py.  Writes
benchmarks/results/t2i_steering.{json,png} (``_x0`` with ``--critic-x0-reward``) and a grid per method at N = 4
(one image per prompt: the training prompts' rows first, then the held-out prompts').
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from steering_table import TableSpec, add_table_args, run_flops_matched, run_table  # noqa: E402
from t2i_advantages import eval_prompts  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts-per-split", type=int, default=100, help="training prompts, and as many held-out ones")
    p.add_argument("--prompt-seed", type=int, default=0, help="seed of the prompt draw")
    add_table_args(p, particles=[2, 4, 8], scales=[10.0, 30.0, 100.0], bon_only=[16], lam=[10.0, 30.0],
                   critic_epochs=20, threads=1, out=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    splits = eval_prompts(args.prompts_per_split, seed=args.prompt_seed)
    prompts = splits["train"] + splits["heldout"]
    spec = TableSpec(name="t2i_steering", config="t2i", reward_key="composition", eval_keys=("composition_correct",),
                     prompts=prompts, splits=splits, grid_nrow=12,
                     title=f"Steering the tiny text-to-image pipeline with its critic ({len(splits['train'])} training "
                           f"+ {len(splits['heldout'])} held-out prompts, T = 20)")
    if args.flops_matched:
        full = p.get_default("prompts_per_split")
        reduction = (f"{len(splits['train'])} training + {len(splits['heldout'])} held-out prompts instead of the "
                     f"equal-NFE table's {full} + {full}, halving the FLOP-matched rows' CPU time (they run more particles "
                     "than the equal-NFE rows)" if args.prompts_per_split < full else None)
        run_flops_matched(spec, args, reduction)
    else:
        run_table(spec, args)


if __name__ == "__main__":
    main()
