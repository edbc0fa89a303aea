"""KL estimators: closed forms, exact expectations over a categorical, placement, controller."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from psirl.core.advantages import no_baseline_advantages
from psirl.core.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_in_reward,
    kl_k1,
    kl_k2,
    kl_k3,
)

D = torch.float64


def test_closed_form_values():
    logp = torch.tensor([math.log(0.5)], dtype=D)
    ref = torch.tensor([math.log(0.25)], dtype=D)
    ln2 = math.log(2.0)
    assert kl_k1(logp, ref).item() == pytest.approx(ln2, rel=1e-15)
    assert kl_k2(logp, ref).item() == pytest.approx(0.5 * ln2**2, rel=1e-15)
    # rho = log(0.25/0.5) = -ln 2: exp(rho) - rho - 1 = 0.5 + ln 2 - 1
    assert kl_k3(logp, ref).item() == pytest.approx(0.5 + ln2 - 1.0, rel=1e-14)
    assert set(KL_ESTIMATORS) == {
        "k1", "k2", "k3", "abs", "low_var_kl", "k1+", "k3+", "low_var_kl+", "k3_ratio",
    }
    assert kl_estimate(logp, ref, "k3").item() == kl_k3(logp, ref).item()
    with pytest.raises(ValueError, match="kl estimator"):
        kl_estimate(logp, ref, "k4")


def _categorical(seed, V=5):
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(V, generator=gen, dtype=D, requires_grad=True)
    ref = torch.log_softmax(torch.randn(V, generator=gen, dtype=D), 0)
    return theta, ref


@pytest.mark.parametrize("seed", range(5))
def test_k1_and_k3_are_unbiased_k2_is_not_by_exact_sum(seed):
    theta, ref = _categorical(seed)
    logp = torch.log_softmax(theta, 0).detach()
    p = logp.exp()
    kl = (p * (logp - ref)).sum().item()
    assert (p * kl_k1(logp, ref)).sum().item() == pytest.approx(kl, rel=1e-12)
    assert (p * kl_k3(logp, ref)).sum().item() == pytest.approx(kl, rel=1e-12)
    assert (p * kl_k2(logp, ref)).sum().item() != pytest.approx(kl, rel=1e-3)


@pytest.mark.parametrize("seed", range(5))
def test_gradient_of_each_estimator_in_the_loss_by_exact_sum(seed):
    # Ref 001: differentiating a KL estimate in the loss is not the KL's gradient.
    # E_{a~pi}[grad k(a)] with pi held fixed (samples do not carry gradient):
    theta, ref = _categorical(seed)
    logp = torch.log_softmax(theta, 0)
    p = logp.exp().detach()

    def expected_grad(k):
        return torch.autograd.grad((p * k(logp, ref)).sum(), theta, retain_graph=True)[0]

    reverse_kl = (logp.exp() * (logp - ref)).sum()
    forward_kl = (ref.exp() * (ref - logp)).sum()
    g_rev = torch.autograd.grad(reverse_kl, theta, retain_graph=True)[0]
    g_fwd = torch.autograd.grad(forward_kl, theta, retain_graph=True)[0]
    # k1 in the loss: zero expected gradient (only noise).
    assert torch.allclose(expected_grad(kl_k1), torch.zeros_like(theta), atol=1e-14)
    # k2 in the loss: the reverse KL's gradient.
    assert torch.allclose(expected_grad(kl_k2), g_rev, atol=1e-12)
    # k3 in the loss: the *forward* KL's gradient, not the reverse KL's (biased).
    assert torch.allclose(expected_grad(kl_k3), g_fwd, atol=1e-12)
    assert not torch.allclose(g_fwd, g_rev, atol=1e-6)


@settings(max_examples=100, deadline=None, database=None)
@given(st.floats(-30, 0), st.floats(-30, 0))
def test_k2_and_k3_are_non_negative(a, b):
    logp, ref = torch.tensor([a], dtype=D), torch.tensor([b], dtype=D)
    assert kl_k2(logp, ref).item() >= 0.0
    assert kl_k3(logp, ref).item() >= 0.0


LOGP = torch.tensor([[-1.0, -2.0, -0.5, -9.0]], dtype=D)
REF = torch.tensor([[-1.5, -1.0, -0.5, -1.0]], dtype=D)
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=D)


def test_kl_in_reward_per_token_gives_reinforce_pp_returns():
    beta = 0.1
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=D)
    logp = LOGP.clone().requires_grad_(True)
    shaped = kl_in_reward(rewards, logp, REF, MASK, coef=beta, estimator="k1")
    assert not shaped.requires_grad  # detached: a number in the reward, never differentiated
    kl = [0.5, -1.0, 0.0]
    assert shaped[0].tolist() == pytest.approx([-0.05, 0.1, 1.0, 0.0], abs=1e-15)
    # Ref 000 / REINFORCE++: A_t = R - beta * sum_{i >= t} KL_i
    adv, _ = no_baseline_advantages(shaped, MASK, torch.zeros(1, dtype=torch.long))
    assert adv[0, :3].tolist() == pytest.approx(
        [1.0 - beta * sum(kl[t:]) for t in range(3)], abs=1e-15
    )


def test_kl_in_reward_per_sequence_puts_the_sum_on_the_last_token():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=D)
    shaped = kl_in_reward(rewards, LOGP, REF, MASK, coef=0.1, estimator="k1", placement="sequence")
    assert shaped[0].tolist() == pytest.approx([0.0, 0.0, 1.0 - 0.1 * (0.5 - 1.0 + 0.0), 0.0])
    with pytest.raises(ValueError, match="placement"):
        kl_in_reward(rewards, LOGP, REF, MASK, coef=0.1, placement="loss")


def test_adaptive_controller_moves_beta_by_the_formulas_amount():
    c = AdaptiveKLController(init=0.2, target=1.0, horizon=100)
    # KL above target by 10%: e = +0.1 -> beta *= 1 + 0.1 * 10 / 100
    assert c.update(1.1, n_steps=10) == pytest.approx(0.2 * 1.01, rel=1e-15)
    # Far above target: error clipped at +0.2.
    assert c.update(50.0, n_steps=10) == pytest.approx(0.2 * 1.01 * 1.02, rel=1e-15)
    # Below target: KL = 0 -> e = -1 clipped at -0.2 -> beta shrinks.
    before = c.value
    assert c.update(0.0, n_steps=10) == pytest.approx(before * 0.98, rel=1e-15)
    # On target: unchanged.
    assert c.update(1.0, n_steps=10) == pytest.approx(before * 0.98, rel=1e-15)
    # Half the target: e = -0.5 -> clipped to -0.2.
    before = c.value
    assert c.update(0.5, n_steps=50) == pytest.approx(before * 0.9, rel=1e-15)


def test_controller_state_round_trip_and_validation():
    c = AdaptiveKLController(0.1, 6.0, 1000)
    c.update(12.0, 100)
    d = AdaptiveKLController(1.0, 1.0, 1)
    d.load_state_dict(c.state_dict())
    assert (d.value, d.target, d.horizon) == (c.value, c.target, c.horizon)
    with pytest.raises(ValueError, match="init"):
        AdaptiveKLController(-0.1, 1.0, 10)
    assert AdaptiveKLController(0.0, 1.0, 10).update(5.0, 10) == 0.0  # no KL stays no KL
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, 0.0, 10)
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(0.1, 1.0, 0)
    f = FixedKLController(0.04)
    assert f.update(100.0, 10) == 0.04


# ------------------------------------------------------------- the anchors' further estimators
def _leaf(x):
    return torch.tensor(x, dtype=D, requires_grad=True)


def test_straight_through_variants_keep_the_value_and_take_k2s_gradient():
    # d = log pi - log pi_ref = ln 2: values k1 = ln 2, k3 = 0.5 + ln 2 - 1; gradient of k2 = d.
    ln2 = math.log(2.0)
    ref = torch.tensor([math.log(0.25)], dtype=D)
    for name, value in (("k1+", ln2), ("k3+", 0.5 + ln2 - 1.0), ("low_var_kl+", 0.5 + ln2 - 1.0)):
        logp = _leaf([math.log(0.5)])
        k = kl_estimate(logp, ref, name)
        (g,) = torch.autograd.grad(k.sum(), logp)
        assert k.item() == pytest.approx(value, rel=1e-14), name
        assert g.item() == pytest.approx(ln2, rel=1e-14), name


def test_abs_and_low_var_kl_closed_forms():
    logp = _leaf([math.log(0.25), -30.0])
    ref = torch.tensor([math.log(0.5), -5.0], dtype=D)
    a = kl_estimate(logp, ref, "abs")
    assert a.tolist() == pytest.approx([math.log(2.0), 25.0], rel=1e-14)
    # low_var_kl: k3 (rho = ln 2: 2 - ln 2 - 1) and, for rho = 25, e^25 - 26 clamped to 10.
    low = kl_estimate(logp, ref, "low_var_kl")
    assert low.tolist() == pytest.approx([1.0 - math.log(2.0), 10.0], rel=1e-14)
    (g,) = torch.autograd.grad(low.sum(), logp)
    assert g[1].item() == 0.0  # beyond the clamp: no gradient (verl's torch.clamp)


def test_k3_clamp_knob_bounds_value_and_gradient():
    # pi_ref / pi = e^25: k3 = e^25 - 26 ~ 7.2e10 and its gradient 1 - e^25; clamp 10 stops both.
    logp = _leaf([-30.0])
    ref = torch.tensor([-5.0], dtype=D)
    raw = kl_estimate(logp, ref, "k3")
    assert raw.item() == pytest.approx(math.exp(25) - 26, rel=1e-12)
    clamped = kl_estimate(logp, ref, "k3", clamp=10.0)
    (g,) = torch.autograd.grad(clamped.sum(), logp)
    assert clamped.item() == 10.0 and g.item() == 0.0
    with pytest.raises(ValueError, match="clamp"):
        kl_estimate(logp, ref, "k3", clamp=0.0)


def test_k3_ratio_is_trls_importance_corrected_k3():
    # value: r * k3 with r = pi / pi_old; gradient at r = 1 (on-policy): grad k3 + k3 grad log pi.
    logp = _leaf([math.log(0.5)])
    ref = torch.tensor([math.log(0.25)], dtype=D)
    old = torch.tensor([math.log(0.4)], dtype=D)
    k = kl_estimate(logp, ref, "k3_ratio", log_ratio=logp - old)
    k3 = 0.5 + math.log(2.0) - 1.0
    assert k.item() == pytest.approx(1.25 * k3, rel=1e-14)
    logp2 = _leaf([math.log(0.5)])
    k_on = kl_estimate(logp2, ref, "k3_ratio", log_ratio=logp2 - logp2.detach())
    (g,) = torch.autograd.grad(k_on.sum(), logp2)
    # d k3 / d logp = 1 - pi_ref/pi = 0.5; plus k3 * 1.
    assert g.item() == pytest.approx(0.5 + k3, rel=1e-14)
    # without a ratio (the KL in the reward, at sampling time) it is k3
    assert kl_estimate(logp, ref, "k3_ratio").item() == pytest.approx(k3, rel=1e-14)
