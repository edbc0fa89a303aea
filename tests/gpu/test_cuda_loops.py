"""Every loop trains on CUDA in float32 and bfloat16, the clip engaged, with evaluation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from loop_matrix import FORCE_CLIP, LOOPS, loop_config
from safetensors.torch import load_file

from psirl.track.metrics import read_metrics
from psirl.train import run_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("name", sorted(LOOPS))
def test_loop_trains_on_cuda(tiny_path, tmp_path, name, dtype, static_decode):
    cfg = loop_config(name, tiny_path, str(tmp_path / name), device="cuda", dtype=dtype,
                      eval={"every": 2, "n": 8})
    run_dir = run_config(cfg, quiet=True)
    records = read_metrics(run_dir)
    steps = [r for r in records if r["step"] > 0 and "time/step_s" in r]
    assert [r["step"] for r in steps] == [1, 2]
    norms = [r["grad_norm"] for r in steps if "grad_norm" in r]
    assert norms and all(math.isfinite(n) for n in norms) and any(n > FORCE_CLIP for n in norms)
    for r in steps:
        for key, value in r.items():
            assert not (isinstance(value, float) and math.isnan(value) and key.startswith("loss")), key
    assert any(k.startswith("eval/") for k in records[-1])
    final = load_file(str(next((run_dir / "final").glob("*.safetensors"))))
    assert {t.dtype for t in final.values()} == {DTYPES[dtype]}
    before = load_file(str(next(Path(tiny_path).glob("*.safetensors"))))
    assert any(not torch.equal(before[k].to(DTYPES[dtype]), final[k]) for k in before if k in final)


def test_zero_signal_groups_with_host_rewards_and_device_groups():
    """The crash of the first H200 run: rewards built on the host, group ids on cuda:0."""
    from psirl.core.filters import dynamic_sampling_keep, top_k_per_group, zero_signal_groups

    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1], device="cuda")
    assert zero_signal_groups(rewards, groups).tolist() == [True, False]
    assert dynamic_sampling_keep(rewards, groups).tolist() == [False, False, True, True]
    assert top_k_per_group(rewards, groups, 1).tolist() == [True, False, False, True]
    on_gpu = zero_signal_groups(rewards.cuda(), groups)
    assert on_gpu.device.type == "cuda" and on_gpu.tolist() == [True, False]
