"""Advantage estimators against the worked example of ref 002 and hand-computed closed forms."""

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from psirl.core.advantages import (
    ADVANTAGE_ESTIMATORS,
    batch_mean_advantages,
    batch_whiten_advantages,
    gae_advantages,
    group_mean_advantages,
    group_mean_std_advantages,
    leave_one_out_advantages,
    no_baseline_advantages,
    reward_to_go,
    sequence_returns,
)
from psirl.core.masking import place_on_last_token

D = torch.float64


def terminal(rewards, lengths, T=None):
    """token_rewards with the sequence reward on the last token of each ragged response."""
    T = T or max(lengths)
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths], dtype=D)
    return place_on_last_token(torch.tensor(rewards, dtype=D), mask), mask


# ----------------------------------------------------------------- worked example (ref 002)

WORKED = [0.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (leave_one_out_advantages, [-1 / 3, -1 / 3, 1.0, -1 / 3]),
        (group_mean_std_advantages, [-0.5, -0.5, 1.5, -0.5]),
        (group_mean_advantages, [-0.25, -0.25, 0.75, -0.25]),
    ],
    ids=["rloo", "grpo", "dr_grpo"],
)
def test_worked_example_of_ref_002_exactly(fn, expected):
    tr, mask = terminal(WORKED, [3, 1, 2, 3])  # ragged lengths: the advantage is per sequence
    adv, ret = fn(tr, mask, torch.zeros(4, dtype=torch.long), eps=0.0)
    for i, (a, n) in enumerate(zip(expected, [3, 1, 2, 3], strict=True)):
        assert adv[i, :n].tolist() == pytest.approx([a] * n, abs=1e-15)
        assert adv[i, n:].tolist() == [0.0] * (3 - n)  # zero on padding
        assert ret[i, :n].tolist() == [WORKED[i]] * n  # returns = reward-to-go
    # Mean-centred: each column of the table sums to zero.
    assert adv[:, 0].sum().item() == pytest.approx(0.0, abs=1e-15)


def test_worked_example_grpo_with_default_eps_is_within_eps():
    tr, mask = terminal(WORKED, [2, 2, 2, 2])
    adv, _ = group_mean_std_advantages(tr, mask, torch.zeros(4, dtype=torch.long))
    assert adv[:, 0].tolist() == pytest.approx([-0.5, -0.5, 1.5, -0.5], rel=3e-6)


@pytest.mark.parametrize(
    "fn",
    [group_mean_std_advantages, group_mean_advantages, leave_one_out_advantages,
     batch_whiten_advantages, batch_mean_advantages],
)
@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, 1e-7])
def test_zero_variance_group_gives_exact_zeros_not_nan(fn, value):
    tr, mask = terminal([value] * 4, [3, 1, 2, 3])
    adv, _ = fn(tr, mask, torch.zeros(4, dtype=torch.long))
    assert not torch.isnan(adv).any()
    assert (adv == 0).all()


def test_zero_variance_group_with_per_token_kl_is_zero_for_grpo():
    # Equal total returns (1 - 0.3) but per-token terms differ: std = 0 -> GRPO gives 0.
    tr = torch.tensor([[-0.1, -0.2, 1.0], [-0.3, 1.0, 0.0]], dtype=D)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]], dtype=D)
    adv, _ = group_mean_std_advantages(tr, mask, torch.zeros(2, dtype=torch.long))
    assert (adv == 0).all()


def test_group_of_one_gives_zero_advantage():
    tr, mask = terminal([1.0, 0.0, 1.0], [2, 2, 2])
    g = torch.tensor([0, 1, 1])
    for fn in (group_mean_std_advantages, group_mean_advantages, leave_one_out_advantages):
        adv, _ = fn(tr, mask, g, eps=0.0)
        assert adv[0].tolist() == [0.0, 0.0]


def test_groups_are_independent_and_ids_need_not_be_sorted():
    rewards = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    ids = torch.tensor([7, 3, 7, 3, 7, 3, 7, 3])
    tr, mask = terminal(rewards, [1] * 8)
    grpo, _ = group_mean_std_advantages(tr, mask, ids, eps=0.0)
    rloo, _ = leave_one_out_advantages(tr, mask, ids)
    for gid in (7, 3):
        members = [i for i in range(8) if ids[i] == gid]
        r = [rewards[i] for i in members]
        mu, sd = statistics.fmean(r), statistics.stdev(r)  # stdev: sample std
        for i in members:
            assert grpo[i, 0].item() == pytest.approx((rewards[i] - mu) / sd, rel=1e-12)
            others = [rewards[j] for j in members if j != i]
            assert rloo[i, 0].item() == pytest.approx(rewards[i] - statistics.fmean(others), rel=1e-12)


# ----------------------------------------------------------------- batch estimators


def test_batch_mean_ignores_groups_and_subtracts_the_batch_mean():
    tr, mask = terminal([1.0, 2.0, 3.0, 6.0], [2, 1, 2, 1])
    adv, _ = batch_mean_advantages(tr, mask, torch.tensor([0, 0, 1, 1]))
    assert adv[:, 0].tolist() == [-2.0, -1.0, 0.0, 3.0]
    assert adv[1, 1].item() == 0.0  # padding


def test_batch_whiten_closed_form():
    tr, mask = terminal([1.0, 2.0, 3.0, 4.0], [1, 1, 1, 1])
    adv, _ = batch_whiten_advantages(tr, mask, torch.tensor([0, 0, 1, 1]), eps=0.0)
    sd = math.sqrt(5.0 / 3.0)  # sample std of 1..4
    assert adv[:, 0].tolist() == pytest.approx([(r - 2.5) / sd for r in (1, 2, 3, 4)], rel=1e-12)


# ----------------------------------------------------------------- reward-to-go and per-token terms


def test_reward_to_go_by_hand_with_discount_padding_and_holes():
    r = torch.tensor([[1.0, 2.0, 3.0, 9.0], [1.0, 7.0, 2.0, 0.0]], dtype=D)
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]], dtype=D)
    g = reward_to_go(r, m, gamma=0.5)
    # Row 0: 3; 2 + 0.5*3 = 3.5; 1 + 0.5*3.5 = 2.75; padding (reward 9 ignored) -> 0.
    assert g[0].tolist() == [2.75, 3.5, 3.0, 0.0]
    # Row 1: the hole at t=1 is skipped, not a step: G_0 = 1 + 0.5 * 2.
    assert g[1].tolist() == [2.0, 0.0, 2.0, 0.0]
    g1 = reward_to_go(r, m, gamma=1.0)
    assert g1.tolist() == [[6.0, 5.0, 3.0, 0.0], [3.0, 0.0, 2.0, 0.0]]


def test_sequence_return_is_the_return_at_the_first_response_token():
    r = torch.tensor([[0.0, 1.0, 2.0], [5.0, 0.0, 0.0]], dtype=D)
    m = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=D)
    assert sequence_returns(reward_to_go(r, m), m).tolist() == [3.0, 5.0]


def test_no_baseline_is_reward_to_go():
    # REINFORCE with per-token KL in the reward: A_t = R - beta * sum_{i >= t} kl_i (ref 000).
    tr = torch.tensor([[-0.1, -0.2, 1.0 - 0.3]], dtype=D)
    mask = torch.ones(1, 3, dtype=D)
    adv, ret = no_baseline_advantages(tr, mask, torch.zeros(1, dtype=torch.long))
    assert torch.allclose(adv, torch.tensor([[0.4, 0.5, 0.7]], dtype=D), rtol=0, atol=1e-15)
    assert torch.equal(adv, ret)


def test_group_baseline_uses_total_returns_and_subtracts_from_per_token_returns():
    # Two sequences, per-token KL terms; totals G_0 = 0.4 and -0.1 -> group mean 0.15.
    tr = torch.tensor([[-0.1, -0.2, 0.7], [-0.1, 0.0, 0.0]], dtype=D)
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]], dtype=D)
    adv, ret = group_mean_advantages(tr, mask, torch.zeros(2, dtype=torch.long))
    expected_ret = torch.tensor([[0.4, 0.5, 0.7], [-0.1, 0.0, 0.0]], dtype=D)
    expected_adv = torch.tensor([[0.25, 0.35, 0.55], [-0.25, 0.0, 0.0]], dtype=D)
    assert torch.allclose(ret, expected_ret, rtol=0, atol=1e-15)
    assert torch.allclose(adv, expected_adv, rtol=0, atol=1e-15)


# ----------------------------------------------------------------- GAE


def test_gae_three_steps_closed_form():
    gamma, lam = 0.9, 0.8
    r = torch.tensor([[0.5, -1.0, 2.0, 0.0]], dtype=D)
    v = torch.tensor([[0.3, 0.1, -0.4, 7.0]], dtype=D)
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=D)
    d0 = 0.5 + gamma * 0.1 - 0.3
    d1 = -1.0 + gamma * -0.4 - 0.1
    d2 = 2.0 + gamma * 0.0 - -0.4  # terminal: V after the last token is 0 (7.0 is padding)
    expected = [d0 + gamma * lam * d1 + (gamma * lam) ** 2 * d2, d1 + gamma * lam * d2, d2, 0.0]
    adv, ret = gae_advantages(r, m, torch.zeros(1, dtype=torch.long), v, gamma=gamma, lam=lam)
    assert adv[0].tolist() == pytest.approx(expected, rel=1e-12)
    assert ret[0].tolist() == pytest.approx([a + b for a, b in zip(expected[:3], [0.3, 0.1, -0.4], strict=True)] + [0.0], rel=1e-12)


@settings(max_examples=40, deadline=None, database=None)
@given(
    st.integers(1, 4),
    st.integers(1, 6),
    st.floats(0.0, 1.0),
    st.integers(0, 2**31 - 1),
)
def test_gae_lambda_one_is_reward_to_go_minus_value_and_lambda_zero_is_td(B, T, gamma, seed):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, generator=gen, dtype=D)
    v = torch.randn(B, T, generator=gen, dtype=D)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    m = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).to(D)
    g = torch.zeros(B, dtype=torch.long)
    a1, ret1 = gae_advantages(r, m, g, v, gamma=gamma, lam=1.0)
    assert torch.allclose(a1, (reward_to_go(r, m, gamma) - v) * m, atol=1e-10)
    assert torch.allclose(ret1, reward_to_go(r, m, gamma), atol=1e-10)
    a0, _ = gae_advantages(r, m, g, v, gamma=gamma, lam=0.0)
    v_next = torch.cat([v[:, 1:] * m[:, 1:], torch.zeros(B, 1, dtype=D)], dim=1)
    td = (r + gamma * v_next - v) * m
    assert torch.allclose(a0, td, atol=1e-12)


def test_gae_needs_values():
    tr, mask = terminal([1.0], [2])
    with pytest.raises(ValueError, match="values"):
        gae_advantages(tr, mask, torch.zeros(1, dtype=torch.long))


def test_gae_detaches_values():
    tr, mask = terminal([1.0], [2])
    v = torch.zeros(1, 2, dtype=D, requires_grad=True)
    adv, ret = gae_advantages(tr, mask, torch.zeros(1, dtype=torch.long), v)
    assert not adv.requires_grad and not ret.requires_grad


# ----------------------------------------------------------------- shared contract


def test_every_estimator_shares_one_signature_and_zeros_padding():
    assert set(ADVANTAGE_ESTIMATORS) == {
        "none", "batch_mean", "batch_whiten", "group_mean", "group_mean_std", "leave_one_out", "gae",
        "remax", "gpg", "opo", "grpo_passk", "grpo_passk_std",
    }
    tr, mask = terminal([1.0, 0.0, 0.5, 2.0], [3, 1, 2, 3])
    values = torch.full_like(tr, 0.25)
    g = torch.tensor([0, 0, 1, 1])
    for name, fn in ADVANTAGE_ESTIMATORS.items():
        extra = {"baseline_rewards": torch.ones(4, dtype=D)} if name == "remax" else {}
        adv, ret = fn(tr, mask, g, values, gamma=1.0, lam=0.9, eps=1e-6, **extra)
        assert adv.shape == ret.shape == tr.shape, name
        assert adv.dtype == D, name
        assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all(), name
        assert torch.isfinite(adv).all(), name


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="group_ids"):
        group_mean_advantages(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="mask"):
        group_mean_advantages(torch.zeros(2, 3), torch.ones(2, 4), torch.zeros(2, dtype=torch.long))


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(st.integers(0, 4), min_size=2, max_size=8))
def test_group_advantages_sum_to_zero_and_rloo_is_k_over_k_minus_1_times_dr_grpo(rewards):
    # Identity: R_i - (S - R_i)/(K-1) = K/(K-1) (R_i - S/K).
    K = len(rewards)
    tr, mask = terminal([float(x) for x in rewards], [1] * K)
    g = torch.zeros(K, dtype=torch.long)
    dr, _ = group_mean_advantages(tr, mask, g)
    rloo, _ = leave_one_out_advantages(tr, mask, g)
    grpo, _ = group_mean_std_advantages(tr, mask, g)
    assert abs(dr.sum().item()) < 1e-12 and abs(rloo.sum().item()) < 1e-12
    assert abs(grpo.sum().item()) < 1e-9
    assert torch.allclose(rloo, dr * K / (K - 1), atol=1e-12)
    if len(set(rewards)) > 1:
        # Sample std of the standardised advantages is 1 (eps aside).
        assert grpo[:, 0].std().item() == pytest.approx(1.0, rel=1e-5)
