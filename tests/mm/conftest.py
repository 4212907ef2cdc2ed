"""Fixtures for the OpenMMLab integration tests: a small synthetic dataset, one intra-op thread."""

import pytest

from _mm_helpers import SIZE


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    pytest.importorskip("mmdet")
    from agvm.mm.synthetic import make_all

    root = str(tmp_path_factory.mktemp("synthetic"))
    return make_all(root, num_train=4, num_val=2, image_size=SIZE, seed=0)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """The CI machine is small and shared: one intra-op thread is the fastest for these tiny models."""
