"""train/base.py: gradient clipping folded into the optimiser step, against AdamW's closed form."""

from __future__ import annotations

import pytest
import torch

from psirl.train.base import clip_and_step


def one_step(fused: bool, grad_clip: float | None) -> tuple[float, torch.Tensor, torch.optim.Optimizer]:
    """One AdamW step from zero weights with gradient (3, 0, 4) | (0,) (global norm 5)."""
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0, 4.0]), torch.zeros(1)
    # eps = 1 makes the first step depend on the gradient's size: m_hat = g, v_hat = g^2, so the
    # update is -lr * g / (|g| + 1) (with eps ~ 0 it would be -lr * sign(g), blind to clipping).
    opt = torch.optim.AdamW([a, b], lr=0.1, eps=1.0, weight_decay=0.0, fused=fused,
                            foreach=None if fused else True)
    norm = clip_and_step([a, b], opt, None, grad_clip)
    return norm, torch.cat([a.detach(), b.detach()]), opt


@pytest.mark.parametrize("fused", [True, False])
def test_clip_then_adamw_first_step_closed_form(fused):
    norm, weights, opt = one_step(fused, grad_clip=1.0)
    assert norm == pytest.approx(5.0)
    g = torch.tensor([3.0, 0.0, 4.0, 0.0]) / (5.0 + 1e-6)  # clipped to norm 1
    torch.testing.assert_close(weights, -0.1 * g / (g.abs() + 1.0), rtol=1e-6, atol=1e-7)
    assert not hasattr(opt, "grad_scale")  # the clip factor does not leak into later steps


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("grad_clip", [10.0, None, 0.0])
def test_no_clip_below_the_limit_or_when_off(fused, grad_clip):
    norm, weights, _ = one_step(fused, grad_clip)
    assert norm == pytest.approx(5.0)
    g = torch.tensor([3.0, 0.0, 4.0, 0.0])
    torch.testing.assert_close(weights, -0.1 * g / (g.abs() + 1.0), rtol=1e-6, atol=1e-7)


def test_no_gradients_steps_nothing():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    assert clip_and_step([p], opt, None, 1.0) == 0.0
    torch.testing.assert_close(p.detach(), torch.ones(2))
