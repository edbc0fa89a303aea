"""Preference losses against closed forms on hand-computed numbers (psirl/core/preference.py).

Numbers are chosen so that the sigmoids are exact fractions: beta h = log 3 gives sigma = 3/4.
"""

from __future__ import annotations

import math

import pytest
import torch

from psirl.core.preference import (
    average_logps,
    best_worst_pairs,
    bradley_terry_loss,
    dpo_loss,
    implicit_rewards,
    ipo_loss,
    kto_loss,
    kto_reference_point,
    log_odds,
    orpo_loss,
    preference_metrics,
    simpo_loss,
)

LOG3 = math.log(3.0)


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


# ----------------------------------------------------------------------------- DPO


def test_dpo_closed_form():
    # pair 0: h = (log3 - 0) - (-log3 - 0) = 2 log 3, beta = 1/2 -> beta h = log 3, sigma = 3/4
    # pair 1: h = 0 -> loss log 2
    loss = dpo_loss(t(LOG3, -1.0), t(-LOG3, -2.0), t(0.0, -1.0), t(0.0, -2.0), beta=0.5)
    torch.testing.assert_close(loss, t(math.log(4 / 3), math.log(2.0)))


def test_conservative_dpo_closed_form():
    eps = 0.1
    loss = dpo_loss(t(LOG3), t(-LOG3), t(0.0), t(0.0), beta=0.5, label_smoothing=eps)
    # -(1-eps) log(3/4) - eps log(1/4)
    torch.testing.assert_close(loss, t((1 - eps) * math.log(4 / 3) + eps * math.log(4.0)))


def test_conservative_dpo_minimiser_is_finite():
    eps = 0.2
    # d/dz [-(1-eps) log s(z) - eps log s(-z)] = 0 at z = log((1-eps)/eps), z = beta h, h = pc
    z_star = math.log((1 - eps) / eps)
    pc = torch.tensor([z_star / 0.5], dtype=torch.float64, requires_grad=True)
    dpo_loss(pc, t(0.0), t(0.0), t(0.0), beta=0.5, label_smoothing=eps).sum().backward()
    assert abs(pc.grad.item()) < 1e-12


def test_dpo_gradient_matches_reference_004():
    """grad wrt log pi(y_w) = -beta sigma(r_l - r_w), wrt log pi(y_l) = +beta sigma(r_l - r_w)."""
    beta = 0.7
    pc = t(-3.0, -1.0, -5.0).requires_grad_()
    pr = t(-2.0, -4.0, -5.5).requires_grad_()
    rc, rr = t(-2.5, -1.5, -4.0), t(-2.5, -3.0, -6.0)
    dpo_loss(pc, pr, rc, rr, beta=beta).sum().backward()
    r_w = beta * (pc.detach() - rc)
    r_l = beta * (pr.detach() - rr)
    weight = torch.sigmoid(r_l - r_w)
    torch.testing.assert_close(pc.grad, -beta * weight)
    torch.testing.assert_close(pr.grad, beta * weight)


def test_dpo_equals_bradley_terry_on_implicit_rewards():
    pc, pr, rc, rr = t(-3.0, -1.0), t(-2.0, -4.0), t(-2.5, -1.5), t(-2.5, -3.0)
    beta = 0.3
    r_w = implicit_rewards(pc, rc, beta=beta)
    r_l = implicit_rewards(pr, rr, beta=beta)
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta=beta), bradley_terry_loss(r_w, r_l))


def test_dpo_small_beta_is_log2_minus_half_beta_h():
    """log(1 + e^{-z}) = log 2 - z/2 + z^2/8 + O(z^4): as beta -> 0 the loss tends to log 2 and its
    weighting sigma(r_l - r_w) to 1/2."""
    h = 2.0
    for beta in (1e-2, 1e-3):
        loss = dpo_loss(t(h), t(0.0), t(0.0), t(0.0), beta=beta).item()
        z = beta * h
        assert abs(loss - (math.log(2) - z / 2)) <= z**2 / 8 * 1.01


# ----------------------------------------------------------------------------- IPO


def test_ipo_closed_form_and_minimiser():
    beta = 0.25  # target margin 1/(2 beta) = 2
    loss = ipo_loss(t(1.0, 0.0, 2.0), t(0.0, 0.0, 0.0), t(0.0, 0.0, 0.0), t(0.0, 0.0, 0.0), beta=beta)
    torch.testing.assert_close(loss, t(1.0, 4.0, 0.0))
    pc = t(2.0).requires_grad_()
    ipo_loss(pc, t(0.0), t(0.0), t(0.0), beta=beta).sum().backward()
    assert pc.grad.item() == 0.0  # zero gradient exactly at h = 1/(2 beta)


# ----------------------------------------------------------------------------- KTO


def test_kto_reference_point_is_clamped_detached_mean():
    p = t(-1.0, -2.0, -3.0).requires_grad_()
    z0 = kto_reference_point(p, t(-2.0, -2.0, -2.5))  # mean of (1, 0, -0.5) = 1/6
    torch.testing.assert_close(z0, torch.tensor(1 / 6, dtype=torch.float64))
    assert not z0.requires_grad
    assert kto_reference_point(t(-3.0), t(-1.0)).item() == 0.0  # negative estimate -> 0


def test_kto_closed_form():
    # z0 = 1, beta = 1; sample 0 desirable with r - z0 = log 3
    loss = kto_loss(
        t(LOG3 + 1.0, 1.0 - LOG3, 1.0),
        t(0.0, 0.0, 1.0),
        torch.tensor([True, False, False]),
        1.0,
        beta=1.0,
        desirable_weight=2.0,
        undesirable_weight=1.5,
    )
    # 0: 2 - 2 sigma(log 3) = 2 - 3/2 = 1/2
    # 1: r = 1 - log3, z0 - r = log 3 -> 1.5 - 1.5 * 3/4 = 3/8
    # 2: r = 0, z0 - r = 1 -> 1.5 - 1.5 sigma(1)
    torch.testing.assert_close(loss, t(0.5, 0.375, 1.5 - 1.5 / (1 + math.exp(-1.0))))


def test_kto_gradient_direction():
    """Desirable samples are pushed up, undesirable ones down."""
    p = t(-1.0, -1.0).requires_grad_()
    kto_loss(p, t(-1.0, -1.0), torch.tensor([True, False]), 0.0, beta=0.1).sum().backward()
    assert p.grad[0] < 0 < p.grad[1]
    # at r = z0 = 0: |dL/dp| = lambda beta sigma'(0) = 0.1 / 4
    torch.testing.assert_close(p.grad.abs(), t(0.025, 0.025))


# ----------------------------------------------------------------------------- SimPO


def test_simpo_closed_form():
    # chosen avg = -2/4 = -0.5, rejected avg = -6/3 = -2, beta = 2, gamma = 3 - log 3:
    # beta (-0.5 + 2) - gamma = 3 - (3 - log 3) = log 3 -> loss log(4/3)
    loss = simpo_loss(t(-2.0), t(-6.0), t(4.0), t(3.0), beta=2.0, gamma=3.0 - LOG3)
    torch.testing.assert_close(loss, t(math.log(4 / 3)))


def test_simpo_has_no_reference_and_is_length_normalised():
    # same average log-prob, different lengths -> margin 0, loss = -log sigma(-gamma)
    loss = simpo_loss(t(-1.0), t(-10.0), t(1.0), t(10.0), beta=5.0, gamma=0.0)
    torch.testing.assert_close(loss, t(math.log(2.0)))


# ----------------------------------------------------------------------------- ORPO


def test_log_odds_closed_form():
    # P = 1/4 -> odds 1/3; P = 3/4 -> odds 3
    torch.testing.assert_close(log_odds(t(math.log(0.25), math.log(0.75))), t(-LOG3, LOG3))


def test_orpo_closed_form():
    # chosen: sum log(3/4) * 2 over 2 tokens -> avg log(3/4), odds 3; rejected avg log(1/4), odds 1/3
    # log odds ratio = 2 log 3 -> sigma = 9/10; L = -log(3/4) + lam * log(10/9)
    lam = 0.5
    loss = orpo_loss(
        t(2 * math.log(0.75)), t(3 * math.log(0.25)), t(2.0), t(3.0), lam=lam
    )
    torch.testing.assert_close(loss, t(math.log(4 / 3) + lam * math.log(10 / 9)))


def test_orpo_lambda_zero_is_sft_nll():
    loss = orpo_loss(t(-3.0), t(-1.0), t(6.0), t(1.0), lam=0.0)
    torch.testing.assert_close(loss, t(0.5))


def test_orpo_is_finite_at_probability_one():
    pc = t(0.0).requires_grad_()
    loss = orpo_loss(pc, t(-1.0), t(2.0), t(2.0), lam=1.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(pc.grad).all()


# ----------------------------------------------------------------------------- Bradley–Terry


def test_bradley_terry_closed_form():
    loss = bradley_terry_loss(t(LOG3, 0.0, 1.0), t(0.0, LOG3, 1.0))
    torch.testing.assert_close(loss, t(math.log(4 / 3), math.log(4.0), math.log(2.0)))
    with_margin = bradley_terry_loss(t(LOG3 + 1.0), t(0.0), margin=1.0)
    torch.testing.assert_close(with_margin, t(math.log(4 / 3)))


def test_bradley_terry_gradient():
    """dL/dr_w = -sigma(r_l - r_w) = -(1 - P(y_w > y_l))."""
    c = t(LOG3).requires_grad_()
    bradley_terry_loss(c, t(0.0)).sum().backward()
    torch.testing.assert_close(c.grad, t(-0.25))


# ----------------------------------------------------------------------------- metrics


def test_implicit_rewards_and_metrics():
    r_w = implicit_rewards(t(-1.0, -2.0, -3.0), t(-2.0, -2.0, -2.0), beta=0.5)
    r_l = implicit_rewards(t(-2.0, -2.0, -1.0), t(-2.0, -2.0, -2.0), beta=0.5)
    torch.testing.assert_close(r_w, t(0.5, 0.0, -0.5))
    torch.testing.assert_close(r_l, t(0.0, 0.0, 0.5))
    m = preference_metrics(r_w, r_l)
    assert m == pytest.approx(
        {"rewards/chosen": 0.0, "rewards/rejected": 1 / 6, "rewards/margin": -1 / 6,
         "rewards/accuracy": 0.5}  # right, tie (1/2), wrong
    )
    torch.testing.assert_close(implicit_rewards(t(-2.0), beta=2.0), t(-4.0))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), beta=0.0)
    with pytest.raises(ValueError, match="one shape"):
        dpo_loss(t(0.0, 1.0), t(0.0), t(0.0), t(0.0), beta=1.0)
    with pytest.raises(ValueError, match="lengths"):
        average_logps(t(-1.0), t(0.0))
    with pytest.raises(ValueError, match="bool"):
        kto_loss(t(0.0), t(0.0), torch.tensor([1]), 0.0, beta=1.0)


def test_best_worst_pairs_skip_ties():
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.5, 0.5, 0.5, 2.0, -1.0, 0.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    chosen, rejected = best_worst_pairs(rewards, groups)
    # group 0: best = first 1.0 (row 1), worst row 0; group 1: all tied -> skipped; group 2: 6 vs 7
    assert chosen.tolist() == [1, 6] and rejected.tolist() == [0, 7]
    empty_c, empty_r = best_worst_pairs(torch.zeros(2), torch.tensor([0, 0]))
    assert empty_c.numel() == 0 and empty_r.numel() == 0 and empty_c.dtype == torch.long
