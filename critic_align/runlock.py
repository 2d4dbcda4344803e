"""One writer per run directory: a lock file ``RUN/run.lock`` holding the writer's PID, host and start time.

Two processes writing one run directory interleave their rows in ``metrics.jsonl`` and overwrite (or delete)
each other's checkpoints; a ``--resume`` of a run that is still alive duplicates its epochs.  The trainer takes
this lock before it writes anything (and before a resume truncates the logs); a second writer gets
:class:`RunLockedError` naming the holder.  A lock left by a process that no longer runs (killed, crashed) on
this host is taken over with a message; a lock from another host cannot be checked, so it is refused with the
command to remove it if that process is known to be gone.

The lock file is created complete and atomically (written to a temporary file, then ``os.link``-ed to its
name, which fails if it exists), so a reader never sees a half-written one.  Within one process the lock is
re-entrant (several trainers of one process may share a directory, as tests do); it is released when the
last holder releases it or the process exits.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

LOCK_NAME = "run.lock"
_held: dict[str, int] = {}  # resolved lock path -> re-entrant count, this process
_owner = [os.getpid()]  # a forked child inherits _held but not the locks: it starts afresh


def _forget_if_forked() -> None:
    if _owner[0] != os.getpid():
        _held.clear()
        _owner[0] = os.getpid()
_mutex = threading.Lock()


class RunLockedError(RuntimeError):
    """Another live process holds the run directory (or it cannot be written at all: :class:`RunDirNotWritable`)."""


class RunDirNotWritable(RunLockedError):
    """The run directory cannot be created or written (read-only filesystem, permissions, a file in the way)."""


def _not_writable(run_dir: Path, action: str, exc: OSError) -> RunDirNotWritable:
    why = f"{type(exc).__name__}: {exc.strerror or exc}" if isinstance(exc, OSError) else str(exc)
    return RunDirNotWritable(f"cannot {action} {run_dir}: the run directory is not writable ({why}); use a writable "
                             "--out (run: output_dir) or fix its permissions (nothing was written)")


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused PID from the holder."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, ticks: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # a zombie (killed, not yet reaped by its parent) writes nothing any more
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return False
    except (OSError, IndexError):
        pass
    now = _start_ticks(pid)
    return ticks is None or now is None or now == ticks


def _describe(info: dict) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {info.get('pid')} on host {info.get('host')!r}, since {when}"


def read_lock(run_dir) -> dict | None:
    path = Path(run_dir) / LOCK_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": None, "host": None, "corrupt": True}


def holder_alive(info: dict) -> bool:
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return True  # cannot tell from here: assume it is
    return _alive(info["pid"], info.get("start_ticks"))


def check_free(run_dir, action: str = "write to") -> None:
    """Raise :class:`RunLockedError` if another live process holds ``run_dir`` (does not take the lock)."""
    info = read_lock(run_dir)
    if info is None or info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        return
    if not info.get("corrupt") and holder_alive(info):
        raise RunLockedError(_locked_message(Path(run_dir), info, action))


def check_writable(run_dir, action: str = "write to") -> None:
    """Raise :class:`RunDirNotWritable` if ``run_dir`` cannot be created or written (a probe file is written and
    removed): the command line checks this before it builds anything."""
    run_dir = Path(run_dir)
    probe = run_dir / f".write-probe-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise _not_writable(run_dir, action, exc) from exc


def _locked_message(run_dir: Path, info: dict, action: str) -> str:
    here = info.get("host") == socket.gethostname()
    fix = (f"wait for it to finish, stop it (kill {info.get('pid')}), or use another --out" if here else
           f"if that process is gone, remove {run_dir / LOCK_NAME} by hand; otherwise use another --out")
    return (f"cannot {action} {run_dir}: it is in use by another training process ({_describe(info)}); a second "
            f"writer would interleave its metrics and overwrite its checkpoints. {fix[0].upper()}{fix[1:]}")


def acquire(run_dir, action: str = "write to") -> None:
    """Take the lock of ``run_dir`` for this process (re-entrant); see the module docstring."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _not_writable(run_dir, action, exc) from exc
    path = run_dir / LOCK_NAME
    key = str(path.resolve())
    with _mutex:
        _forget_if_forked()
        if key in _held:
            _held[key] += 1
            return
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "start_ticks": _start_ticks(os.getpid()), "argv": sys.argv[:8]}
        tmp = run_dir / f".{LOCK_NAME}.{os.getpid()}.tmp"
        try:
            tmp.write_text(json.dumps(me))
        except OSError as exc:
            raise _not_writable(run_dir, action, exc) from exc
        try:
            for _ in range(3):
                try:
                    os.link(tmp, path)  # atomic: fails if the lock exists
                    break
                except FileExistsError:
                    pass
                except OSError as exc:
                    raise _not_writable(run_dir, action, exc) from exc
                info = read_lock(run_dir)
                if info is None:
                    continue  # released in between: try again
                if info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
                    break  # ours (e.g. released by another holder in this process without the count)
                if not info.get("corrupt") and holder_alive(info):
                    raise RunLockedError(_locked_message(run_dir, info, action))
                # stale: rename it away (only one taker's rename succeeds), then create ours
                stale = run_dir / f".{LOCK_NAME}.stale-{os.getpid()}"
                try:
                    os.replace(path, stale)
                except FileNotFoundError:
                    continue
                stale.unlink(missing_ok=True)
                what = "an unreadable lock file" if info.get("corrupt") else \
                    f"the lock of {_describe(info)}, which is no longer running (killed or crashed)"
                print(f"critic_align: taking over {what} in {run_dir}", file=sys.stderr, flush=True)
            else:
                raise RunLockedError(f"could not take the lock {path}: other processes keep creating it")
        finally:
            tmp.unlink(missing_ok=True)
        _held[key] = 1


def release(run_dir) -> None:
    """Drop one hold of ``run_dir``'s lock; the file is removed when this process's last hold goes."""
    path = Path(run_dir) / LOCK_NAME
    key = str(path.resolve()) if path.parent.exists() else str(path)
    with _mutex:
        _forget_if_forked()
        if key not in _held:
            return
        _held[key] -= 1
        if _held[key] > 0:
            return
        del _held[key]
        _unlink_if_mine(path)


def _unlink_if_mine(path: Path) -> None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@atexit.register
def _release_all() -> None:
    _forget_if_forked()
    for key in list(_held):
        _unlink_if_mine(Path(key))
    _held.clear()


class RunLock:
    """A trainer's hold on its run directory's lock (:func:`acquire`), taken at most once: by the main process,
    while every process learns the outcome (``processes``: :class:`~critic_align.distributed.Processes`), so when
    the main one is refused every process raises and none waits for the others forever."""

    def __init__(self, run_dir, processes):
        self.run_dir, self.processes = Path(run_dir), processes
        self.held = False

    def take(self, action: str = "write to") -> None:
        """Take the lock for ``action`` ('write to', 'resume': the error message's verb), unless already held."""
        if self.held:
            return
        error = None
        if self.processes.is_main_process:
            try:
                acquire(self.run_dir, action)
            except RunLockedError as exc:
                error = exc
        message = self.processes.share_from_main(str(error) if error else None)
        if message and error is None:
            error = RunLockedError(message)
        if error is not None:
            raise error
        self.held = True

    def release(self) -> None:
        """Let go of the lock (the file goes with this process's last hold: :func:`release`)."""
        if self.held and self.processes.is_main_process:
            release(self.run_dir)
        self.held = False
