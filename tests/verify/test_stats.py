"""The statistics: F survival function by known quantiles, Hotelling calibration and power."""

import torch

from psirl.verify.stats import (
    bonferroni_alpha,
    f_survival,
    hotelling_test,
    orthogonal_complement,
    reduce,
    zero_sum_basis,
)


def test_f_survival_known_quantiles():
    # F(1, n) = t_n^2: two-sided 5% point of t_10 is 2.2281
    assert abs(f_survival(2.2281389**2, 1, 10) - 0.05) < 1e-6
    # F(5, 10) upper 5% point 3.3258, F(2, 20) upper 1% point 5.8489
    assert abs(f_survival(3.3258345, 5, 10) - 0.05) < 1e-6
    assert abs(f_survival(5.8489319, 2, 20) - 0.01) < 1e-6
    # d1 F(d1, inf) = chi2_d1; P(chi2_2 > x) = exp(-x / 2)
    assert abs(f_survival(3.0, 2, 10**9) - torch.exp(torch.tensor(-3.0)).item()) < 1e-6
    assert f_survival(0.0, 3, 7) == 1.0


def test_hotelling_false_positive_rate_and_power():
    """Under H0 the rejection rate at alpha = 0.05 is 0.05; a 0.3-sd shift is always seen."""
    gen = torch.Generator().manual_seed(0)
    d, m, reps = 4, 60, 2000
    cov_root = torch.tensor([[1.0, 0, 0, 0], [0.5, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0.3, 0.1]])
    rejections = 0
    for _ in range(reps):
        x = torch.randn(m, d, generator=gen, dtype=torch.float64) @ cov_root.T.double()
        rejections += hotelling_test(x, torch.zeros(d, dtype=torch.float64))[2] < 0.05
    # binomial(2000, 0.05): mean 100, sd 9.7
    assert 70 <= rejections <= 130
    x = torch.randn(400, d, generator=gen, dtype=torch.float64)
    assert hotelling_test(x + 0.3, torch.zeros(d, dtype=torch.float64))[2] < 1e-6


def test_zero_sum_basis_and_reduce_preserve_geometry():
    q = zero_sum_basis(4)
    assert torch.allclose(q.T @ q, torch.eye(3, dtype=torch.float64))
    assert torch.allclose(q.sum(0), torch.zeros(3, dtype=torch.float64))
    g = torch.randn(5, 4, dtype=torch.float64)
    g = g - g.mean(1, keepdim=True)
    reachable = torch.tensor([True, False, True, True, True])
    x = reduce(g, reachable)
    assert x.shape == (4 * 3,)
    assert torch.allclose(x.norm(), g[reachable].norm())
    u = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    b = orthogonal_complement(u)
    assert torch.allclose(b.T @ b, torch.eye(2, dtype=torch.float64))
    assert torch.allclose(u @ b, torch.zeros(2, dtype=torch.float64))


def test_bonferroni():
    assert bonferroni_alpha(0.01, 100) == 1e-4
