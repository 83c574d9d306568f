"""Shared test set-up: one torch thread per xdist worker (CI has 2 cores), fixed seeds."""
import os

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
