import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import agvm._compat  # noqa: E402

agvm._compat.apply()  # the torchvision shim must be in place before any test imports timm / mmdet


@pytest.fixture
def one_thread():
    """One intra-op thread: for tiny models on the small shared CI machine it is many times faster than two."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
