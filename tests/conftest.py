"""Shared test set-up: one torch thread per xdist worker (CI has 2 cores), fixed seeds, Triton's interpreter
where there is no GPU."""
import os

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)
# Without a GPU the Triton kernels are tested under Triton's interpreter, which must be switched on before
# anything imports Triton (torch does so on first use of custom ops and compile).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
