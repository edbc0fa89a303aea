"""pass@k against exact enumeration of k-subsets and the closed form 1 - C(n-c,k)/C(n,k)."""

import itertools
import math

import pytest

from psirl.core.passk import mean_pass_at_k, pass_at_k


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_enumeration_and_closed_form(n):
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            enumerated = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
            closed = 1 - math.comb(n - c, k) / math.comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(enumerated, abs=1e-12)
            assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)


def test_worked_values_and_mean():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)
    assert pass_at_k(200, 0, 100) == 0.0
    assert mean_pass_at_k([0, 4], 4, 1) == pytest.approx(0.5)


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="k must be in"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, 5, 1)
