import os
import sys
from pathlib import Path

import pytest
import torch

# the benchmark scripts import each other as siblings (they run as `python benchmarks/<script>.py`, which puts their
# folder on sys.path); tests that import them need the same
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` / ``@pytest.mark.gpu(n)``: skipped unless CUDA has at least n (default 1) devices.
    ``gpu(rehearse=True)``: the test also runs on the CPU in benchmarks/gpu_check.py's rehearsal
    (CRITIC_ALIGN_GPU_REHEARSAL=1; the test picks its device itself); the others are skipped there too."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    rehearsal = os.environ.get("CRITIC_ALIGN_GPU_REHEARSAL") == "1"
    for item in items:
        mark = item.get_closest_marker("gpu")
        if mark is not None:
            need = int(mark.args[0]) if mark.args else 1
            if have < need and not (rehearsal and mark.kwargs.get("rehearse")):
                item.add_marker(pytest.mark.skip(reason=f"needs {need} CUDA device(s), this machine has {have}"))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The suite's models are tiny: intra-op threads only add overhead (~100x on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
