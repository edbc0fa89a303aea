"""Masked reductions: hand-computed values, padding that holds NaN/-inf, last-token placement."""

import math
import statistics

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from psirl.core.masking import (
    first_token_index,
    last_token_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    place_on_last_token,
    token_counts,
)

X = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, -7.0]])
M = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])


def test_masked_sum_and_mean_by_hand():
    assert masked_sum(X, M).item() == 15.0
    assert masked_sum(X, M, dim=1).tolist() == [6.0, 9.0]
    assert masked_mean(X, M).item() == 3.0
    assert masked_mean(X, M, dim=1).tolist() == [2.0, 4.5]


def test_bool_mask_is_accepted():
    assert masked_mean(X, M.bool()).item() == 3.0


def test_all_masked_row_has_mean_zero_not_nan():
    out = masked_mean(X, torch.tensor([[0.0] * 4, [1.0, 0, 0, 0]]), dim=1)
    assert out.tolist() == [0.0, 4.0]


def test_padding_with_nan_and_inf_does_not_leak_into_value_or_gradient():
    x = torch.tensor([[1.0, 2.0, float("nan"), -float("inf")]], requires_grad=True)
    m = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    s = masked_sum(x, m)
    s.backward()
    assert s.item() == 3.0
    assert x.grad.tolist() == [[1.0, 1.0, 0.0, 0.0]]


def test_masked_var_unbiased_and_biased_closed_form():
    # Entries 1, 2, 3, 4, 5: mean 3, squared deviations sum to 10 -> 10/4 and 10/5.
    assert masked_var(X, M, unbiased=True).item() == 2.5
    assert masked_var(X, M, unbiased=False).item() == 2.0
    # Per row: [1,2,3] -> 1.0; [4,5] -> 0.5
    assert masked_var(X, M, dim=1).tolist() == [1.0, 0.5]


def test_masked_var_of_one_entry_is_zero_not_nan():
    one = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert masked_var(X, one).item() == 0.0
    assert masked_var(X, one, dim=1).tolist() == [0.0, 0.0]


def test_masked_whiten_has_zero_mean_unit_variance_and_zero_padding():
    w = masked_whiten(X.double(), M.double(), eps=0.0)
    assert abs(masked_mean(w, M.double()).item()) < 1e-12
    assert abs(masked_var(w, M.double()).item() - 1.0) < 1e-12
    assert w[0, 3].item() == 0.0 and w[1, 2].item() == 0.0
    # Closed form: (x - 3) / sqrt(2.5)
    assert math.isclose(w[0, 0].item(), (1 - 3) / math.sqrt(2.5), rel_tol=1e-12)


def test_masked_whiten_without_shift_keeps_the_mean():
    w = masked_whiten(X.double(), M.double(), shift_mean=False, eps=0.0)
    assert math.isclose(masked_mean(w, M.double()).item(), 3.0, rel_tol=1e-12)


def test_first_and_last_token_index_on_ragged_and_holey_masks():
    m = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 1], [0, 0, 0, 0], [0, 0, 0, 1]])
    assert first_token_index(m).tolist() == [0, 1, 0, 3]
    assert last_token_index(m).tolist() == [2, 3, 0, 3]
    assert token_counts(m).tolist() == [3.0, 2.0, 0.0, 1.0]


def test_place_on_last_token():
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    out = place_on_last_token(torch.tensor([5.0, -1.0, 9.0]), m)
    assert out.tolist() == [[0.0, 5.0, 0.0], [0.0, 0.0, -1.0], [0.0, 0.0, 0.0]]


def test_place_on_last_token_rejects_bad_shapes():
    import pytest

    with pytest.raises(ValueError, match="values must be"):
        place_on_last_token(torch.zeros(2, 1), torch.ones(2, 3))


@settings(max_examples=50, deadline=None, database=None)
@given(
    st.lists(
        st.tuples(st.floats(-1e3, 1e3), st.booleans()), min_size=1, max_size=12
    ).filter(lambda xs: sum(k for _, k in xs) >= 2)
)
def test_masked_mean_and_var_match_the_statistics_module(entries):
    x = torch.tensor([v for v, _ in entries], dtype=torch.float64)
    m = torch.tensor([float(k) for _, k in entries], dtype=torch.float64)
    kept = [v for v, k in entries if k]
    assert math.isclose(masked_mean(x, m).item(), statistics.fmean(kept), rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(
        masked_var(x, m).item(), statistics.variance(kept), rel_tol=1e-7, abs_tol=1e-7
    )
