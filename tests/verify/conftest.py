"""Shared fixtures of the exact-enumeration tests.

The tensors here are tiny, so every module runs with one intra-op thread (restored after the
module): on a loaded 2-core machine extra threads only add synchronisation overhead (~10x).
"""

import pytest
import torch

from psirl.verify.exact import make_problem
from psirl.verify.sampled import sample_batches

N_BATCHES = 2048
GROUP_SIZE = 4
ALPHA = 1e-3
"""Per-test level of the Hotelling tests: false-positive rate 0.1% for each "unbiased" test
(the tests are seeded, so a given seed either passes or fails every time)."""


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def problem():
    """The default enumeration problem: 2 prompts, V = 3, H = 3, beta = 0.5."""
    return make_problem()


@pytest.fixture(scope="session")
def batches(problem):
    """N_BATCHES batches of 2 prompts x GROUP_SIZE samples (seed 1)."""
    return sample_batches(problem, N_BATCHES, GROUP_SIZE, seed=1)
