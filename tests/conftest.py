import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The suite's models are tiny: intra-op threads only add overhead (~100x on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
