"""Same seed, same numbers: a tiny digits run per advantage mode and algorithm (gae, grpo, ddpo on the UNet; nft and
awm with critic advantages on the DiT; 2 epochs after one value-pretraining batch),
its metrics.jsonl rows without timings and a digest of the final trainable tensors, written to JSON.

    python benchmarks/engine_equivalence.py --out benchmarks/results/engine_equivalence_before.json   # old code
    python benchmarks/engine_equivalence.py --out /tmp/after.json --compare benchmarks/results/engine_equivalence_before.json

With --compare it exits 1 unless every row and digest is identical (a restructure of the engine must not change
what it computes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch  # noqa: E402

from critic_align.api import build_trainer  # noqa: E402
from critic_align.train.registry import load_run_config  # noqa: E402

TINY = {"num_epochs": 2, "batch_size": 16, "group_size": 8, "num_inference_steps": 5, "sample_chunk_size": 16,
        "minibatch_size": 40, "value_pretrain_epochs": 1, "value_pretrain_passes": 1, "progress": False,
        "log_tensorboard": False, "grid_every": 0, "checkpoint_every": 1, "eval_every": 0}


CONFIGS = {"digits": {}, "digits_grpo": {}, "digits_ddpo": {}, "digits_dit_nft": {},
           "digits_dit_awm": {"advantage": "gae", "awm_advantage": "critic"}}


def run(config: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        trainer = build_trainer(load_run_config(config, {"output_dir": d, **TINY, **CONFIGS[config]}))
        trainer.train()
        rows = [json.loads(line) for line in open(Path(d) / "metrics.jsonl")]
        digest = hashlib.sha256()
        for p in trainer.trainable:
            digest.update(p.detach().cpu().numpy().tobytes())
    return {"rows": [{k: v for k, v in r.items() if "time" not in k} for r in rows], "weights": digest.hexdigest()[:16]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON to write")
    p.add_argument("--compare", help="a JSON written by this script (e.g. on the old code) that must match exactly")
    args = p.parse_args()
    torch.set_num_threads(1)
    result = {"settings": TINY, "runs": {c: run(c) for c in CONFIGS}}
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True))
    print({c: r["weights"] for c, r in result["runs"].items()})
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        same = {c: before["runs"].get(c) == r for c, r in result["runs"].items()}
        print("identical" if all(same.values()) else f"DIFFERENT: {same}")
        return 0 if all(same.values()) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
