"""Inject faults into real `critic-align train` runs and check that nothing saved is lost and each error is clear.

    python benchmarks/fault_injection.py [--epochs 4] [--kills 4]

Faults (each on a small digits run, the command of benchmarks/kill_resume.py):
  divergence     learning_rate = critic_learning_rate = 1.0 until the weights go non-finite; a reward that jumps
                 to 1e38 at epoch 3 (served by a reward server in this process, the `remote` reward)
  concurrency    a second `train` into a run directory while the first runs; a `--resume` of a live run
  corruption     the newest checkpoint truncated; one bit flipped; 100 kB of it overwritten with random bytes
                 (same size), then `--resume`
  disk full      the run directory on a tmpfs that fills up mid-run (real ENOSPC; needs root to mount, else the
                 write is made to fail with ENOSPC in the process), then space is freed and the run resumed
  SIGKILL        benchmarks/kill_resume.py with --kills N (short) in its own directory; plus the full 10-kill
                 result of benchmarks/results/kill_resume.json
  collapse       learning_rate = critic_learning_rate = 1.0 on a tiny run (batch 8, 5 steps, evaluation every
                 epoch) that stays finite while held-out digit accuracy falls: reported (warning + summary.json) with
                 best/ kept past keep_last rotation and loading with --resume-from; and with stop_on_collapse
  corruption     (more) the newest checkpoint's safetensors header garbled; its state.json corrupt
  remote         a reward server that trickles its answer (one byte every 0.5 s, never finishing) from epoch 3 on,
                 with timeout: 1, retries: 0; the reference server with 20 stalled uploads, then a real request

How loss is detected, per fault ("data_lost"):
  * recovered runs (concurrency, corruption, disk full, SIGKILL) are compared with an uninterrupted run of the
    same command: every metrics.jsonl row (wall-clock fields excluded) and every tensor of the final checkpoint,
    bit for bit (kill_resume.compare); any difference, a failed recovery, or a checkpoint that verified before
    the fault and is gone or changed after it (before recovery) is data lost;
  * diverged runs: every checkpoint left on disk must verify (SHA-256 manifest) and hold finite weights, the
    newest must be the last epoch logged before the divergence (nothing completed was lost), no logged row may
    be non-finite, and `--resume-from` the checkpoint named in the error must load it;
  * every resume that cuts metrics.jsonl (a fallback past a corrupt checkpoint, --resume-from best/) must leave a
    metrics.before-resume-*.jsonl copy holding every row of the log before the resume, else data is lost;
  * collapsed runs: best/ must hold the best evaluation's checkpoint, verify, and load with --resume-from, and
    every checkpoint left in checkpoints/ must verify;
  * the trickling remote: the checkpoints written before it must verify and the newest must be the last epoch
    logged.
"clear_error": exit code 2, one `critic-align: error:` line on stderr without a traceback, containing the words the
fault must name (a warning another library logs at import, bitsandbytes' kernel warning here, is not counted).
For the faults where no error is expected ("expects_error": false: SIGKILL, a reported collapse, 20 stalled
uploads), clear_error says the recovery or report was what it should be (see each entry's note).

Writes benchmarks/results/fault_injection.json with one entry per fault and "data_lost_count", and re-renders
benchmarks/results/reliability.md (with the default --out).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from harness import machine_info, write_result

ROOT = Path(__file__).resolve().parents[1]

import kill_resume  # noqa: E402  (the command, the comparison and the SIGKILL loop are shared)

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_OUT = RESULTS / "fault_injection.json"


def cmd(out: Path, epochs: int, extra=(), resume=False, resume_from=None, config="digits") -> list[str]:
    c = kill_resume.command(out, epochs, resume)
    if config != "digits":
        c[c.index("--config") + 1] = config
    for s in extra:
        c += ["--set", s]
    if resume_from:
        c += ["--resume-from", str(resume_from)]
    return c


def run(c: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(c, env=kill_resume.env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def start(c: list[str]) -> subprocess.Popen:
    return subprocess.Popen(c, env=kill_resume.env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


# Lines other libraries log to stderr at import in this environment (not critic-align's messages): bitsandbytes,
# imported by diffusers' modeling utilities, warns that it cannot fetch a CPU kernel without network access.
FOREIGN_LINES = ("Failed to load CPU gemm_4bit_forward from kernels-community",)


def own_lines(stderr: str) -> list[str]:
    return [x for x in stderr.strip().splitlines() if x and not x.startswith(FOREIGN_LINES)]


def clear_error(proc, words: list[str]) -> bool:
    """Exit code 2, no traceback, one line of critic-align's own on stderr (FOREIGN_LINES aside) naming ``words``."""
    err = own_lines(proc.stderr)
    return (proc.returncode == 2 and "Traceback" not in proc.stderr and len(err) == 1
            and err[0].startswith("critic-align: error: ") and all(w.lower() in err[0].lower() for w in words))


def intact(run_dir: Path) -> dict[str, str]:
    """{checkpoint name: SHA-256 of its tensors} for the checkpoints that verify (manifest, JSON, finite weights)."""
    from critic_align.checkpoint import verify_checkpoint

    out = {}
    for p in sorted((run_dir / "checkpoints").glob("epoch_*")):
        if verify_checkpoint(p) is None:
            out[p.name] = json.loads((p / "manifest.json").read_text())["files"]["tensors.safetensors"]["sha256"]
    return out


def all_on_disk(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("epoch_*"))


def rows(run_dir: Path) -> list[dict]:
    return kill_resume.rows(run_dir)


def last_logged_epoch(run_dir: Path) -> int:
    return max((r["epoch"] for r in rows(run_dir) if r.get("phase") == "train"), default=0)


def rows_finite(run_dir: Path) -> bool:
    return all(not (isinstance(v, float) and not math.isfinite(v)) for r in rows(run_dir) for v in r.values()
               if not isinstance(v, str))


def wait_for(pred, timeout: float, proc=None) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def entry(fault: str, data_lost: bool, clear: bool, t0: float, expects_error: bool = True, **details) -> dict:
    e = {"fault": fault, "data_lost": bool(data_lost), "clear_error": bool(clear), "expects_error": expects_error,
         "seconds": round(time.time() - t0, 1), **details}
    print(f"{fault}: data_lost={e['data_lost']} clear_error={e['clear_error']} ({e['seconds']} s)", flush=True)
    return e


# ------------------------------------------------------------------------------------------------ divergence
def check_diverged(run_dir: Path, proc, words, epochs) -> tuple[bool, bool, dict]:
    """(data_lost, clear_error, details) of a run that should have stopped on the finiteness guard."""
    on_disk, good = all_on_disk(run_dir), intact(run_dir)
    named = re.search(r"last good checkpoint is (\S+) ", proc.stderr)
    named_path = Path(named.group(1)) if named else None
    newest = on_disk[-1] if on_disk else None
    last = last_logged_epoch(run_dir)
    resumed_ok = False
    if named_path is not None and named_path.exists():  # the named checkpoint loads through the CLI
        ckpt_epoch = int(named_path.name.split("_")[1])
        back = run(cmd(run_dir, ckpt_epoch, resume_from=named_path, extra=proc.extra))
        resumed_ok = back.returncode == 0 and f"resumed from {named_path}" in back.stdout
    lost = (proc.returncode == 0 or set(on_disk) != set(good) or newest is None
            or int(newest.split("_")[1]) != last or not rows_finite(run_dir)
            or named_path is None or named_path.name != newest or not resumed_ok)
    details = {"exit_code": proc.returncode, "stderr": "\n".join(own_lines(proc.stderr))[-700:], "checkpoints_on_disk": on_disk,
               "checkpoints_that_verify": sorted(good), "last_logged_epoch": last,
               "checkpoint_named_in_error": str(named_path.name) if named_path else None,
               "resume_from_named_checkpoint_loads": resumed_ok, "logged_rows_finite": rows_finite(run_dir)}
    return lost, clear_error(proc, words), details


def fault_lr(work: Path, epochs: int) -> dict:
    t0 = time.time()
    d = work / "lr"
    extra = ["learning_rate=1.0", "critic_learning_rate=1.0"]
    proc = run(cmd(d, epochs, extra))
    proc.extra = extra
    lost, clear, det = check_diverged(d, proc, ["diverged", "epoch", "last good checkpoint"], epochs)
    return entry("divergence: learning_rate = critic_learning_rate = 1.0", lost, clear, t0, **det)


def fault_huge_reward(work: Path, epochs: int) -> dict:
    import torch

    from critic_align.rewards import FunctionReward
    from critic_align.rewards.remote_server import make_server

    t0 = time.time()
    calls = []

    d = work / "huge"

    def score(samples, prompts):  # a plain reward until epoch 2 is logged, then 1e38 (from epoch 3's rollout on)
        calls.append(len(prompts))
        if last_logged_epoch(d) < 2:
            return samples.mean(dim=(1, 2, 3))
        return torch.full((len(prompts),), 1e38)

    server = make_server(FunctionReward(score, name="scorer"), 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    d.mkdir(parents=True)
    cfg = d.parent / "huge.yaml"
    cfg.write_text(f"task: digits\nrewards:\n  - {{name: remote, url: 'http://{host}:{port}/score', encoding: list, "
                   "timeout: 60}\n")
    try:
        proc = run(cmd(d, epochs, config=str(cfg)))
    finally:
        server.shutdown()
        server.server_close()
    proc.extra = []
    on_disk, good = all_on_disk(d), intact(d)
    last = last_logged_epoch(d)
    lost = (proc.returncode == 0 or set(on_disk) != set(good) or not on_disk
            or int(on_disk[-1].split("_")[1]) != last or not rows_finite(d) or last != 2)
    det = {"exit_code": proc.returncode, "stderr": "\n".join(own_lines(proc.stderr))[-700:], "checkpoints_on_disk": on_disk,
           "checkpoints_that_verify": sorted(good), "last_logged_epoch": last, "logged_rows_finite": rows_finite(d)}
    return entry("divergence: a reward of 1e38 from epoch 3 (remote reward)", lost,
                 clear_error(proc, ["reward 'remote'", "1e+38", "overflow the value loss"]), t0, **det)


# ----------------------------------------------------------------------------------------------- concurrency
def fault_second_writer(work: Path, ref: Path, epochs: int, resume: bool) -> dict:
    from critic_align.checkpoint import latest_checkpoint

    t0 = time.time()
    d = work / ("live_resume" if resume else "two_writers")
    first = start(cmd(d, epochs))
    # the second writer comes while the first is in value pretraining (before any row), or, for --resume,
    # once the first has written a checkpoint (so the resume has something to load)
    ready = (lambda: latest_checkpoint(d / "checkpoints") is not None) if resume else \
        (lambda: (d / "run.lock").exists())
    started = wait_for(ready, 120, first)
    second = run(cmd(d, epochs, resume=resume))
    out, err = first.communicate(timeout=600)
    diffs = kill_resume.compare(ref, d) if first.returncode == 0 else [f"the first run failed: {err[-500:]}"]
    words = ["cannot resume" if resume else "cannot write to", "in use by another training process",
             f"pid {first.pid}"]
    return entry("resume of a live run" if resume else "two concurrent writers", not started or bool(diffs),
                 clear_error(second, words), t0, second_exit_code=second.returncode,
                 second_stderr="\n".join(own_lines(second.stderr))[-500:], differences_from_uninterrupted_run=diffs[:5])


# ------------------------------------------------------------------------------------------------ corruption
def fault_corrupt(work: Path, ref: Path, epochs: int, how: str) -> dict:
    t0 = time.time()
    d = work / f"corrupt_{how}"
    shutil.copytree(ref, d)
    before = intact(d)
    newest = d / "checkpoints" / all_on_disk(d)[-1]
    f = newest / "tensors.safetensors"
    data = bytearray(f.read_bytes())
    log_before = (d / "metrics.jsonl").read_text()
    if how == "truncated":
        data = data[: len(data) // 3]
    elif how == "bit_flip":
        data[len(data) // 2] ^= 0x04
    elif how == "header":  # inside safetensors' JSON header (after its 8-byte length)
        data[8:40] = b"#" * 32
    elif how == "garbage":  # 100 kB of random bytes inside the tensor data, same size
        n = min(100_000, len(data) // 2)
        start_at = len(data) // 3
        data[start_at:start_at + n] = random.Random(0).randbytes(n)
    if how == "state_json":
        (newest / "state.json").write_text('{"format_version": 1, "epoch": ')
    else:
        f.write_bytes(bytes(data))
    after_fault = intact(d)
    # nothing but the corrupted checkpoint changed
    others_kept = all(after_fault.get(k) == v for k, v in before.items() if k != newest.name)
    back = run(cmd(d, epochs, resume=True))
    diffs = kill_resume.compare(ref, d) if back.returncode == 0 else [f"the resume failed: {back.stderr[-500:]}"]
    set_aside = sorted(p.name for p in (d / "checkpoints").glob(f"corrupt-{newest.name}-*"))
    prev = all_on_disk(ref)[-2]
    said = (f"skipping {newest.name}" in back.stderr and f"resuming from {prev}" in back.stderr
            and "corrupt" in back.stderr)
    label = {"truncated": "truncated checkpoint (a third of tensors.safetensors left)",
             "bit_flip": "bit-flipped checkpoint (one bit of tensors.safetensors)",
             "garbage": "100 kB of random bytes inside tensors.safetensors (same size)",
             "header": "garbled safetensors header (32 bytes of its JSON header)",
             "state_json": "corrupt state.json (cut mid-JSON)"}[how]
    log_kept = log_copy_holds(d, log_before)
    said = said and "the full log is kept as metrics.before-resume-" in back.stderr
    return entry(label, not others_kept or bool(diffs) or not set_aside or not log_kept, said and back.returncode == 0,
                 t0, corrupted=newest.name, resume_exit_code=back.returncode,
                 resume_stderr="\n".join(own_lines(back.stderr))[-900:],
                 corrupt_checkpoint_kept_as=set_aside, cut_log_rows_kept_in_a_copy=log_kept,
                 rows_cut_by_the_fallback=len(log_before.splitlines()) - _rows_at_checkpoint(ref, prev),
                 differences_from_uninterrupted_run=diffs[:5])


def _rows_at_checkpoint(run_dir: Path, name: str) -> int:
    """Rows of metrics.jsonl when checkpoint ``name`` was written (its recorded size)."""
    size = json.loads((run_dir / "checkpoints" / name / "state.json").read_text())["metrics_bytes"]
    return (run_dir / "metrics.jsonl").read_bytes()[:size].count(b"\n")


def log_copy_holds(run_dir: Path, log_before: str) -> bool:
    """A metrics.before-resume-*.jsonl copy holds every row the log had before the resume."""
    return any(p.read_text() == log_before for p in run_dir.glob("metrics.before-resume-*.jsonl"))


# ------------------------------------------------------------------------------------------------- disk full
def _mount_tmpfs(path: Path, size: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


ENOSPC_SHIM = """
import errno, sys
import safetensors.torch as st
real, calls = st.save_file, [0]
def save_file(*a, **k):
    calls[0] += 1
    if calls[0] == 3:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(*a, **k)
st.save_file = save_file
from critic_align.train.cli import cli
sys.argv = ["critic-align"] + sys.argv[1:]
sys.exit(cli())
"""


def fault_disk_full(work: Path, ref: Path, epochs: int) -> dict:
    t0 = time.time()
    ckpt_bytes = sum(f.stat().st_size for f in (ref / "checkpoints" / all_on_disk(ref)[-1]).iterdir())
    # room for the small files and two checkpoints, not three: the third write (epoch 2) fills the disk
    size = 2 * ckpt_bytes + 1_500_000
    mnt = work / "disk_full_mnt"
    real = _mount_tmpfs(mnt, size)
    d = mnt / "run"
    try:
        if real:
            first = run(cmd(d, epochs))
        else:  # no root: the third checkpoint write raises ENOSPC inside the process
            mnt.mkdir(parents=True, exist_ok=True)
            c = cmd(d, epochs)
            first = run([sys.executable, "-c", ENOSPC_SHIM] + c[3:])
        before = intact(d)
        # every checkpoint left on the full disk verifies (the failed write left no half checkpoint behind)
        kept = bool(before) and set(all_on_disk(d)) == set(before)
        if real:  # free space: grow the filesystem
            subprocess.run(["mount", "-o", "remount,size=512m", str(mnt)], check=True)
        back = run(cmd(d, epochs, resume=True))
        diffs = kill_resume.compare(ref, d) if back.returncode == 0 else [f"the resume failed: {back.stderr[-500:]}"]
        return entry("disk full" + ("" if real else " (simulated: ENOSPC raised by the checkpoint write)"),
                     not kept or bool(diffs), clear_error(first, ["disk is full", "free disk space"]), t0,
                     real_filesystem=real, filesystem_bytes=size if real else None, first_exit_code=first.returncode,
                     first_stderr="\n".join(own_lines(first.stderr))[-600:], checkpoints_before_resume=sorted(before),
                     resume_exit_code=back.returncode, differences_from_uninterrupted_run=diffs[:5])
    finally:
        if real:
            subprocess.run(["umount", str(mnt)], capture_output=True)


# ---------------------------------------------------------------------------------------------------- collapse
COLLAPSE = ["batch_size=8", "num_inference_steps=5", "minibatch_size=20", "sde_window_size=0", "eval_every=1",
            "learning_rate=1.0", "critic_learning_rate=1.0", "best_metric=eval/reward/digit_correct"]


def fault_collapse(work: Path, epochs: int, stop: bool) -> dict:
    """A finite collapse: reported (exit 0, a warning, summary.json) or, with stop_on_collapse, a clear error; either
    way best/ is kept past keep_last rotation, verifies, and loads with --resume-from (the log cut by that resume
    is kept in a copy)."""
    from critic_align.checkpoint import verify_checkpoint

    t0 = time.time()
    d = work / ("collapse_stop" if stop else "collapse")
    extra = COLLAPSE + (["stop_on_collapse=true"] if stop else [])
    proc = run(cmd(d, epochs, extra))
    summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
    report = summary.get("collapse", {})
    best_dir = sorted((d / "best").glob("epoch_*"))
    best = best_dir[-1] if best_dir else None
    best_ok = best is not None and verify_checkpoint(best) is None and report.get("best_checkpoint") == str(best)
    on_disk, good = all_on_disk(d), intact(d)
    rotated_past = best is not None and best.name not in on_disk  # keep_last rotation removed its epoch there
    log_before = (d / "metrics.jsonl").read_text()
    evals = [round(r["eval/reward/digit_correct"], 4) for r in rows(d) if r.get("phase") == "eval"
             and "eval/reward/digit_correct" in r]
    resumed = False
    if best is not None:
        back = run(cmd(d, int(best.name.split("_")[1]) + 1, extra + ["stop_on_collapse=false"], resume_from=best))
        resumed = back.returncode == 0 and f"resumed from {best}" in back.stdout
    log_kept = log_copy_holds(d, log_before)
    kept = best_ok and resumed
    if stop:
        clear = clear_error(proc, ["collapse", "stop_on_collapse", "best checkpoint is", "--resume-from"])
    else:
        clear = (proc.returncode == 0 and "warning: collapse: the held-out eval/reward/digit_correct fell" in proc.stderr
                 and f"--resume-from {best}" in proc.stderr and report.get("collapsed") is True)
    lost = not kept or set(on_disk) != set(good) or not log_kept
    return entry(f"collapse (learning_rate = critic_learning_rate = 1.0, finite){', stop_on_collapse' if stop else ''}",
                 lost, clear, t0, expects_error=stop, exit_code=proc.returncode,
                 stderr=[x for x in proc.stderr.strip().splitlines() if "collapse" in x][-1:],
                 eval_digit_correct=evals,
                 summary_collapse={k: report.get(k) for k in ("collapsed", "collapse_epoch", "collapse_value",
                                                              "best_value", "best_epoch", "best_checkpoint")},
                 best_checkpoint_kept=kept, best_epoch_rotated_out_of_checkpoints=rotated_past,
                 checkpoints_on_disk=on_disk, resume_from_best_loads=resumed, cut_log_rows_kept_in_a_copy=log_kept,
                 note=None if stop else "no error is expected: clear_error = the collapse was reported on the console "
                                        "(naming best/ and --resume-from) and in summary.json")


# ------------------------------------------------------------------------------------------------------ remote
def trickle_server(trickle_when, byte_every: float = 0.5, max_bytes: int = 120):
    """An HTTP reward server on 127.0.0.1 (list encoding, the samples' mean as the score) that, once
    ``trickle_when()`` is true, answers one byte every ``byte_every`` s and never finishes (at most ``max_bytes``
    bytes: its threads end by themselves).  Returns (url, stop())."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.2)
    stop = threading.Event()
    trickles = []

    def handle(conn):
        with conn:
            conn.settimeout(30)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(1 << 16)
                if not chunk:
                    return
                data += chunk
            head, body = data.split(b"\r\n\r\n", 1)
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            while len(body) < length:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    return
                body += chunk
            try:
                if trickle_when():
                    trickles.append(time.time())
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
                    for _ in range(max_bytes):
                        if stop.is_set():
                            return
                        conn.sendall(b" ")
                        time.sleep(byte_every)
                    return
                images = json.loads(body)["images"]
                scores = [sum(sum(sum(row) for row in ch) for ch in im) / (len(im) * len(im[0]) * len(im[0][0]))
                          for im in images]
                out = json.dumps({"scores": scores}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                             % len(out) + out)
            except OSError:
                return

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()

    def close():
        stop.set()
        srv.close()

    return f"http://127.0.0.1:{srv.getsockname()[1]}/score", close, trickles


def fault_trickle(work: Path, epochs: int) -> dict:
    t0 = time.time()
    d = work / "trickle"
    d.mkdir(parents=True)
    url, close, trickles = trickle_server(lambda: last_logged_epoch(d) >= 2)
    cfg = d.parent / "trickle.yaml"
    cfg.write_text(f"task: digits\nrewards:\n  - {{name: remote, url: '{url}', encoding: list, timeout: 1, "
                   "retries: 0}\n")
    try:
        proc = run(cmd(d, epochs, config=str(cfg)))
        ended = time.time()
    finally:
        close()
    blocked = round(ended - trickles[0], 1) if trickles else None
    on_disk, good = all_on_disk(d), intact(d)
    last = last_logged_epoch(d)
    lost = (proc.returncode == 0 or set(on_disk) != set(good) or not on_disk
            or int(on_disk[-1].split("_")[1]) != last or last != 2)
    return entry("remote reward trickling its answer (1 byte / 0.5 s, never finishing) from epoch 3; timeout 1 s, "
                 "retries 0", lost, clear_error(proc, ["remote reward 'remote'", "no answer within the timeout of 1 s",
                                                       "gave up after 1 attempt"]) and blocked is not None
                 and blocked < 10, t0, exit_code=proc.returncode, stderr="\n".join(own_lines(proc.stderr))[-500:],
                 seconds_from_the_trickle_to_the_exit=blocked, checkpoints_on_disk=on_disk,
                 checkpoints_that_verify=sorted(good), last_logged_epoch=last)


def fault_stalled_uploads(stalled_count: int = 20, connection_timeout: float = 2.0) -> dict:
    """The reference server with ``stalled_count`` uploads that announce a body and never send it: a real request
    (RemoteReward, its default retries) is answered once the stalled ones hit the connection timeout."""
    import socket

    import torch

    from critic_align.rewards import Boldness
    from critic_align.rewards.remote import RemoteReward
    from critic_align.rewards.remote_server import make_server

    t0 = time.time()
    server = make_server(Boldness(), 0, connection_timeout=connection_timeout)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    host, port = server.server_address[:2]
    stalled, got, error = [], None, None
    try:
        for _ in range(stalled_count):
            s = socket.create_connection((host, port))
            s.sendall(b"POST /score HTTP/1.1\r\nContent-Length: 100000\r\n\r\n{")
            stalled.append(s)
        t1 = time.time()
        x = torch.zeros(2, 1, 4, 4)
        try:
            got = RemoteReward(f"http://{host}:{port}/score", timeout=5, retries=4, backoff=0.5, encoding="list")(
                x, ["a", "b"]).tolist()
        except Exception as exc:  # noqa: BLE001 (recorded)
            error = f"{type(exc).__name__}: {exc}"
        answered_after = round(time.time() - t1, 1)
        right = got == Boldness()(x, ["a", "b"]).tolist()
    finally:
        for s in stalled:
            s.close()
        server.shutdown()
        server.server_close()
    return entry(f"reference reward server: {stalled_count} stalled uploads, then a real request", False,
                 right and answered_after < 2 * connection_timeout + 2, t0, expects_error=False,
                 connection_timeout_s=connection_timeout, real_request_answered_after_s=answered_after,
                 real_request_scores_right=right, error=error,
                 note="no error is expected: clear_error = the real request got its scores once the stalled uploads "
                      "were cut at the server's connection timeout (503 + client retries before that)")


# --------------------------------------------------------------------------------------------------- SIGKILL
def fault_sigkill(work: Path, kills: int, epochs: int) -> list[dict]:
    t0 = time.time()
    tmp_out = work / "kill_resume.json"
    res = kill_resume.main(["--kills", str(kills), "--epochs", str(epochs), "--seed", "1",
                            "--workdir", str(work / "kills"), "--out", str(tmp_out)])
    out = [entry(f"SIGKILL at {res['kills']} random moments, then --resume each time (kill_resume.py, seed 1)",
                 not res["identical"], res["identical"], t0, expects_error=False, verdict=res["verdict"],
                 note="no error is expected: each resume continues exactly (clear_error = it did, with the stale lock "
                      "of the killed process taken over)", phases=[k["phase"] for k in res["kill_log"]])]
    full = RESULTS / "kill_resume.json"
    if full.exists():
        d = json.loads(full.read_text())
        out.append({"fault": f"SIGKILL at {d['kills']} random moments (benchmarks/results/kill_resume.json)",
                    "data_lost": not d["identical"], "clear_error": bool(d["identical"]), "expects_error": False,
                    "verdict": d["verdict"],
                    "seconds": d["total_wall_s"], "note": "read from kill_resume.json, written by "
                    "benchmarks/kill_resume.py"})
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4, help="epochs of the recovered runs")
    ap.add_argument("--diverge-epochs", type=int, default=10, help="epochs of the learning-rate-1.0 run")
    ap.add_argument("--collapse-epochs", type=int, default=6, help="epochs of the learning-rate-1.0 collapse runs")
    ap.add_argument("--kills", type=int, default=4)
    ap.add_argument("--kill-epochs", type=int, default=6)
    ap.add_argument("--workdir", default="/tmp/critic_align_fault_injection")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    if (work / "disk_full_mnt").is_mount():
        subprocess.run(["umount", str(work / "disk_full_mnt")])
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.time()
    ref = work / "uninterrupted"
    r = run(cmd(ref, args.epochs))
    if r.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed:\n{r.stderr[-2000:]}")
    print(f"uninterrupted run: {time.time() - t0:.1f} s", flush=True)

    faults = [fault_lr(work, args.diverge_epochs), fault_huge_reward(work, args.epochs),
              fault_second_writer(work, ref, args.epochs, resume=False),
              fault_second_writer(work, ref, args.epochs, resume=True)]
    faults += [fault_corrupt(work, ref, args.epochs, how)
               for how in ("truncated", "bit_flip", "garbage", "header", "state_json")]
    faults.append(fault_disk_full(work, ref, args.epochs))
    faults += [fault_collapse(work, args.collapse_epochs, stop=False), fault_collapse(work, args.collapse_epochs, True)]
    faults += [fault_trickle(work, args.epochs), fault_stalled_uploads()]
    faults += fault_sigkill(work, args.kills, args.kill_epochs)


    result = {
        "data_lost_count": sum(f["data_lost"] for f in faults),
        "clear_error_count": sum(f["clear_error"] for f in faults),
        "faults_count": len(faults),
        "faults_that_should_error": sum(f.get("expects_error", True) for f in faults),
        "clear_errors_where_an_error_is_expected": sum(f["clear_error"] for f in faults if f.get("expects_error", True)),
        "best_checkpoint_kept": all(f["best_checkpoint_kept"] for f in faults if "best_checkpoint_kept" in f),
        "faults": faults,
        "command": " ".join(cmd(Path("RUN"), args.epochs)[1:]),
        "epochs": args.epochs,
        "how_loss_is_detected": __doc__.split("How loss is detected, per fault (\"data_lost\"):")[1].split(
            "Writes")[0].strip(),
        "total_wall_s": round(time.time() - t0, 1),
        "machine": machine_info(threads=1),  # threads: the training subprocesses'
    }
    out = Path(args.out)
    write_result(out, result, topic="reliability" if out.resolve() == DEFAULT_OUT.resolve() else None)
    print(f"data_lost_count = {result['data_lost_count']} of {len(faults)} faults; clear errors "
          f"{result['clear_error_count']}/{len(faults)}")
    return result


if __name__ == "__main__":
    main()
