"""Kill a digits training run with SIGKILL at random moments, resume it each time, compare with an uninterrupted run.

    python benchmarks/kill_resume.py [--kills 10] [--seed 0] [--epochs 16] [--processes 2]

1. Runs `critic-align train` (a small digits config, a checkpoint every epoch) once without interruption.
2. Runs the same command in another directory as a subprocess and SIGKILLs it after a random delay (seeded);
   resumes it with `--resume` from its latest complete checkpoint (or starts it again when the kill came before
   the first checkpoint), and repeats until ``--kills`` kills were made; then lets it finish.
3. Compares the final metrics (every JSONL row, wall-clock fields excluded) and the final checkpoint (every
   safetensors tensor bit for bit: policy LoRA, critic, optimiser state, RNG states; and state.json) with the
   uninterrupted run.

Prints and writes benchmarks/results/kill_resume.json (re-rendering benchmarks/results/reliability.md): "10/10
identical" or exactly what differed.  Each kill is
recorded with where it landed (process start-up, value pretraining, an epoch, between logging and checkpointing,
inside a checkpoint write).

``--processes N`` (N > 1) runs every command under ``torchrun --nproc_per_node N`` (gloo on CPU, one torch thread per
process) and each kill SIGKILLs one rank, chosen at random (torchrun then stops the others, as on a cluster where a
node dies); the resume runs on the same number of processes.  Its result is written under ``processes_N`` of the
same JSON, next to the one-process result.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness import machine_info, write_result

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_OUT = RESULTS / "kill_resume.json"
TIME_KEYS = {"time_s", "time_rollout_s", "time_update_s", "time_epoch_s"}


def overrides(epochs: int) -> list[str]:
    return [f"num_epochs={epochs}", "batch_size=16", "group_size=4", "num_inference_steps=10", "minibatch_size=80",
            "value_pretrain_epochs=1", "value_pretrain_passes=1", "checkpoint_every=1", "keep_last=2",
            "grid_every=0", "log_tensorboard=false", "progress=false"]


PROCESSES = 1


def command(out: Path, epochs: int, resume: bool) -> list[str]:
    launch = [sys.executable] if PROCESSES == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      f"--nproc_per_node={PROCESSES}"]
    cmd = launch + ["-m", "critic_align.train.cli", "train", "--config", "digits", "--out", str(out)]
    for s in overrides(epochs) + ([f"sample_chunk_size={16 // PROCESSES}"] if PROCESSES > 1 else []):
        cmd += ["--set", s]
    return cmd + (["--resume"] if resume else [])


def env() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if PROCESSES > 1:
        e["ACCELERATE_USE_CPU"] = "1"
    return e


def kill_one_rank(proc: subprocess.Popen, rng: random.Random) -> int | None:
    """SIGKILL one of the launcher's worker processes (a random rank; the process itself with one process);
    returns the rank index killed (None: the launcher itself, no worker yet)."""
    if PROCESSES == 1:
        os.kill(proc.pid, signal.SIGKILL)
        return 0
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    pids = [int(x) for x in children.read_text().split()] if children.exists() else []
    if not pids:
        os.killpg(proc.pid, signal.SIGKILL)
        return None
    i = rng.randrange(len(pids))
    os.kill(sorted(pids)[i], signal.SIGKILL)
    return i


def rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def checkpoints(run: Path) -> list[Path]:
    from critic_align.checkpoint import latest_checkpoint

    d = run / "checkpoints"
    done = latest_checkpoint(d) if d.exists() else None
    return [done] if done else []


def where_killed(run: Path) -> dict:
    """Where a kill landed, read from what the killed process left on disk."""
    from critic_align.checkpoint import latest_checkpoint

    d = run / "checkpoints"
    latest = latest_checkpoint(d) if d.exists() else None
    logged = rows(run)
    partial_line = (run / "metrics.jsonl").exists() and not (run / "metrics.jsonl").read_text().endswith("\n") \
        and (run / "metrics.jsonl").stat().st_size > 0
    tmp = sorted(p.name for p in d.glob(".tmp-*")) if d.exists() else []
    ckpt_epoch = int(latest.name.split("_")[1]) if latest else None
    last_logged = max((r.get("epoch", 0) for r in logged if r.get("phase") == "train"), default=None)
    if not logged and latest is None:
        phase = "start-up or value pretraining (nothing logged yet)"
    elif latest is None:
        phase = "after value pretraining was logged, before its checkpoint"
    elif tmp:
        phase = f"inside a checkpoint write ({tmp[0]} present)"
    elif last_logged is not None and last_logged > ckpt_epoch:
        phase = f"after epoch {last_logged} was logged, before its checkpoint"
    else:
        phase = f"during epoch {ckpt_epoch + 1}"
    return {"latest_checkpoint_epoch": ckpt_epoch, "rows_logged": len(logged), "partial_last_line": partial_line,
            "tmp_dirs": tmp, "phase": phase}


def final_checkpoint(run: Path):
    from critic_align.checkpoint import latest_checkpoint, read_checkpoint

    return read_checkpoint(latest_checkpoint(run / "checkpoints"))


def compare(ref: Path, run: Path) -> list[str]:
    import torch

    diffs = []
    a = [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows(ref)]
    b = [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows(run)]
    if len(a) != len(b):
        diffs.append(f"metrics.jsonl has {len(b)} rows, the uninterrupted run {len(a)}")
    for i, (ra, rb) in enumerate(zip(a, b)):
        keys = sorted(k for k in set(ra) | set(rb) if ra.get(k) != rb.get(k) and not (ra.get(k) != ra.get(k)
                                                                                    and rb.get(k) != rb.get(k)))
        if keys:
            diffs.append(f"metrics row {i} ({ra.get('phase')} epoch {ra.get('epoch', ra.get('iteration'))}) differs in "
                         + ", ".join(f"{k}: {ra.get(k)!r} vs {rb.get(k)!r}" for k in keys[:5]))
    ta, sa = final_checkpoint(ref)
    tb, sb = final_checkpoint(run)
    if set(ta) != set(tb):
        diffs.append(f"checkpoint tensors differ in names: {sorted(set(ta) ^ set(tb))[:5]}")
    for k in sorted(set(ta) & set(tb)):
        if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape or not torch.equal(ta[k], tb[k]):
            d = (ta[k].double() - tb[k].double()).abs().max().item() if ta[k].shape == tb[k].shape else "shape"
            diffs.append(f"checkpoint tensor {k} differs (max abs diff {d})")
    skip = {"metrics_bytes", "config"}
    for k in sorted((set(sa) | set(sb)) - skip):
        if sa.get(k) != sb.get(k):
            diffs.append(f"checkpoint state.json field {k} differs")
    ca = {k: v for k, v in sa["config"].items() if k != "output_dir"}
    cb = {k: v for k, v in sb["config"].items() if k != "output_dir"}
    if ca != cb:
        diffs.append("checkpoint configs differ")
    return diffs


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--workdir", default="/tmp/critic_align_kill_resume")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--processes", type=int, default=1, help="processes per run (torchrun on CPU when > 1)")
    args = ap.parse_args(argv)
    global PROCESSES
    PROCESSES = args.processes
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ref, run = work / "uninterrupted", work / "killed"

    t0 = time.time()
    proc = subprocess.Popen(command(ref, args.epochs, False), env=env(), cwd=ROOT, stdout=subprocess.DEVNULL)
    first_row_s = None
    while proc.poll() is None:  # time to the first logged row (start-up + value pretraining)
        if first_row_s is None and rows(ref):
            first_row_s = time.time() - t0
        time.sleep(0.05)
    if proc.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed (exit {proc.returncode})")
    wall = time.time() - t0
    ref_rows = rows(ref)
    train_s = sum(r.get("time_epoch_s", 0) for r in ref_rows)
    epoch_s = (wall - first_row_s) / args.epochs  # includes checkpointing; slightly over (final grid, plot)
    print(f"uninterrupted run: {wall:.1f} s (first row after {first_row_s:.1f} s, ~{epoch_s:.2f} s per epoch "
          f"with its checkpoint, {train_s / args.epochs:.2f} s in the epoch itself)")

    rng = random.Random(args.seed)
    kills, attempts = [], 0
    from tqdm import tqdm

    bar = tqdm(total=args.kills, desc="kills")
    while len(kills) < args.kills:
        resume = bool(checkpoints(run))
        if not resume:
            shutil.rmtree(run, ignore_errors=True)
        # a random moment between mid start-up and ~1.5 epochs after the first row would appear (about one epoch
        # of progress per attempt on average; kills land in every phase of an epoch)
        delay = rng.uniform(0.5 * first_row_s, first_row_s + 1.5 * epoch_s)
        proc = subprocess.Popen(command(run, args.epochs, resume), env=env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        attempts += 1
        try:
            proc.wait(timeout=delay)
            err = proc.stderr.read().decode(errors="replace")
            if proc.returncode != 0:
                raise RuntimeError(f"attempt {attempts} failed (exit {proc.returncode}):\n{err[-3000:]}")
            print(f"attempt {attempts}: the run finished before its kill at {delay:.1f} s")
            break
        except subprocess.TimeoutExpired:
            rank = kill_one_rank(proc, rng)
            try:  # the launcher stops the other ranks when one dies; what is still alive after 30 s is killed
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if PROCESSES > 1:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # no orphaned worker writes on after the launcher is gone
                except ProcessLookupError:
                    pass
            proc.stderr.close()
            kills.append({"kill": len(kills) + 1, "resumed": resume, "delay_s": round(delay, 2), "rank_killed": rank,
                          **where_killed(run)})
            bar.update(1)
            bar.set_postfix(phase=kills[-1]["phase"][:40])
    bar.close()
    resume = bool(checkpoints(run))
    if not resume:
        shutil.rmtree(run, ignore_errors=True)
    subprocess.run(command(run, args.epochs, resume), env=env(), cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    diffs = compare(ref, run)
    identical = not diffs
    verdict = f"{len(kills)}/{len(kills)} identical" if identical else f"{len(kills)} kills: {len(diffs)} differences"

    result = {
        "processes": PROCESSES,
        "verdict": verdict,
        "identical": identical,
        "kills": len(kills),
        "kills_requested": args.kills,
        "differences": diffs,
        "kill_log": kills,
        "compared": "every metrics.jsonl row (wall-clock fields excluded) and every tensor of the final checkpoint "
                    "(policy LoRA, critic, optimiser state, RNG states) bit for bit, and its state.json",
        "command": " ".join(command(Path("RUN"), args.epochs, False)[1:]),
        "epochs": args.epochs,
        "seed": args.seed,
        "uninterrupted_wall_s": round(wall, 1),
        "first_row_s": round(first_row_s, 1),
        "epoch_with_checkpoint_s": round(epoch_s, 2),
        "total_wall_s": round(time.time() - t0, 1),
        # threads: the training subprocesses' (this process only waits on them)
        "machine": machine_info(threads=1, load_average_at_end=os.getloadavg()[0]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if PROCESSES > 1:  # next to the one-process result
        whole = json.loads(out.read_text()) if out.exists() else {}
        whole[f"processes_{PROCESSES}"] = result
        result_to_write = whole
    else:
        whole = json.loads(out.read_text()) if out.exists() else {}
        result_to_write = {**result, **{k: v for k, v in whole.items() if k.startswith("processes_")}}
    # the committed result re-renders its page; fault_injection.py's scratch runs only write
    write_result(out, result_to_write, topic="reliability" if out.resolve() == DEFAULT_OUT.resolve() else None)
    print(verdict)
    for d in diffs:
        print("  " + d)
    return result


if __name__ == "__main__":
    main()
