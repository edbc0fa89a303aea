"""Clip rules: gradient zero exactly where the PPO clip selects, CISPO never zero, dual bound."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from psirl.core.clip import (
    CLIP_RULES,
    asymmetric_clip_loss,
    cispo_loss,
    dual_clip_loss,
    no_clip_loss,
    symmetric_clip_loss,
)

D = torch.float64
# Ratios below, inside and above the band [0.8, 1.2], each with A > 0 and A < 0.
RATIOS = [0.5, 0.9, 1.0, 1.1, 1.5, 0.5, 0.9, 1.0, 1.1, 1.5]
ADV = [2.0] * 5 + [-2.0] * 5


def grad_wrt_log_pi(rule, ratios=RATIOS, adv=ADV, **kw):
    """Per-token d loss / d log pi, with ratio = exp(log pi - log pi_old)."""
    log_ratio = torch.log(torch.tensor([ratios], dtype=D)).requires_grad_(True)
    ratio = torch.exp(log_ratio)
    loss, masks = rule(ratio, torch.tensor([adv], dtype=D), log_ratio=log_ratio, **kw)
    loss.sum().backward()
    return loss.detach()[0], log_ratio.grad[0], {k: v[0].tolist() for k, v in masks.items()}


def test_rule_names():
    assert set(CLIP_RULES) == {
        "none", "symmetric", "asymmetric", "dual", "cispo", "sapo", "gmpo", "clip_cov", "kl_cov",
    }


def test_ppo_clip_zero_gradient_outside_band_on_the_side_the_advantage_selects():
    loss, grad, masks = grad_wrt_log_pi(symmetric_clip_loss, eps_low=0.2, eps_high=0.2)
    r, a = torch.tensor(RATIOS, dtype=D), torch.tensor(ADV, dtype=D)
    # A > 0, r = 1.5 > 1.2: clipped, flat.  A < 0, r = 0.5 < 0.8: clipped, flat.
    zero = [False, False, False, False, True, True, False, False, False, False]
    for i, z in enumerate(zero):
        if z:
            assert grad[i].item() == 0.0, i
        else:  # the unclipped branch: d(-r A)/d log pi = -r A, never zero here
            assert grad[i].item() == pytest.approx(-(r[i] * a[i]).item(), rel=1e-14), i
    assert masks["clipped_high"] == zero[:5] + [False] * 5
    assert masks["clipped_low"] == [False] * 5 + zero[5:]
    # Values: -min(rA, clip(r)A)
    assert loss[4].item() == pytest.approx(-1.2 * 2.0) and loss[5].item() == pytest.approx(0.8 * 2.0)
    assert loss[0].item() == pytest.approx(-0.5 * 2.0) and loss[9].item() == pytest.approx(1.5 * 2.0)


def test_asymmetric_clip_higher_band():
    ratios = [1.25, 1.3, 0.75, 0.85]
    adv = [1.0, 1.0, -1.0, -1.0]
    _, grad, masks = grad_wrt_log_pi(
        asymmetric_clip_loss, ratios, adv, eps_low=0.2, eps_high=0.28
    )
    assert grad.tolist()[1] == 0.0 and grad.tolist()[2] == 0.0
    assert grad.tolist()[0] == pytest.approx(-1.25) and grad.tolist()[3] == pytest.approx(0.85)
    assert masks["clipped_high"] == [False, True, False, False]
    assert masks["clipped_low"] == [False, False, True, False]


def test_symmetric_rejects_unequal_widths():
    with pytest.raises(ValueError, match="asymmetric"):
        symmetric_clip_loss(torch.ones(1, 1), torch.ones(1, 1), eps_low=0.2, eps_high=0.3)


def test_no_clip_is_the_importance_weighted_gradient():
    loss, grad, masks = grad_wrt_log_pi(no_clip_loss)
    r, a = torch.tensor(RATIOS, dtype=D), torch.tensor(ADV, dtype=D)
    assert torch.allclose(grad, -r * a, rtol=1e-14)
    assert torch.allclose(loss, -r * a, rtol=1e-14)
    assert not any(any(v) for v in masks.values())


def test_cispo_gradient_is_clipped_detached_weight_times_advantage_and_never_zero():
    loss, grad, masks = grad_wrt_log_pi(cispo_loss, eps_low=0.2, eps_high=0.28)
    r, a = torch.tensor(RATIOS, dtype=D), torch.tensor(ADV, dtype=D)
    w = r.clamp(0.8, 1.28)
    assert torch.allclose(grad, -w * a, rtol=1e-14)
    assert (grad != 0).all()  # including r = 1.5 with A > 0 and r = 0.5 with A < 0
    assert torch.allclose(loss, -w * a * torch.log(r), rtol=1e-14)
    assert masks["clipped_high"] == [r_ > 1.28 for r_ in RATIOS]
    assert masks["clipped_low"] == [r_ < 0.8 for r_ in RATIOS]


def test_cispo_without_log_ratio_uses_log_of_ratio():
    ratio = torch.tensor([[1.5, 0.5]], dtype=D, requires_grad=True)
    loss, _ = cispo_loss(ratio, torch.tensor([[1.0, 1.0]], dtype=D), eps_low=1.0, eps_high=0.28)
    loss.sum().backward()
    # d/dr [-w A log r] = -w A / r
    assert ratio.grad.tolist()[0] == pytest.approx([-1.28 / 1.5, -0.5 / 0.5])


def test_dual_clip_bounds_negative_advantage_loss_and_zeroes_gradient_beyond_c():
    ratios = [2.0, 3.5, 10.0, 10.0]
    adv = [-1.0, -1.0, -1.0, 1.0]
    loss, grad, masks = grad_wrt_log_pi(
        dual_clip_loss, ratios, adv, eps_low=0.2, eps_high=0.2, dual_clip_c=3.0
    )
    # A < 0: loss = min(-r A, -c A) = min(r, 3): 2 (gradient r), then capped at 3 (flat).
    assert loss.tolist()[:3] == pytest.approx([2.0, 3.0, 3.0])
    assert grad.tolist()[:3] == pytest.approx([2.0, 0.0, 0.0])
    # A > 0 is untouched: the ordinary upper clip.
    assert loss.tolist()[3] == pytest.approx(-1.2) and grad.tolist()[3] == 0.0
    assert masks["clipped_dual"] == [False, True, True, False]


def test_dual_clip_needs_c_above_one():
    with pytest.raises(ValueError, match="dual_clip_c"):
        dual_clip_loss(torch.ones(1, 1), -torch.ones(1, 1), dual_clip_c=1.0)


@settings(max_examples=100, deadline=None, database=None)
@given(
    st.floats(0.0, 20.0),
    st.floats(-5.0, 5.0),
    st.floats(0.0, 0.9),
    st.floats(0.0, 2.0),
    st.floats(1.01, 10.0),
)
def test_surrogate_bounds(r, a, eps_low, eps_high, c):
    ratio = torch.tensor([[r]], dtype=D)
    adv = torch.tensor([[a]], dtype=D)
    ppo, _ = asymmetric_clip_loss(ratio, adv, eps_low=eps_low, eps_high=eps_high)
    # PPO's pessimism: the surrogate never exceeds either term -> loss >= both negated terms.
    assert ppo.item() >= -r * a - 1e-12
    assert ppo.item() >= -min(max(r, 1 - eps_low), 1 + eps_high) * a - 1e-12
    dual, _ = dual_clip_loss(ratio, adv, eps_low=eps_low, eps_high=eps_high, dual_clip_c=c)
    if a < 0:
        assert dual.item() <= -c * a + 1e-12  # the dual-clip bound
    else:
        assert dual.item() == ppo.item()
