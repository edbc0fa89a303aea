"""GPU tests: every test here is marked `gpu` and skipped without CUDA.

Run them with `pytest tests/gpu` (or `bash benchmarks/gpu_check.sh OUT`, which also runs the GPU
benchmark). cuBLAS is made deterministic before CUDA starts (CUBLAS_WORKSPACE_CONFIG), the
setting the resume test relies on and a user can set the same way.
"""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))  # loop_matrix

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if Path(str(item.fspath)).resolve().parent == here:
            item.add_marker(pytest.mark.gpu)
            if not HAS_CUDA:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_tf32():
    """float32 matmuls in full float32 (no TF32), so CUDA and CPU agree to float32 rounding."""
    if not HAS_CUDA:
        yield
        return
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture
def static_decode(monkeypatch):
    """The loops' engines decode on the static cache without torch.compile: the compiled path
    is tested once (test_cuda_engine.py) instead of being compiled again in every loop."""
    from psirl.rollout.hf_engine import HFEngine

    monkeypatch.setitem(HFEngine.__init__.__kwdefaults__, "decode", "static")


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    from loop_matrix import TINY

    from psirl.models.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("gpu_tiny"), **TINY))
