"""Nothing lost, ever: divergence, a second writer, corrupt checkpoints, a resume under another run definition.

Each test makes the fault happen for real (a diverging optimiser, a second process, bytes changed on disk) and
then checks both the error and that everything saved before it is still there and loads.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_trainer import make_trainer

from critic_align.checkpoint import (
    CheckpointError,
    _rotate,
    find_resumable,
    latest_checkpoint,
    read_checkpoint,
)
from critic_align.guard import MAX_ABS_REWARD, DivergenceError
from critic_align.rewards import FunctionReward, MultiReward, RewardError
from critic_align.runlock import LOCK_NAME, RunLockedError, acquire, release

ROOT = Path(__file__).resolve().parents[1]


def _finite(ckpt) -> bool:
    tensors, _ = read_checkpoint(ckpt)
    return all(bool(torch.isfinite(v).all()) for v in tensors.values() if v.is_floating_point())


# --------------------------------------------------------------------------------------------- divergence
def test_divergence_stops_naming_the_epoch_and_keeps_the_last_good_checkpoint(tmp_path):
    tr = make_trainer(tmp_path, num_epochs=6, keep_last=1)
    tr.train(num_epochs=2)
    ckpts = tmp_path / "run" / "checkpoints"
    good = latest_checkpoint(ckpts)
    assert good.name == "epoch_000002"
    for group in tr.optimizer.param_groups:  # the learning rate of a run about to diverge
        group["lr"] = 1e4
    with pytest.raises(DivergenceError) as info:
        tr.train(num_epochs=6)
    msg = str(info.value)
    assert "training diverged in epoch 3" in msg
    assert ("gradient norm" in msg or "loss is" in msg or "hold NaN/inf" in msg), msg
    assert f"last good checkpoint is {good}" in msg
    # the last good checkpoint survives (keep_last=1 did not rotate it away for a broken one) and loads
    assert sorted(p.name for p in ckpts.glob("epoch_*")) == ["epoch_000002"]
    assert _finite(good)
    fresh = make_trainer(tmp_path, num_epochs=6, keep_last=1)
    fresh.load(good)
    assert fresh.epoch == 2
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["phase"] == "train"] == [1, 2]  # no row of the diverged epoch


def test_weights_made_non_finite_are_never_checkpointed(tmp_path):
    tr = make_trainer(tmp_path)
    good = tr.save()
    with torch.no_grad():
        tr.policy_params[0].view(-1)[0] = math.nan
    tr.epoch = 1
    with pytest.raises(DivergenceError, match=r"policy tensors hold NaN/inf .* before writing a checkpoint.*"
                                              r"last good checkpoint is .*epoch_000000"):
        tr.save()
    assert latest_checkpoint(good.parent) == good and not (good.parent / "epoch_000001").exists()


def test_a_checkpoint_with_non_finite_weights_is_refused_on_load(tmp_path):
    from safetensors.torch import load_file, save_file

    tr = make_trainer(tmp_path)
    path = tr.save()
    (path / "manifest.json").unlink()  # as written by a version without the guard or manifests
    tensors = load_file(str(path / "tensors.safetensors"))
    name = next(k for k in tensors if k.startswith("policy."))
    tensors[name] = torch.full_like(tensors[name], math.nan)
    save_file(tensors, str(path / "tensors.safetensors"))
    with pytest.raises(CheckpointError, match=r"holds non-finite weights .*written after training diverged"):
        tr.load(path)


def test_rotation_never_drops_the_newest_checkpoint_that_passed_the_guard(tmp_path):
    for e in range(4):
        d = tmp_path / f"epoch_{e:06d}"
        d.mkdir()
        (d / "state.json").write_text(json.dumps({"guard": "passed"} if e < 2 else {}))
    _rotate(tmp_path, keep_last=2)  # the two newest lack the guard mark (e.g. written by an older version)
    assert sorted(p.name for p in tmp_path.glob("epoch_*")) == ["epoch_000001", "epoch_000002", "epoch_000003"]
    (tmp_path / "epoch_000003" / "state.json").write_text(json.dumps({"guard": "passed"}))
    _rotate(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("epoch_*")) == ["epoch_000002", "epoch_000003"]


@pytest.mark.parametrize("value", [1e38, -1e20, 2 * MAX_ABS_REWARD])
def test_a_reward_that_would_overflow_the_value_loss_is_refused_by_name(tmp_path, value):
    tr = make_trainer(tmp_path)
    tr.train(num_epochs=1)
    saved = latest_checkpoint(tmp_path / "run" / "checkpoints")

    def huge(s, p):
        out = torch.zeros(len(p))
        out[3] = value
        return out

    tr.rewards = MultiReward([FunctionReward(huge, name="huge")])
    with pytest.raises(RewardError, match=r"reward 'huge' returned .* for samples \[3\]: magnitudes above 1e\+15 "
                                          r"overflow the value loss"):
        tr.train_epoch()
    assert read_checkpoint(saved)  # still intact


def test_the_reward_limit_keeps_the_value_loss_finite():
    """MAX_ABS_REWARD's justification, checked: at the limit, float32 squared errors summed over a large
    minibatch stay finite; at 1e20 a single one overflows."""
    r = torch.full((100_000,), MAX_ABS_REWARD)
    v = -r  # a critic as wrong as it can be at this scale
    assert math.isfinite(((v - r) ** 2).sum().item())
    big = torch.tensor([1e20])
    assert math.isinf(((big - 0) ** 2).item())


# ------------------------------------------------------------------------------------------------ the lock
_HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from critic_align.runlock import acquire
    acquire({run!r})
    print("locked", flush=True)
    time.sleep(60)
""")


def _hold_in_other_process(run: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER.format(root=str(ROOT), run=str(run))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_and_a_resume_of_a_live_run_are_refused(tmp_path):
    run = tmp_path / "run"
    tr = make_trainer(tmp_path)
    tr.train(num_epochs=1)
    saved = latest_checkpoint(run / "checkpoints")
    before = (run / "metrics.jsonl").read_bytes()
    tr.lock.release()  # this process lets go; another process takes the run
    proc = _hold_in_other_process(run)
    try:
        other = make_trainer(tmp_path)
        with pytest.raises(RunLockedError, match=rf"cannot resume {run}: it is in use by another training process "
                                                 rf"\(pid {proc.pid} on host .*\).*kill {proc.pid}"):
            other.load(saved)
        with pytest.raises(RunLockedError, match=rf"cannot write to {run}: it is in use .*pid {proc.pid}"):
            make_trainer(tmp_path).train()
        assert (run / "metrics.jsonl").read_bytes() == before  # neither wrote a row nor cut the log
        assert latest_checkpoint(run / "checkpoints") == saved
    finally:
        proc.kill()
        proc.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_message(tmp_path, capsys):
    run = tmp_path / "run"
    proc = _hold_in_other_process(run)
    proc.kill()
    proc.wait()
    info = json.loads((run / LOCK_NAME).read_text())
    assert info["pid"] == proc.pid
    acquire(run)
    assert f"taking over the lock of pid {proc.pid}" in capsys.readouterr().err
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    release(run)
    assert not (run / LOCK_NAME).exists()


def test_a_lock_from_another_host_is_refused_with_how_to_remove_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": time.time()}))
    with pytest.raises(RunLockedError, match=r"host 'elsewhere'.*If that process is gone, remove .*run.lock by hand"):
        acquire(run)


# ---------------------------------------------------------------------------------------- integrity
def _three_checkpoints(tmp_path):
    tr = make_trainer(tmp_path, num_epochs=3, keep_last=3)
    tr.train()
    return sorted((tmp_path / "run" / "checkpoints").glob("epoch_*"))


def test_a_bit_flipped_checkpoint_of_the_same_size_is_detected(tmp_path):
    ckpts = _three_checkpoints(tmp_path)
    f = ckpts[-1] / "tensors.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit inside the tensor data: safetensors itself would load it
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"tensors.safetensors is corrupt \(same size but SHA-256 .* its bytes "
                                              r"were altered"):
        read_checkpoint(ckpts[-1])
    best, skipped = find_resumable(ckpts[-1].parent)
    assert best == ckpts[-2] and [p for p, _ in skipped] == [ckpts[-1]]


def test_resume_walks_back_to_the_newest_checkpoint_that_verifies_and_says_so(tmp_path, capsys):
    from critic_align.train.cli import _checkpoint_to_resume

    ckpts = _three_checkpoints(tmp_path)
    f = ckpts[-1] / "tensors.safetensors"
    f.write_bytes(f.read_bytes()[:100])  # truncated
    chosen = _checkpoint_to_resume(tmp_path / "run", None)
    err = capsys.readouterr().err
    assert chosen == ckpts[-2]
    assert "skipping epoch_000003" in err and "truncated" in err and "resuming from epoch_000002" in err
    moved = list((tmp_path / "run" / "checkpoints").glob("corrupt-epoch_000003-*"))
    assert len(moved) == 1 and (moved[0] / "tensors.safetensors").stat().st_size == 100  # kept, not deleted
    with pytest.raises(CheckpointError, match=r"--resume-from .*epoch_000003.*does not exist"):
        _checkpoint_to_resume(tmp_path / "run", str(ckpts[-1]))


def test_resume_from_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path, capsys):
    from critic_align.train.cli import _set_aside_newer

    ckpts = _three_checkpoints(tmp_path)
    run = tmp_path / "run"
    log = (run / "metrics.jsonl").read_text()
    _set_aside_newer(run, ckpts[0])
    assert sorted(p.name for p in (run / "checkpoints").glob("epoch_*")) == ["epoch_000001"]
    assert len(list((run / "checkpoints").glob("superseded-epoch_00000[23]-*"))) == 2
    copies = list(run.glob("metrics.before-resume-*.jsonl"))
    assert len(copies) == 1 and copies[0].read_text() == log
    assert "moved it to superseded-epoch_000002" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ run identity
def _rewards(temperature=1.0, weight=1.0, name="bright"):
    from test_trainer import brightness_matches_label

    r = FunctionReward(brightness_matches_label, name=name, differentiable=True)
    r.temperature = temperature  # a reward parameter
    return MultiReward([r], [weight])


@pytest.mark.parametrize("kw,match", [
    (dict(temperature=6.0), r"reward 'bright': temperature=1.0 in the checkpoint vs 6.0 now"),
    (dict(weight=2.0), r"reward 'bright': weight 1 in the checkpoint vs 2 now"),
    (dict(name="other"), r"rewards \['bright'\] in the checkpoint vs \['other'\] now"),
])
def test_resume_with_another_reward_is_refused_naming_the_difference(tmp_path, kw, match):
    tr = make_trainer(tmp_path / "a")
    tr.rewards = _rewards()
    path = tr.save()
    other = make_trainer(tmp_path / "b")
    other.rewards = _rewards(**kw)
    with pytest.raises(CheckpointError, match=match):
        other.load(path)
    same = make_trainer(tmp_path / "c")
    same.rewards = _rewards()
    same.load(path)  # the same definition resumes


def test_resume_with_another_task_is_refused(tmp_path):
    from test_trainer import TinyTask

    path = make_trainer(tmp_path / "a").save()
    other = make_trainer(tmp_path / "b")

    class OtherPrompts(TinyTask):
        prompts = ("3", "2", "1", "0")

    other.task = OtherPrompts()
    with pytest.raises(CheckpointError, match=r"task '.*TinyTask' in the checkpoint vs '.*OtherPrompts' now, "
                                              r"the prompts differ"):
        other.load(path)


# ------------------------------------------------------------------------------------------- remote reward
def test_the_remote_timeout_is_a_deadline_for_the_whole_request():
    """A server trickling its answer one byte every 0.1 s: each read is quick, the request is not."""
    import socket
    import threading

    from critic_align.rewards.remote import RemoteReward

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(1 << 20)
                body = b'{"scores": [1.0]}'
                answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
                try:
                    for byte in answer:
                        conn.sendall(bytes([byte]))
                        time.sleep(0.1)
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{srv.getsockname()[1]}/score"
    t0 = time.perf_counter()
    with pytest.raises(RewardError, match=r"no answer within the timeout of 0.5 s \(gave up after 1 attempt\)"):
        RemoteReward(url, timeout=0.5, retries=0)(torch.zeros(1, 3, 4, 4), ["a"])
    assert time.perf_counter() - t0 < 1.5  # the whole answer would take ~6 s
    stop.set()
    srv.close()


def test_the_reference_server_frees_stalled_connections_and_bounds_its_threads():
    import socket
    import threading

    from critic_align.rewards import Boldness
    from critic_align.rewards.remote import RemoteReward
    from critic_align.rewards.remote_server import make_server

    server = make_server(Boldness(), 0, workers=2, backlog=1, connection_timeout=0.5)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    host, port = server.server_address[:2]
    url = f"http://{host}:{port}/score"
    threads_before = threading.active_count()
    stalled = []
    try:
        for _ in range(10):  # uploads that announce a body and never send it
            s = socket.create_connection((host, port))
            s.sendall(b"POST /score HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{")
            stalled.append(s)
        time.sleep(0.2)
        assert threading.active_count() - threads_before <= 2 + 2  # the pool's 2 workers (+ 2 cut-off timers)
        busy = [s.recv(1 << 16) for s in stalled[3:]]  # beyond 2 workers + 1 queued: answered 503 at once
        assert all(b.startswith(b"HTTP/1.1 503") for b in busy)
        time.sleep(1.2)  # the stalled uploads hit the connection timeout and free their workers
        got = RemoteReward(url, timeout=5, retries=0, encoding="list")(torch.zeros(2, 1, 4, 4), ["a", "b"])
        assert got.tolist() == Boldness()(torch.zeros(2, 1, 4, 4), ["a", "b"]).tolist()
    finally:
        for s in stalled:
            s.close()
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------- config and CLI
def test_every_config_field_is_validated():
    """Each PPOConfig field given a value of no sensible type is refused with an error naming the field."""
    import dataclasses

    from critic_align.config import PPOConfig

    for f in dataclasses.fields(PPOConfig):
        with pytest.raises(ValueError, match=rf"config field {f.name}="):
            PPOConfig(**{f.name: object()})


@pytest.mark.parametrize("kw,match", [
    (dict(lora_alpha=-1.0), r"lora_alpha=-1.0: must be a finite number > 0.*flip its sign"),
    (dict(lora_alpha=0), r"lora_alpha=0: must be a finite number > 0"),
    (dict(adam_betas=[0.9]), r"adam_betas=\[0.9\]: must be two numbers in \[0, 1\)"),
    (dict(adam_betas=[0.9, 1.5]), r"adam_betas=\[0.9, 1.5\]"),
    (dict(lora_target_modules="to_q"), r"lora_target_modules='to_q': must be a non-empty list .*goes in a list"),
    (dict(reward_weights="abc"), r"reward_weights='abc': must be a non-empty list of finite numbers"),
    (dict(value_clip_range="x"), r"value_clip_range='x'"),
])
def test_config_values_that_used_to_slip_through(kw, match):
    from critic_align.config import PPOConfig

    with pytest.raises(ValueError, match=match):
        PPOConfig(**kw)


@pytest.mark.parametrize("text,match", [
    ("", r"bad.yaml is empty: a run config needs at least its rewards"),
    ("run:\n  num_epochs: 2\n", r"bad.yaml lists no rewards"),
    ("rewards: []\n", r"bad.yaml lists no rewards"),
    ("rewards: [{name: digit_prob\n", r"bad.yaml is not valid YAML: "),
])
def test_empty_rewardless_and_broken_yaml_are_refused_naming_the_file(tmp_path, text, match):
    from critic_align.train.registry import load_run_config

    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_run_config(str(bad))


def test_a_reward_weight_that_is_not_a_number_is_refused():
    from critic_align.registry import build_rewards

    with pytest.raises(ValueError, match=r"weight must be a finite number, got 'abc' \(a quoted string"):
        build_rewards([{"name": "boldness", "weight": "abc"}])


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    from critic_align.train.cli import cli

    bad = tmp_path / "bad.yaml"
    bad.write_text("rewards: [{name: digit_prob\n")
    assert cli(["train", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("critic-align: error: ") and "bad.yaml is not valid YAML" in err
    assert "Traceback" not in err
    assert cli(["train", "--out", str(tmp_path / "r"), "--set", "learning_rate=-1"]) == 2
    assert "config field learning_rate=-1: must be a finite number > 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not valid YAML"):  # --debug: the exception itself, with its traceback
        cli(["train", "--config", str(bad), "--debug"])


def test_cli_exit_code_and_traceback_only_with_debug_in_a_real_process(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rewards: []\n")
    cmd = [sys.executable, "-m", "critic_align.train.cli", "train", "--config", str(bad)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1 and "lists no rewards" in plain.stderr
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


@pytest.mark.parametrize("args,match", [
    (["--particles", "-2"], r"argument --particles: must be an integer >= 1, got -2"),
    (["--particles", "0"], r"argument --particles: must be an integer >= 1, got 0"),
    (["--scale", "inf"], r"argument --scale: must be a finite number, got inf"),
    (["--lam", "nan"], r"argument --lam: must be a finite number, got nan"),
    (["--ess-threshold", "2"], r"argument --ess-threshold: must be a number in \[0, 1\], got 2"),
])
def test_steering_arguments_are_checked_before_anything_runs(args, match, capsys):
    from critic_align.train.cli import cli

    with pytest.raises(SystemExit) as info:
        cli(["steer", "--config", "digits", *args])
    assert info.value.code == 2
    assert __import__("re").search(match, capsys.readouterr().err)


def test_steering_entry_point_checks_its_arguments():
    from critic_align.train.steer import check_steering_args

    for kw, match in [(dict(particles=0, scale=0.0, lam=1.0), "particles must be an integer >= 1, got 0"),
                      (dict(particles=2, scale=math.inf, lam=1.0), "scale must be a finite number, got inf"),
                      (dict(particles=2, scale=0.0, lam=math.nan), "lam must be a finite number, got nan")]:
        with pytest.raises(ValueError, match=match):
            check_steering_args(**kw)


def test_summary_after_a_resume_is_computed_from_the_whole_log(tmp_path):
    from critic_align.train.cli import run_summary

    rows = [{"phase": "value_pretrain", "iteration": 0, "time_s": 2.0},
            {"phase": "train", "epoch": 1, "time_epoch_s": 1.0, "reward/r/mean": 0.1},
            {"phase": "train", "epoch": 2, "time_epoch_s": 1.5, "reward/r/mean": 0.2},  # logged by the first process
            {"phase": "train", "epoch": 3, "time_epoch_s": 1.0, "reward/r/mean": 0.3}]  # by the resumed one
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = run_summary(tmp_path, ["r"], epochs=3, reward_queries=64)
    assert s["r_first_epoch"] == 0.1 and s["r_last_epoch"] == 0.3  # not 0.3 / 0.3 as a resumed process saw it
    assert s["train_seconds"] == 5.5 and s["logged_epochs"] == 3


# ------------------------------------------------------------------ issue 30: best/ and the collapse guard
def _scripted_eval(tr, values):
    """The held-out evaluation returns these values of eval/reward/bright, one per call (epoch 0, 1, ...)."""
    it = iter(values)
    tr.evaluate = lambda: {"eval/reward/bright": next(it)}
    return tr


def test_a_collapse_keeps_the_best_checkpoint_and_is_reported(tmp_path, capsys):
    from critic_align.best import best_checkpoint
    from critic_align.train.cli import run_summary

    tr = _scripted_eval(make_trainer(tmp_path, num_epochs=4, eval_every=1, keep_last=1), [0.5, 0.9, 0.8, 0.3, 0.2])
    tr.train()
    run = tmp_path / "run"
    best = best_checkpoint(run)
    assert best == run / "best" / "epoch_000001"  # the best evaluation (0.9), written when it was evaluated
    assert sorted(p.name for p in (run / "best").iterdir()) == ["epoch_000001"]  # the epoch-0 best was replaced
    assert sorted(p.name for p in (run / "checkpoints").glob("epoch_*")) == ["epoch_000004"]  # keep_last=1 rotated
    assert read_checkpoint(best)[1]["epoch"] == 1  # it verifies and holds epoch 1
    err = capsys.readouterr().err
    assert err.count("collapse: the held-out eval/reward/bright fell to 0.3 at epoch 3") == 1  # once, when it starts
    assert f"--resume-from {best}" in err
    s = run_summary(run, ["bright"], 4, 0, tr.config, ["bright"])["collapse"]
    assert (s["collapsed"], s["collapse_epoch"], s["collapse_value"], s["best_value"], s["best_epoch"]) == \
        (True, 3, 0.3, 0.9, 1)
    assert s["best_checkpoint"] == str(best) and s["final_value"] == 0.2
    fresh = make_trainer(tmp_path / "b", num_epochs=4, eval_every=1, keep_last=1)
    fresh.load(best, resume=False)  # the best policy loads
    assert fresh.epoch == 1


def test_stop_on_collapse_stops_naming_best_and_how_to_resume(tmp_path):
    from critic_align.best import CollapseError

    tr = _scripted_eval(make_trainer(tmp_path, num_epochs=5, eval_every=1, stop_on_collapse=True, collapse_margin=0.2),
                        [0.5, 0.9, 0.8, 0.6, 0.1])
    best = tmp_path / "run" / "best" / "epoch_000001"
    with pytest.raises(CollapseError, match=rf"stop_on_collapse.*fell to 0.6 at epoch 3, 0.3 below its best 0.9 "
                                            rf"\(epoch 1; collapse_margin=0.2 allows 0.18\).*--resume-from {best}"):
        tr.train()
    assert tr.epoch == 3 and best.exists()
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "epoch_000002"  # nothing saved was removed
    # no collapse with margin 0 (off), and a drop within the margin is not one
    quiet = _scripted_eval(make_trainer(tmp_path / "q", num_epochs=2, eval_every=1, stop_on_collapse=True,
                                       collapse_margin=0.0), [0.9, 0.1, 0.05])
    quiet.train()
    assert quiet.epoch == 2


def test_resume_from_best_sets_newer_checkpoints_aside_and_keeps_the_log(tmp_path, capsys):
    from critic_align.train.cli import _set_aside_newer

    tr = _scripted_eval(make_trainer(tmp_path, num_epochs=3, eval_every=1, keep_last=3), [0.5, 0.9, 0.3, 0.2])
    tr.train()
    run = tmp_path / "run"
    best = run / "best" / "epoch_000001"
    log = (run / "metrics.jsonl").read_text()
    _set_aside_newer(run, best)  # what critic-align train --resume-from RUN/best/epoch_000001 does first
    assert sorted(p.name for p in (run / "checkpoints").glob("epoch_*")) == ["epoch_000001"]
    assert len(list((run / "checkpoints").glob("superseded-epoch_00000[23]-*"))) == 2  # kept, renamed
    back = make_trainer(tmp_path, num_epochs=3, eval_every=1, keep_last=3)
    back.load(best)
    assert back.epoch == 1
    copies = list(run.glob("metrics.before-resume-*.jsonl"))
    assert len(copies) == 1 and copies[0].read_text() == log  # one copy of the whole log, not two
    assert len((run / "metrics.jsonl").read_text()) < len(log)


def test_an_unknown_best_metric_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"best_metric='eval/reward/nope': no such reward in this run; use one of "
                                         r"\['eval/reward/bright'\]"):
        make_trainer(tmp_path, best_metric="eval/reward/nope")
    with pytest.raises(ValueError, match=r"config field best_metric='accuracy': must be an eval/\* key"):
        make_trainer(tmp_path, best_metric="accuracy")


# ------------------------------------------------------- issue 30: a fallback past a corrupt checkpoint keeps the log
@pytest.mark.parametrize("how", ["truncated tensors", "garbled header", "corrupt state.json"])
def test_falling_back_past_a_corrupt_checkpoint_keeps_the_cut_rows(tmp_path, how, capsys):
    from critic_align.train.cli import _checkpoint_to_resume, _set_aside_newer

    ckpts = _three_checkpoints(tmp_path)
    run = tmp_path / "run"
    log = (run / "metrics.jsonl").read_text()
    newest = ckpts[-1]
    if how == "truncated tensors":
        f = newest / "tensors.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    elif how == "garbled header":
        f = newest / "tensors.safetensors"
        data = bytearray(f.read_bytes())
        data[8:24] = b"#" * 16  # inside the JSON header
        f.write_bytes(bytes(data))
    else:
        (newest / "state.json").write_text('{"format_version": 1, "epoch": ')
    ckpt = _checkpoint_to_resume(run, None)
    assert ckpt == ckpts[-2]
    _set_aside_newer(run, ckpt)
    tr = make_trainer(tmp_path, num_epochs=3, keep_last=3)
    tr.load(ckpt)
    err = capsys.readouterr().err
    copies = list(run.glob("metrics.before-resume-*.jsonl"))
    assert len(copies) == 1 and copies[0].read_text() == log  # every row, the final evaluation's included
    kept = [json.loads(x) for x in log.splitlines()]
    now = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    cut = kept[len(now):]
    assert now == kept[: len(now)] and any(r.get("phase") == "eval" and r["epoch"] == 3 for r in cut)
    assert f"row(s) of metrics.jsonl logged after {ckpt.name} are cut from it; the full log is kept as " \
           f"{copies[0].name}" in err
    tr.train()  # the resumed run finishes; the copy is untouched
    assert copies[0].read_text() == log


# --------------------------------------------------------------- issue 30: the remote deadline, an endless trickle
@pytest.mark.parametrize("head,bytes_sent", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", 40),
    # HTTP/1.0 without a length (read until the server closes): http.client drops its reference to the socket for
    # such an answer, so the deadline must keep its own
    (b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n", 16),
], ids=["http11-length", "http10-no-length"])
def test_an_endless_trickle_is_cut_at_the_deadline(head, bytes_sent):
    """A server that sends one byte every 0.5 s and never finishes: timeout=1 returns after ~1 s, not never."""
    import socket
    import threading

    from critic_align.rewards.remote import RemoteReward

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve():  # one connection, at most bytes_sent bytes (one per 0.5 s): the loop ends by itself
        conn, _ = srv.accept()
        with conn:
            conn.recv(1 << 20)
            try:
                conn.sendall(head)
                for _ in range(bytes_sent):
                    conn.sendall(b" ")
                    time.sleep(0.5)
            except OSError:
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    t0 = time.perf_counter()
    with pytest.raises(RewardError, match=r"no answer within the timeout of 1 s \(gave up after 1 attempt\)"):
        RemoteReward(f"http://127.0.0.1:{srv.getsockname()[1]}/score", timeout=1, retries=0)(torch.zeros(1, 3, 4, 4),
                                                                                            ["a"])
    assert time.perf_counter() - t0 < 2.5
    srv.close()


def test_a_queue_of_stalled_uploads_is_shed_together():
    """20 uploads that never send their body fill 2 workers and a queue of 18: each connection's deadline runs from
    its arrival, so all of them are shed about one connection_timeout after they came (not 10 timeouts later, one
    pair of workers at a time), and a real request gets through."""
    import socket
    import threading

    from critic_align.rewards import Boldness
    from critic_align.rewards.remote import RemoteReward
    from critic_align.rewards.remote_server import make_server

    server = make_server(Boldness(), 0, workers=2, backlog=18, connection_timeout=0.5)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    host, port = server.server_address[:2]
    stalled = []
    try:
        for _ in range(20):
            s = socket.create_connection((host, port))
            s.sendall(b"POST /score HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{")
            stalled.append(s)
        time.sleep(1.5)  # one timeout (0.5 s) + a grace of 0.05 s for each of the 18 queued, shared by 2 workers
        t0 = time.perf_counter()
        got = RemoteReward(f"http://{host}:{port}/score", timeout=2, retries=0, encoding="list")(
            torch.zeros(2, 1, 4, 4), ["a", "b"])
        assert got.tolist() == Boldness()(torch.zeros(2, 1, 4, 4), ["a", "b"]).tolist()
        assert time.perf_counter() - t0 < 1.0  # served at once: no stalled upload holds a worker any more
        for s in stalled:  # each stalled upload was answered 408 or cut
            s.settimeout(1.0)
            try:
                data = s.recv(1 << 16)
            except ConnectionResetError:
                data = b""
            assert data == b"" or data.split(b"\r\n")[0].endswith(b" 408 Request Timeout")
    finally:
        for s in stalled:
            s.close()
        server.shutdown()
        server.server_close()


def test_resuming_from_a_best_checkpoint_of_epoch_0_does_not_log_its_evaluation_twice(tmp_path):
    from critic_align.train.cli import _set_aside_newer

    tr = _scripted_eval(make_trainer(tmp_path, num_epochs=2, eval_every=1), [0.9, 0.3, 0.2])
    tr.train()
    run = tmp_path / "run"
    best = run / "best" / "epoch_000000"  # the base policy was the best: written after its evaluation
    assert sorted(p.name for p in (run / "best").glob("epoch_*")) == [best.name]
    _set_aside_newer(run, best)
    back = _scripted_eval(make_trainer(tmp_path, num_epochs=2, eval_every=1), [0.4, 0.5])
    back.load(best)
    back.train()
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [(r["epoch"], r["eval/reward/bright"]) for r in evals] == [(0, 0.9), (1, 0.4), (2, 0.5)]
