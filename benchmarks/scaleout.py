"""Scaling out on CPU processes: throughput, bytes across ranks and equality with one process.

    python benchmarks/scaleout.py             # the digits job and the tiny t2i job; ≈ 15-25 min on 2 idle cores
    python benchmarks/scaleout.py --quick     # a smoke test of the whole pipeline (small batches, 2 epochs)

For each job (``--config digits`` and ``--config t2i``: the Stable Diffusion path with its text encoder, VAE decode
and composition reward), ``critic-align train`` runs through ``benchmarks/scaleout_worker.py`` (one torch thread per
process, each process pinned to its own core, a byte-counting shim on torch.distributed's collectives):

* 1 process, then 2 processes (``torchrun --nproc_per_node 2``), at the same global batch and seed for ``--epochs``
  epochs: ``samples_per_s`` = global batch / mean epoch time over the epochs after the first (the epoch's own
  ``time_epoch_s``: rollout, rewards, advantages, update; value pretraining, grids and checkpoints excluded), and
  ``scaling_efficiency_2`` = 2-process throughput / (2 × 1-process throughput).  The host's speed drifts by a few
  per cent between runs taken minutes apart, more than the engine costs, so ``--rounds`` (default 3) rounds each run
  1 process, 2 processes and the independent pair (below) back to back; every efficiency is the median of the
  rounds' ratios (``*_by_round``: each round's).  ``engine_seconds_per_epoch``: where round 1's 2-process run spends
  more than the pair (the most any rank waits in our collectives, the update's extra engine forward + backward,
  the rollout's extra compute), from each rank's own timers (``scaleout_worker.py``);
* ``identical_to_single``: the first epoch's rewards and advantages (every trajectory of the global batch, rows
  matched by prompt and rewards) agree with one process's to ``ROW_ATOL``, and the weights after 2 epochs (the
  epoch-2 checkpoint's policy LoRA and critic) agree to the tolerance ``tests/test_multiprocess.py`` states
  (``torch.testing.assert_close`` with rtol 1e-3, atol 2e-5); ``max_weight_diff`` is the largest absolute
  difference (the attention key bias compared as the test compares it);
* ``engine_efficiency_one_core``: 2 processes taking turns on core 0 (the same work as the 1-process run on that
  core, plus the engine and the switching: DDP, the collectives, and two processes' working sets sharing one core's
  caches) over the 1-process run.  An upper bound on the engine's own cost, not a measure of it: the switching
  between two processes costs by itself (compare ``engine_phase_ratio_2``, where each rank has its own core);
* ``round_off_floor``: the same comparison between the 1-process run and a second single-process run that only
  splits its minibatches into other micro-batches (:func:`round_off_floor`); ``engine_diff_over_round_off`` = the
  2-process ``max_weight_diff`` / this one.  Near 1 or below: the processes differ from one process by no more than
  a change of summation order does (a job with many optimiser steps per epoch and a tight clip, such as
  digits_grpo's 16, grows round-off past the fixed tolerance either way);
* ``independent_pair``: the machine's own ceiling for the same split, without the engine: two single-process runs
  started together, each pinned to its own core, each doing one rank's share of the 2-process run (half the
  trajectories, half the minibatch: the same micro-batches a rank forwards) with no process group at all.
  ``machine_efficiency_2`` = their summed throughput / (2 × 1-process throughput): what splitting the batch costs on
  this machine (smaller forwards, two busy cores sharing caches and memory bandwidth); ``engine_efficiency_2`` =
  2-process throughput / the pair's: what the engine (DDP, collectives, rank-local sampling) costs on top;
* ``cross_rank_bytes_per_sample`` at 2 and 4 processes: the bytes a rank receives through torch.distributed's
  collectives during the training epochs (the most of any rank), per epoch, divided by the global batch; a
  hand-written gradient all-reduce (the engine before accelerate's DDP had one; 0 since) is reported apart
  (``gradient_allreduce_bytes_per_epoch``), and DDP's own bucketed all-reduce runs in C++ and is not counted (see
  ``scaleout_worker.py``).  The 4-process runs
  (2 epochs, more processes than cores) count bytes only; their times are not used.

Writes ``benchmarks/results/scaleout.json`` (``scaleout_quick.json`` with ``--quick``), with the machine's load
average before and after each run and ``other_processes_cpu_share``: the CPU the rest of the machine used during the
run, as a share of the usable cores (/proc/stat less this benchmark's own processes).  Throughput is only meaningful
where that share is near 0: a 2-process run whose ranks share their cores with other work waits for its slower rank.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import machine_info, write_result
from report_gpu import error_line
from scaleout_worker import OPS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORKER = ROOT / "benchmarks" / "scaleout_worker.py"
ROW_ATOL = 1e-5
KEY_BIAS = "critic.head.attn.in_proj_bias"  # compared as the test compares it (see compare)
WEIGHT_RTOL, WEIGHT_ATOL = 1e-3, 2e-5
ROUND_OFF_MICRO = 8  # the round-off floor's micro-batch size (see round_off_floor)

# per job: the run config and the overrides that make it fit 1, 2 and 4 processes (chunks of 8 trajectories; no
# held-out evaluation, grids or TensorBoard; a short value pretraining, which is not timed)
JOBS = {"digits": "digits", "t2i": "t2i", "digits_grpo": "digits_grpo"}  # digits_grpo: the 0.975 baseline job
COMMON = ["sample_chunk_size=8", "eval_every=0", "grid_every=0", "log_tensorboard=false", "progress=false",
          "checkpoint_every=1", "seed=0", "value_pretrain_epochs=2", "value_pretrain_passes=1"]
QUICK = ["batch_size=16", "group_size=4", "sample_chunk_size=4", "minibatch_size=32", "value_pretrain_epochs=1",
         "num_inference_steps=8"]


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat; 0 where it is not readable)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def other_cpu_share(seconds: float = 5.0) -> float:
    """The share of the usable cores other processes kept busy over the last ``seconds`` (this one sleeps)."""
    b0 = _busy_cpu_s()
    time.sleep(seconds)
    return max(0.0, (_busy_cpu_s() - b0) / (seconds * len(os.sched_getaffinity(0))))


def _others_share(busy0: float, ours0: float, wall: float) -> float:
    """CPU the rest of the machine used since (busy0, ours0), as a share of the cores: > 0 means the timed processes
    shared cores."""
    return max(0.0, (_busy_cpu_s() - busy0) - (_children_cpu_s() - ours0)) / (wall * len(os.sched_getaffinity(0)))


def _epoch_times(out: Path) -> tuple[int, list[dict], list[float]]:
    """(batch size, training rows, the epoch times that count: those after the first) of a run under ``out``."""
    rows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if r.get("phase") == "train"]
    times = [r["time_epoch_s"] for r in train[1:]] or [r["time_epoch_s"] for r in train]
    return int(json.loads((out / "run" / "config.json").read_text())["batch_size"]), train, times


def _phases(train: list[dict]) -> dict:
    """Mean seconds per epoch (the epochs after the first) of the main process's phases: ``rollout`` (sampling,
    decoding, scoring; one gather at its end), ``update`` (the algorithm's optimiser steps) and ``other`` (values and
    advantages)."""
    rows = train[1:] or train
    roll = sum(r["time_rollout_s"] for r in rows) / len(rows)
    upd = sum(r["time_update_s"] for r in rows) / len(rows)
    return {"rollout": round(roll, 4), "update": round(upd, 4),
            "other": round(sum(r["time_epoch_s"] for r in rows) / len(rows) - roll - upd, 4)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(job: str, nproc: int, epochs: int, quick: bool, out: Path, extra=(), local_rank: int = 0):
    sets = COMMON + (QUICK if quick else []) + [f"num_epochs={epochs}", f"keep_last={epochs + 1}", *extra]
    argv = ["train", "--config", JOBS[job], "--out", str(out / "run")]
    for s in sets:
        argv += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    if nproc == 1:  # the worker pins itself to core SCALEOUT_CORE (an independent pair's second run: core 1)
        env["SCALEOUT_CORE"] = str(local_rank)
        cmd = [sys.executable, str(WORKER), str(out), *argv]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(_free_port()), str(WORKER), str(out), *argv]
    return cmd, env


def run(job: str, nproc: int, epochs: int, quick: bool, out: Path, extra=(), one_core: bool = False) -> dict:
    """One ``critic-align train`` run of ``job`` on ``nproc`` processes (``one_core``: all of them on core 0, taking
    turns); returns what it measured."""
    shutil.rmtree(out, ignore_errors=True)
    cmd, env = _command(job, nproc, epochs, quick, out, extra)
    if one_core:  # the workers pin themselves within the affinity they inherit: here, core 0 only
        cmd = ["taskset", "-c", "0", *cmd]
    load_before = os.getloadavg()
    busy0, ours0, t0 = _busy_cpu_s(), _children_cpu_s(), time.time()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    others = _others_share(busy0, ours0, wall)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{job} on {nproc} processes failed (exit {proc.returncode}); see above")
    batch, train, times = _epoch_times(out)
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("bytes_rank*.json"))]
    epochs_done = max(1, ranks[0].get("epochs", 0)) if ranks else 1
    per_rank = [sum(r.get("epoch", {}).values()) / epochs_done for r in ranks]
    grad = [sum(r.get("gradient", {}).values()) / epochs_done for r in ranks]
    return {"processes": nproc, "epochs": len(train), "global_batch": batch, "wall_s": round(wall, 1),
            "epoch_s": [round(t, 3) for t in times], "samples_per_s": batch * len(times) / sum(times),
            "phase_s": _phases(train), "bytes_received_per_epoch_max_rank": max(per_rank) if per_rank else 0.0,
            "bytes_received_per_epoch_by_op": _by_op(ranks, epochs_done),
            "gradient_allreduce_bytes_per_epoch": max(grad) if grad else 0.0,
            "seconds_per_epoch_by_rank": [_engine_seconds(r) for r in ranks],
            "cores": [r.get("core") for r in ranks], "other_processes_cpu_share": round(others, 3),
            "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()]}


def _engine_seconds(rank: dict) -> dict:
    """One rank's seconds per training epoch (all epochs, the first included; ``rank``: its ``bytes_rank*.json``) in:
    the collectives our code calls (``collectives``: mostly waiting for the slower rank; DDP's gradient all-reduce is
    not among them), the engine's forward and backward of the update (``engine_forward``, ``engine_backward``: DDP's
    reducer waits for the other rank's gradients inside the backward), and the rollout and update stages."""
    epochs = max(1, rank.get("epochs", 0))
    secs = {k: v / epochs for k, v in rank.get("seconds_in", {}).get("epoch", {}).items()}
    coll = sum(v for k, v in secs.items() if k in OPS)
    return {"collectives": round(coll, 4), **{k: round(secs.get(k, 0.0), 4) for k in
                                               ("engine_forward", "engine_backward", "stage_rollout", "stage_update")}}


def _engine_overhead(two: dict, pair: dict) -> dict:
    """Where the 2-process run spends more than the pair, per epoch: the seconds each rank waits in our collectives
    (the most of any rank) and the extra seconds of the update's engine forward + backward over the pair's slower
    process (DDP: the gradient all-reduce and the wait for the other rank)."""
    ranks, solo = two["seconds_per_epoch_by_rank"], [r["seconds_per_epoch"] for r in pair["runs"]]
    if not ranks or not all(solo):
        return {}
    fb = max(r["engine_forward"] + r["engine_backward"] for r in ranks)
    fb_solo = max(r["engine_forward"] + r["engine_backward"] for r in solo)
    roll, roll_solo = max(r["stage_rollout"] - r["collectives"] for r in ranks), max(r["stage_rollout"] for r in solo)
    return {"collective_wait": max(r["collectives"] for r in ranks), "update_forward_backward_extra": fb - fb_solo,
            "rollout_compute_extra": roll - roll_solo, "epoch_s_2": sum(two["epoch_s"]) / len(two["epoch_s"])}


def run_independent_pair(job: str, epochs: int, quick: bool, base: Path, one: dict, one_dir: Path) -> dict:
    """Two single-process runs at once, one per core, each with one rank's share of the 2-process run's work (half
    the batch and half the minibatch of the 1-process run ``one``, whose resolved config is in ``one_dir``)."""
    cfg = json.loads((one_dir / "run" / "config.json").read_text())
    half = [f"batch_size={cfg['batch_size'] // 2}", f"minibatch_size={cfg['minibatch_size'] // 2}",
            f"group_size={min(cfg['group_size'], cfg['batch_size'] // 2)}"]
    procs, outs = [], []
    busy0, ours0, t0 = _busy_cpu_s(), _children_cpu_s(), time.time()
    for core in (0, 1):
        out = base / f"{job}_independent{core}"
        shutil.rmtree(out, ignore_errors=True)
        cmd, env = _command(job, 1, epochs, quick, out, half, local_rank=core)
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
        outs.append(out)
    for pr in procs:
        o, e = pr.communicate()
        if pr.returncode:
            sys.stderr.write(o[-4000:] + e[-4000:])
            raise SystemExit(f"{job}: an independent half-batch run failed (exit {pr.returncode}); see above")
    wall = time.time() - t0
    others = _others_share(busy0, ours0, wall)
    per = []
    for out in outs:
        batch, train, times = _epoch_times(out)
        per.append({"batch": batch, "epoch_s": [round(t, 3) for t in times],
                    "samples_per_s": batch * len(times) / sum(times), "phase_s": _phases(train),
                    "seconds_per_epoch": _engine_seconds(json.loads((out / "bytes_rank0.json").read_text()))})
    total = sum(r["samples_per_s"] for r in per)
    return {"overrides": half, "runs": per, "samples_per_s": total, "wall_s": round(wall, 1),
            "other_processes_cpu_share": round(others, 3),
            "machine_efficiency_2": total / (2 * one["samples_per_s"])}


def round_off_floor(job: str, quick: bool, base: Path, one_dir: Path) -> dict:
    """What round-off alone grows into: a second single-process run that differs from the 1-process run in
    ``one_dir`` only in how the update splits each minibatch into micro-batches (``micro_batch_size`` =
    ``ROUND_OFF_MICRO``: the same rows, the same mean, another summation order; nothing distributed), compared after
    2 epochs as the 2-process run is.  Many optimiser steps under a tight ratio clip and Adam's per-element
    normalisation turn a last-bit difference in a gradient into lr-sized steps, so the 2-process run's weights can
    only be held to this floor, not to a fixed tolerance."""
    out = base / f"{job}_1_micro{ROUND_OFF_MICRO}"
    run(job, 1, 2, quick, out, [f"micro_batch_size={ROUND_OFF_MICRO}"])
    eq = compare(one_dir, out)
    return {"override": f"micro_batch_size={ROUND_OFF_MICRO}", "rows_identical": eq["max_reward_diff"] <= ROW_ATOL
            and eq["max_advantage_diff"] <= ROW_ATOL, "max_weight_diff": eq["max_weight_diff"],
            "weights_within_tolerance": eq["weights_within_tolerance"]}


def _by_op(ranks: list[dict], epochs: int) -> dict:
    """The most bytes any rank received per epoch, per collective (training epochs, gradient all-reduce apart)."""
    out: dict = {}
    for r in ranks:
        for op, b in r.get("epoch", {}).items():
            out[op] = max(out.get(op, 0.0), b / epochs)
    return {k: round(v) for k, v in sorted(out.items())}


def compare(one: Path, two: Path) -> dict:
    """First-epoch rows and epoch-2 weights of a 1-process and a 2-process run."""
    import torch
    from safetensors.torch import load_file

    if not (one / "first_epoch.pt").exists() or not (two / "first_epoch.pt").exists():
        return {"identical_to_single": None, "note": "no first_epoch.pt: Trainer.compute_advantages was not found"}
    a, b = (torch.load(d / "first_epoch.pt", weights_only=True) for d in (one, two))
    same_rows = a["prompts"] == b["prompts"] and a["rewards"].shape == b["rewards"].shape and \
        a["advantages"].shape == b["advantages"].shape
    reward_diff = float((a["rewards"] - b["rewards"]).abs().max()) if same_rows else float("inf")
    adv_diff = float((a["advantages"] - b["advantages"]).abs().max()) if same_rows else float("inf")
    wa = load_file(str(one / "run" / "checkpoints" / "epoch_000002" / "tensors.safetensors"))
    wb = load_file(str(two / "run" / "checkpoints" / "epoch_000002" / "tensors.safetensors"))
    keys = sorted(k for k in wa if k.startswith(("policy.", "critic.")))
    weights_ok, max_diff, outside = sorted(wb.keys() & set(keys)) == keys, 0.0, []
    for k in keys if weights_ok else []:
        x, y = wa[k].float(), wb[k].float()
        if k == KEY_BIAS:  # as tests/test_multiprocess.py: the key third has an exactly zero gradient (softmax ignores a
            c = x.numel() // 3  # shift shared by all keys), so Adam turns round-off into lr-sized steps in either run
            noise = max(float(x[c:2 * c].abs().max()), float(y[c:2 * c].abs().max()))
            if noise >= 1e-4:
                outside.append({"tensor": k + " (key third)", "elements_outside": c, "of": c, "max_abs_diff": noise})
            x, y = torch.cat([x[:c], x[2 * c:]]), torch.cat([y[:c], y[2 * c:]])
        wa_k = x
        diff = (x - y).abs()
        max_diff = max(max_diff, float(diff.max()))
        over = diff > WEIGHT_ATOL + WEIGHT_RTOL * wa_k.abs()  # torch.testing.assert_close's rule
        if bool(over.any()):
            outside.append({"tensor": k, "elements_outside": int(over.sum()), "of": int(over.numel()),
                            "max_abs_diff": float(diff.max())})
    weights_ok = weights_ok and not outside
    critic_moved = _critic_moved(one)
    return {"identical_to_single": bool(same_rows and reward_diff <= ROW_ATOL and adv_diff <= ROW_ATOL and weights_ok),
            "max_reward_diff": reward_diff, "max_advantage_diff": adv_diff, "max_weight_diff": max_diff,
            "weights_within_tolerance": weights_ok, "compared_tensors": len(keys), "tensors_outside_tolerance": outside,
            "critic_weights_move": critic_moved}


def _critic_moved(run_dir: Path) -> bool | None:
    """Whether the critic's weights changed between the epoch-1 and epoch-2 checkpoints (None: no critic)."""
    from safetensors.torch import load_file

    c1 = load_file(str(run_dir / "run" / "checkpoints" / "epoch_000001" / "tensors.safetensors"))
    c2 = load_file(str(run_dir / "run" / "checkpoints" / "epoch_000002" / "tensors.safetensors"))
    keys = [k for k in c1 if k.startswith("critic.") and c1[k].is_floating_point()]
    return None if not keys else any(not bool((c1[k] == c2[k]).all()) for k in keys)


def gpu_rows(path: Path) -> dict | None:
    """The multi-process rows of the GPU check (benchmarks/gpu_check.py), when a GPU session ran it: its device and
    the outcome of each multi-process CUDA test (2 processes on one GPU over gloo; FSDP), with the error of a failed
    one.  None without a GPU check."""
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    tests = d.get("parts", {}).get("tests", {})
    failures = tests.get("failures", {})
    rows = {t["name"].split("::")[-1]: {"status": t["status"], **({"error": error_line(failures.get(t["name"]))}
                                                                     if t["status"] == "failed" else {})}
            for t in tests.get("tests", []) if "process" in t["name"] or "fsdp" in t["name"]}
    return {"source": path.name, "device": d.get("device", {}).get("name"), "command": d.get("command"),
            "tests": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small batches and 2 epochs: a smoke test")
    ap.add_argument("--epochs", type=int, default=None, help="epochs of the 1- and 2-process runs (default 6; quick 2)")
    ap.add_argument("--jobs", nargs="+", default=["digits", "t2i"], choices=sorted(JOBS),
                    help="digits_grpo (no critic) shows what the critic's update adds to the cost of splitting")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds of (1 process, 2 processes, the independent pair); the efficiencies are the medians "
                         "of the rounds' ratios (default 3; quick 1)")
    ap.add_argument("--keep", default=None, help="keep the run directories here (default: a temporary directory)")
    ap.add_argument("--merge", action="store_true", help="keep the other jobs of an existing JSON (rerun some jobs)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="MINUTES",
                    help="first wait (up to MINUTES) until other processes use under 10%% of the cores")
    ap.add_argument("--gpu-rows-only", action="store_true",
                    help="run nothing: refresh the JSON's GPU rows from gpu_check.json (after a GPU session)")
    args = ap.parse_args()
    if args.gpu_rows_only:
        result = json.loads((RESULTS / "scaleout.json").read_text())
        result["gpu"] = gpu_rows(RESULTS / "gpu_check.json")
        write_result(RESULTS / "scaleout.json", result, topic="perf")
        print(json.dumps(result["gpu"], indent=1))
        return 0
    deadline = time.time() + 60 * args.wait_quiet
    while args.wait_quiet and other_cpu_share() > 0.10 and time.time() < deadline:
        time.sleep(25)
    epochs = args.epochs or (2 if args.quick else 6)
    args.rounds = (1 if args.quick else 3) if args.rounds is None else args.rounds
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    if epochs < 2:
        raise SystemExit("--epochs must be >= 2 (the weights are compared after 2 epochs)")
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="scaleout_"))
    result = {"what": "benchmarks/scaleout.py" + (" --quick" if args.quick else ""), "quick": args.quick,
              "machine": machine_info(cpus=os.cpu_count(), cores_usable=len(os.sched_getaffinity(0))),
              "other_processes_cpu_share_at_start": round(other_cpu_share(), 3),
              "threads_per_process": 1, "row_atol": ROW_ATOL, "weight_rtol": WEIGHT_RTOL, "weight_atol": WEIGHT_ATOL,
              "jobs": {}}

    for job in args.jobs:
        runs, rounds = {}, []
        for rnd in range(args.rounds):  # 1 process, 2 processes and the pair, again: the host's speed drifts
            tag = "" if rnd == 0 else f"_round{rnd + 1}"
            this = {}
            for n in (1, 2):
                print(f"{job}: {n} process(es), {epochs} epochs (round {rnd + 1} of {args.rounds}) ...", flush=True)
                this[n] = run(job, n, epochs, args.quick, base / f"{job}_{n}{tag}")
                runs.setdefault(n, this[n])  # round 1's runs: compared for equality, and their bytes reported
                print(f"  {this[n]['samples_per_s']:.2f} samples/s", flush=True)
            one, two = this[1], this[2]
            print(f"{job}: an independent pair of half-batch single processes, {epochs} epochs ...", flush=True)
            pair = run_independent_pair(job, epochs, args.quick, base, one, base / f"{job}_1")
            rounds.append({"samples_per_s_1": one["samples_per_s"], "samples_per_s_2": two["samples_per_s"],
                           "scaling_efficiency_2": two["samples_per_s"] / (2 * one["samples_per_s"]),
                           "machine_efficiency_2": pair["machine_efficiency_2"],
                           "engine_efficiency_2": two["samples_per_s"] / pair["samples_per_s"],
                           "engine_seconds_per_epoch": _engine_overhead(two, pair), "independent_pair": pair,
                           **({} if rnd == 0 else {"run_1": one, "run_2": two})})
            print(f"  scaling {rounds[-1]['scaling_efficiency_2']:.3f}, machine {pair['machine_efficiency_2']:.3f}, "
                  f"engine {rounds[-1]['engine_efficiency_2']:.3f}", flush=True)
        print(f"{job}: 4 processes (bytes only), 2 epochs ...", flush=True)
        runs[4] = run(job, 4, 2, args.quick, base / f"{job}_4")
        eq = compare(base / f"{job}_1", base / f"{job}_2")
        print(f"{job}: 2 processes taking turns on one core, {epochs} epochs ...", flush=True)
        shared = run(job, 2, epochs, args.quick, base / f"{job}_2_one_core", one_core=True)
        print(f"{job}: the round-off floor (1 process, micro-batches of {ROUND_OFF_MICRO}), 2 epochs ...", flush=True)
        floor = round_off_floor(job, args.quick, base, base / f"{job}_1")
        batch = runs[1]["global_batch"]
        pair = rounds[0]["independent_pair"]
        med = {k: statistics.median(r[k] for r in rounds) for k in
               ("samples_per_s_1", "samples_per_s_2", "scaling_efficiency_2", "machine_efficiency_2",
                "engine_efficiency_2")}
        result["jobs"][job] = {
            "config": JOBS[job], "global_batch": batch,
            # the medians over the rounds (each round's ratios from runs taken one after another)
            **med, "rounds": len(rounds),
            "scaling_efficiency_2_by_round": [r["scaling_efficiency_2"] for r in rounds],
            "machine_efficiency_2_by_round": [r["machine_efficiency_2"] for r in rounds],
            "engine_efficiency_2_by_round": [r["engine_efficiency_2"] for r in rounds],
            "engine_seconds_per_epoch": rounds[0]["engine_seconds_per_epoch"], "independent_pair": pair,
            # 2 processes taking turns on one core against 1 process on it: the engine plus the switching
            "engine_efficiency_one_core": shared["samples_per_s"] / runs[1]["samples_per_s"], "two_on_one_core": shared,
            # where the engine's cost lands: each phase of the 2-process run over the pair's (its slower run's)
            "engine_phase_ratio_2": {ph: runs[2]["phase_s"][ph] / slow for ph in ("rollout", "update")
                                     if (slow := max(r["phase_s"][ph] for r in pair["runs"]))},
            "cross_rank_bytes_per_sample": {str(n): runs[n]["bytes_received_per_epoch_max_rank"] / batch for n in (2, 4)},
            "gradient_allreduce_bytes_per_epoch": {str(n): runs[n]["gradient_allreduce_bytes_per_epoch"] for n in (2, 4)},
            **eq, "round_off_floor": floor,
            "engine_diff_over_round_off": eq["max_weight_diff"] / floor["max_weight_diff"]
            if floor["max_weight_diff"] else None,
            "runs": {str(n): r for n, r in runs.items()}, "later_rounds": rounds[1:]}
        print(json.dumps({k: v for k, v in result["jobs"][job].items() if k != "runs"}, indent=1), flush=True)
    name = "scaleout_quick.json" if args.quick else "scaleout.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.merge and (RESULTS / name).exists():  # the jobs not rerun keep their rows (and their own machine record)
        old = json.loads((RESULTS / name).read_text())
        for job, row in old.get("jobs", {}).items():
            if job not in result["jobs"]:
                result["jobs"][job] = {**row, "earlier_invocation_other_cpu_share_at_start":
                                       old.get("other_processes_cpu_share_at_start")}
    result["gpu"] = gpu_rows(RESULTS / "gpu_check.json")
    write_result(RESULTS / name, result, topic="perf" if name == "scaleout.json" else None)
    print(f"wrote {RESULTS / name}")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
