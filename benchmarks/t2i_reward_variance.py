"""How much of the tiny text-to-image task's reward variance a prompt-level baseline can explain.

    python benchmarks/t2i_reward_variance.py        # about a minute on one core

The shipped ``critic_align/assets/tiny_t2i`` pipeline's own trained sampler (``train/configs/t2i.yaml``, full
stochastic trajectories, no LoRA trained) draws ``--per-prompt`` samples for each of ``--prompts`` training prompts
(a fixed draw).  The dense ``composition`` reward's variance splits into a within-prompt part (what the noise
decides: the only part a GRPO group baseline leaves in the advantage) and a between-prompt part (what a critic
that knew each prompt's expected reward would explain at the first step).  The between-prompt fraction is the
explained variance of a perfect prompt-only baseline: the ceiling of a critic's EV at the noisiest states.
Writes ``benchmarks/results/t2i_reward_variance.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from harness import machine_info  # noqa: E402

from critic_align.api import build_trainer  # noqa: E402
from critic_align.rewards import CompositionScore  # noqa: E402
from critic_align.tasks.composition import parse_prompt  # noqa: E402
from critic_align.tasks.digits import ASSETS  # noqa: E402
from critic_align.tasks.sd import read_prompts  # noqa: E402
from critic_align.train.registry import load_run_config  # noqa: E402


def variance_split(rewards: torch.Tensor) -> dict:
    """(P, G) rewards of P prompts x G samples -> total and mean within-prompt variance (unbiased estimates: with
    a few samples per prompt the population variance of a group underestimates its variance by (G - 1) / G) and
    the between-prompt fraction 1 - within / total."""
    total = rewards.flatten().var(unbiased=True).item()
    within = rewards.var(dim=1, unbiased=True).mean().item()
    return {"total_var": total, "within_prompt_var": within, "between_prompt_fraction": 1.0 - within / total}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--per-prompt", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "t2i_reward_variance.json"))
    args = p.parse_args(argv)
    t0 = time.time()
    run = load_run_config("t2i", {"output_dir": str(ROOT / "benchmarks" / "results" / "tmp" / "t2i_reward_variance"),
                                  "progress": False, "log_tensorboard": False, "grid_every": 0,
                                  "checkpoint_every": 0})
    trainer = build_trainer(run)
    pool = read_prompts(ASSETS / "tiny_t2i" / "train_prompts.txt")
    rng = np.random.default_rng(args.seed)
    chosen = [pool[i] for i in rng.choice(len(pool), size=args.prompts, replace=False)]
    prompts = [q for q in chosen for _ in range(args.per_prompt)]
    with torch.no_grad():
        rewards = CompositionScore()(trainer.sample(prompts, seed=args.seed + 1), prompts).view(args.prompts, -1)
    relation = torch.tensor([parse_prompt(q).relation is not None for q in chosen])
    result = {"benchmark": "t2i_reward_variance", "args": vars(args), **variance_split(rewards),
              "relation_prompt_fraction": float(relation.float().mean()),
              "mean_reward_relation_prompts": float(rewards[relation].mean()) if relation.any() else None,
              "mean_reward_count_prompts": float(rewards[~relation].mean()) if (~relation).any() else None,
              "relation_prompts_only": variance_split(rewards[relation]) if relation.sum() > 1 else None,
              "machine": machine_info(), "time_s": time.time() - t0}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "args")}, indent=1))
    return result


if __name__ == "__main__":
    main()
