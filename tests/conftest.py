import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # the tests' helpers (tiny, tiny_saved, ...)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))  # model_matrix, ...
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture
def one_thread():
    """One torch thread for a test (restored afterwards): small models run faster so on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
