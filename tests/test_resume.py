"""Exact resume after a kill: the logs are cut back to the checkpoint, stale temporary directories are ignored and
removed, and a run SIGKILLed at a random moment resumes to the same metrics and weights, bit for bit.

(benchmarks/kill_resume.py does the same with 10 kills of the real digits CLI; this is its fast variant.)
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import time

import torch
from safetensors.torch import load_file
from test_trainer import make_trainer

from critic_align.checkpoint import latest_checkpoint

TIME_KEYS = {"time_s", "time_rollout_s", "time_update_s", "time_epoch_s"}


def _rows(run):
    return [{k: v for k, v in json.loads(x).items() if k not in TIME_KEYS}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_rows_logged_after_the_checkpoint_are_cut_on_resume(tmp_path):
    tr = make_trainer(tmp_path, num_epochs=3)
    tr.train(num_epochs=2)
    run = tmp_path / "run"
    good = (run / "metrics.jsonl").read_text()
    # a run killed after logging epoch 3 (and in the middle of another line), before checkpointing it
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"phase": "train", "epoch": 3}) + "\n" + '{"phase": "tr')
    resumed = make_trainer(tmp_path, num_epochs=3)
    resumed.load(latest_checkpoint(run / "checkpoints"))
    assert (run / "metrics.jsonl").read_text() == good
    assert resumed.log.purge_step == resumed.reward_queries + 1  # tensorboard hides the killed run's later events


def test_stale_temporary_directories_are_ignored_then_removed(tmp_path):
    tr = make_trainer(tmp_path)
    good = tr.save()
    stale = [good.parent / ".tmp-epoch_000001-999", good.parent / ".trash-epoch_000000-999"]
    for d in stale:
        d.mkdir()
        (d / "state.json").write_text("{}")
        (d / "tensors.safetensors").write_bytes(b"")
    assert latest_checkpoint(good.parent) == good
    tr.epoch = 1
    assert tr.save().name == "epoch_000001"
    assert not any(d.exists() for d in stale)


def _train_in_child(tmp_path):
    torch.set_num_threads(1)
    make_trainer(tmp_path, num_epochs=4).train()


def test_sigkill_at_a_random_moment_then_resume_is_bit_identical(tmp_path):
    straight = make_trainer(tmp_path / "a", num_epochs=4)
    straight.train()

    killed = tmp_path / "b"
    ckpts = killed / "run" / "checkpoints"
    child = mp.get_context("fork").Process(target=_train_in_child, args=(killed,))
    child.start()
    deadline = time.time() + 60
    while latest_checkpoint(ckpts) is None and time.time() < deadline and child.is_alive():
        time.sleep(0.01)
    time.sleep(random.Random(0).uniform(0.0, 0.3))  # somewhere in the next epoch(s)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL, "the run finished before it was killed: the test would be vacuous"

    torch.manual_seed(999)  # the resumed process starts from other RNG states
    resumed = make_trainer(killed, num_epochs=4)
    resumed.load(latest_checkpoint(ckpts))
    resumed.train()

    assert _rows(killed / "run") == _rows(tmp_path / "a" / "run")
    a = load_file(str(latest_checkpoint(tmp_path / "a" / "run" / "checkpoints") / "tensors.safetensors"))
    b = load_file(str(latest_checkpoint(ckpts) / "tensors.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_loading_the_digit_classifier_leaves_the_global_rng_alone():
    """Rewards load their models lazily, on the first call: after a resume that call comes later in the RNG
    stream than in the uninterrupted run, so a loader that drew from the global RNG would shift it."""
    from critic_align.tasks.digits import load_digit_classifier

    torch.manual_seed(3)
    before = torch.get_rng_state()
    load_digit_classifier()
    assert torch.equal(torch.get_rng_state(), before)
