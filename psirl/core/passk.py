"""pass@k: the probability that at least one of k samples is correct, estimated from n >= k.

Unbiased estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1):
with n samples per problem of which c are correct,

    pass@k = 1 - C(n - c, k) / C(n, k)

(the chance that k draws without replacement from the n samples contain a correct one); the
benchmark's pass@k is its mean over problems. Computed as a running product
prod_{i = n - c + 1}^{n} (1 - k / i) for numerical stability with large n.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["pass_at_k", "mean_pass_at_k"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from ``n`` samples with ``c`` correct (0 <= c <= n, k <= n)."""
    if not (0 <= c <= n) or n < 1:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and n >= 1, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k must be in [1, n={n}], got k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def mean_pass_at_k(correct_counts: Sequence[int], n: int, k: int) -> float:
    """Mean over problems of pass_at_k(n, c_i, k); ``correct_counts`` holds one c_i per problem."""
    if not correct_counts:
        raise ValueError("mean_pass_at_k: no problems")
    return sum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts)
