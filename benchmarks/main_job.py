"""The README's main job, measured: `critic-align train --config digits` on the embedded default.

    python benchmarks/main_job.py                 # ≈ 4 min on 2 CPU cores (3 of them training)

Runs the job exactly as the README's first command does (same config, same CLI entry point) into a scratch
directory and copies its summary.json (rewards first/last epoch, train_seconds, the held-out batch's rewards,
within-prompt diversity and critic explained variance before and after), metrics.jsonl, reward_curve.png,
critic_eval.png and the before/after grids to benchmarks/results/main_job/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from harness import machine_info

ROOT = Path(__file__).resolve().parents[1]

from critic_align.train.cli import main as cli_main  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
FILES = ("summary.json", "metrics.jsonl", "reward_curve.png", "critic_eval.png", "grid_before.png", "grid_after.png")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="digits")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--out", default=str(RESULTS / "main_job"))
    args = p.parse_args(argv)
    run_dir = RESULTS / "tmp" / "main_job_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.time()
    cmd = ["train", "--config", args.config, "--out", str(run_dir)] + [x for s in args.set for x in ("--set", s)]
    rc = cli_main(cmd)
    if rc:
        raise SystemExit(f"the main job failed (exit {rc})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, out / name)
    summary = json.loads((out / "summary.json").read_text())
    # the run's scratch directory, relative to the checkout (an absolute path would name this machine's layout)
    summary["run_dir"] = f"{run_dir.relative_to(ROOT)} (scratch; the listed files are copied here)"
    # where it ran: the README quotes this time, so the summary says on how many cores and threads it was taken
    summary["machine"] = machine_info(cores_used=len(os.sched_getaffinity(0)))
    summary["command"] = f"critic-align train --config {args.config}" + "".join(f" --set {s}" for s in args.set)
    summary["wall_seconds_with_startup"] = time.time() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
