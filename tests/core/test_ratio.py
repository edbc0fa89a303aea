"""Importance ratios: on-policy value/gradient, token ratio, GSPO sequence ratio and its gradient."""

import pytest
import torch

from psirl.core.aggregate import aggregate_loss
from psirl.core.ratio import RATIO_LEVELS, importance_log_ratio, importance_ratio

D = torch.float64
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]], dtype=D)


def leaf(values):
    return torch.tensor(values, dtype=D, requires_grad=True)


LOGP = [[-0.5, -1.0, -2.0, -0.1], [-0.3, -0.7, -0.2, -0.9]]
OLD = [[-0.6, -0.8, -2.5, -9.0], [-0.3, -1.0, -0.2, -0.4]]


def test_levels():
    assert RATIO_LEVELS == ("on_policy", "token", "sequence")


def test_on_policy_ratio_is_one_with_the_gradient_of_log_pi():
    logp = leaf(LOGP)
    r = importance_ratio(logp, torch.full_like(logp, 123.0), MASK, "on_policy")
    assert torch.equal(r, torch.ones_like(r))
    weights = torch.arange(8, dtype=D).reshape(2, 4)
    (r * weights).sum().backward()
    assert torch.equal(logp.grad, weights * MASK)  # d r / d log pi = r = 1 on response tokens


def test_token_ratio_value_and_gradient():
    logp, old = leaf(LOGP), torch.tensor(OLD, dtype=D)
    r = importance_ratio(logp, old, MASK, "token")
    expected = torch.exp(torch.tensor(LOGP, dtype=D) - old) * MASK + (1 - MASK)
    assert torch.allclose(r, expected, rtol=1e-15, atol=0)
    r.sum().backward()
    assert torch.allclose(logp.grad, (expected * MASK), rtol=1e-15, atol=0)


def test_sequence_ratio_equals_exp_of_masked_mean_log_ratio_on_every_token():
    logp, old = leaf(LOGP), torch.tensor(OLD, dtype=D)
    r = importance_ratio(logp, old, MASK, "sequence")
    s0 = torch.exp(torch.tensor((0.1 - 0.2 + 0.5) / 3, dtype=D))  # mean of (logp - old), row 0
    s1 = torch.exp(torch.tensor((0.0 + 0.3) / 2, dtype=D))  # row 1
    assert torch.allclose(r[0, :3], s0.expand(3), rtol=1e-14, atol=0)
    assert torch.allclose(r[1, :2], s1.expand(2), rtol=1e-14, atol=0)
    assert r[0, 3].item() == 1.0 and r[1, 2:].tolist() == [1.0, 1.0]


def test_sequence_ratio_gradient_is_each_tokens_score_scaled_by_the_sequence_ratio():
    logp, old = leaf(LOGP), torch.tensor(OLD, dtype=D)
    r = importance_ratio(logp, old, MASK, "sequence")
    # d r_{i,t} / d logp_{i,t'} = s_i * [t == t'] (GSPO-token stop-gradient).
    r[0, 1].backward()
    expected = torch.zeros(2, 4, dtype=D)
    expected[0, 1] = r[0, 1].item()
    assert torch.allclose(logp.grad, expected, rtol=1e-14, atol=0)


def test_gspo_token_with_per_sequence_mean_matches_gspos_sequence_objective_gradient():
    # GSPO: J = (1/G) sum_i s_i(theta) A_i with s_i = exp(mean_t log r_{i,t}); its gradient
    # must equal that of the per-token form aggregated seq-mean-token-mean.
    adv_seq = torch.tensor([0.7, -1.3], dtype=D)
    old = torch.tensor(OLD, dtype=D)
    logp_a = leaf(LOGP)
    r = importance_ratio(logp_a, old, MASK, "sequence")
    per_token = -r * adv_seq.unsqueeze(1)
    aggregate_loss(per_token, MASK, "seq_mean_token_mean", 2.0).backward()

    logp_b = leaf(LOGP)
    lr = (logp_b - old) * MASK
    s = torch.exp(lr.sum(1) / MASK.sum(1))
    (-(s * adv_seq).sum() / 2.0).backward()
    assert torch.allclose(logp_a.grad, logp_b.grad, rtol=1e-13, atol=1e-15)


def test_padding_with_minus_inf_gives_no_nan():
    logp = leaf([[-0.5, -float("inf")]])
    old = torch.tensor([[-0.4, -float("inf")]], dtype=D)
    m = torch.tensor([[1.0, 0.0]], dtype=D)
    for level in RATIO_LEVELS:
        r = importance_ratio(logp, old, m, level)
        r.sum().backward()
        assert torch.isfinite(r).all() and torch.isfinite(logp.grad).all(), level
        logp.grad = None


def test_unknown_level_is_an_error():
    with pytest.raises(ValueError, match="ratio level"):
        importance_log_ratio(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), "tokens")
