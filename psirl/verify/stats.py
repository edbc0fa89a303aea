"""Statistics for comparing a sampled gradient with an exact one.

A policy-gradient estimator is run on M independent batches, giving M i.i.d. gradient vectors
g_1..g_M in R^d. "The estimator is unbiased" is the hypothesis H0: E[g] = mu (mu = the exact
gradient, times a known constant). It is tested with Hotelling's T^2:

    gbar = (1/M) sum_m g_m,   S = (1/(M-1)) sum_m (g_m - gbar)(g_m - gbar)^T
    T^2  = M (gbar - mu)^T S^{-1} (gbar - mu)
    F    = (M - d) / (d (M - 1)) * T^2  ~  F(d, M - d)   under H0

(exact for Gaussian g; by the central limit theorem the test is asymptotically exact for any
g with finite variance as M grows with d fixed -- here M >= 2000, d <= 52). The p-value is the
F survival function, computed with the regularised incomplete beta function. Rejecting when
p < alpha has false-positive rate alpha per test; when n tests are run together, alpha =
alpha_family / n (Bonferroni) keeps the chance of *any* false alarm below alpha_family.

Gradients of a tabular softmax policy have rows that sum to zero (log-softmax is invariant to
adding a constant to a row), so their covariance is singular along the all-ones direction of
every row, and prefixes that are never visited have identically zero gradient. ``reduce``
maps a [.., n_prefixes, V] gradient to coordinates in an orthonormal basis of the reachable,
zero-sum subspace (d = n_reachable * (V - 1)); Euclidean norms and inner products of
zero-sum gradients are preserved.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "zero_sum_basis",
    "reduce",
    "orthogonal_complement",
    "hotelling_test",
    "f_survival",
    "bonferroni_alpha",
]


def zero_sum_basis(v: int) -> Tensor:
    """Orthonormal basis Q [V, V-1] float64 of {x in R^V : sum_a x_a = 0} (Q^T Q = I)."""
    centred = torch.eye(v, dtype=torch.float64) - 1.0 / v
    q, _ = torch.linalg.qr(centred[:, : v - 1])
    return q


def reduce(grad: Tensor, reachable: Tensor) -> Tensor:
    """Coordinates of zero-sum-row gradients in the reachable zero-sum subspace.

    grad: [..., n_prefixes, V] float; reachable: [n_prefixes] bool.
    Returns [..., n_reachable * (V - 1)] float64:  x = vec( grad[..., reachable, :] @ Q ).
    For rows that sum to zero, ||x|| = ||grad|| and <x, y> = <grad_x, grad_y>.
    """
    q = zero_sum_basis(grad.shape[-1])
    sub = grad[..., reachable, :].to(torch.float64) @ q
    return sub.reshape(*grad.shape[:-2], -1)


def orthogonal_complement(u: Tensor) -> Tensor:
    """Orthonormal basis [d, d-1] float64 of the complement of the direction u [d] (u != 0)."""
    d = u.shape[0]
    first = (u / u.norm()).to(torch.float64).unsqueeze(1)
    q, _ = torch.linalg.qr(torch.cat([first, torch.eye(d, dtype=torch.float64)], dim=1))
    return q[:, 1:d]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction for the incomplete beta function (modified Lentz, Numerical Recipes)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for a, b > 0, 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def f_survival(f: float, d1: int, d2: int) -> float:
    """P(F > f) for F ~ F(d1, d2):  I_{d2 / (d2 + d1 f)}(d2 / 2, d1 / 2)."""
    if f <= 0.0:
        return 1.0
    return _betainc(d2 / 2.0, d1 / 2.0, d2 / (d2 + d1 * f))


def hotelling_test(samples: Tensor, mu: Tensor) -> tuple[float, int, float]:
    """One-sample Hotelling T^2 test of H0: E[samples] = mu.

    samples: [M, d] float (i.i.d. rows), mu: [d]. Requires M > d + 1 and S non-singular.
    Returns (T^2, d, p) with p = P(F(d, M-d) > (M-d)/(d(M-1)) T^2) (see module docstring).
    """
    m, d = samples.shape
    if m <= d + 1:
        raise ValueError(f"hotelling_test needs more samples than dimensions + 1, got M={m}, d={d}")
    x = samples.to(torch.float64)
    mean = x.mean(0)
    centred = x - mean
    cov = centred.T @ centred / (m - 1)
    diff = (mean - mu.to(torch.float64)).unsqueeze(1)
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0:
        raise ValueError(
            f"hotelling_test: the sample covariance ({d} x {d}, from M={m} samples) is singular; "
            "use more batches, or drop coordinates that never vary"
        )
    y = torch.linalg.solve_triangular(chol, diff, upper=False)
    t2 = float(m * (y * y).sum())
    f = (m - d) / (d * (m - 1)) * t2
    return t2, d, f_survival(f, d, m - d)


def bonferroni_alpha(alpha_family: float, n_tests: int) -> float:
    """Per-test level alpha_family / n_tests: P(any false rejection among n) <= alpha_family."""
    return alpha_family / max(n_tests, 1)
