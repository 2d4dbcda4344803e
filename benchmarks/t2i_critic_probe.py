"""Can the latent critic learn the tiny text-to-image task's values?  Value pretraining under several critic settings.

    python benchmarks/t2i_critic_probe.py          # about 5 minutes on one core

Each variant = ``train/configs/t2i.yaml`` (batch 32 = 4 prompts x 8 samples an epoch, the SDE window's states) with
its overrides (``critic_x0_reward`` off unless the variant turns it on), ``--epochs`` value-pretraining epochs on
rollouts of the frozen base policy, seed 0.  Reported per variant: the explained variance of each new batch's
returns *before* the critic fits it (``pre_value_ev``: how well it generalises to prompts it has not seen), averaged
over blocks of 5 epochs and over the last 10.  For scale,
``t2i_reward_variance.json`` gives the between-prompt share of the reward's variance (what a critic that only knew
each prompt's expected reward would explain).  Writes ``benchmarks/results/t2i_critic_probe.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from harness import machine_info  # noqa: E402

from critic_align.api import build_trainer  # noqa: E402
from critic_align.train.registry import load_run_config  # noqa: E402

VARIANTS = {
    "default": {},
    "critic_cond": {"critic_cond": True},
    "critic_cond, 1 pass": {"critic_cond": True, "value_pretrain_passes": 1},
    "critic_cond, lr 3e-4": {"critic_cond": True, "critic_learning_rate": 3e-4},
    "multi-level features": {"critic_features": "multi"},
    "critic_x0_reward": {"critic_x0_reward": True},
}


def probe(name: str, overrides: dict, epochs: int, workdir: Path) -> dict:
    out = workdir / name.replace(" ", "_").replace(",", "")
    shutil.rmtree(out, ignore_errors=True)
    over = {"seed": 0, "batch_size": 32, "value_pretrain_epochs": epochs, "output_dir": str(out), "progress": False,
            "grid_every": 0, "checkpoint_every": 0, "log_tensorboard": False, "critic_x0_reward": False, **overrides}
    trainer = build_trainer(load_run_config("t2i", over))
    t0 = time.time()
    logs = trainer.pretrain_value()
    ev = [r["pre_value_ev"] for r in logs]
    return {"variant": name, "overrides": overrides, "pre_value_ev": ev,
            "pre_value_ev_by_5": [float(np.mean(ev[i:i + 5])) for i in range(0, len(ev), 5)],
            "pre_value_ev_last10_mean": float(np.mean(ev[-10:])), "seconds": time.time() - t0}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "t2i_critic_probe.json"))
    args = p.parse_args(argv)
    workdir = ROOT / "benchmarks" / "results" / "tmp" / "t2i_critic_probe"
    t0, rows = time.time(), []
    for name in args.variants:
        rows.append(probe(name, VARIANTS[name], args.epochs, workdir))
        print(f"{name}: pre_value_ev by 5 epochs {[round(x, 3) for x in rows[-1]['pre_value_ev_by_5']]}", flush=True)
    result = {"benchmark": "t2i_critic_probe", "args": vars(args), "rows": rows, "machine": machine_info(),
              "time_s": time.time() - t0}
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
