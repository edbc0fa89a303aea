"""SAPO, GMPO, Clip-Cov and KL-Cov against hand-computed values and gradients."""

import math

import pytest
import torch

from psirl.algorithms import PolicyLossKnobs
from psirl.core.clip import clip_cov_loss, gmpo_loss, kl_cov_loss, sapo_loss
from psirl.core.objective import policy_loss

D = torch.float64


def test_sapo_gate_value_and_gradient():
    lr = torch.tensor([[math.log(1.5), 0.0, math.log(0.5)]], dtype=D, requires_grad=True)
    adv = torch.tensor([[1.0, -2.0, -1.0]], dtype=D)
    loss, masks = sapo_loss(lr.exp(), adv, sapo_tau_pos=1.0, sapo_tau_neg=2.0)

    def gate(r, tau):
        return 4 / tau / (1 + math.exp(-tau * (r - 1)))

    want = [-gate(1.5, 1.0) * 1.0, -gate(1.0, 2.0) * -2.0, -gate(0.5, 2.0) * -1.0]
    assert loss[0].tolist() == pytest.approx(want, rel=1e-12)
    (g,) = torch.autograd.grad(loss.sum(), lr)
    # d/dlog r of -(4/tau) sig(tau (r - 1)) A = -4 sig' r A; at r = 1: -A (the policy gradient).
    s = 1 / (1 + math.exp(-0.5))
    assert g[0, 0].item() == pytest.approx(-4 * s * (1 - s) * 1.5 * 1.0, rel=1e-12)
    assert g[0, 1].item() == pytest.approx(2.0, rel=1e-12)
    assert not any(m.any() for m in masks.values())


def test_gmpo_geometric_mean_with_log_space_clip():
    # One sequence of 3 tokens (+1 pad), A = 2 on every token; log r = [0.1, 0.6, -0.2];
    # eps 0.4: A > 0 -> l = min(lr, clip(lr)) = [0.1, 0.4, -0.2]; s = exp(0.3 / 3).
    lr = torch.tensor([[0.1, 0.6, -0.2, 0.0]], dtype=D, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0]], dtype=D)
    adv = torch.full((1, 4), 2.0, dtype=D) * mask
    loss, masks = gmpo_loss(lr.exp(), adv, eps_low=0.4, eps_high=0.4, log_ratio=lr, mask=mask)
    s = math.exp(0.1)
    assert loss[0, :3].tolist() == pytest.approx([-2 * s] * 3, rel=1e-12)
    assert loss[0, 3].item() == 0.0
    assert masks["clipped_high"][0].tolist() == [False, True, False, False]
    (g,) = torch.autograd.grad(loss[0, 0], lr)
    # d/d lr_t of -A exp(mean l): -A s / 3 for unclipped tokens, 0 for the clipped one
    assert g[0].tolist() == pytest.approx([-2 * s / 3, 0.0, -2 * s / 3, 0.0], rel=1e-12)
    # A < 0: l = -min(-lr, -clip(lr)) = max(lr, clip(lr)) -> a token at -0.6 keeps -0.4.
    lr2 = torch.tensor([[-0.6, 0.2]], dtype=D)
    loss2, masks2 = gmpo_loss(lr2.exp(), -torch.ones(1, 2, dtype=D), eps_low=0.4, eps_high=0.4,
                              log_ratio=lr2, mask=torch.ones(1, 2, dtype=D))
    assert loss2[0, 0].item() == pytest.approx(math.exp((-0.4 + 0.2) / 2), rel=1e-12)
    assert masks2["clipped_low"][0].tolist() == [True, False]


def test_kl_cov_penalises_the_top_covariance_token():
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=D)
    logp = torch.tensor([[-0.1, -3.0, -2.0, -0.5]], dtype=D)
    mask = torch.ones(1, 4, dtype=D)
    lr = torch.tensor([[0.2, 0.1, -0.3, 0.05]], dtype=D)
    # cov = (A - 0)(logp - mean(-1.4)) = [1.3, 1.6, -0.6, -0.9] -> top-1 (cov_ratio 0.25) is t=1
    loss, masks = kl_cov_loss(lr.exp(), adv, mask=mask, logp=logp, cov_ratio=0.25, kl_cov_coef=2.0,
                              log_ratio=lr)
    want = (-lr.exp() * adv)[0].tolist()
    want[1] += 2.0 * 0.1
    assert loss[0].tolist() == pytest.approx(want, rel=1e-12)
    assert masks["clipped_dual"][0].tolist() == [False, True, False, False]


def test_clip_cov_cuts_eligible_tokens_only():
    adv = torch.tensor([[2.0, -2.0, 2.0, -2.0]], dtype=D)
    logp = torch.tensor([[-0.1, -3.0, -2.0, -0.5]], dtype=D)
    mask = torch.ones(1, 4, dtype=D)
    ratio = torch.ones(1, 4, dtype=D, requires_grad=True)
    # cov = 2 * (logp + 1.4) * sign -> [2.6, 3.2, -1.2, -1.8]: in (1, 5) are t = 0, 1; 1 is cut.
    loss, masks = clip_cov_loss(ratio, adv, mask=mask, logp=logp, cov_ratio=0.25,
                                generator=torch.Generator().manual_seed(0))
    cut = masks["clipped_dual"][0].tolist()
    assert sum(cut) == 1 and (cut[0] or cut[1])
    (g,) = torch.autograd.grad(loss.sum(), ratio)
    expected = [0.0 if c else -a for c, a in zip(cut, adv[0].tolist(), strict=True)]
    assert g[0].tolist() == expected


@pytest.mark.parametrize("rule", ["sapo", "gmpo", "clip_cov", "kl_cov"])
def test_rules_run_through_policy_loss_from_knobs(rule):
    knobs = PolicyLossKnobs(clip=rule, eps_low=0.2, eps_high=0.2, aggregation="seq_mean_token_mean")
    logp = torch.randn(2, 3, dtype=D, generator=torch.Generator().manual_seed(1)).requires_grad_()
    adv = torch.tensor([[1.0] * 3, [-1.0] * 3], dtype=D)
    loss, metrics = policy_loss(logp, logp.detach(), adv, torch.ones(2, 3, dtype=D), knobs, 2.0)
    loss.backward()
    assert torch.isfinite(logp.grad).all() and math.isfinite(metrics["loss"])
