"""The same job's 1- vs 2-process scaling on this engine and on an earlier revision, measured in the same rounds.

    python benchmarks/scaleout_engines.py                       # digits_grpo, against 756ad7c, 3 rounds; ≈ 12 min
    python benchmarks/scaleout_engines.py --against REV --job digits --rounds 5

Why: the scale-out issue's goal (``scaling_efficiency_2`` ≥ 0.95) was set from one reading of the engine before
accelerate's DDP (``756ad7c``: every rollout gathered to every rank, a hand-written gradient all-reduce), 0.975 on
digits_grpo.  This machine's speed drifts by a few per cent between runs minutes apart (``scaleout.py``), so a
reading taken on another day says little about whether the engine got cheaper or dearer.  Here both revisions run
the same job in the same rounds: each round runs, for each revision, 1 process and then 2 processes
(``torchrun --nproc_per_node 2``, gloo), at the same global batch, the revisions' order alternating from round to
round.  ``scaling_efficiency_2`` = 2-process throughput / (2 × 1-process throughput), per round and revision, and the
medians over rounds.

Each revision runs from its own checkout (``git worktree add --detach``, removed at the end) with its own command
line entry (``critic_align.train.cli``, or ``train.cli`` before it moved) and its own shipped config of the job;
every process is pinned to its own core (local rank modulo the usable cores) with one torch thread, as in
``scaleout.py``.  Throughput: global batch / mean ``time_epoch_s`` over the epochs after the first (rollout, rewards,
advantages, update; checkpoints excluded).  Writes ``benchmarks/results/scaleout_engines.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import machine_info, write_result
from scaleout import _epoch_times, _free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
AGAINST = "756ad7c"  # the last revision with the hand-written gradient all-reduce and the gathered rollouts
SETS = ["sample_chunk_size=8", "eval_every=0", "grid_every=0", "log_tensorboard=false", "progress=false",
        "checkpoint_every=0", "seed=0"]

# pins the process to its core (local rank modulo the usable cores), one torch thread, then runs the revision's CLI
SHIM = """import os, runpy, sys
cores = sorted(os.sched_getaffinity(0))
os.sched_setaffinity(0, {cores[int(os.environ.get("LOCAL_RANK", "0")) % len(cores)]})
import torch
torch.set_num_threads(1)
module = sys.argv[1]
sys.argv = [module] + sys.argv[2:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def cli_module(tree: Path) -> str:
    """The revision's command-line module (it moved into the package with the accelerate engine)."""
    for module in ("critic_align.train.cli", "train.cli"):
        if (tree / (module.replace(".", "/") + ".py")).exists():
            return module
    raise SystemExit(f"{tree}: no critic_align/train/cli.py or train/cli.py: not a checkout of this project")


def run(tree: Path, shim: Path, job: str, nproc: int, epochs: int, out: Path, extra=()) -> dict:
    """One ``train`` run of ``job`` from the checkout ``tree`` on ``nproc`` processes; its throughput."""
    shutil.rmtree(out, ignore_errors=True)
    argv = [cli_module(tree), "train", "--config", job, "--out", str(out / "run")]
    for s in SETS + [f"num_epochs={epochs}", *extra]:
        argv += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(tree), CUDA_VISIBLE_DEVICES="")
    if nproc == 1:
        cmd = [sys.executable, str(shim), *argv]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(_free_port()), str(shim), *argv]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{job} on {nproc} processes from {tree} failed (exit {proc.returncode}); see above")
    batch, _, times = _epoch_times(out)  # the epochs after the first, as scaleout.py times them
    return {"processes": nproc, "global_batch": batch, "epoch_s": [round(t, 3) for t in times],
            "samples_per_s": batch * len(times) / sum(times), "wall_s": round(time.time() - t0, 1),
            "load_avg_after": [round(x, 2) for x in os.getloadavg()]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", default=AGAINST, help="the earlier revision (default %(default)s)")
    ap.add_argument("--against-label", default="the engine before accelerate's DDP: a hand-written gradient "
                    "all-reduce, every rollout gathered to every rank", help="what the earlier revision is, in words")
    ap.add_argument("--job", default="digits_grpo", help="a config both revisions ship (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=6, help="epochs per run; the first is not timed (default 6)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="an override for both revisions' runs (a smoke test: smaller batches)")
    ap.add_argument("--out", default=str(RESULTS / "scaleout_engines.json"))
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.epochs < 2:
        raise SystemExit("--rounds must be >= 1 and --epochs >= 2 (the first epoch is not timed)")
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("2 usable cores are needed (one per process)")
    git = ["git", "-C", str(ROOT)]
    try:
        against = subprocess.run(git + ["rev-parse", "--verify", args.against + "^{commit}"], check=True,
                                 capture_output=True, text=True).stdout.strip()
    except subprocess.CalledProcessError:
        raise SystemExit(f"--against {args.against!r}: not a commit of this repository") from None
    subject = subprocess.run(git + ["log", "-1", "--format=%s", against], capture_output=True, text=True).stdout
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True).stdout.strip())
    base = Path(tempfile.mkdtemp(prefix="scaleout_engines_"))
    shim = base / "shim.py"
    shim.write_text(SHIM)
    old_tree = base / "against"
    subprocess.run(git + ["worktree", "add", "--detach", str(old_tree), against], check=True, capture_output=True)
    trees = {"head": ROOT, "against": old_tree}
    for name, tree in trees.items():
        if not (tree / "train" / "configs" / f"{args.job}.yaml").exists():
            raise SystemExit(f"--job {args.job}: {name} ({tree}) ships no train/configs/{args.job}.yaml")
    rounds = []
    try:
        for rnd in range(args.rounds):
            order = ("against", "head") if rnd % 2 == 0 else ("head", "against")
            this = {}
            for name in order:
                runs = {}
                for n in (1, 2):
                    print(f"round {rnd + 1}/{args.rounds}: {name}, {n} process(es) ...", flush=True)
                    runs[n] = run(trees[name], shim, args.job, n, args.epochs, base / f"{name}_{n}_r{rnd}", args.set)
                this[name] = {"run_1": runs[1], "run_2": runs[2],
                              "scaling_efficiency_2": runs[2]["samples_per_s"] / (2 * runs[1]["samples_per_s"])}
                print(f"  {name}: {this[name]['scaling_efficiency_2']:.3f}", flush=True)
            rounds.append({"order": list(order), **this})
    finally:
        subprocess.run(git + ["worktree", "remove", "--force", str(old_tree)], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
    med = {name: statistics.median(r[name]["scaling_efficiency_2"] for r in rounds) for name in trees}
    result = {"what": "benchmarks/scaleout_engines.py", "job": args.job, "epochs": args.epochs,
              "overrides": SETS + args.set, "rounds": rounds,
              "head": head + (" (with uncommitted changes)" if dirty else ""), "against": against,
              "against_subject": subject.strip(), "against_label": args.against_label,
              "scaling_efficiency_2": med,
              "scaling_efficiency_2_by_round": {n: [r[n]["scaling_efficiency_2"] for r in rounds] for n in trees},
              "head_minus_against_by_round": [r["head"]["scaling_efficiency_2"] - r["against"]["scaling_efficiency_2"]
                                              for r in rounds],
              "machine": machine_info(cpus=os.cpu_count(), cores_usable=len(os.sched_getaffinity(0)),
                                      torch_threads=1)}
    write_result(Path(args.out), result, topic="perf" if Path(args.out).parent == RESULTS else None)
    print(json.dumps({"scaling_efficiency_2": med, "by_round": result["scaling_efficiency_2_by_round"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
