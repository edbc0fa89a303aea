"""The estimator registry (core.advantages.ESTIMATORS) against what each function does, and the
new estimators (ReMax, GPG, OPO, pass@k) and the whitening step against hand-computed values."""

import math

import pytest
import torch

from psirl.core.advantages import (
    ESTIMATORS,
    estimator_names,
    gpg_advantages,
    opo_advantages,
    passk_advantages,
    passk_std_advantages,
    remax_advantages,
    whiten_advantages,
)
from psirl.core.masking import place_on_last_token

D = torch.float64


def terminal(rewards, lengths, T=None):
    T = T or max(lengths)
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths], dtype=D)
    return place_on_last_token(torch.tensor(rewards, dtype=D), mask), mask


def _run(name, tr, mask, ids, values=None):
    extra = {}
    if "baseline_rewards" in ESTIMATORS[name].inputs:
        extra["baseline_rewards"] = torch.full((tr.shape[0],), 0.3, dtype=D)
    if values is None and ESTIMATORS[name].needs_values:
        values = torch.full_like(tr, 0.25)
    return ESTIMATORS[name].fn(tr, mask, ids, values, **extra)[0]


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_scope_matches_what_the_function_reads(name):
    """Behaviour, not a list: change rows outside a group and see whether a row's advantage moves.

    rows 0-3 are group 0, rows 4-7 group 1. Changing group 1's rewards must leave group 0's
    advantages unchanged unless the spec says a statistic spans the batch (scope "batch" or
    a batch factor); changing the other members of row 0's own group must move it exactly
    when the scope is "group" or "batch"."""
    spec = ESTIMATORS[name]
    gen = torch.Generator().manual_seed(3)
    base = torch.rand(8, generator=gen, dtype=D) + 0.5
    base[0] = 10.0  # row 0 is its group's best (pass@k pushes only the best)
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    lengths = [3, 2, 3, 1, 2, 3, 3, 1]
    a = _run(name, *terminal(base.tolist(), lengths), ids)
    other = base.clone()
    other[4:] = other[4:] * 3 + 1
    other[4:6] = 0.0  # also changes the batch's count of non-zero rewards (GPG's alpha)
    b = _run(name, *terminal(other.tolist(), lengths), ids)
    moved_by_other_group = not torch.allclose(a[:4], b[:4], atol=1e-12)
    assert moved_by_other_group == spec.global_statistics, name
    same = base.clone()
    same[1:4] = same[1:4] * 2 + 0.7
    c = _run(name, *terminal(same.tolist(), lengths), ids)
    moved_by_own_group = not torch.allclose(a[0], c[0], atol=1e-12)
    assert moved_by_own_group == (spec.scope in ("group", "batch")), name


def test_scopes_partition_the_registry():
    names = [n for s in ("sequence", "group", "batch", "critic") for n in estimator_names(scope=s)]
    assert sorted(names) == sorted(ESTIMATORS)
    assert estimator_names(std_scaled=True) == ("batch_whiten", "group_mean_std", "grpo_passk_std")
    for name, spec in ESTIMATORS.items():
        assert spec.bias, name
        assert spec.unbiased == (spec.scale is not None), name


def test_remax_subtracts_the_greedy_reward():
    tr, mask = terminal([1.0, 0.0, 2.0], [2, 1, 3])
    adv, ret = remax_advantages(tr, mask, torch.tensor([0, 0, 1]),
                                baseline_rewards=torch.tensor([0.5, 0.5, 3.0], dtype=D))
    assert torch.allclose(adv[:, 0], torch.tensor([0.5, -0.5, -1.0], dtype=D))
    assert (adv[mask == 0] == 0).all()
    with pytest.raises(ValueError, match="baseline_rewards"):
        remax_advantages(tr, mask, torch.tensor([0, 0, 1]))


def test_gpg_scales_dr_grpo_by_batch_over_nonzero_count():
    # Group 0: R = [1, 0] -> mean 0.5; group 1: R = [0, 0] -> 0. Non-zero rewards: 1 of 4,
    # alpha = 4 / 1 = 4: A = [2, -2, 0, 0].
    tr, mask = terminal([1.0, 0.0, 0.0, 0.0], [1, 2, 1, 1])
    adv, _ = gpg_advantages(tr, mask, torch.tensor([0, 0, 1, 1]))
    assert torch.allclose(adv[:, 0], torch.tensor([2.0, -2.0, 0.0, 0.0], dtype=D))
    # reduce: a second rank with 4 rows of which 3 are non-zero -> alpha = 8 / 4 = 2.
    adv2, _ = gpg_advantages(tr, mask, torch.tensor([0, 0, 1, 1]),
                             reduce=lambda x: x + torch.tensor([4.0, 3.0], dtype=D))
    assert torch.allclose(adv2[:, 0], torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=D))


def test_opo_baseline_is_length_weighted():
    # Group: R = [1, 0] with lengths [3, 1] -> b = (3*1 + 1*0) / 4 = 0.75.
    tr, mask = terminal([1.0, 0.0, 1.0, 2.0], [3, 1, 2, 3])
    adv, _ = opo_advantages(tr, mask, torch.tensor([0, 0, 1, 1]))
    # Group 1: R = [1, 2], lengths [2, 3] -> b = (2 + 6) / 5 = 1.6.
    assert torch.allclose(adv[:, 0], torch.tensor([0.25, -0.75, -0.6, 0.4], dtype=D))


def test_passk_pushes_only_the_best_sample_by_its_margin():
    tr, mask = terminal([0.2, 0.9, 0.5, 1.0, 1.0, 0.0], [1] * 6)
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    adv, _ = passk_advantages(tr, mask, ids)
    # group 0: best 0.9, runner-up 0.5 -> 0.4 on row 1; group 1: tie at 1.0 -> 0 for both.
    assert torch.allclose(adv[:, 0], torch.tensor([0, 0.4, 0, 0, 0, 0], dtype=D))
    std, _ = passk_std_advantages(tr, mask, ids, eps=0.0)
    s0 = torch.tensor([0.2, 0.9, 0.5], dtype=D).std()
    assert math.isclose(float(std[1, 0]), 0.4 / float(s0), rel_tol=1e-12)
    with pytest.raises(ValueError, match="2 samples"):
        passk_advantages(tr[:1], mask[:1], ids[:1])


def test_passk_expectation_is_the_gradient_weight_of_best_of_g():
    """Exact enumeration: with G i.i.d. draws from a discrete distribution p over rewards r,
    E[sum_i A_i d log p(y_i)/d p_k] must equal d E[max_j r_j] / d p_k (score-function identity),
    i.e. sum over all G-tuples of prod p * sum_i A_i [y_i = k] / p_k."""
    import itertools

    r = torch.tensor([0.0, 0.3, 1.0], dtype=D)
    p = torch.tensor([0.5, 0.3, 0.2], dtype=D, requires_grad=True)
    G = 3
    cdf = torch.cumsum(p, 0)
    e_max = (r * (cdf ** G - torch.cat([torch.zeros(1, dtype=D), cdf[:-1]]) ** G)).sum()
    (grad,) = torch.autograd.grad(e_max, p)
    expected = torch.zeros(3, dtype=D)
    pd = p.detach()
    for ys in itertools.product(range(3), repeat=G):
        tr, mask = terminal([float(r[y]) for y in ys], [1] * G)
        adv, _ = passk_advantages(tr, mask, torch.zeros(G, dtype=torch.long))
        weight = math.prod(float(pd[y]) for y in ys)
        for i, y in enumerate(ys):
            expected[y] += weight * float(adv[i, 0]) / float(pd[y])
    # d/dp_k along the simplex: compare after removing the common component.
    assert torch.allclose(expected - expected.mean(), grad - grad.mean(), atol=1e-12)


def test_batch_whitening_is_verl_masked_whiten():
    a = torch.tensor([[1.0, 2.0, 0.0], [4.0, 0.0, 0.0]], dtype=D)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=D)
    out = whiten_advantages(a, mask, torch.tensor([0, 1]), "batch", eps=0.0)
    vals = torch.tensor([1.0, 2.0, 4.0], dtype=D)  # mean 7/3, unbiased var 7/3
    want = (vals - vals.mean()) / vals.std()
    assert torch.allclose(out[mask > 0], want, atol=1e-12)
    assert (out[mask == 0] == 0).all()
    # reduce: another rank holding tokens [0, 0, 5] -> global stats over 6 tokens.
    other = torch.tensor([0.0, 0.0, 5.0], dtype=D)
    everything = torch.cat([vals, other])

    def reduce(x):
        if x.numel() == 2:
            return x + torch.tensor([3.0, 5.0], dtype=D)
        mean = everything.mean()
        return x + ((other - mean) ** 2).sum().reshape(1)

    out2 = whiten_advantages(a, mask, torch.tensor([0, 1]), "batch", eps=0.0, reduce=reduce)
    want2 = (vals - everything.mean()) / everything.std()
    assert torch.allclose(out2[mask > 0], want2, atol=1e-12)


def test_group_whitening_uses_each_groups_tokens():
    a = torch.tensor([[1.0, 3.0], [5.0, 0.0], [2.0, 2.0]], dtype=D)
    mask = torch.tensor([[1, 1], [1, 0], [1, 0]], dtype=D)
    out = whiten_advantages(a, mask, torch.tensor([0, 0, 1]), "group", eps=0.0)
    g0 = torch.tensor([1.0, 3.0, 5.0], dtype=D)
    assert torch.allclose(out[:2][mask[:2] > 0], (g0 - 3.0) / g0.std(), atol=1e-12)
    assert out[2, 0] == 0  # one token: no spread, exactly 0
    assert torch.equal(whiten_advantages(a, mask, torch.tensor([0, 0, 1]), "none"), a * mask)
    with pytest.raises(ValueError, match="whiten mode"):
        whiten_advantages(a, mask, torch.tensor([0, 0, 1]), "global")
