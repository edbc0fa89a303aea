"""bfloat16 on the CPU: every loop's update path with the gradient norm above grad_clip.

The fused AdamW step used to crash ("expected scalar type Float but found BFloat16") as soon as a
bf16 step's norm exceeded grad_clip: the clip helper handed the kernel a bf16 `grad_scale`.
`FORCE_CLIP` is far below every norm here, so each update of each loop takes the clipped path.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from loop_matrix import FORCE_CLIP, LOOPS, TINY, loop_config
from safetensors.torch import load_file

from psirl.models.tiny import make_tiny_model
from psirl.track.metrics import read_metrics
from psirl.train import run_config
from psirl.train.base import clip_and_step


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("bf16_tiny"), **TINY))


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", sorted(LOOPS))
def test_every_loop_steps_in_bf16_with_the_clip_engaged(tiny_path, tmp_path, name, one_thread):
    cfg = loop_config(name, tiny_path, str(tmp_path / name), dtype="bfloat16")
    run_dir = run_config(cfg, quiet=True)
    records = [r for r in read_metrics(run_dir) if r["step"] > 0]
    assert [r["step"] for r in records] == [1, 2]
    norms = [r["grad_norm"] for r in records if "grad_norm" in r]
    assert norms, "the loop logs grad_norm"
    # The clip engaged (norm > clip) whenever there was a gradient (self-training may skip a step).
    assert all(math.isfinite(n) for n in norms) and any(n > FORCE_CLIP for n in norms)
    final = load_file(str(next((run_dir / "final").glob("*.safetensors"))))
    assert {t.dtype for t in final.values()} == {torch.bfloat16}
    before = load_file(str(next(Path(tiny_path).glob("*.safetensors"))))
    changed = sum(not torch.equal(before[k].to(torch.bfloat16), final[k]) for k in before if k in final)
    assert changed > 0


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_clip_matches_the_float32_closed_form(fused):
    """One clipped AdamW step of bf16 weights: the clip factor comes from a float32 norm."""
    a = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    a.grad = torch.tensor([3.0, 0.0, 4.0], dtype=torch.bfloat16)
    opt = torch.optim.AdamW([a], lr=0.25, eps=1.0, weight_decay=0.0, fused=fused,
                            foreach=None if fused else True)
    norm = clip_and_step([a], opt, None, 1.0)
    assert norm == 5.0 and not hasattr(opt, "grad_scale")
    g = torch.tensor([3.0, 0.0, 4.0]) / (5.0 + 1e-6)  # clipped to norm 1
    # first AdamW step with eps = 1: -lr * g / (|g| + 1), rounded once to bf16
    expected = (-0.25 * g / (g.abs() + 1.0)).to(torch.bfloat16)
    torch.testing.assert_close(a.detach(), expected, rtol=0, atol=2e-3)


def test_grad_norm_is_accumulated_in_float32():
    """10^4 bf16 gradients of 0.01: norm 1.0 exactly in float32 accumulation."""
    p = torch.nn.Parameter(torch.zeros(10_000, dtype=torch.bfloat16))
    p.grad = torch.full((10_000,), 0.01, dtype=torch.bfloat16)
    exact = float(torch.linalg.vector_norm(p.grad.double()))
    opt = torch.optim.AdamW([p], lr=0.0, fused=True)
    assert clip_and_step([p], opt, None, None) == pytest.approx(exact, rel=1e-6)


@pytest.fixture
def master_weights(monkeypatch):
    """build_optimizer's AdamW replaced by train.precision.adamw (the bf16 recipe), as wired in
    build_optimizer on merge: bf16 parameters get float32 master weights."""
    from psirl.train import precision

    plain = torch.optim.AdamW

    def adamw(params, **kwargs):
        params = [p for p in params if p.requires_grad]
        if any(p.dtype in precision.LOW_PRECISION for p in params):
            return precision.MasterWeightAdamW(params, **kwargs)
        return plain(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", adamw)


@pytest.mark.parametrize("name", ["online-ppo", "preference-dpo", "sft"])
def test_bf16_master_weight_recipe_resumes_exactly(tiny_path, tmp_path, name, one_thread,
                                                   master_weights):
    """Through run_loop's checkpoints: 2 steps straight == 1 step, then resume for 1 more; the
    masters travel in the optimiser state (bf16 weights alone would lose the float32 bits)."""
    straight = run_config(loop_config(name, tiny_path, str(tmp_path / "a"), dtype="bfloat16",
                                      grad_clip=1.0), quiet=True)
    run_config(loop_config(name, tiny_path, str(tmp_path / "b"), dtype="bfloat16", grad_clip=1.0,
                           max_steps=1), quiet=True)
    resumed = run_config(loop_config(name, tiny_path, str(tmp_path / "b"), dtype="bfloat16",
                                     grad_clip=1.0), resume=True, quiet=True)
    a = load_file(str(next((straight / "final").glob("*.safetensors"))))
    b = load_file(str(next((resumed / "final").glob("*.safetensors"))))
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(next((straight / "checkpoints").glob("step-*/trainer_state.pt")),
                       weights_only=True)
    masters = state["optimizers"]["policy"]["master_weights"]
    assert masters and all(m.dtype == torch.float32 for m in masters)
