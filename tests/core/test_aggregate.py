"""Aggregation modes by hand, and micro-batch invariance of loss and gradient for every mode."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from psirl.core.aggregate import (
    AGGREGATION_MODES,
    aggregate_loss,
    normaliser_count,
    normaliser_from_count,
    step_normaliser,
)

D = torch.float64
# Three sequences of lengths 1, 2, 3 plus an empty row (a padding sequence).
L = torch.tensor(
    [[6.0, 99.0, 99.0], [1.0, 3.0, 99.0], [2.0, 4.0, 6.0], [99.0, 99.0, 99.0]], dtype=D
)
M = torch.tensor([[1.0, 0, 0], [1, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=D)


def test_modes():
    assert AGGREGATION_MODES == (
        "token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant",
    )


@pytest.mark.parametrize(
    ("mode", "constant", "normaliser", "loss"),
    [
        # 6 tokens summing to 22.
        ("token_mean", None, 6.0, 22.0 / 6.0),
        # per-sequence means 6, 2, 4 over 3 non-empty sequences.
        ("seq_mean_token_mean", None, 3.0, 4.0),
        # per-sequence sums 6, 4, 12 over 3 sequences.
        ("seq_mean_token_sum", None, 3.0, 22.0 / 3.0),
        # Dr. GRPO: sums over (3 sequences * C = 10).
        ("constant", 10.0, 30.0, 22.0 / 30.0),
    ],
)
def test_each_mode_by_hand(mode, constant, normaliser, loss):
    n = step_normaliser(M, mode, constant=constant)
    assert n == normaliser
    assert aggregate_loss(L, M, mode, n).item() == pytest.approx(loss, rel=1e-15)


def test_step_normaliser_accepts_micro_batch_masks_of_different_widths():
    parts = [M[:2, :2], M[2:, :]]
    for mode in AGGREGATION_MODES:
        assert step_normaliser(parts, mode, constant=4.0) == step_normaliser(M, mode, constant=4.0)


@pytest.mark.parametrize(
    ("mode", "counts", "normaliser"),
    [
        # Rank 0 holds the length-1 sequence, rank 1 lengths 2, 3 and the empty row, rank 2 nothing.
        ("token_mean", (1.0, 5.0, 0.0), 6.0),
        ("seq_mean_token_mean", (1.0, 2.0, 0.0), 3.0),
        ("seq_mean_token_sum", (1.0, 2.0, 0.0), 3.0),
        ("constant", (1.0, 2.0, 0.0), 30.0),
    ],
)
def test_counts_of_disjoint_parts_add_up_to_the_step_normaliser(mode, counts, normaliser):
    """Data parallelism: each rank's count, summed (an all-reduce), gives the whole step's
    normaliser; an empty part counts 0, and only the total is clamped to >= 1."""
    parts = [M[:1], M[1:], M[:0]]
    assert tuple(normaliser_count(p, mode) for p in parts) == counts
    assert normaliser_from_count(sum(counts), mode, constant=10.0) == normaliser
    assert step_normaliser(M, mode, constant=10.0) == normaliser
    assert normaliser_from_count(0.0, mode, constant=10.0) == (10.0 if mode == "constant" else 1.0)


def test_empty_step_divides_by_one_and_constant_needs_a_value():
    z = torch.zeros(2, 3)
    assert step_normaliser(z, "token_mean") == 1.0
    assert aggregate_loss(torch.ones(2, 3), z, "token_mean", 1.0).item() == 0.0
    with pytest.raises(ValueError, match="constant_normaliser"):
        step_normaliser(M, "constant")
    with pytest.raises(ValueError, match="constant_normaliser"):
        normaliser_from_count(3.0, "constant")
    with pytest.raises(ValueError, match="aggregation mode"):
        step_normaliser(M, "mean")
    with pytest.raises(ValueError, match="normaliser"):
        aggregate_loss(L, M, "token_mean", 0.0)


def _per_token_loss(theta, x):
    # A smooth, non-linear function of shared parameters so the gradient mixes all tokens.
    return torch.sin(x * theta[0]) + theta[1] * x**2


def _random_step(seed, B, T):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, generator=gen, dtype=D)
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).to(D)
    return x, mask


def _full_and_split(mode, x, mask, bounds, trim):
    theta = torch.tensor([0.7, -0.3], dtype=D, requires_grad=True)
    n = step_normaliser(mask, mode, constant=5.0)
    full = aggregate_loss(_per_token_loss(theta, x), mask, mode, n)
    (g_full,) = torch.autograd.grad(full, theta)
    total = torch.zeros((), dtype=D)
    g_sum = torch.zeros(2, dtype=D)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        xm, mm = x[lo:hi], mask[lo:hi]
        if trim:  # each micro-batch padded only to its own longest response
            width = int(mm.sum(1).max().item()) if mm.numel() else 0
            xm, mm = xm[:, : max(width, 1)], mm[:, : max(width, 1)]
        part = aggregate_loss(_per_token_loss(theta, xm), mm, mode, n)
        (g,) = torch.autograd.grad(part, theta)
        total, g_sum = total + part.detach(), g_sum + g
    return full.detach(), g_full, total, g_sum


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_micro_batches_with_the_step_normaliser_sum_to_the_full_batch(mode, k):
    x, mask = _random_step(seed=k, B=7, T=6)
    bounds = torch.linspace(0, 7, k + 1).round().long().tolist()
    full, g_full, total, g_sum = _full_and_split(mode, x, mask, bounds, trim=True)
    assert total.item() == pytest.approx(full.item(), abs=1e-6, rel=0)
    assert torch.allclose(g_sum, g_full, atol=1e-6, rtol=0)
    assert abs(total.item() - full.item()) < 1e-12  # in float64 it is exact up to rounding


@settings(max_examples=30, deadline=None, database=None)
@given(
    st.sampled_from(AGGREGATION_MODES),
    st.integers(2, 9),
    st.integers(1, 6),
    st.integers(0, 2**31 - 1),
    st.data(),
)
def test_micro_batch_invariance_for_random_splits(mode, B, T, seed, data):
    x, mask = _random_step(seed, B, T)
    cuts = sorted(data.draw(st.sets(st.integers(1, B - 1), max_size=B - 1)))
    full, g_full, total, g_sum = _full_and_split(mode, x, mask, [0, *cuts, B], trim=False)
    assert abs(total.item() - full.item()) < 1e-10
    assert torch.allclose(g_sum, g_full, atol=1e-10, rtol=0)


def test_averaging_micro_batch_means_is_not_the_full_batch_loss():
    # The bug the step normaliser prevents (TRL #5619): per-micro-batch token means, averaged.
    full = aggregate_loss(L, M, "token_mean", step_normaliser(M, "token_mean"))
    a, b = (L[:1], M[:1]), (L[1:], M[1:])  # token means 6 and 16/5, averaged: 4.6 != 22/6
    naive = 0.5 * sum(aggregate_loss(l_, m_, "token_mean", step_normaliser(m_, "token_mean"))
                      for l_, m_ in (a, b))
    assert naive.item() != pytest.approx(full.item())
