"""Resume on CUDA continues exactly as an uninterrupted run (deterministic settings on).

The settings (what a user sets for bitwise-reproducible CUDA runs): CUBLAS_WORKSPACE_CONFIG=
:4096:8 before CUDA starts (tests/gpu/conftest.py), torch.use_deterministic_algorithms(True),
TF32 off. Both runs are in one process on one GPU, as a resume on the same machine is.
"""

from __future__ import annotations

import pytest
import torch
from loop_matrix import loop_config
from safetensors.torch import load_file

from psirl.track.metrics import read_metrics
from psirl.train import run_config


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("name", ["online-grpo", "sft"])
def test_resume_on_cuda_is_exact(tiny_path, tmp_path, name, deterministic, static_decode):
    straight = run_config(loop_config(name, tiny_path, str(tmp_path / "a"), device="cuda",
                                      max_steps=4, grad_clip=1.0), quiet=True)
    half = loop_config(name, tiny_path, str(tmp_path / "b"), device="cuda", max_steps=2,
                       grad_clip=1.0)
    run_config(half, quiet=True)
    resumed = run_config(loop_config(name, tiny_path, str(tmp_path / "b"), device="cuda",
                                     max_steps=4, grad_clip=1.0), resume=True, quiet=True)
    a = load_file(str(next((straight / "final").glob("*.safetensors"))))
    b = load_file(str(next((resumed / "final").glob("*.safetensors"))))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = [r.get("loss", r.get("loss/total")) for r in read_metrics(straight) if r["step"] > 0]
    lb = [r.get("loss", r.get("loss/total")) for r in read_metrics(resumed) if r["step"] > 0]
    assert la == lb
