import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Two threads on a shared 2-core machine run these tiny matmuls ~30x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
